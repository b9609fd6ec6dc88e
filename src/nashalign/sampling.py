"""Generation backends: K responses per prompt from the current policy π_t.

Two backends share one interface (`generate(prompts, n) -> list[list[Generation]]` and
`update_weights(model)`):

- `TransformersSampler`: batched `model.generate` with the KV cache and left padding. Works everywhere.
- `VLLMSampler`: vLLM's offline `LLM` engine; used when vLLM is installed and a CUDA GPU is visible.

Prompts are already-rendered prompt strings (chat template applied); they are tokenized without
adding special tokens, because a rendered template already carries its own BOS.

Reproducibility (transformers backend). Every sample (prompt p, sample j) draws its tokens from its
own `torch.Generator` seeded from (seed, p, j), where p is the prompt's key (`prompt_indices`,
default its position). A sample therefore does not depend on which other rows share its batch:
the same seed gives the same samples for any `batch_size` and when only a subset of the prompts is
generated again (as on resume), up to floating-point differences in the logits caused by a
different amount of left padding (rare token flips, never seen on the tiny test models). Not
reproducible across devices, dtypes, torch/transformers versions or attention kernels. The vLLM
backend seeds each prompt's request from (seed, p) and vLLM gives its n children seeds
seed_p + j; vLLM documents per-request seeds as reproducible on the same hardware and version.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Protocol

import numpy as np

from nashalign import NashalignError

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    """One sampled response.

    `token_ids` are the response tokens only: no prompt, no padding, and not the EOS token itself;
    `text` is their decoding. `finish_reason` is "stop" when the model produced an EOS token right
    after `token_ids` and "length" when `max_new_tokens` tokens were produced without one.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason


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


def _check_sampling_args(max_new_tokens, temperature, top_p, seed, batch_size=1):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise NashalignError(f"sampling: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise NashalignError(f"sampling: batch_size must be an integer >= 1, got {batch_size!r}")
    if not temperature >= 0:
        raise NashalignError(f"sampling: temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise NashalignError(f"sampling: top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(seed, int) or seed < 0:
        raise NashalignError(f"sampling: seed must be a non-negative integer, got {seed!r}")


def _check_generate_args(prompts, n, prompt_indices) -> list[int]:
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


def _eos_token_ids(model, tokenizer) -> list[int]:
    """The model's EOS ids (its generation config may list several), else the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise NashalignError("sampling: the tokenizer has no eos_token and the model config names none")
    return ids


def _finish(
    new_ids: Sequence[int], eos_ids: Sequence[int], max_new_tokens: int, tokenizer
) -> tuple[str, list[int], FinishReason]:
    """Cut the generated ids at the first EOS; everything after it (padding) is dropped."""
    ids = list(new_ids)
    for position, token in enumerate(ids):
        if token in eos_ids:
            kept = ids[:position]
            return tokenizer.decode(kept), kept, "stop"
    kept = ids[:max_new_tokens]
    return tokenizer.decode(kept), kept, "length"


def _draw(logits, generators, temperature: float, top_p: float):
    """The next token of each row: argmax when `generators` is None (greedy), else one draw per row
    from softmax(logits / temperature) restricted to the top-p nucleus, with the row's own generator
    (HF's own warpers), so a row's draw does not depend on the other rows of its batch."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if generators is None:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p=top_p)(None, logits)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(generators)])


class TransformersSampler:
    """Batched sampling with Hugging Face `generate` (KV cache, left padding).

    Args:
        model: a causal LM (`PreTrainedModel`); it is put in eval mode while generating and its
            previous mode is restored afterwards.
        tokenizer: its tokenizer; its padding side is set to "left" while generating, then restored.
            A tokenizer without a pad token pads with EOS (set for the call, then unset again).
        max_new_tokens: at most this many tokens per response.
        temperature: softmax temperature; 0 means greedy decoding (all n samples are identical).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        batch_size: rows (prompt, sample) per `generate` call.
        seed: non-negative; see the module docstring for what it makes reproducible.

    The pad token is never generated when it differs from EOS (it is suppressed), so a response
    can never be confused with padding.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        seed: int = 0,
    ):
        _check_sampling_args(max_new_tokens, temperature, top_p, seed, batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.batch_size = batch_size
        self.seed = seed

    def update_weights(self, model) -> None:
        """Sample from `model` from now on: a `PreTrainedModel`, or a checkpoint directory to load
        onto the current model's device. The online loop calls this with π_{t+1} each iteration."""
        if isinstance(model, (str, Path)):
            model = _load_causal_lm(model).to(self.model.device)
        self.model = model

    def generate(
        self,
        prompts: list[str],
        n: int,
        *,
        progress: bool = True,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[list[Generation]]:
        """Sample `n` responses for each prompt.

        Returns a list with one entry per prompt, each a list of `n` Generations ordered by
        sample_index. `prompt_indices` (default 0..len(prompts)-1) are the prompts' keys: they fill
        `Generation.prompt_index` and key the per-sample random streams.
        """
        from tqdm.auto import tqdm

        keys = _check_generate_args(prompts, n, prompt_indices)
        greedy = self.temperature == 0
        # Greedy samples of one prompt are identical: generate each prompt once and copy it.
        rows = [(p, j) for p in range(len(prompts)) for j in range(1 if greedy else n)]
        results: list[list[Generation]] = [[] for _ in prompts]
        eos_ids = _eos_token_ids(self.model, self.tokenizer)
        was_training = self.model.training
        saved_padding_side, saved_pad_token = self.tokenizer.padding_side, self.tokenizer.pad_token
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if saved_pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(eos_ids[0])
        try:
            with tqdm(total=len(prompts) * n, unit="sample", desc="sampling", disable=not progress) as bar:
                for start in range(0, len(rows), self.batch_size):
                    batch = rows[start : start + self.batch_size]
                    new_ids = self._generate_batch([prompts[p] for p, _ in batch], batch, keys, eos_ids)
                    for (p, j), ids in zip(batch, new_ids):
                        text, kept, reason = _finish(ids, eos_ids, self.max_new_tokens, self.tokenizer)
                        for sample in range(n) if greedy else [j]:
                            results[p].append(Generation(keys[p], sample, text, list(kept), reason))
                    bar.update(len(batch) * (n if greedy else 1))
        finally:
            self.tokenizer.padding_side = saved_padding_side
            if saved_pad_token is None:
                self.tokenizer.pad_token = None
            self.model.train(was_training)
        return results

    def _generate_batch(self, texts, batch, keys, eos_ids) -> list[list[int]]:
        """Decode one batch of rows (prompt p, sample j) with the KV cache; `texts[i]` is row i's prompt.

        Each distinct prompt of the batch is computed once (left-padded prefill) and its cache rows
        are copied to its samples (the KV cache is expanded, not the prompt repeated). Rows that have
        produced EOS leave the batch. Positions follow the attention mask, so left padding does not
        shift them. Returns each row's new ids (EOS-terminated, or max_new_tokens long).
        """
        import inspect

        import torch
        from transformers import DynamicCache

        device = self.model.device
        pad_id = self.tokenizer.pad_token_id
        cache = DynamicCache()  # filled in place by every forward; newer transformers call the argument `cache`
        cache_arg = {"cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values": cache}
        distinct = list(dict.fromkeys(texts))
        encoded = self.tokenizer(distinct, return_tensors="pt", padding=True, add_special_tokens=False)
        rows = torch.tensor([distinct.index(text) for text in texts], device=device)
        mask = encoded["attention_mask"].to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        generators = None
        if self.temperature > 0:
            generators = [
                torch.Generator(device=device).manual_seed(sample_seed(self.seed, keys[p], j)) for p, j in batch
            ]
        eos = torch.tensor(list(eos_ids), device=device)
        new_ids: list[list[int]] = [[] for _ in batch]
        active = list(range(len(batch)))  # batch rows still decoding, in cache order
        with torch.inference_mode():
            out = self.model(
                input_ids=encoded["input_ids"].to(device), attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **cache_arg,
            )
            logits = out.logits[:, -1]
            cache.reorder_cache(rows)
            logits, mask, last = logits[rows], mask[rows], positions[rows, -1]
            for step in range(self.max_new_tokens):
                if pad_id not in eos_ids:
                    logits[:, pad_id] = float("-inf")
                drawn = _draw(logits, generators, self.temperature, self.top_p)
                for row, token in zip(active, drawn.tolist()):
                    new_ids[row].append(token)
                going = ~torch.isin(drawn, eos)
                if step == self.max_new_tokens - 1 or not going.any():
                    break
                if not going.all():
                    keep = going.nonzero().flatten()
                    cache.reorder_cache(keep)
                    drawn, mask, last = drawn[keep], mask[keep], last[keep]
                    active = [active[i] for i in keep.tolist()]
                    generators = None if generators is None else [generators[i] for i in keep.tolist()]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                last = last + 1
                out = self.model(
                    input_ids=drawn[:, None], attention_mask=mask, position_ids=last[:, None],
                    use_cache=True, **cache_arg,
                )
                logits = out.logits[:, -1]
        return new_ids


def _load_causal_lm(path):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise NashalignError(f"sampling: checkpoint directory {path} does not exist")
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def _generation_config(path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS is used
        return None


def vllm_available() -> tuple[bool, str]:
    """(True, "") when vLLM imports and a CUDA GPU is visible, else (False, the reason)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed (install the 'vllm' extra: pip install 'nashalign[vllm]')"
    import torch

    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and torch sees none"
    try:
        import vllm  # noqa: F401
    except Exception as error:  # a broken install raises anything from ImportError to RuntimeError
        return False, f"vLLM is installed but failed to import: {type(error).__name__}: {error}"
    return True, ""


class VLLMSampler:
    """Sampling with vLLM's offline engine (`vllm.LLM`), reloaded from disk for every new policy.

    Args:
        model_path: a Hugging Face checkpoint directory (weights + config); also used for the
            tokenizer unless `tokenizer_path` is given.
        max_new_tokens, temperature, top_p, seed: as for `TransformersSampler` (temperature 0 is
            greedy). `batch_size` does not exist here: vLLM schedules its own batches.
        tensor_parallel_size: GPUs per engine.
        llm_kwargs: further `vllm.LLM` arguments (dtype, gpu_memory_utilization, max_model_len, ...).

    `update_weights(path)` frees the current engine (`cleanup_dist_env_and_memory`) and builds a new
    one from the new checkpoint: the simplest way to load new weights that works across vLLM
    versions; it costs an engine start per iteration. The pad token is not suppressed here.
    """

    def __init__(
        self,
        model_path,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        tokenizer_path=None,
        llm_kwargs: dict | None = None,
    ):
        _check_sampling_args(max_new_tokens, temperature, top_p, seed)
        available, reason = vllm_available()
        if not available:
            raise NashalignError(f"sampling: the vLLM backend is unavailable: {reason}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise NashalignError(f"sampling: tensor_parallel_size must be >= 1, got {tensor_parallel_size!r}")
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.tensor_parallel_size = tensor_parallel_size
        self.tokenizer_path = tokenizer_path
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = None
        self._load(model_path)

    def _load(self, model_path) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        model_path = Path(model_path)
        if not model_path.is_dir():
            raise NashalignError(
                f"sampling: the vLLM backend needs a checkpoint directory; {model_path} is none"
            )
        tokenizer_path = Path(self.tokenizer_path or model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.llm = LLM(
            model=str(model_path),
            tokenizer=str(tokenizer_path),
            tensor_parallel_size=self.tensor_parallel_size,
            seed=self.seed,
            **self.llm_kwargs,
        )
        self.eos_ids = _eos_token_ids(
            SimpleNamespace(generation_config=_generation_config(model_path)), self.tokenizer
        )

    def close(self) -> None:
        """Free the engine and its GPU memory."""
        if self.llm is None:
            return
        self.llm = None
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:  # older layouts export it from vllm.distributed only
            from vllm.distributed import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()

    def update_weights(self, model) -> None:
        """Reload the engine from the checkpoint directory `model` (a path; a live module cannot be
        handed to a vLLM engine, so save it with `save_pretrained` first)."""
        if not isinstance(model, (str, Path)):
            raise NashalignError(
                "sampling: the vLLM backend loads weights from a checkpoint directory; pass its path"
            )
        self.close()
        self._load(model)

    def generate(
        self,
        prompts: list[str],
        n: int,
        *,
        progress: bool = True,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[list[Generation]]:
        """Same contract as `TransformersSampler.generate`."""
        from vllm import SamplingParams

        keys = _check_generate_args(prompts, n, prompt_indices)
        requests = [
            {"prompt_token_ids": self.tokenizer(prompt, add_special_tokens=False)["input_ids"]}
            for prompt in prompts
        ]
        greedy = self.temperature == 0
        # vLLM refuses n > 1 (and top_p < 1) with greedy decoding: ask once and copy, as transformers does.
        params = [
            SamplingParams(
                n=1 if greedy else n,
                temperature=self.temperature,
                top_p=1.0 if greedy else self.top_p,
                max_tokens=self.max_new_tokens,
                stop_token_ids=list(self.eos_ids),
                seed=sample_seed(self.seed, key) >> 32,
            )
            for key in keys
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        results = []
        for key, output in zip(keys, outputs):
            completions = sorted(output.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * n
            row = []
            for j, completion in enumerate(completions):
                text, kept, reason = _finish(
                    completion.token_ids, self.eos_ids, self.max_new_tokens, self.tokenizer
                )
                if completion.finish_reason == "stop":  # vLLM may or may not return the stop token itself
                    reason = "stop"
                row.append(Generation(key, j, text, kept, reason))
            results.append(row)
        return results


def make_sampler(
    backend: Literal["transformers", "vllm", "auto"],
    model,
    tokenizer=None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    fallback_to_transformers: bool = False,
    llm_kwargs: dict | None = None,
) -> TransformersSampler | VLLMSampler:
    """Build a sampler.

    backend:
        "transformers": `model` is a `PreTrainedModel` (with `tokenizer`) or a checkpoint directory.
        "vllm": `model` must be a checkpoint directory. When vLLM is unavailable (not installed, fails
            to import, or no CUDA GPU) this raises NashalignError with the reason, unless
            `fallback_to_transformers` is True: then it logs a warning and returns a
            TransformersSampler instead.
        "auto": vLLM when it is available and `model` is a checkpoint directory, else transformers.
    """
    if backend not in ("transformers", "vllm", "auto"):
        raise NashalignError(f"sampling: backend must be 'transformers', 'vllm' or 'auto', got {backend!r}")
    is_path = isinstance(model, (str, Path))
    if backend == "vllm" and not is_path:
        raise NashalignError(
            "sampling: the vLLM backend loads weights from a checkpoint directory; pass its path"
        )
    if backend != "transformers" and is_path:
        available, reason = vllm_available()
        if available:
            return VLLMSampler(
                model,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
                tokenizer_path=tokenizer if isinstance(tokenizer, (str, Path)) else None,
                llm_kwargs=llm_kwargs,
            )
        if backend == "vllm" and not fallback_to_transformers:
            raise NashalignError(
                f"sampling: backend 'vllm' is unavailable: {reason}. Use backend 'transformers' or 'auto', "
                "or allow the fallback to transformers"
            )
        if backend == "vllm":
            logger.warning("vLLM is unavailable (%s); sampling with transformers instead", reason)
    if is_path:
        from transformers import AutoTokenizer

        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        model = _load_causal_lm(model)
    if tokenizer is None:
        raise NashalignError("sampling: the transformers backend needs the model's tokenizer")
    return TransformersSampler(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
