"""GPU-only tests: bf16 training on CUDA, the vLLM sampler with tensor parallelism, and the shipped
DeepSpeed ZeRO and FSDP configs under `accelerate launch`. Each is skipped, with its reason, where
CUDA, enough GPUs, vLLM or DeepSpeed is missing; on a CUDA machine they run with the rest of the
suite (`pytest -m gpu` selects them alone).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "configs" / "train-tiny-pairs.jsonl"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

needs_cuda = pytest.mark.skipif(GPUS == 0, reason="no CUDA device")
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA devices, found {GPUS}")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

pytestmark = pytest.mark.gpu


def _train_config(model_dir: Path, run_dir: Path, **optim):
    from nashalign.config import TrainConfig, from_mapping

    return from_mapping(TrainConfig, {
        "model": {"name_or_path": str(model_dir), "mixed_precision": optim.pop("mixed_precision", "no")},
        "data": {"train_file": str(PAIRS), "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "per_device_batch_size": 8, "max_steps": 3, "seed": 0, **optim},
        "output": {"dir": str(run_dir), "save_steps": 0, "report_to": "none"},
    })


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@needs_cuda
def test_bf16_training_steps_on_cuda_track_float32(tiny_model_dir, tmp_path):
    """Three DPO steps on the GPU with bfloat16 autocast: the model runs on CUDA, the weights stay
    float32 and move, and each step's loss equals the float32 run's to bfloat16 precision (8
    significant bits: relative 2e-2 leaves room for the rounding of a 2-layer forward pass)."""
    from nashalign.train.loop import train

    torch.cuda.reset_peak_memory_stats()
    bf16 = train(_train_config(tiny_model_dir, tmp_path / "bf16", mixed_precision="bf16"))
    assert torch.cuda.max_memory_allocated() > 0
    fp32 = train(_train_config(tiny_model_dir, tmp_path / "fp32"))
    rows = {name: [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
            for name, result in (("bf16", bf16), ("fp32", fp32))}
    assert [row["step"] for row in rows["bf16"]] == [1, 2, 3]
    for low, full in zip(rows["bf16"], rows["fp32"]):
        assert math.isfinite(low["loss"]) and low["loss"] == pytest.approx(full["loss"], rel=2e-2)
    final, initial = _weights(bf16.final_dir), _weights(Path(tiny_model_dir))
    assert all(tensor.dtype == torch.float32 for tensor in final.values())
    assert max(float((final[name] - initial[name]).abs().max()) for name in final) > 1e-4


@needs_cuda
@needs_two_gpus
@needs_vllm
def test_vllm_sampler_with_tensor_parallelism_matches_transformers_and_reloads(tmp_path):
    """Greedy decoding with vLLM over 2 GPUs (float32) gives the token ids transformers' greedy
    decoding gives, for model A and, after update_weights, for model B (another seed), whose
    continuations differ from A's. The models have head size 64, which vLLM's kernels support."""
    from nashalign.sampling.engines import make_sampler

    first, second = _save_sampling_model(tmp_path / "a", seed=0), _save_sampling_model(tmp_path / "b", seed=1)
    prompts = ["The quick brown fox", "What is the capital of France?", "Numbers: 1 2 3"]

    def greedy_with_transformers(model_dir: Path) -> list[list[int]]:
        sampler = make_sampler("transformers", str(model_dir), max_new_tokens=6, temperature=0.0)
        sampler.model.to("cuda")
        return [group[0].token_ids for group in sampler.generate(prompts, 1, progress=False)]

    expected = {path: greedy_with_transformers(path) for path in (first, second)}
    assert expected[first] != expected[second]
    sampler = make_sampler(
        "vllm", str(first), max_new_tokens=6, temperature=0.0, tensor_parallel_size=2,
        llm_kwargs={"dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True},
    )
    try:
        for path in (first, second):
            if path == second:
                sampler.update_weights(str(second))
            groups = sampler.generate(prompts, 2, progress=False)
            assert [[g.token_ids for g in group] for group in groups] == [[ids, ids] for ids in expected[path]]
    finally:
        sampler.close()


def _save_sampling_model(directory: Path, seed: int) -> Path:
    """A tiny Llama whose output row for the pad token is zero: that logit is 0 while the largest of
    the other ~500 random logits is positive, so pad never wins an argmax (the transformers sampler
    suppresses pad, vLLM does not, and greedy decoding must not depend on that difference)."""
    from nashalign.models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=256, num_heads=4, num_layers=2, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.pad_token_id] = 0.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _launch_training(accelerate_config: str, model_dir: Path, run_dir: Path, overrides: list[str], log: Path):
    """`accelerate launch --config_file configs/accelerate/<config> -m nashalign.cli train` on up to
    2 GPUs, with a tiny-model config written to run_dir; returns the number of processes."""
    import yaml

    processes = min(GPUS, 2)
    run_dir.mkdir(parents=True)
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(PAIRS), "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "inpo", "eta": 0.05},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "epochs": 1, "per_device_batch_size": 2,
                  "gradient_accumulation_steps": 2, "seed": 0},
        "output": {"dir": str(run_dir), "save_steps": 2, "report_to": "none"},
    }))
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(ROOT / "configs" / "accelerate" / accelerate_config),
        "--num_processes", str(processes), "--main_process_port", str(free_port()),
        "-m", "nashalign.cli", "train", "--config", str(config), *[arg for item in overrides for arg in ("--set", item)],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, log.read_text()[-3000:]
    return processes


def _check_sharded_run(run_dir: Path, model_dir: Path, processes: int) -> None:
    """24 pairs at 2 x 2 x processes a step; one metrics line per step with a finite loss; the last
    step's checkpoint is complete; final/ has the full weights (the gathered state dict, not one
    process's shard), and they moved."""
    from nashalign.train.checkpoint import checkpoint_name, latest_checkpoint

    steps = math.ceil(24 / (4 * processes))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in rows)
    assert latest_checkpoint(run_dir / "checkpoints").name == checkpoint_name(steps)
    final, initial = _weights(run_dir / "final"), _weights(model_dir)
    assert {name: tuple(t.shape) for name, t in final.items()} == {name: tuple(t.shape) for name, t in initial.items()}
    assert max(float((final[name].float() - initial[name].float()).abs().max()) for name in final) > 1e-4


@needs_cuda
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_config_trains_and_saves_full_weights(stage, tiny_model_dir, tmp_path):
    """The shipped ZeRO config in bf16 (DeepSpeed keeps float32 master weights), with nashalign's
    accumulation of 2 micro-batches: DeepSpeed steps once per optimizer step."""
    run_dir = tmp_path / f"zero{stage}"
    processes = _launch_training(
        f"deepspeed-zero{stage}.yaml", tiny_model_dir, run_dir,
        ["model.dtype=bfloat16", "model.mixed_precision=bf16"], tmp_path / "log.txt",
    )
    _check_sharded_run(run_dir, Path(tiny_model_dir), processes)


def _resume_worker(config_path: str, kill_after: int) -> None:
    """Inside each launched process: train; SIGKILL this process once step `kill_after` is done."""
    import logging
    import signal

    from nashalign.config import TrainConfig, load_config
    from nashalign.train.loop import train

    def kill(step: int, metrics: dict) -> None:
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    logging.basicConfig(level=logging.INFO)
    train(load_config(TrainConfig, config_path), callback=kill)


def _launch_worker(accelerate_config: str, config: Path, kill_after: int, log: Path) -> int:
    processes = min(GPUS, 2)
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(ROOT / "configs" / "accelerate" / accelerate_config), "--mixed_precision", "no",
        "--num_processes", str(processes), "--main_process_port", str(free_port()),
        str(Path(__file__)), "--worker", str(config), str(kill_after),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600, cwd=ROOT).returncode


@needs_cuda
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_killed_deepspeed_phase_resumes_to_the_uninterrupted_weights(stage, tiny_model_dir, tmp_path):
    """ZeRO-{stage} in float32 (so that the comparison is not bfloat16 rounding), 2 epochs over the 24
    pairs, a checkpoint every 2 steps: a run SIGKILLed after step 3 resumes from its step-2
    checkpoint (DeepSpeed's partitioned optimizer state, one file per process, read back by
    DeepSpeed) and ends with the uninterrupted run's weights (1e-5) and per-step losses."""
    import yaml

    from nashalign.train.checkpoint import checkpoint_name, list_checkpoints

    runs = {}
    for name, kill_after in (("whole", 0), ("killed", 3)):
        run_dir = tmp_path / name
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(tiny_model_dir), "mixed_precision": "no"},
            "data": {"train_file": str(PAIRS), "max_length": 64, "max_prompt_length": 32},
            "loss": {"name": "inpo", "eta": 0.05},
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "epochs": 2, "per_device_batch_size": 2,
                      "gradient_accumulation_steps": 2, "seed": 0},
            "output": {"dir": str(run_dir), "save_steps": 2, "save_total_limit": 2, "report_to": "none"},
        }))
        returncode = _launch_worker(f"deepspeed-zero{stage}.yaml", config, kill_after, tmp_path / f"{name}.log")
        if name == "killed":
            assert returncode != 0 and not (run_dir / "final").exists()
            assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [checkpoint_name(2)]
            shards = sorted((run_dir / "checkpoints" / checkpoint_name(2) / "deepspeed").glob("*optim_states*"))
            assert len(shards) == min(GPUS, 2)
            returncode = _launch_worker(f"deepspeed-zero{stage}.yaml", config, 0, tmp_path / "resumed.log")
            assert "resuming from" in (tmp_path / "resumed.log").read_text()
        assert returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        runs[name] = run_dir
    whole, killed = _weights(runs["whole"] / "final"), _weights(runs["killed"] / "final")
    assert whole.keys() == killed.keys()
    for key in whole:
        torch.testing.assert_close(killed[key].float(), whole[key].float(), rtol=0, atol=1e-5, msg=key)
    losses = {name: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for name, run in runs.items()}
    assert losses["killed"] == pytest.approx(losses["whole"], rel=1e-5)


@needs_cuda
def test_fsdp_config_trains_and_saves_full_weights(tiny_model_dir, tmp_path):
    """The shipped FSDP2 config (one unit per LlamaDecoderLayer) with float32 weights and bf16
    compute."""
    run_dir = tmp_path / "fsdp"
    processes = _launch_training(
        "fsdp.yaml", tiny_model_dir, run_dir, ["model.mixed_precision=bf16"], tmp_path / "log.txt"
    )
    _check_sharded_run(run_dir, Path(tiny_model_dir), processes)


@needs_cuda
def test_online_stages_return_cuda_memory_to_the_pre_stage_level(tiny_model_dir, tmp_path, monkeypatch):
    """Two online iterations on the GPU with a pair-model judge on CUDA: when each training phase
    starts, the memory allocated on the device is what it was before the loop (no sampler, judge or
    scoring model left), and so it is after the loop."""
    sys.path.insert(0, str(Path(__file__).parent))
    import nashalign.train.loop as train
    from nashalign.config import from_mapping
    from nashalign.online.loop import OnlineConfig, run_online
    from test_online import _config

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    at_training = []
    original_train = train.train_pairs

    def checking_train(*args, **kwargs):
        at_training.append(torch.cuda.memory_allocated())
        return original_train(*args, **kwargs)

    monkeypatch.setattr(train, "train_pairs", checking_train)
    judge = {"type": "pair_model", "path": str(tiny_model_dir), "device": "cuda", "dtype": "float32"}
    config = from_mapping(OnlineConfig, _config(tmp_path, tiny_model_dir, prompts=2, oracle=judge))
    run_online(config, progress=False)
    assert at_training == [before, before]
    assert torch.cuda.memory_allocated() == before


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _resume_worker(sys.argv[2], int(sys.argv[3]))
