"""Saving and restoring a training phase's checkpoint under each engine accelerate runs it on.

The checkpoint directory and its atomic publication are nashalign.train.checkpoint's; what differs per
engine is where the optimizer state lives and who may read or write it:

    one process, DDP   every process holds the whole optimizer state: the main process writes
                       `optimizer.safetensors/.json` from its own state dict
    FSDP               each process holds a shard: torch.distributed.checkpoint's state-dict API
                       gathers the full state dict (keyed by parameter name) onto the main process,
                       which writes it in the same safetensors + JSON form; on resume the main
                       process reads it and the same API sends each process its shards
    DeepSpeed ZeRO     the engine writes its own partitioned state (`deepspeed/` in the checkpoint,
                       one file per process) with `save_checkpoint` and reads it with
                       `load_checkpoint`; all processes fill the one staging directory together

In all cases the model is also saved in Hugging Face format (gathered under FSDP and ZeRO-3), so a
checkpoint loads with from_pretrained, and the COMPLETE marker is written last by the main process.
Nothing nashalign writes is read with an unpickler; DeepSpeed's own files are torch.save archives,
which DeepSpeed reads back with its own loader (see docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nashalign.train import checkpoint

DEEPSPEED_TAG = "deepspeed"

SaveModel = Callable[[Path, Mapping[str, Any] | None], None]


def engine(accelerator) -> str:
    """'fsdp', 'deepspeed' or 'replicated' (one process or DDP: every process has the whole state)."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(
        accelerator.distributed_type, "replicated"
    )


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(accelerator, policy) -> dict[str, Any] | None:
    """The whole model's weights on the main process (empty elsewhere) where they are sharded, else
    None (the unwrapped model's own state dict is whole). Collective under FSDP and ZeRO-3: every
    process must call it.

    Under FSDP this asks torch.distributed.checkpoint directly for the full state dict (accelerate's
    get_state_dict also sets `broadcast_from_rank0`, with which the main process gets an empty dict
    when the shards live on the CPU)."""
    kind = engine(accelerator)
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(policy, options=_full_state_options())
    return accelerator.get_state_dict(policy) if kind == "deepspeed" else None


def save_training_checkpoint(
    accelerator, policy, optimizer, scheduler, *, directory: Path, step: int, trainer_state: Mapping[str, Any],
    save_model: SaveModel, keep_last: int | None,
) -> Path:
    """Write checkpoint `step` under `directory`; every process calls this (the gathers are collective).

    `policy` and `optimizer` as accelerator.prepare returned them; `save_model(path, state_dict)`
    writes the model (from `state_dict` when given, the gathered full weights) and the tokenizer.
    """
    kind = engine(accelerator)
    final = directory / checkpoint.checkpoint_name(step)
    if kind == "deepspeed":
        _save_deepspeed(accelerator, policy, scheduler, final, trainer_state, save_model)
    else:
        if kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            optimizer_state = get_optimizer_state_dict(policy, optimizer.optimizer, options=_full_state_options())
            model_state = full_model_state(accelerator, policy)
        else:
            optimizer_state, model_state = optimizer.optimizer, None
        if accelerator.is_main_process:
            checkpoint.save_checkpoint(
                directory, step, save_model=lambda path: save_model(path, model_state), optimizer=optimizer_state,
                scheduler=scheduler, trainer_state=trainer_state,
            )
    if accelerator.is_main_process and keep_last is not None:
        checkpoint.prune(directory, keep_last)
    accelerator.wait_for_everyone()
    return final


def _save_deepspeed(accelerator, policy, scheduler, final: Path, trainer_state, save_model: SaveModel) -> None:
    """All processes write DeepSpeed's state into one staging directory; the main process adds the
    Hugging Face model, scheduler, RNG and trainer state, then publishes it."""
    staging = checkpoint.staging_path(final, owner="shared")
    if accelerator.is_main_process:
        checkpoint.staging_directory(final, owner="shared")
    accelerator.wait_for_everyone()
    policy.save_checkpoint(str(staging), tag=DEEPSPEED_TAG)  # collective: each process writes its partition
    model_state = full_model_state(accelerator, policy)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.write_checkpoint_files(
            staging, save_model=lambda path: save_model(path, model_state), optimizer=None, scheduler=scheduler,
            trainer_state=trainer_state,
        )
        checkpoint.publish(staging, final)


def load_training_checkpoint(accelerator, policy, optimizer, scheduler, path: Path) -> None:
    """Restore the optimizer, scheduler and RNG states of checkpoint `path` on every process (the
    model weights were loaded from its Hugging Face files before the policy was prepared)."""
    kind = engine(accelerator)
    if kind == "deepspeed":
        checkpoint.require_complete(path)
        loaded, _ = policy.load_checkpoint(
            str(path), tag=DEEPSPEED_TAG, load_module_strict=True, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            from nashalign import NashalignError

            raise NashalignError(f"{path}: DeepSpeed found no state under {DEEPSPEED_TAG}/ to resume from")
    elif kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        checkpoint.require_complete(path)
        # The main process alone reads the full state; each process receives only its shards.
        full = checkpoint.load_state_dict(path, "optimizer") if accelerator.is_main_process else {}
        set_optimizer_state_dict(
            policy, optimizer.optimizer, optim_state_dict=full,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
    else:
        checkpoint.load_optimizer_state(path, optimizer.optimizer)
    checkpoint.load_scheduler_state(path, scheduler)
    checkpoint.load_rng_state(path)
