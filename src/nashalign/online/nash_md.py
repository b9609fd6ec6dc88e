"""Nash-MD's opponents for the online loop: responses sampled token by token from the geometric
mixture of the policy and the reference, and the oracle's P(y ≻ y′) of each sample against its opponent.

`MixtureSampler` is a TransformersSampler whose next-token distribution is
μ ∝ π_t^(1−β)·π_ref^β (`nashalign.core.mixture.geometric_mixture_logprobs`, β = sampling.mixture_coef):
the policy runs Hugging Face `generate`, and a logits processor runs the reference on the same
prefix (with its own KV cache) and replaces the policy's logits by the mixture's log-probs, before
the sampler's temperature, top-p and per-row seeded draw. So an opponent, like any sample, depends
only on the seed, its prompt and its sample index, not on its batch.

`judge_opponents` builds the training rows of a Nash-MD iteration: sample j of prompt p (from π_t)
is the "chosen" response, opponent j of prompt p the "rejected" one, and `mixture_win_rate` the
oracle's P(y ≻ y′). The nash-md loss reads only the first response and the win rate (a
single-response loss trained on these rows as pairs: the opponent's log-probs are computed along
and unused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nashalign.core.mixture import geometric_mixture_logprobs
from nashalign.data.artifacts import read_json, read_jsonl, write_json, write_jsonl
from nashalign.data.logprobs import position_ids_from_mask
from nashalign.online.config import sampling_spec
from nashalign.online.sharding import from_main
from nashalign.sampling.engines import TransformersSampler, draw_tokens, sample_seed

if TYPE_CHECKING:
    from nashalign.online.config import OnlineConfig

__all__ = ["MixtureSampler", "judge_opponents", "judge_opponents_stage", "sample_opponents"]


def _mixture_processor(ref_model, attention_mask, mixture_coef: float):
    """A logits processor: the policy's next-token logits → log μ, the reference scoring the same
    prefix incrementally (the prompt at the first call, then each new token)."""
    import inspect

    import torch
    from transformers import LogitsProcessor

    # transformers 5 renamed past_key_values (argument and output) to cache
    cache_key = "cache" if "cache" in inspect.signature(ref_model.forward).parameters else "past_key_values"

    class GeometricMixture(LogitsProcessor):
        def __init__(self):
            self.mask, self.past, self.fed = attention_mask, None, 0

        def __call__(self, input_ids, scores):
            new = input_ids[:, self.fed :]
            if self.past is not None:
                self.mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)
            positions = position_ids_from_mask(self.mask)[:, -new.shape[1] :]
            with torch.inference_mode():
                out = ref_model(input_ids=new, attention_mask=self.mask, position_ids=positions, use_cache=True,
                                **{cache_key: self.past})
            self.past, self.fed = getattr(out, cache_key), input_ids.shape[1]
            mixed = geometric_mixture_logprobs(scores, out.logits[:, -1, : scores.shape[-1]], mixture_coef)
            # tokens the policy's own processors forbid (the pad token) stay forbidden
            return mixed.masked_fill(scores == -float("inf"), -float("inf"))

    return GeometricMixture()


def _row_seeded_sampler(generators, temperature: float, top_p: float):
    """A logits processor that draws each row's next token from that row's own generator (the mixture
    sampler runs inside HF `generate`, whose processors see the mixed scores).

    HF's `generate` draws all rows of a batch with one `torch.multinomial` on the global RNG, so
    a sample would depend on its batch. This processor applies HF's own temperature and top-p
    warpers, draws one token per row from the row's generator (the transformers sampler's own
    `draw_tokens`) and returns scores that are -inf everywhere except at the drawn token; `generate`
    then runs in greedy mode and picks exactly it.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))

    class RowSeededSampling(LogitsProcessor):
        def __call__(self, input_ids, scores):
            drawn = draw_tokens(torch.softmax(warpers(input_ids, scores).float(), dim=-1), generators)
            chosen = torch.full_like(scores, float("-inf"))
            chosen.scatter_(1, drawn[:, None], 0.0)
            return chosen

    return RowSeededSampling()


class MixtureSampler(TransformersSampler):
    """Samples from the token-level geometric mixture of `model` (π_t) and `ref_model` (π_ref) with
    weight `mixture_coef` (β) on the reference; otherwise as TransformersSampler (both models on the
    same device, the same tokenizer)."""

    def __init__(self, model, ref_model, tokenizer, *, mixture_coef: float, **settings):
        super().__init__(model, tokenizer, **settings)
        self.ref_model = ref_model.eval()
        self.mixture_coef = float(mixture_coef)

    def _generate_batch(self, texts, batch, keys, eos_ids) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        pad_id = self.tokenizer.pad_token_id
        device = self.model.device
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        processors = LogitsProcessorList([_mixture_processor(self.ref_model, encoded["attention_mask"],
                                                             self.mixture_coef)])
        if self.temperature > 0:
            generators = []
            for p, j in batch:
                generator = torch.Generator(device=device)
                generator.manual_seed(sample_seed(self.seed, keys[p], j))
                generators.append(generator)
            processors.append(_row_seeded_sampler(generators, self.temperature, self.top_p))
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=list(eos_ids), pad_token_id=pad_id,
            suppress_tokens=None if pad_id in eos_ids else [pad_id],
        )
        with torch.inference_mode():
            output = self.model.generate(**encoded, generation_config=config, logits_processor=processors)
        return output[:, encoded["input_ids"].shape[1] :].tolist()


def judge_opponents(oracle, judge_prompts: Sequence[str], groups, opponents) -> tuple[list[dict], list[dict]]:
    """(rows, judgments): one row per sample of π_t, {prompt_index, chosen_index, rejected_index,
    mixture_win_rate} with chosen the sample and rejected its opponent (same indices), and the
    oracle's P(sample ≻ opponent) of each, asked in one call."""
    index = [(p, j) for p, group in enumerate(groups) for j in range(len(group))]
    probs = oracle.prob([judge_prompts[p] for p, _ in index], [groups[p][j]["text"] for p, j in index],
                        [opponents[p][j]["text"] for p, j in index])
    probs = np.asarray(probs, dtype=np.float64)
    rows = [{"prompt_index": p, "chosen_index": j, "rejected_index": j, "mixture_win_rate": float(prob)}
            for (p, j), prob in zip(index, probs)]
    judgments = [{"prompt_index": p, "sample_index": j, "prob": float(prob)} for (p, j), prob in zip(index, probs)]
    return rows, judgments


def sample_opponents(policy_path: str, ref_path: str, tokenizer, prompts: list[str], indices: list[int],
                    config: OnlineConfig, seed: int, state, progress: bool) -> list[dict]:
    """nash-md's opponents: K samples of each prompt from the mixture of π_t and π_ref (transformers)."""
    from nashalign.models.loader import load_causal_lm, release

    s = config.sampling
    policy = load_causal_lm(sampling_spec(config, policy_path), where="model").to(state.device)
    ref = load_causal_lm(sampling_spec(config, ref_path), where="model.ref_name_or_path").to(state.device)
    sampler = MixtureSampler(policy, ref, tokenizer, mixture_coef=s.mixture_coef, max_new_tokens=s.max_new_tokens,
                             temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size, seed=seed)
    groups = sampler.generate(prompts, s.samples_per_prompt, prompt_indices=indices,
                              progress=progress and state.is_local_main_process)
    release(sampler, policy, ref)
    del sampler, policy, ref
    release()
    return [dataclasses.asdict(g) for group in groups for g in group]


def judge_opponents_stage(it: Path, oracle, judge_prompts: list[str], groups, opponents, state):
    """Stage 2 of nash-md: P(sample ≻ its opponent) of every sample → judgments.jsonl,
    pair_stats.json, pairs.jsonl (last), as the loop's `_judge` (every process asks, the oracle splits the rows)."""
    pairs_path = it / "pairs.jsonl"
    if not from_main(state, pairs_path.exists):
        calls_before = oracle.counts.judge_calls
        rows, judgments = judge_opponents(oracle, judge_prompts, groups, opponents)
        stats = {"kept": len(rows), "dropped": 0, "comparisons": len(rows), "method": "mixture",
                 "judge_calls": oracle.counts.judge_calls - calls_before}
        if state.is_main_process:
            write_jsonl(it / "judgments.jsonl", judgments)
            write_json(it / "pair_stats.json", stats)
            write_jsonl(pairs_path, rows)
        state.wait_for_everyone()
    return read_jsonl(pairs_path), read_json(it / "pair_stats.json")
