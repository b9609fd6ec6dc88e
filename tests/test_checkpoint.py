"""Atomic checkpoints: whole or invisible, pruned, and read back without unpickling anything."""

from __future__ import annotations

import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from nashalign import NashalignError
from nashalign.train.checkpoint import (
    COMPLETE_MARKER,
    atomic_directory,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    load_rng_state,
    load_scheduler_state,
    load_state_dict,
    load_trainer_state,
    save_checkpoint,
    save_state_dict,
)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 10)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    """One update on data drawn from all three global RNGs (so restoring them matters)."""
    noise = random.random() + float(np.random.rand())
    x = torch.randn(5, 4)
    loss = ((model(x) - noise) ** 2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _save_model(model):
    def save(directory):
        from safetensors.torch import save_file

        save_file(dict(model.state_dict()), str(directory / "model.safetensors"))

    return save


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """3 steps, checkpoint, 3 more == 3 steps, checkpoint, restore everything into fresh objects, 3 more.

    Covers optimizer moments and step counts, the schedule position and the python/numpy/torch RNGs.
    """
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    model, optimizer, scheduler = _setup()
    for _ in range(3):
        _step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 3, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": 3, "epoch": 0})
    for _ in range(3):
        _step(model, optimizer, scheduler)
    expected = [p.detach().clone() for p in model.parameters()]

    random.seed(99)  # a different process state: everything must come from the checkpoint
    np.random.seed(99)
    torch.manual_seed(99)
    resumed, optimizer2, scheduler2 = _setup(seed=5)
    from safetensors.torch import load_file

    resumed.load_state_dict(load_file(str(path / "model.safetensors")))
    load_optimizer_state(path, optimizer2)
    load_scheduler_state(path, scheduler2)
    load_rng_state(path)
    assert load_trainer_state(path) == {"global_step": 3, "epoch": 0}
    for _ in range(3):
        _step(resumed, optimizer2, scheduler2)
    for got, want in zip(resumed.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_loading_never_unpickles(tmp_path, monkeypatch):
    """Optimizer / scheduler / RNG state is safetensors + JSON: loading works with pickle disabled."""
    model, optimizer, scheduler = _setup()
    _step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 1, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": 1})

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _, optimizer2, scheduler2 = _setup()
    load_optimizer_state(path, optimizer2)
    load_scheduler_state(path, scheduler2)
    load_rng_state(path)
    state = optimizer2.state_dict()
    assert state["param_groups"][0]["betas"] == (0.8, 0.95)  # tuples survive
    assert set(state["state"]) == set(optimizer.state_dict()["state"])  # int keys survive
    assert sorted(f.suffix for f in path.iterdir() if f.is_file()) == sorted(
        [".json", ".safetensors", ".json", ".safetensors", ".json", ".safetensors", ".json", ""]
    )


def test_state_dict_round_trip_keeps_types(tmp_path):
    state = {"a": (1, 2.5, None, True), 3: [torch.arange(3), {"s": "x"}], "n": np.arange(4, dtype=np.uint32)}
    save_state_dict(state, tmp_path, "s")
    loaded = load_state_dict(tmp_path, "s")
    assert loaded["a"] == (1, 2.5, None, True)
    assert torch.equal(loaded[3][0], torch.arange(3)) and loaded[3][1] == {"s": "x"}
    assert loaded["n"].dtype == np.uint32 and loaded["n"].tolist() == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="cannot store a object"):
        save_state_dict({"bad": object()}, tmp_path, "t")


def test_failed_save_leaves_nothing_visible(tmp_path):
    """An exception while writing removes the temporary directory; the previous checkpoint stays latest."""
    model, optimizer, scheduler = _setup()
    first = save_checkpoint(tmp_path, 1, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler,
                            trainer_state={"global_step": 1})

    def broken(directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, save_model=broken, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"global_step": 2})
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1)]


def test_process_killed_mid_save_is_never_picked_up(tmp_path):
    """A child process SIGKILLed while writing checkpoint 2 leaves a temp dir that resume ignores;
    a `step_*` directory without the COMPLETE marker is ignored too, and the next save cleans up."""
    model, optimizer, scheduler = _setup()
    first = save_checkpoint(tmp_path, 1, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler,
                            trainer_state={"global_step": 1})
    pid = os.fork()
    if pid == 0:  # child: die in the middle of writing the model
        def die(directory):
            (directory / "model.safetensors").write_bytes(b"half a tensor")
            os.kill(os.getpid(), signal.SIGKILL)

        save_checkpoint(tmp_path, 2, save_model=die, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"global_step": 2})
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed save should have left its temporary directory"
    fake = tmp_path / checkpoint_name(5)
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"no marker")
    assert latest_checkpoint(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    with pytest.raises(NashalignError, match="not a complete checkpoint"):
        load_trainer_state(fake)
    third = save_checkpoint(tmp_path, 3, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler,
                            trainer_state={"global_step": 3}, keep_last=5)
    assert latest_checkpoint(tmp_path) == third
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_keep_last_prunes_oldest_and_same_step_is_replaced(tmp_path):
    model, optimizer, scheduler = _setup()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"global_step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(4), checkpoint_name(5)]
    save_checkpoint(tmp_path, 5, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler,
                    trainer_state={"global_step": 5, "again": True}, keep_last=2)
    assert load_trainer_state(latest_checkpoint(tmp_path)) == {"global_step": 5, "again": True}
    assert (latest_checkpoint(tmp_path) / COMPLETE_MARKER).is_file()


def test_atomic_directory_replaces_whole(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target, marker=None) as directory:
        (directory / "a.txt").write_text("one")
    with atomic_directory(target, marker=None) as directory:
        (directory / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError), atomic_directory(target, marker=None) as directory:
        (directory / "c.txt").write_text("three")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
