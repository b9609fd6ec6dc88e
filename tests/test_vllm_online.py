"""The online loop with `sampling.backend: vllm` on the real engine (vLLM's CPU build here).

Runs (each `nashalign online` in a subprocess; every engine start costs about a minute on a CPU):
(1) two INPO iterations uninterrupted: one engine for the whole run, each new policy's weights
loaded into it in place; (2) the same config SIGKILLed as the engine is about to draw iteration 1's
samples (stopped there by tests/plugins/pause_point.py), then rerun: the final weights and every
artifact equal run (1)'s (a new engine built from π_1's checkpoint samples what the reloaded engine
sampled); (3) two processes under `accelerate launch` (one engine each, sampling half the
prompts): iteration 0's samples equal run (1)'s byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nashalign.data.artifacts import read_json, read_jsonl, write_jsonl
from vllm_models import ENGINE_ARGS, save_sampling_model

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).parent / "plugins"
PROMPTS, K = 4, 4


def _config(root: Path, model_dir: Path, name: str, iterations: int = 2) -> Path:
    mapping = {
        "model": {"name_or_path": str(model_dir)},
        "oracle": {"type": "python", "function": "vowel_judge:prefer_vowels"},
        "run": {"name": name, "dir": str(root / "runs"), "iterations": iterations, "seed": 3},
        "prompts": {"file": str(root / "prompts.jsonl")},
        "sampling": {"backend": "vllm", "samples_per_prompt": K, "max_new_tokens": 8, "engine_args": ENGINE_ARGS},
        "pairs": {"method": "all_pairs"},
        "data": {"max_length": 64, "max_prompt_length": 32, "scoring_batch_size": 16},
        "loss": {"eta": 0.5, "tau": 0.1},
        "optim": {"lr": 1e-3, "epochs": 1, "per_device_batch_size": 4, "warmup_ratio": 0.0},
        "output": {"save_steps": 1, "report_to": "none"},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}


def _online(config: Path) -> list[str]:
    return [sys.executable, "-m", "nashalign.cli", "online", "--config", str(config)]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_online")
    write_jsonl(root / "prompts.jsonl", ({"prompt": [{"role": "user", "content": f"Question {i}: yes or no?"}]}
                                         for i in range(PROMPTS)))
    return root, save_sampling_model(root / "model", seed=0)


@pytest.fixture(scope="module")
def uninterrupted(setting):
    root, model_dir = setting
    done = subprocess.run(_online(_config(root, model_dir, "clean")), env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "runs" / "clean", done.stdout + done.stderr  # vLLM logs to stdout


def test_two_iterations_with_one_engine_whose_weights_are_updated_in_place(setting, uninterrupted):
    """Every iteration's artifacts exist with K samples per prompt; one engine served the run's three
    sampling stages (one engine start in vLLM's log, in-place reloads); the policy moved."""
    root, model_dir = setting
    run_dir, log = uninterrupted
    assert log.count("Initializing a V1 LLM engine") == 1
    assert log.count("Reloading weights inplace") >= 1  # the worker's last log lines may be lost at shutdown
    for t in range(2):
        rows = read_jsonl(run_dir / f"iter_{t}" / "generations.jsonl")
        assert sorted((r["prompt_index"], r["sample_index"]) for r in rows) == [(p, j) for p in range(PROMPTS)
                                                                              for j in range(K)]
        assert all(len(r["token_ids"]) <= 8 and r["finish_reason"] in ("stop", "length") for r in rows)
        assert read_json(run_dir / f"iter_{t}" / "summary.json")["iteration"] == t
    assert len(read_jsonl(run_dir / "iter_2" / "generations.jsonl")) == PROMPTS * K
    before, after = load_file(model_dir / "model.safetensors"), load_file(
        run_dir / "iter_1" / "train" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_killed_during_vllm_sampling_resumes_to_the_same_run(setting, uninterrupted, kill_at_pause):
    """SIGKILL as the engine, holding π_1's weights, is about to sample iteration 1's prompts (for
    iteration 0's win rate; its samples are not written), rerun: the final weights are bit-for-bit
    those of the uninterrupted run, and the same artifacts hold the same rows."""
    root, model_dir = setting
    clean_dir, _ = uninterrupted
    config = _config(root, model_dir, "crash")
    run_dir = root / "runs" / "crash"
    # its own process group: the kill takes vLLM's engine processes too (they outlive a SIGKILLed parent)
    kill_at_pause("vllm-sampling", ["online", "--config", str(config)], _env(), process_group=True)
    assert (run_dir / "iter_0" / "train" / "final").is_dir() and (run_dir / "iter_1").is_dir()
    assert not (run_dir / "iter_1" / "generations.jsonl").exists()
    assert not (run_dir / "iter_0" / "summary.json").exists()

    resumed = subprocess.run(_online(config), env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean = load_file(clean_dir / "iter_1" / "train" / "final" / "model.safetensors")
    crashed = load_file(run_dir / "iter_1" / "train" / "final" / "model.safetensors")
    for key in clean:
        torch.testing.assert_close(crashed[key], clean[key], rtol=0, atol=0)
    for name in ("iter_1/generations.jsonl", "iter_2/generations.jsonl", "iter_1/judgments.jsonl"):
        assert (run_dir / name).read_bytes() == (clean_dir / name).read_bytes(), name


def test_two_processes_sample_with_one_engine_each(setting, uninterrupted):
    """Under `accelerate launch` with 2 CPU processes, each process samples its half of the prompts
    with its own engine; the merged samples of iteration 0 equal the 1-process run's byte for byte."""
    from ports import free_port

    root, model_dir = setting
    clean_dir, _ = uninterrupted
    config = _config(root, model_dir, "double", iterations=1)
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "nashalign.cli", "online", "--config", str(config)]
    done = subprocess.run(command, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("Initializing a V1 LLM engine") == 2
    double = root / "runs" / "double"
    assert (double / "iter_0" / "generations.jsonl").read_bytes() == (clean_dir / "iter_0" / "generations.jsonl").read_bytes()
    assert len(read_jsonl(double / "iter_1" / "generations.jsonl")) == PROMPTS * K
