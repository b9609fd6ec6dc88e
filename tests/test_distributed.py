"""Data-parallel training with 2 processes equals 1 process with the same global batch.

The runs go through the shipped DDP config, on CPU:

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/ddp.yaml \\
        --num_processes 2 ...

(accelerate then starts 2 processes that reduce over gloo). The pairs are the first 21 of
configs/train-tiny-pairs.jsonl and one optimizer step takes a global batch of 4 pairs:

    2 processes x per_device_batch_size 1 x gradient_accumulation_steps 2   (the runs under test)
    1 process   x per_device_batch_size 4 x gradient_accumulation_steps 1   (the reference, in-process)

so an epoch is ceil(21 / 4) = 6 steps whose last batch holds 1 pair: process 1 then has no pair and
must still take part in the gradient reduction. Two epochs = 12 steps, loss inpo, checkpoints every
4 steps, the newest 2 kept.

Launches (each a few seconds of start-up): (1) a worker run, this file as the script, that records
which pairs each process scored and stops itself after step 6 (a checkpoint exists at step 4, the
metrics reach step 6); (2) `nashalign train` through the CLI, which resumes from step 4 to step 12.
The resumed 2-process run must equal the uninterrupted 1-process run: parameters, per-step metrics
and the cached reference log-probs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DDP_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
PAIRS = ROOT / "configs" / "train-tiny-pairs.jsonl"
NUM_PAIRS, STEPS, INTERRUPT_AT = 21, 12, 6


class _Interrupted(Exception):
    pass


def _worker(config_path: str, record_dir: str, stop_at: int) -> None:
    """Run inside each launched process: train, recording the pairs this process scores; stop after
    step `stop_at` on every process (as a kill after the step would)."""
    import nashalign.data.cache
    from nashalign.config import TrainConfig, load_config
    from nashalign.train.loop import train

    rank = int(os.environ["RANK"])
    score_pairs = nashalign.data.cache.score_pairs

    def recording(model, pairs, **kwargs):
        with open(Path(record_dir) / f"scored-rank{rank}.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps([pair.content_hash() for pair in pairs]) + "\n")
        return score_pairs(model, pairs, **kwargs)

    nashalign.data.cache.score_pairs = recording

    def stop(step: int, metrics: dict) -> None:
        if step == stop_at:
            raise _Interrupted

    try:
        train(load_config(TrainConfig, config_path), callback=stop)
    except _Interrupted:
        print(f"rank {rank}: stopped after step {stop_at}")


def _launch(arguments: list[str], log: Path) -> None:
    """accelerate launch with the DDP config on 2 CPU processes; fails with the log's tail."""
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(DDP_CONFIG),
        "--num_processes", "2", "--main_process_port", str(free_port()), *arguments,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w", encoding="utf-8") as out:
        # a timeout turns a deadlock between the processes into a failure
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=240, cwd=ROOT)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(arguments[:3])} exited {done.returncode}:\n{log.read_text()[-3000:]}")


def _write_config(path: Path, model_dir: Path, pairs: Path, run_dir: Path, per_device: int, accumulation: int):
    import yaml

    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(pairs), "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "inpo", "eta": 0.05},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "epochs": 2, "per_device_batch_size": per_device,
                  "gradient_accumulation_steps": accumulation, "seed": 0},
        "output": {"dir": str(run_dir), "save_steps": 4, "save_total_limit": 2, "report_to": "none"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from nashalign.config import TrainConfig, load_config
    from nashalign.train.loop import train

    root = tmp_path_factory.mktemp("distributed")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:NUM_PAIRS]))
    single = _write_config(root / "single.yaml", tiny_model_dir, pairs, root / "single", 4, 1)
    double = _write_config(root / "double.yaml", tiny_model_dir, pairs, root / "double", 1, 2)
    records = root / "records"
    records.mkdir()

    reference = train(load_config(TrainConfig, single))
    _launch([str(Path(__file__)), "--worker", str(double), str(records), str(INTERRUPT_AT)], root / "interrupted.log")
    interrupted = {
        "log": (root / "interrupted.log").read_text(),
        "metrics": (root / "double" / "metrics.jsonl").read_text().splitlines(),
        "checkpoints": sorted(p.name for p in (root / "double" / "checkpoints").iterdir()),
        "final_exists": (root / "double" / "final").exists(),
    }
    _launch(["-m", "nashalign.cli", "train", "--config", str(double)], root / "resumed.log")
    return {"root": root, "reference": reference, "double": root / "double", "records": records,
            "interrupted": interrupted, "resumed_log": (root / "resumed.log").read_text()}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_two_processes_interrupted_and_resumed_equal_one_process(runs, tiny_model_dir):
    """Same global batch, same data order, gradients averaged over processes: after 12 AdamW steps
    every parameter agrees within 1e-5, though process 1 had no pair in each epoch's last step and
    the 2-process run was stopped after step 6 and resumed from its step-4 checkpoint. The weights
    moved (so agreeing is not trivial)."""
    single, double = _weights(runs["reference"].final_dir), _weights(runs["double"] / "final")
    initial = _weights(Path(tiny_model_dir))
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=1e-5, msg=name)
    moved = max(float((single[name] - initial[name]).abs().max()) for name in single)
    assert moved > 1e-3
    assert "resuming from" in runs["resumed_log"] and "step_00000004" in runs["resumed_log"]


def test_per_step_metrics_equal_one_process_and_are_written_once(runs):
    """metrics.jsonl holds steps 1..12 exactly once (the interrupted run's steps 5-6, logged past
    its last checkpoint, were dropped on resume and logged again), and each step's global-batch
    metrics equal the 1-process run's: the loss mean is reduced over both processes' pairs."""
    interrupted_steps = [json.loads(line)["step"] for line in runs["interrupted"]["metrics"]]
    assert interrupted_steps == list(range(1, INTERRUPT_AT + 1))
    double = [json.loads(line) for line in (runs["double"] / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in runs["reference"].metrics_file.read_text().splitlines()]
    assert [row["step"] for row in double] == list(range(1, STEPS + 1))
    for mine, theirs in zip(double, single):
        for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "lr"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
        assert mine["tokens"] == theirs["tokens"]


def test_only_the_main_process_writes_checkpoints_and_final(runs):
    """Checkpoints at steps 4 (before the stop) then 8 and 12 with the newest 2 kept, no leftover
    temporary directories, no final/ before the run ended, and the final model loads."""
    from transformers import AutoModelForCausalLM

    assert runs["interrupted"]["checkpoints"] == ["step_00000004"]
    assert not runs["interrupted"]["final_exists"]
    assert runs["interrupted"]["log"].count(f"stopped after step {INTERRUPT_AT}") == 2
    names = sorted(p.name for p in (runs["double"] / "checkpoints").iterdir())
    assert names == ["step_00000008", "step_00000012"]
    assert sorted(p.name for p in runs["double"].iterdir() if p.name.startswith(".")) == []
    model = AutoModelForCausalLM.from_pretrained(runs["double"] / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_scoring_is_split_between_processes_and_equals_one_process(runs):
    """Each process scored its own half of the 21 pairs (11 and 10, disjoint, together all of
    them), once: the resumed run found them all in the cache. The cached log-probs equal those the
    1-process run computed (one cache file, same fingerprint, same pairs, within float32 noise
    of different padding)."""
    from nashalign.data.cache import LogpCache

    scored = {rank: [json.loads(line) for line in (runs["records"] / f"scored-rank{rank}.jsonl").read_text().splitlines()]
              for rank in (0, 1)}
    assert [len(call) for call in scored[0]] == [11] and [len(call) for call in scored[1]] == [10]
    assert not set(scored[0][0]) & set(scored[1][0])
    double_files = sorted((runs["double"] / "logp_cache").glob("*.safetensors"))
    single_files = sorted((runs["reference"].run_dir / "logp_cache").glob("*.safetensors"))
    assert [f.name for f in double_files] == [f.name for f in single_files] and len(double_files) == 1
    fingerprint = double_files[0].stem
    double = LogpCache(runs["double"] / "logp_cache").load(fingerprint)
    single = LogpCache(runs["reference"].run_dir / "logp_cache").load(fingerprint)
    assert set(double) == set(single) == set(scored[0][0]) | set(scored[1][0])
    for key, values in single.items():
        assert double[key] == pytest.approx(values, abs=1e-5), key
    assert "21 hits, 0 to score" in runs["resumed_log"]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*sys.argv[2:4], int(sys.argv[4]))
