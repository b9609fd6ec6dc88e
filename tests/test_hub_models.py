"""Models named by hub id, the way users run them: the tiny models are written into a local Hugging
Face cache under hub-style names, HF_HUB_OFFLINE=1, and the `nashalign` CLI runs in a subprocess
(the hub client reads its cache location when it is imported, so a fresh process is the real test).

    acme/tiny-chat    the tiny chat model (policy, reference, baseline)
    acme/tiny-judge   the same weights under another name, used as a pair-preference judge
    acme/tiny-nopad   its tokenizer has no pad token (as Llama-3's has none)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from nashalign.data.artifacts import read_json, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_model_dir):
    from nashalign.models.loader import load_tokenizer
    from nashalign.models.tiny import write_hub_cache

    cache = tmp_path_factory.mktemp("hub") / "cache"
    write_hub_cache(tiny_model_dir, cache, "acme/tiny-chat")
    write_hub_cache(tiny_model_dir, cache, "acme/tiny-judge")
    no_pad = tmp_path_factory.mktemp("nopad") / "model"
    shutil.copytree(tiny_model_dir, no_pad)
    tokenizer = load_tokenizer(no_pad, pad_fallback=False)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    write_hub_cache(no_pad, cache, "acme/tiny-nopad")
    return cache


def _cli(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), env.get("PYTHONPATH", "")])
    env.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    return subprocess.run([sys.executable, "-m", "nashalign.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def _prompts(path: Path, count: int) -> Path:
    write_jsonl(path, ({"prompt": [{"role": "user", "content": f"Question {i}: yes or no?"}]} for i in range(count)))
    return path


def test_online_with_hub_named_policy_and_pair_model_judge(tmp_path, hub_cache):
    """Two INPO iterations with π_0 and the judge named by hub id: every stage runs, π_ref is π_0
    (iteration 0 scores ref and prev with the same model), and the judge was asked."""
    config = {
        "model": {"name_or_path": "acme/tiny-chat"},
        "oracle": {"type": "pair_model", "path": "acme/tiny-judge", "dtype": "float32", "device": "cpu",
                   "batch_size": 16, "max_length": 256},
        "run": {"name": "hub", "dir": str(tmp_path / "runs"), "iterations": 2, "seed": 1},
        "prompts": {"file": str(_prompts(tmp_path / "prompts.jsonl", 3))},
        "sampling": {"backend": "transformers", "samples_per_prompt": 4, "max_new_tokens": 6},
        "pairs": {"method": "tournament"},
        "data": {"max_length": 64, "max_prompt_length": 32},
        "loss": {"eta": 0.5, "tau": 0.1},
        "optim": {"lr": 1e-3, "epochs": 1, "per_device_batch_size": 4, "warmup_ratio": 0.0},
        "output": {"save_steps": 0, "report_to": "none"},
    }
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(config))
    done = _cli(["online", "--config", str(path)], hub_cache, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "hub"
    for t in range(2):
        assert len(read_jsonl(run_dir / f"iter_{t}" / "generations.jsonl")) == 3 * 4
        assert read_json(run_dir / f"iter_{t}" / "summary.json")["judge_calls"] > 0
        assert (run_dir / f"iter_{t}" / "train" / "final" / "model.safetensors").exists()
    logps = load_file(run_dir / "iter_0" / "logps.safetensors")
    assert (logps["ref_chosen"] == logps["prev_chosen"]).all()


def test_train_and_eval_with_hub_named_models(tmp_path, hub_cache):
    """`nashalign train` on a hub-named policy; `nashalign eval` with hub-named models whose
    tokenizer has no pad token, and the model options (device, dtype) on the command line."""
    done = _cli(["train", "--config", str(ROOT / "configs" / "train-tiny.yaml"),
                 "--set", "model.name_or_path=acme/tiny-chat", "--set", f"data.train_file={ROOT / 'configs' / 'train-tiny-pairs.jsonl'}",
                 "--set", f"output.dir={tmp_path / 'train'}", "--set", "optim.max_steps=2"], hub_cache, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "train" / "final" / "model.safetensors").exists()

    oracle = tmp_path / "oracle.yaml"
    oracle.write_text(yaml.safe_dump({"oracle": {"type": "pair_model", "path": "acme/tiny-judge", "device": "cpu"}}))
    out = tmp_path / "winrate.json"
    done = _cli(["eval", "winrate", "--policy", "acme/tiny-nopad", "--baseline", "acme/tiny-nopad",
                 "--prompts", str(_prompts(tmp_path / "prompts.jsonl", 4)), "--oracle", str(oracle),
                 "--max-new-tokens", "5", "--device", "cpu", "--dtype", "float32", "--output", str(out)],
                hub_cache, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    # the policy against itself with the same seed: the same answers, each pair a tie at exactly ½
    assert result["win_rate"]["estimate"] == 0.5 and result["kl_to_ref"]["estimate"] == 0.0

    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, ({"prompt": f"Q{i}: ", "chosen": "yes", "rejected": "no no"} for i in range(4)))
    out = tmp_path / "ranking.json"
    done = _cli(["eval", "ranking", "--model", "acme/tiny-nopad", "--ref", "acme/tiny-chat", "--data", str(data),
                 "--output", str(out)], hub_cache, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pairs"] == 4 and result["implicit_reward"] == 0.5  # same weights: every margin is 0


def test_a_missing_hub_model_is_one_line_naming_it(tmp_path, hub_cache):
    done = _cli(["train", "--config", str(ROOT / "configs" / "train-tiny.yaml"),
                 "--set", "model.name_or_path=acme/not-cached", "--set", f"output.dir={tmp_path / 'train'}",
                 "--set", f"data.train_file={ROOT / 'configs' / 'train-tiny-pairs.jsonl'}"], hub_cache, tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "acme/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0], done.stderr


def test_the_paper_config_runs_one_iteration_with_tiny_hub_models(tmp_path, hub_cache):
    """configs/llama3-8b-inpo.yaml as shipped, with overrides that only swap the models for tiny
    hub-named ones and shrink the sizes (one iteration, short answers, a CPU sampler)."""
    prompts = _prompts(tmp_path / "prompts-iter1.jsonl", 3)
    overrides = {
        "model.name_or_path": "acme/tiny-chat",
        "oracle.path": "acme/tiny-judge",
        "oracle.max_length": 256,
        "run.dir": str(tmp_path / "runs"),
        "run.iterations": 1,
        "prompts.files": f"[{prompts}]",
        "sampling.backend": "transformers",
        "sampling.samples_per_prompt": 4,
        "sampling.max_new_tokens": 6,
        "data.max_length": 64,
        "data.max_prompt_length": 32,
        "optim.per_device_batch_size": 1,
        "optim.gradient_accumulation_steps": 2,
    }
    args = ["online", "--config", str(ROOT / "configs" / "llama3-8b-inpo.yaml")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    done = _cli(args, hub_cache, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "llama3-8b-inpo"
    assert read_json(run_dir / "iter_0" / "pair_stats.json")["method"] == "tournament"
    assert (run_dir / "iter_0" / "train" / "final" / "model.safetensors").exists()
    assert read_json(run_dir / "iter_0" / "summary.json")["iteration"] == 0
