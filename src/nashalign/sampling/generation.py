"""What every sampling backend shares: the `Generation` record, the `Sampler` protocol, the settings
every sampler checks (`SamplerSettings`), per-sample seeds, the EOS ids a model stops on and cutting a
decoded row at its first EOS. The backends (nashalign.sampling.engines, nashalign.sampling.vllm_engine)
import this module; it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, Protocol

import numpy as np

from nashalign import NashalignError
from nashalign.models.loader import load_generation_config

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    """One sampled response.

    `token_ids` are the response tokens only: no prompt, no padding, and not the stop token itself;
    `text` is their decoding. `finish_reason` is "stop" when the model produced an EOS token right
    after `token_ids` and "length" when `max_new_tokens` tokens were produced without one.
    `stop_token_id` is the EOS id that ended the response (a model may stop on several: Llama 3
    lists <|end_of_text|> and <|eot_id|> in its generation config), None for "length".
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stop_token_id: int | None

    @property
    def response_ids(self) -> list[int]:
        """What the policy produced, as pairs are scored and trained on: `token_ids`, then the stop
        token that ended them (none after a response cut by max_new_tokens)."""
        return self.token_ids + ([] if self.stop_token_id is None else [self.stop_token_id])

    @classmethod
    def from_row(cls, row: Mapping[str, Any], default_stop_id: int) -> Generation:
        """A Generation from its dict form (a row of generations.jsonl). Rows written before stop
        tokens were recorded have no `stop_token_id`: a stopped one gets `default_stop_id`."""
        fields = {key: row[key] for key in ("prompt_index", "sample_index", "text", "token_ids", "finish_reason")}
        stop = row.get("stop_token_id", default_stop_id if row["finish_reason"] == "stop" else None)
        return cls(**fields, stop_token_id=stop)


class Sampler(Protocol):
    def generate(
        self,
        prompts: list[str],
        n: int,
        *,
        progress: bool = True,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[list[Generation]]: ...

    def update_weights(self, model) -> None: ...


def sample_seed(seed: int, prompt_key: int, sample_index: int | None = None) -> int:
    """A 63-bit seed derived from (seed, prompt, sample) with numpy's SeedSequence (well mixed, stable)."""
    entropy = [seed, prompt_key] if sample_index is None else [seed, prompt_key, sample_index]
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) >> 1


class SamplerSettings:
    """The settings every backend's sampler holds, checked when it is built and before each
    `generate` (the online loop changes `seed` between calls): response length limit, temperature
    (0: greedy), nucleus mass and seed."""

    def __init__(self, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0):
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.check_settings()
        self.temperature, self.top_p = float(temperature), float(top_p)

    def check_settings(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise NashalignError(f"sampling: max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise NashalignError(f"sampling: temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise NashalignError(f"sampling: top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise NashalignError(f"sampling: seed must be a non-negative integer, got {self.seed!r}")


def check_generate_args(prompts, n, prompt_indices) -> list[int]:
    if not isinstance(n, int) or n < 1:
        raise NashalignError(f"sampling: n (samples per prompt) must be an integer >= 1, got {n!r}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise NashalignError(f"sampling: prompt {i} must be a non-empty string, got {prompt!r}")
    keys = list(range(len(prompts))) if prompt_indices is None else [int(k) for k in prompt_indices]
    if len(keys) != len(prompts):
        raise NashalignError(
            f"sampling: prompt_indices has {len(keys)} entries but there are {len(prompts)} prompts"
        )
    if len(set(keys)) != len(keys) or any(k < 0 for k in keys):
        raise NashalignError("sampling: prompt_indices must be distinct non-negative integers")
    return keys


def eos_token_ids(model, tokenizer) -> list[int]:
    """The model's EOS ids (its generation config may list several), else the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise NashalignError("sampling: the tokenizer has no eos_token and the model config names none")
    return ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """The EOS ids generation from `model` (a ModelSpec, a directory or a hub name) stops on: its
    generation config's `eos_token_id` (one id or a list), then the tokenizer's EOS."""
    return eos_token_ids(SimpleNamespace(generation_config=load_generation_config(model)), tokenizer)


def finish(
    new_ids: Sequence[int], eos_ids: Sequence[int], max_new_tokens: int, tokenizer
) -> tuple[str, list[int], FinishReason, int | None]:
    """Cut the generated ids at the first EOS; everything after it (padding) is dropped. Returns the
    text, the kept ids, the finish reason and the EOS id that stopped the response (or None)."""
    ids = list(new_ids)
    for position, token in enumerate(ids):
        if token in eos_ids:
            kept = ids[:position]
            return tokenizer.decode(kept), kept, "stop", token
    kept = ids[:max_new_tokens]
    return tokenizer.decode(kept), kept, "length", None
