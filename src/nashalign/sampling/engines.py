"""Generation backends: K responses per prompt from the current policy π_t.

Two backends share one interface (`generate(prompts, n) -> list[list[Generation]]` and
`update_weights(model)`):

- `TransformersSampler`: batched decoding with the KV cache and left padding; each prompt is
  computed once for its K samples. Works everywhere.
- `nashalign.sampling.vllm_engine.VLLMSampler`: vLLM's offline `LLM` engine, wherever vLLM is installed (its
  GPU build, or its CPU build on x86).

`make_sampler` picks one; `SamplerPool` keeps a vLLM engine for a whole run.

Prompts are already-rendered prompt strings (chat template applied); they are tokenized without
adding special tokens, because a rendered template already carries its own BOS.

Reproducibility (transformers backend). Every sample (prompt p, sample j) draws its tokens from its
own `torch.Generator` seeded from (seed, p, j), where p is the prompt's key (`prompt_indices`,
default its position). A sample therefore does not depend on which other rows share its batch:
the same seed gives the same samples for any `batch_size` and when only a subset of the prompts is
generated again (as on resume), up to floating-point differences in the logits caused by a
different amount of left padding (rare token flips, never seen on the tiny test models). Not
reproducible across devices, dtypes, torch/transformers versions or attention kernels. The vLLM
backend's seeding is described in nashalign.sampling.vllm_engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from nashalign import NashalignError
from nashalign.models.loader import ModelSpec
from nashalign.sampling.generation import (
    Generation,
    Sampler,
    SamplerSettings,
    check_generate_args,
    eos_token_ids,
    finish,
    sample_seed,
    stop_token_ids,
)

# Generation, Sampler, sample_seed and stop_token_ids live in nashalign.sampling.generation (shared
# with the vLLM backend) and are importable from here too.
__all__ = [
    "Generation", "Sampler", "SamplerPool", "TransformersSampler", "VLLM_CPU_MIN_WORK_TOKENS", "VLLM_MIN_WORK_TOKENS",
    "draw_tokens", "make_sampler", "sample_seed", "stop_token_ids", "vllm_min_work_tokens",
]

logger = logging.getLogger(__name__)


def draw_tokens(probs, generators):
    """One token per row of `probs` (each row a categorical distribution, not necessarily
    normalized), row r drawn with `generators[r]`: the row's cumulative distribution inverted at
    one uniform number from that generator.

    Written by hand because `torch.multinomial` takes one generator per call: drawing each row
    with its own generator costs a call per row, and each call draws an exponential variate for
    every token of the vocabulary (a quarter of the sampler's time on a 32k vocabulary). Here a row
    costs one uniform number and the cumulative sums of all rows are one vectorized operation. A
    row's draw depends only on its own probabilities and generator, never on the other rows.
    Tokens of zero probability are never drawn."""
    import torch

    uniforms = torch.cat(
        [torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators]
    )
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # the point to invert, kept strictly below the total so that it lands on a token with mass
    point = torch.minimum((uniforms[:, None] * total.double()).to(cdf.dtype),
                          torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def _draw(logits, generators, temperature: float, top_p: float):
    """The next token of each row: argmax when `generators` is None (greedy), else one draw per row
    from softmax(logits / temperature) restricted to the top-p nucleus (HF's own warpers), with the
    row's own generator (`draw_tokens`), so a row's draw does not depend on the other rows of its
    batch."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if generators is None:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p=top_p)(None, logits)
    return draw_tokens(torch.softmax(logits.float(), dim=-1), generators)


class TransformersSampler(SamplerSettings):
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
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NashalignError(f"sampling: batch_size must be an integer >= 1, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def update_weights(self, model) -> None:
        """Sample from `model` from now on: a `PreTrainedModel`, or a checkpoint directory to load
        onto the current model's device. The online loop calls this with π_{t+1} each iteration."""
        if isinstance(model, (str, Path, ModelSpec)):
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

        keys = check_generate_args(prompts, n, prompt_indices)
        self.check_settings()
        greedy = self.temperature == 0
        # Greedy samples of one prompt are identical: generate each prompt once and copy it.
        rows = [(p, j) for p in range(len(prompts)) for j in range(1 if greedy else n)]
        results: list[list[Generation]] = [[] for _ in prompts]
        eos_ids = eos_token_ids(self.model, self.tokenizer)
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
                        text, kept, reason, stop = finish(ids, eos_ids, self.max_new_tokens, self.tokenizer)
                        for sample in range(n) if greedy else [j]:
                            results[p].append(Generation(keys[p], sample, text, list(kept), reason, stop))
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
        from transformers import StaticCache

        from nashalign.data.logprobs import position_ids_from_mask

        device = self.model.device
        pad_id = self.tokenizer.pad_token_id
        distinct = list(dict.fromkeys(texts))
        encoded = self.tokenizer(distinct, return_tensors="pt", padding=True, add_special_tokens=False)
        # Preallocated for the whole decode and filled in place: a growing cache copies itself at
        # every step (a sixth of the sampler's time at 128 rows).
        cache = StaticCache(config=self.model.config,
                            max_cache_len=encoded["input_ids"].shape[1] + self.max_new_tokens)
        # newer transformers call the argument `cache`
        cache_key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        cache_arg = {cache_key: cache}
        rows = torch.tensor([distinct.index(text) for text in texts], device=device)
        mask = encoded["attention_mask"].to(device)
        positions = position_ids_from_mask(mask)
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


def _load_causal_lm(model):
    """A checkpoint directory, hub id or ModelSpec through the one loader (the checkpoint's dtype
    unless the spec sets one). On a CPU, unless the spec names an attention implementation, the
    sampler's copy attends with transformers' eager attention: for one query token against the cache,
    torch's CPU SDPA kernel took 41% of a bfloat16 decode step (docs/performance.md)."""
    from nashalign.models.loader import as_spec, load_causal_lm

    spec = as_spec(model, dtype="auto")
    loaded = load_causal_lm(spec, where="sampling")
    if spec.attn_implementation is None and loaded.device.type == "cpu":
        loaded.set_attn_implementation("eager")
    return loaded


# `backend: auto` starts a vLLM engine only for at least this many sampled tokens (see make_sampler):
# VLLM_MIN_WORK_TOKENS on a GPU; VLLM_CPU_MIN_WORK_TOKENS on a CPU (vLLM's CPU build), where the
# transformers sampler is nearly as fast.
VLLM_MIN_WORK_TOKENS = 32768
VLLM_CPU_MIN_WORK_TOKENS = 262144


def vllm_min_work_tokens() -> int:
    """The `backend: auto` threshold of this machine: VLLM_MIN_WORK_TOKENS with a CUDA device, else
    VLLM_CPU_MIN_WORK_TOKENS."""
    import torch

    return VLLM_MIN_WORK_TOKENS if torch.cuda.is_available() else VLLM_CPU_MIN_WORK_TOKENS


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
    work_tokens: int | None = None,
):
    """Build a sampler: a `TransformersSampler`, or a `nashalign.sampling.vllm_engine.VLLMSampler`.

    backend:
        "transformers": `model` is a `PreTrainedModel` (with `tokenizer`) or a checkpoint directory.
        "vllm": `model` must be a checkpoint directory. When vLLM is unavailable (not installed or
            fails to import) this raises NashalignError with the reason, unless
            `fallback_to_transformers` is True: then it logs a warning and returns a
            TransformersSampler instead.
        "auto": vLLM when it is available, `model` is a checkpoint directory and the work pays for
            the engine's start: `work_tokens` (the tokens the caller expects to sample with this
            engine, prompts × K × max_new_tokens summed over its uses; None: unknown, counts as
            enough) is at least `vllm_min_work_tokens()`. Else transformers. An engine start of S
            seconds pays off from S / (1/r_t − 1/r_v) sampled tokens at sampling rates r_t
            (transformers) < r_v (vLLM): on a GPU vLLM's lead is large; on a CPU the transformers
            sampler is nearly as fast, hence the higher threshold (docs/performance.md).
    """
    if backend not in ("transformers", "vllm", "auto"):
        raise NashalignError(f"sampling: backend must be 'transformers', 'vllm' or 'auto', got {backend!r}")
    is_path = isinstance(model, (str, Path, ModelSpec))
    if backend == "vllm" and not is_path:
        raise NashalignError(
            "sampling: the vLLM backend loads weights from a checkpoint directory; pass its path"
        )
    worth_an_engine = backend == "vllm" or work_tokens is None or work_tokens >= vllm_min_work_tokens()
    if backend != "transformers" and is_path and worth_an_engine:
        from nashalign.sampling.vllm_engine import VLLMSampler, vllm_available

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
        from nashalign.models.loader import as_spec, load_tokenizer

        if tokenizer is None or isinstance(tokenizer, (str, Path, ModelSpec)):
            spec = as_spec(model)
            tokenizer = load_tokenizer(spec.replace(name_or_path=str(tokenizer)) if tokenizer else spec,
                                       where="sampling", pad_fallback=False)
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


class SamplerPool:
    """The samplers of one run. A vLLM engine is built once and kept: each later request for
    another checkpoint loads its weights in place (`update_weights`) and takes the call's seed, and
    the engine sleeps between uses where sleep mode is on. Transformers samplers are built per
    request (loading a small checkpoint costs little). `close()` shuts the engine down."""

    def __init__(self):
        self._engine = None
        self._engine_path: str | None = None

    def sampler(self, backend, model_path: str, tokenizer, *, seed: int, **settings):
        """A sampler for `model_path`; `settings` are `make_sampler`'s keyword arguments."""
        if self._engine is not None and backend != "transformers":
            if model_path != self._engine_path:
                self._engine.update_weights(model_path)
                self._engine_path = model_path
            self._engine.seed = seed
            return self._engine
        sampler = make_sampler(backend, model_path, tokenizer, seed=seed, **settings)
        if not isinstance(sampler, TransformersSampler):
            self._engine, self._engine_path = sampler, model_path
        return sampler

    def release(self, sampler) -> None:
        """The caller is done with `sampler` for now."""
        if sampler is self._engine:
            sampler.sleep()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
