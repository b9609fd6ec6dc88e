"""The online loop end to end on the tiny model: stages, artifacts, summary rows, and crash safety.

The crash tests run `nashalign online` in a subprocess, SIGKILL it once during sampling, once during
judging and once during training, rerun the same command, and compare the final weights with those of
an uninterrupted run with the same seed (bit-for-bit on CPU with one thread).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from nashalign.artifacts import read_json, read_jsonl, write_jsonl
from nashalign.config import from_mapping
from nashalign.online import OnlineConfig, run_online
from nashalign.oracles import GameOracle

ANSWERS = ["yes", "no", "maybe", "good", "bad"]
GAME_P = [  # a rock-paper-scissors cycle over yes/no/maybe, good/bad lose to all of them
    [0.5, 0.9, 0.1, 0.8, 0.8],
    [0.1, 0.5, 0.9, 0.8, 0.8],
    [0.9, 0.1, 0.5, 0.8, 0.8],
    [0.2, 0.2, 0.2, 0.5, 0.6],
    [0.2, 0.2, 0.2, 0.4, 0.5],
]


def _config(tmp_path: Path, model_dir: Path, *, prompts: int = 4, iterations: int = 2, oracle=None, **over):
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, ({"prompt": [{"role": "user", "content": f"Question {i}: yes or no?"}]}
                               for i in range(prompts)))
    mapping = {
        "model": {"name_or_path": str(model_dir)},
        "oracle": oracle,
        "run": {"name": "run", "dir": str(tmp_path / "runs"), "iterations": iterations, "seed": 3},
        "prompts": {"file": str(prompts_file)},
        "sampling": {"backend": "transformers", "samples_per_prompt": 4, "max_new_tokens": 6, "batch_size": 8},
        "pairs": {"method": "all_pairs"},
        "data": {"max_length": 64, "max_prompt_length": 32, "scoring_batch_size": 16},
        "loss": {"eta": 0.5, "tau": 0.1},
        "optim": {"lr": 1e-3, "epochs": 1, "per_device_batch_size": 4, "warmup_ratio": 0.0},
        "output": {"save_steps": 1, "report_to": "none"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        mapping[section][name] = value
    return mapping


def test_two_inpo_iterations_against_the_game_oracle(tmp_path, tiny_model_dir):
    """Two INPO iterations run end to end; every artifact exists; the trained weights moved; the
    summary rows are consistent with the artifacts."""
    config = from_mapping(OnlineConfig, _config(tmp_path, tiny_model_dir))
    oracle = GameOracle(ANSWERS, GAME_P, invalid="worst")
    result = run_online(config, oracle=oracle)
    run_dir = result.run_dir
    assert (run_dir / "config.yaml").exists()
    for t in range(2):
        it = run_dir / f"iter_{t}"
        generations = read_jsonl(it / "generations.jsonl")
        assert len(generations) == 4 * 4
        assert {(g["prompt_index"], g["sample_index"]) for g in generations} == {(p, j) for p in range(4) for j in range(4)}
        pairs = read_jsonl(it / "pairs.jsonl")
        stats = read_json(it / "pair_stats.json")
        assert stats["kept"] == len(pairs) > 0
        logps = load_file(it / "logps.safetensors")
        assert set(logps) == {"ref_chosen", "ref_rejected", "prev_chosen", "prev_rejected"}
        assert all(v.shape == (len(pairs),) for v in logps.values())
        if t == 0:  # π_0 is the reference: both scorings are the same model
            torch.testing.assert_close(logps["ref_chosen"], logps["prev_chosen"])
        assert (it / "train" / "final" / "model.safetensors").exists()
        summary = read_json(it / "summary.json")
        assert summary["iteration"] == t and summary["pairs_kept"] == len(pairs) and summary["prompts"] == 4
        # π_{t+1}'s sample j of each prompt against π_t's sample j, judged afresh from the artifacts
        following = read_jsonl(run_dir / f"iter_{t + 1}" / "generations.jsonl")
        judge = GameOracle(ANSWERS, GAME_P, invalid="worst")
        probs = judge.prob([str(g["prompt_index"]) for g in generations], [g["text"] for g in following],
                           [g["text"] for g in generations])
        assert [(g["prompt_index"], g["sample_index"]) for g in following] == \
            [(g["prompt_index"], g["sample_index"]) for g in generations]
        assert summary["win_rate_next_vs_current"] == pytest.approx(float(np.mean(probs)), abs=1e-12)
        assert summary["judge_calls"] > 0
    assert len(read_jsonl(run_dir / "iter_2" / "generations.jsonl")) == 16
    assert result.final_model == run_dir / "iter_1" / "train" / "final"
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.final_model / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert [row["iteration"] for row in result.summaries] == [0, 1]

    _check_scoring_roles(config, run_dir, tiny_model_dir)

    # A second call finds every artifact complete and recomputes nothing: the oracle is not asked again.
    calls = oracle.counts.judge_calls
    again = run_online(config, oracle=oracle)
    assert oracle.counts.judge_calls == calls
    assert again.summaries == result.summaries


def _check_scoring_roles(config, run_dir: Path, initial: Path) -> None:
    """π_ref stays π_0 and π_t is iteration t−1's trained weights: the log-probs each iteration
    trained with (logps.safetensors) equal those of its pairs scored afresh under the model loaded
    from π_0 (ref, every t) and from iter_{t-1}/train/final (prev, t ≥ 1; π_0 at t = 0); at t = 1
    the two roles differ (the check tells them apart)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nashalign.data import collate_pairs
    from nashalign.logprobs import pair_logps
    from nashalign.online import tokenized_pairs
    from nashalign.prompts import prompt_set

    tokenizer = AutoTokenizer.from_pretrained(initial)
    for t in range(config.run.iterations):
        it = run_dir / f"iter_{t}"
        rows = read_jsonl(it / "generations.jsonl")
        groups = [sorted((r for r in rows if r["prompt_index"] == p), key=lambda r: r["sample_index"])
                  for p in range(1 + max(r["prompt_index"] for r in rows))]
        pairs = tokenized_pairs(read_jsonl(it / "pairs.jsonl"), groups, prompt_set(config.prompts, t, tokenizer).ids,
                                tokenizer.eos_token_id)
        saved = load_file(it / "logps.safetensors")
        previous = initial if t == 0 else run_dir / f"iter_{t - 1}" / "train" / "final"
        for role, source in (("ref", initial), ("prev", previous)):
            model = AutoModelForCausalLM.from_pretrained(source).eval()
            with torch.no_grad():
                fresh = pair_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
            for side in ("chosen", "rejected"):
                torch.testing.assert_close(saved[f"{role}_{side}"], fresh[f"{side}_logps"], rtol=0, atol=1e-4,
                                           msg=f"iter_{t} {role}_{side}")
        if t >= 1:
            assert float((saved["ref_chosen"] - saved["prev_chosen"]).abs().max()) > 1e-2


def test_a_different_config_in_the_same_run_directory_is_refused(tmp_path, tiny_model_dir):
    from nashalign import NashalignError

    mapping = _config(tmp_path, tiny_model_dir, iterations=1, prompts=2)
    oracle = GameOracle(ANSWERS, GAME_P, invalid="worst")
    run_online(from_mapping(OnlineConfig, mapping), oracle=oracle)
    mapping["loss"]["eta"] = 0.7
    with pytest.raises(NashalignError, match="different config"):
        run_online(from_mapping(OnlineConfig, mapping), oracle=oracle)


# --------------------------------------------------------------------------- crash safety


def _cli_config(tmp_path: Path, model_dir: Path, name: str) -> Path:
    mapping = _config(
        tmp_path, model_dir, prompts=8, iterations=2,
        oracle={"type": "python", "function": "vowel_judge:prefer_vowels"},
        sampling__max_new_tokens=12, sampling__batch_size=4,
    )
    mapping["run"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "plugins"), env.get("PYTHONPATH", "")])
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    env.update(extra)
    return env


def _run(config: Path, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nashalign.cli", "online", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=600)


def _final_weights(run_dir: Path):
    return load_file(run_dir / "iter_1" / "train" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config = _cli_config(tmp_path, tiny_model_dir, "clean")
    done = _run(config, _env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "runs" / "clean"


def _artifact_rows(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): len(read_jsonl(p)) for p in sorted(run_dir.glob("iter_*/*.jsonl"))}


@pytest.mark.parametrize("stage", ["sampling", "judging", "training"])
def test_killed_run_resumes_to_the_same_weights(stage, tmp_path, tiny_model_dir, uninterrupted, kill_at_pause):
    """The loop is SIGKILLed at a fixed point of each stage (it pauses there, see
    tests/plugins/pause_point.py): iteration 1 about to sample; the first judge call of iteration
    0; iteration 0's training with its first checkpoint complete. The rerun ends with the
    uninterrupted run's weights, bit for bit, and the same artifacts."""
    config = _cli_config(tmp_path, tiny_model_dir, "crash")
    run_dir = tmp_path / "runs" / "crash"
    point = {"sampling": "sampling", "judging": "judging", "training": "checkpoint"}[stage]
    kill_at_pause(point, ["online", "--config", str(config)], _env(tmp_path))
    if stage == "sampling":
        assert (run_dir / "iter_0" / "train" / "final").exists()
        assert not (run_dir / "iter_1" / "generations.jsonl").exists()
    elif stage == "judging":
        assert (run_dir / "iter_0" / "generations.jsonl").exists()
        assert not (run_dir / "iter_0" / "pairs.jsonl").exists()
    else:
        checkpoints = sorted(p.name for p in (run_dir / "iter_0" / "train" / "checkpoints").glob("step_*/COMPLETE"))
        assert len(checkpoints) == 1
        assert not (run_dir / "iter_0" / "train" / "final").exists()

    resumed = _run(config, _env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean, crashed = _final_weights(uninterrupted), _final_weights(run_dir)
    assert clean.keys() == crashed.keys()
    for key in clean:
        torch.testing.assert_close(crashed[key], clean[key], rtol=0, atol=0)
    # No artifact is duplicated or lost: the same files with the same number of rows.
    assert _artifact_rows(run_dir) == _artifact_rows(uninterrupted)
    assert not list(run_dir.rglob(".tmp-*"))
