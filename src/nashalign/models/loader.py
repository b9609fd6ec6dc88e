"""The one place models and tokenizers are loaded, and released.

A `ModelSpec` names a model the way the field does — a local directory or a hub id such as
`RLHFlow/LLaMA3-SFT` (optionally at a `revision`) — plus how to load it: dtype, device, whether to
run code shipped with it, the attention implementation. Sampling, scoring, training, the model
judges, `nashalign eval` and the demo all load through `load_causal_lm`, `load_tokenizer` and
`load_sequence_classifier`, so one setting means the same thing everywhere.

Hub ids resolve through the Hugging Face cache as transformers resolves them: with
`HF_HUB_OFFLINE=1` a cached model loads and an uncached one is an error. A model that cannot be
found or loaded is one NashalignError line naming it (and the config key, given as `where`).

Lifetimes: the online loop holds a model only for the stage that needs it. `release()` returns the
memory of models the caller has dropped (garbage collection, then the CUDA caching allocator's
unused blocks), and closes what it is handed (a vLLM engine, a judge holding a model).
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any, Literal

from nashalign import NashalignError

__all__ = [
    "DTYPES",
    "ModelSpec",
    "as_spec",
    "is_local",
    "load_causal_lm",
    "load_generation_config",
    "load_model_config",
    "load_sequence_classifier",
    "load_tokenizer",
    "local_directory",
    "release",
    "resolve_device",
]

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to load and how.

    name_or_path: a local directory or a hub id (`owner/name`).
    revision: a hub branch, tag or commit (ignored for a local directory).
    dtype: "auto" (the checkpoint's own), "float32", "bfloat16" or "float16".
    device: "auto" (a CUDA device when torch sees one, else the CPU), "cpu", "cuda", "cuda:N", or None
        to leave the weights where loading put them (the trainer's accelerator places them itself).
    device_map: passed to transformers (for example "auto" to spread a large model over devices);
        excludes `device`.
    trust_remote_code: run modelling code shipped with a hub model.
    attn_implementation: "eager", "sdpa", "flash_attention_2", ...; None: transformers' default.
    """

    name_or_path: str
    revision: str | None = None
    dtype: Dtype = "auto"
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name_or_path", str(self.name_or_path))
        if not self.name_or_path:
            raise NashalignError("model: name_or_path is empty")
        if self.dtype not in DTYPES:
            raise NashalignError(f"model {self.name_or_path!r}: dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device is not None and self.device_map is not None:
            raise NashalignError(f"model {self.name_or_path!r}: give device or device_map, not both")

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)


def as_spec(model: str | Path | ModelSpec, **defaults: Any) -> ModelSpec:
    """A ModelSpec from a spec, a directory or a hub id (`defaults` fill the other fields)."""
    if isinstance(model, ModelSpec):
        return model
    return ModelSpec(str(model), **defaults)


def is_local(name_or_path: str | Path) -> bool:
    """True when the name is an existing local directory (else it is read as a hub id)."""
    return Path(name_or_path).expanduser().is_dir()


def resolve_device(device: str | None) -> str | None:
    """"auto" → "cuda" when torch sees a GPU, else "cpu"; other values are returned unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _location(spec: ModelSpec, where: str) -> str:
    """The string handed to from_pretrained: an expanded local directory, or the hub id. A name that
    looks like a path (starts with '.', '/' or '~') but is no directory is refused here, where the
    message can say so plainly."""
    local = Path(spec.name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if spec.name_or_path.startswith((".", "/", "~")):
        raise NashalignError(f"{where}: no model directory {spec.name_or_path!r}")
    return spec.name_or_path


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached(spec: ModelSpec) -> bool:
    """Whether the hub cache holds the model's config at its revision."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(spec.name_or_path, "config.json", revision=spec.revision)
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def _failure(spec: ModelSpec, what: str, where: str, error: BaseException) -> NashalignError:
    """One line naming the model and why it could not be loaded."""
    at = f" at revision {spec.revision!r}" if spec.revision else ""
    if not is_local(spec.name_or_path) and _offline() and not _cached(spec):
        from huggingface_hub import constants

        return NashalignError(
            f"{where}: {what} {spec.name_or_path!r}{at} is neither a local directory nor in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so nothing is downloaded"
        )
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return NashalignError(f"{where}: cannot load {what} {spec.name_or_path!r}{at}: {first_line}")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises for a missing, gated or malformed model (huggingface_hub's errors
    are OSError or ValueError subclasses; EnvironmentError is OSError)."""
    return (OSError, ValueError, KeyError)


def _model_kwargs(spec: ModelSpec) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {
        "dtype": "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype),
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    return kwargs


def _load_model(model_class, spec: ModelSpec, what: str, where: str, **extra: Any):
    location = _location(spec, where)
    try:
        model = model_class.from_pretrained(location, **_model_kwargs(spec), **extra)
    except _load_errors() as error:
        raise _failure(spec, what, where, error) from None
    device = resolve_device(spec.device)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_causal_lm(spec: ModelSpec | str | Path, *, where: str = "model"):
    """A causal LM (`AutoModelForCausalLM`) in eval mode; `where` names the config key in errors."""
    from transformers import AutoModelForCausalLM

    return _load_model(AutoModelForCausalLM, as_spec(spec), "model", where)


def load_sequence_classifier(spec: ModelSpec | str | Path, *, where: str = "model", **kwargs: Any):
    """A sequence classifier (`AutoModelForSequenceClassification`, e.g. a reward model) in eval mode."""
    from transformers import AutoModelForSequenceClassification

    return _load_model(AutoModelForSequenceClassification, as_spec(spec), "sequence classifier", where, **kwargs)


def load_tokenizer(spec: ModelSpec | str | Path, *, where: str = "tokenizer", pad_fallback: bool = True):
    """The model's tokenizer; with `pad_fallback`, a tokenizer without a pad token pads with EOS."""
    from transformers import AutoTokenizer

    spec = as_spec(spec)
    location = _location(spec, where)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except _load_errors() as error:
        raise _failure(spec, "tokenizer", where, error) from None
    if pad_fallback and tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise NashalignError(f"{where}: tokenizer {spec.name_or_path!r} has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(spec: ModelSpec | str | Path, *, where: str = "model"):
    """The model's `AutoConfig` alone (no weights): what a judge checks before it loads them."""
    from transformers import AutoConfig

    spec = as_spec(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    try:
        return AutoConfig.from_pretrained(_location(spec, where), **kwargs)
    except _load_errors() as error:
        raise _failure(spec, "model", where, error) from None


def load_generation_config(spec: ModelSpec | str | Path):
    """The model's GenerationConfig, or None when it ships none (its EOS ids may differ from the
    tokenizer's: Llama-3-style models list several)."""
    from transformers import GenerationConfig

    spec = as_spec(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    try:
        return GenerationConfig.from_pretrained(_location(spec, "model"), **kwargs)
    except OSError:
        return None


def local_directory(spec: ModelSpec | str | Path, *, where: str = "model") -> Path:
    """A directory holding the model's files, for engines that read them themselves (vLLM): the local
    directory, or the hub id's snapshot in the Hugging Face cache (fetched into it first unless
    HF_HUB_OFFLINE is set; the original/ consolidated checkpoints some repositories carry are skipped)."""
    spec = as_spec(spec)
    location = _location(spec, where)
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.name_or_path, revision=spec.revision, ignore_patterns=["original/*", "*.pth"]))
    except _load_errors() as error:
        raise _failure(spec, "model", where, error) from None


def release(*holders: Any) -> None:
    """Free what holds a model — a model judge (its `release()`: the model is dropped and loaded
    again on its next call), a vLLM sampler (its `close()`) — then collect garbage and return the
    CUDA caching allocator's unused blocks. The caller drops its own references first: what is
    still referenced stays alive."""
    for holder in holders:
        free = getattr(holder, "release", None) or getattr(holder, "close", None)
        if callable(free):
            free()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
