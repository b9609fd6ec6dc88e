"""What a run prints: one bar per stage that moves with the work, one summary line per stage, no
model-loading bars, nothing from processes other than the main one."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from nashalign import progress
from nashalign.data.artifacts import write_jsonl
from nashalign.judges.oracles import Oracle
from nashalign.judges.pairs import make_pairs


class _BatchedJudge(Oracle):
    """A slow judge stand-in: scores in batches of 3 rows and reports after each, recording where the
    stage's bar stood."""

    name = "batched"
    slow = True

    def __init__(self):
        super().__init__()
        self.positions = []

    def _prob(self, prompts, first, second):
        for done in range(3, len(first) + 3, 3):
            progress.report(min(done, len(first)), len(first))
            current = progress.current_stage()
            self.positions.append(None if current is None else current.done)
        self.counts.judge_calls += len(first)
        return np.array([0.75 if len(a) > len(b) else 0.25 for a, b in zip(first, second)])


def test_work_spans_move_the_bar_by_their_share():
    with progress.stage("demo", 10, "thing", show=False) as current:
        with progress.work(4):
            progress.report(1, 2)
            assert current.done == 2
            with progress.work(100):  # nested: the outer span keeps reporting
                progress.report(3, 4)
                assert current.done == 3
        assert current.done == 4  # the span ends exactly where it was allotted, whatever was reported
        with progress.work(6):
            pass
        assert current.done == 10
    progress.report(1, 1)  # outside a stage: nothing to move, no error


def test_judging_stage_counts_the_tournament_and_logs_one_line(caplog, monkeypatch):
    """Tournament over B = 2 prompts, K = 8: 2 · (3·8/2 − 1) = 22 comparisons, in log2(8) + 1 = 4 oracle
    calls of 8, 8, 4, 2 comparisons; the bar ends at 22 and moves inside each call (the judge reports
    every 3 rows). The summary line names the comparisons and the judge calls; with RANK=1 (another
    process of a launch) there is no line."""
    monkeypatch.delenv("RANK", raising=False)
    judge = _BatchedJudge()
    responses = [["x" * (j + 1) for j in range(8)], ["y" * (8 - j) for j in range(8)]]
    with caplog.at_level(logging.INFO, logger="nashalign.progress"):
        result = make_pairs("tournament", judge, ["p0", "p1"], responses, decide="threshold")
    assert result.stats.comparisons == 22
    lines = [r.getMessage() for r in caplog.records if r.name == "nashalign.progress"]
    assert len(lines) == 1 and lines[0].startswith("judging: 22 comparisons in ")
    assert "tournament, 22 judge calls, 2 pairs kept from 2 prompts" in lines[0]
    # inside the first call (8 comparisons): 3, 6, then 8 of 8 rows reported
    assert judge.positions[:3] == [3, 6, 8]

    caplog.clear()
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger="nashalign.progress"):
        make_pairs("tournament", _BatchedJudge(), ["p0", "p1"], responses, decide="threshold")
    assert not [r for r in caplog.records if r.name == "nashalign.progress"]


def test_a_vowel_judge_called_outside_a_stage_shows_its_own(caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    judge = _BatchedJudge()
    with caplog.at_level(logging.INFO, logger="nashalign.progress"):
        judge.prob(["p"] * 5, ["a", "bb", "c", "dd", "same"], ["bb", "a", "dd", "c", "same"])
    lines = [r.getMessage() for r in caplog.records if r.name == "nashalign.progress"]
    assert len(lines) == 1 and lines[0].startswith("judging (batched): 4 comparisons in ")  # identical texts skip the judge


def test_cli_run_prints_stage_lines_and_no_loading_bars(tmp_path, tiny_model_dir):
    """`nashalign online` on the tiny model (3 prompts, K = 4: a tournament makes 3 · (3·4/2 − 1) = 15
    comparisons): stderr has a summary line for each stage (sampling,
    judging, log-probs, training) and none of transformers' 'Loading weights' / 'Writing model
    shards' bars, which a run used to print for every model load and save."""
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, ({"prompt": f"Question {i}: yes or no?"} for i in range(3)))
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "oracle": {"type": "python", "function": "vowel_judge:prefer_vowels"},
        "run": {"name": "run", "dir": str(tmp_path / "runs"), "iterations": 1, "seed": 0},
        "prompts": {"file": str(prompts)},
        "sampling": {"backend": "transformers", "samples_per_prompt": 4, "max_new_tokens": 5},
        # threshold decisions: the vowel judge's P > 1/2 is an order (shorter, then more vowels), so each
        # final keeps its pair unless the two responses tie; with Bernoulli draws a seed could lose all three
        "pairs": {"method": "tournament", "decide": "threshold"},
        "data": {"max_length": 64, "max_prompt_length": 32},
        "optim": {"lr": 1e-3, "epochs": 1, "per_device_batch_size": 2},
        "output": {"save_steps": 1, "report_to": "none"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "plugins"), env.get("PYTHONPATH", "")])
    env.pop("TQDM_DISABLE", None)
    done = subprocess.run([sys.executable, "-m", "nashalign.cli", "online", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    err = done.stderr
    assert "Loading weights" not in err and "Writing model shards" not in err
    lines = err.replace("\r", "\n").splitlines()
    # (a summary line may follow a bar's last refresh on the same line)
    for pattern in (r"sampling: 12 samples in [\d.]+ s \([\d.e+]+ samples/s\), \d+ tokens from 3 prompts$",
                    r"judging: 15 comparisons in [\d.]+ s .*tournament, \d+ judge calls",
                    r"log-probs: \d+ pairs in [\d.]+ s ",
                    r"training: \d+ steps in [\d.]+ s .* tokens/s\), last loss "):
        assert any(re.search(pattern, line) for line in lines), (pattern, err[-3000:])
    assert any(line.startswith("training: ") and "step/s" in line for line in lines)  # the bar, with its rate
