"""A killed 2-process FSDP phase resumes to the uninterrupted run's weights, on CPU.

The runs go through the shipped FSDP2 config (full sharding, one unit per LlamaDecoderLayer) on 2 CPU
processes that reduce over gloo:

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/fsdp.yaml \\
        --num_processes 2 --mixed_precision no tests/test_fsdp.py --worker ...

torch's FSDP2 runs on CPU with gloo, but accelerate (1.15) selects FSDP only on accelerator devices:
on CPU its state reports MULTI_CPU even with the FSDP config (accelerate/state.py sets FSDP only for
MULTI_GPU, MULTI_NPU, ...). The worker therefore sets the distributed type to FSDP, with the plugin
built from the launch environment of the shipped config, right after nashalign creates its
Accelerator; from there on accelerate's own FSDP2 code prepares, trains and saves, as on GPUs. The
worker records, at every checkpoint, the engine and the type of the policy's parameters (DTensor
shards), so a run that silently fell back to plain data parallelism fails.

Data and batches are those of tests/test_distributed.py: 21 pairs, a global batch of 4 (2 processes x
1 pair x 2 accumulation steps), 2 epochs = 12 steps, a checkpoint every 4 steps. The first launch
SIGKILLs both processes right after step 6 (a real kill: no handler, no flush), when the step-4
checkpoint exists; the second launch resumes from it. The reference is the same config trained in
this process without FSDP.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ports import free_port
from test_distributed import NUM_PAIRS, PAIRS, _write_config  # the same data, batches and schedule

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
STEPS, KILL_AFTER = 12, 6


def _worker(config_path: str, record: str, kill_after: int) -> None:
    """Inside each launched process: train under FSDP (see the module docstring), recording each
    checkpoint's engine and parameter type; SIGKILL this process once step `kill_after` is done."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from nashalign.config import TrainConfig, load_config
    from nashalign.train import engine_checkpoint
    from nashalign.train import loop as train_module

    make_accelerator, save = train_module._make_accelerator, engine_checkpoint.save_training_checkpoint

    def fsdp_accelerator(config, run_dir):
        accelerator = make_accelerator(config, run_dir)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* launch environment
        accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        return accelerator

    def recording_save(accelerator, policy, *args, **kwargs):
        with open(f"{record}-rank{accelerator.process_index}.jsonl", "a", encoding="utf-8") as out:
            row = {"engine": engine_checkpoint.engine(accelerator), "parameter": type(next(policy.parameters())).__name__}
            out.write(json.dumps(row) + "\n")
        return save(accelerator, policy, *args, **kwargs)

    train_module._make_accelerator = fsdp_accelerator
    engine_checkpoint.save_training_checkpoint = recording_save

    def kill(step: int, metrics: dict) -> None:
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    logging.basicConfig(level=logging.INFO)  # as the CLI does: "resuming from ..." goes to the log
    train_module.train(load_config(TrainConfig, config_path), callback=kill)


def _launch(arguments: list[str], log: Path) -> int:
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(FSDP_CONFIG),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), *arguments,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w", encoding="utf-8") as out:
        # a timeout turns a deadlock between the processes into a failure
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300, cwd=ROOT).returncode


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from nashalign.config import TrainConfig, load_config
    from nashalign.train.loop import train

    root = tmp_path_factory.mktemp("fsdp")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:NUM_PAIRS]))
    single = _write_config(root / "single.yaml", tiny_model_dir, pairs, root / "single", 4, 1)
    sharded = _write_config(root / "sharded.yaml", tiny_model_dir, pairs, root / "sharded", 1, 2)

    reference = train(load_config(TrainConfig, single))
    worker = [str(Path(__file__)), "--worker", str(sharded), str(root / "saves")]
    killed = _launch([*worker, str(KILL_AFTER)], root / "killed.log")
    interrupted = {
        "returncode": killed,
        "log": (root / "killed.log").read_text(),
        "metrics": (root / "sharded" / "metrics.jsonl").read_text().splitlines(),
        "checkpoints": sorted(p.name for p in (root / "sharded" / "checkpoints").iterdir()),
        "final_exists": (root / "sharded" / "final").exists(),
    }
    resumed = _launch([*worker, "0"], root / "resumed.log")
    resumed_log = (root / "resumed.log").read_text()
    assert resumed == 0, resumed_log[-3000:]
    saves = {rank: [json.loads(line) for line in (root / f"saves-rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)}
    return {"reference": reference, "sharded": root / "sharded", "interrupted": interrupted,
            "resumed_log": resumed_log, "saves": saves}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_the_runs_were_sharded_and_the_kill_landed_after_step_6(runs):
    """Every checkpoint (4 before the kill; 8 and 12 after the resume) was saved under FSDP by both
    processes, with the policy's parameters as DTensor shards. The processes died by the kill after
    step 6: steps 1-6 logged, the step-4 checkpoint complete, no final/."""
    assert runs["saves"][0] == runs["saves"][1] == [{"engine": "fsdp", "parameter": "DTensor"}] * 3
    interrupted = runs["interrupted"]
    assert interrupted["returncode"] != 0 and "SIGKILL" in interrupted["log"]
    assert [json.loads(line)["step"] for line in interrupted["metrics"]] == list(range(1, KILL_AFTER + 1))
    assert interrupted["checkpoints"] == ["step_00000004"]
    assert not interrupted["final_exists"]


def test_killed_fsdp_run_resumes_to_the_uninterrupted_weights(runs, tiny_model_dir):
    """After resuming from step 4 and finishing 12 steps, every parameter equals the uninterrupted
    1-process run's within 1e-5 (AdamW moments restored: a fresh optimizer would miss by far more),
    and the weights moved."""
    single, sharded = _weights(runs["reference"].final_dir), _weights(runs["sharded"] / "final")
    initial = _weights(Path(tiny_model_dir))
    assert single.keys() == sharded.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=1e-5, msg=name)
    assert max(float((single[name] - initial[name]).abs().max()) for name in single) > 1e-3
    assert "resuming from" in runs["resumed_log"] and "step_00000004" in runs["resumed_log"]


def test_fsdp_checkpoints_hold_the_full_optimizer_state_by_parameter_name(runs, tiny_model_dir):
    """The newest checkpoints (8 and 12) each hold the whole model in Hugging Face format and AdamW's
    moments for every parameter, full-sized (gathered from both shards) and keyed by its name; the
    per-step metrics equal the 1-process run's."""
    from nashalign.train.checkpoint import list_checkpoints, load_state_dict

    names = [p.name for p in list_checkpoints(runs["sharded"] / "checkpoints")]
    assert names == ["step_00000008", "step_00000012"]
    initial = _weights(Path(tiny_model_dir))
    last = runs["sharded"] / "checkpoints" / names[-1]
    optimizer = load_state_dict(last, "optimizer")
    shapes = {name: tuple(state["exp_avg"].shape) for name, state in optimizer["state"].items()}
    assert shapes == {name: tuple(t.shape) for name, t in initial.items()}
    assert all(int(state["step"]) == STEPS for state in optimizer["state"].values())
    sharded = [json.loads(line) for line in (runs["sharded"] / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in runs["reference"].metrics_file.read_text().splitlines()]
    assert [row["step"] for row in sharded] == list(range(1, STEPS + 1))
    for mine, theirs in zip(sharded, single):
        for key in ("loss", "rewards/accuracy", "lr"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
