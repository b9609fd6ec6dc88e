"""Atomic training checkpoints, read back with safe loaders only.

A checkpoint is a directory `<checkpoints>/step_<NNNNNNNN>/` holding:

    config.json, model.safetensors, tokenizer files   the model in Hugging Face format (from_pretrained)
                                                        (adapter_config.json + adapter_model.safetensors
                                                        for a LoRA policy: PeftModel.from_pretrained)
    optimizer.safetensors + optimizer.json             optimizer state: tensors + the structure around them
    scheduler.json                                      learning-rate scheduler state
    rng.safetensors + rng.json                          python, numpy, torch (and CUDA) RNG states
    trainer_state.json                                  data position and counters (epoch, step, ...)
    COMPLETE                                            written last: the checkpoint is whole

It is written into a hidden temporary sibling (`.tmp-step_...`), every file fsynced, the COMPLETE
marker written, the directory renamed into place and the parent fsynced. A crash at any moment leaves
either no `step_*` directory or a whole one; `latest_checkpoint` also skips any `step_*` without the
marker. Nothing is unpickled on load: tensors come from safetensors, everything else from JSON.

`staging_directory` + `publish` are the two halves of `atomic_directory`, for a directory that
several processes fill together (DeepSpeed's partitions; see nashalign.train.engine_checkpoint, which also
says what the optimizer files hold under each engine).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nashalign import NashalignError

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp-"

__all__ = [
    "COMPLETE_MARKER",
    "atomic_directory",
    "staging_path",
    "staging_directory",
    "require_complete",
    "publish",
    "write_checkpoint_files",
    "prune",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_trainer_state",
    "load_optimizer_state",
    "load_scheduler_state",
    "capture_rng_state",
    "restore_rng_state",
    "load_rng_state",
    "save_state_dict",
    "load_state_dict",
]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- state dicts without pickle
#
# torch.save/torch.load(weights_only=True) would also be safe to read, but it is still a pickle stream;
# this form (tensors in safetensors, structure in JSON) is readable by anything and needs no unpickler.
# The structure keeps what JSON alone loses: int dict keys (optimizer state is keyed by parameter
# index), tuples (Adam's betas), numpy arrays (numpy's RNG state).


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, Mapping):
        return {"dict": [[key, _encode(item, tensors)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return {"list": [_encode(item, tensors) for item in value]}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint state")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    (kind,) = (key for key in node if key != "dtype")
    if kind == "tensor":
        return tensors[node["tensor"]]
    if kind == "ndarray":
        return np.asarray(node["ndarray"], dtype=node["dtype"])
    if kind == "dict":
        return {key: _decode(item, tensors) for key, item in node["dict"]}
    if kind == "tuple":
        return tuple(_decode(item, tensors) for item in node["tuple"])
    if kind == "list":
        return [_decode(item, tensors) for item in node["list"]]
    return node["value"]


def save_state_dict(state: Mapping[str, Any], directory: Path, name: str) -> None:
    """Write a nested state (optimizer, scheduler, RNG) as `<name>.safetensors` + `<name>.json`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure), encoding="utf-8")


def load_state_dict(directory: Path, name: str) -> Any:
    """Read what `save_state_dict` wrote (safetensors + JSON; no pickle)."""
    structure = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _decode(structure, tensors)


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- directories


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(directory)


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first (directories without COMPLETE are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `directory`, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def staging_path(final: str | Path, owner: str | None = None) -> Path:
    """The hidden sibling of `final` that `staging_directory` makes. `owner` tells concurrent writers
    apart (default: this process id); processes that fill one directory together pass the same owner."""
    final = Path(final)
    return final.parent / f"{_TEMP_PREFIX}{final.name}-{owner or os.getpid()}"


def staging_directory(final: str | Path, owner: str | None = None) -> Path:
    """A fresh, empty `staging_path(final, owner)` to fill before `publish` (any leftover of an
    earlier, interrupted fill removed)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = staging_path(final, owner)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    return temporary


def publish(temporary: Path, final: str | Path, marker: str | None = COMPLETE_MARKER) -> None:
    """fsync the filled `temporary`, write `marker` (if any) last, and rename it to `final` (replacing
    an existing `final` whole); the parent directory is fsynced. On an error `temporary` is removed
    and `final` is left as it was."""
    final = Path(final)
    try:
        if marker is not None:
            (temporary / marker).write_text("complete\n", encoding="utf-8")
        _fsync_tree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():  # saved again (a resumed run): swap the old one out, then delete it
        stale = final.parent / f"{_TEMP_PREFIX}old-{final.name}-{os.getpid()}"
        final.rename(stale)
        temporary.rename(final)
        shutil.rmtree(stale)
    else:
        temporary.rename(final)
    _fsync(final.parent)


@contextlib.contextmanager
def atomic_directory(final: str | Path, marker: str | None = COMPLETE_MARKER) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success `publish` it. On an exception the
    temporary directory is removed and `final` is left as it was.
    """
    temporary = staging_directory(final)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    publish(temporary, final, marker)


def write_checkpoint_files(
    directory: Path,
    *,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None,
    scheduler: Any,
    trainer_state: Mapping[str, Any],
) -> None:
    """Fill `directory` with a checkpoint's files (all but the COMPLETE marker): the model through
    `save_model`, the optimizer state (an optimizer, an already gathered state dict, or None when the
    engine writes its own), the scheduler, the RNG states and the trainer state."""
    save_model(directory)
    if optimizer is not None:
        state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        save_state_dict(state, directory, "optimizer")
    save_state_dict(scheduler.state_dict(), directory, "scheduler")
    save_state_dict(capture_rng_state(), directory, "rng")
    (directory / TRAINER_STATE).write_text(json.dumps(dict(trainer_state), indent=1), encoding="utf-8")


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None,
    scheduler: Any,
    trainer_state: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `directory` and return its path.

    `save_model(path)` writes the model (and tokenizer) in Hugging Face format into `path`.
    `optimizer`: the optimizer or its (gathered) state dict. `trainer_state` must be JSON data (data
    position, counters). The RNG states are captured here. With `keep_last`, older complete
    checkpoints beyond the newest `keep_last` are deleted, and so are leftover temporary directories
    of interrupted saves.
    """
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    with atomic_directory(final) as temporary:
        write_checkpoint_files(temporary, save_model=save_model, optimizer=optimizer, scheduler=scheduler,
                               trainer_state=trainer_state)
    if keep_last is not None:
        prune(directory, keep_last)
    return final


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and any leftover temporary directory."""
    for path in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(path)
    for path in directory.iterdir():
        if path.name.startswith(_TEMP_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def require_complete(path: Path) -> None:
    if not (path / COMPLETE_MARKER).is_file():
        raise NashalignError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state (data position, counters) of a complete checkpoint; restores no RNG."""
    path = Path(path)
    require_complete(path)
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    path = Path(path)
    require_complete(path)
    optimizer.load_state_dict(load_state_dict(path, "optimizer"))


def load_scheduler_state(path: str | Path, scheduler: Any) -> None:
    path = Path(path)
    require_complete(path)
    scheduler.load_state_dict(load_state_dict(path, "scheduler"))


def load_rng_state(path: str | Path) -> None:
    """Restore the RNG states saved with the checkpoint at `path`."""
    path = Path(path)
    require_complete(path)
    restore_rng_state(load_state_dict(path, "rng"))
