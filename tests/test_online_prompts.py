"""Per-iteration prompts (`prompts.files`): config checks and a two-iteration run on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nashalign import NashalignError
from nashalign.config import from_mapping, load_config
from nashalign.data.artifacts import read_json, read_jsonl, write_jsonl
from nashalign.judges.oracles import PythonOracle
from nashalign.online.loop import OnlineConfig, PromptsConfig, prompt_file, run_online


def test_file_and_files_are_exclusive(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: m}\nprompts:\n  file: a.jsonl\n  files: [b.jsonl]\nrun: {iterations: 1}\n")
    with pytest.raises(NashalignError, match=r"run\.yaml:4: prompts\.files: set prompts\.file or prompts\.files, not both"):
        load_config(OnlineConfig, path)


def test_files_must_name_one_file_per_iteration(tmp_path):
    mapping = {"model": {"name_or_path": "m"}, "prompts": {"files": ["a.jsonl", "b.jsonl"]}, "run": {"iterations": 3}}
    with pytest.raises(NashalignError, match=r"prompts: files: expected one file per iteration, 3 \(run\.iterations\), got 2"):
        from_mapping(OnlineConfig, mapping)
    mapping["prompts"]["files"] = []
    with pytest.raises(NashalignError, match=r"prompts\.files: expected a list of one prompts file per iteration"):
        from_mapping(OnlineConfig, mapping)


def test_prompt_file_of_each_iteration():
    """files[t] for iteration t; iteration T (the final policy's samples) reuses the last file."""
    config = PromptsConfig(files=["a", "b"])
    assert [prompt_file(config, t) for t in range(3)] == ["a", "b", "b"]
    assert prompt_file(PromptsConfig(file="x"), 5) == "x"
    with pytest.raises(NashalignError, match="prompts.file: required"):
        prompt_file(PromptsConfig(), 0)


def _shorter_wins(prompts, first, second):
    """q(a, b) = 0.9 if a is shorter than b, 0.2 if longer, 0.5 if equally long."""
    return np.array([0.9 if len(a) < len(b) else 0.2 if len(a) > len(b) else 0.5 for a, b in zip(first, second)])


def test_each_iteration_answers_its_own_prompts(tmp_path, tiny_model_dir):
    """files = [2 prompts, 3 prompts], 2 iterations: iteration 0 samples and trains on the first
    file, iteration 1 on the second; π_1 samples the first file once more (next_generations.jsonl)
    for iteration 0's win rate, which is the oracle's mean P over those samples against π_0's, sample
    j with sample j; π_2 samples the last file for the last row."""
    files = []
    for name, count in (("split0", 2), ("split1", 3)):
        files.append(str(tmp_path / f"{name}.jsonl"))
        write_jsonl(files[-1], ({"prompt": f"{name} question {i}?"} for i in range(count)))
    config = from_mapping(OnlineConfig, {
        "model": {"name_or_path": str(tiny_model_dir)},
        "run": {"dir": str(tmp_path / "runs"), "iterations": 2, "seed": 1},
        "prompts": {"files": files},
        "sampling": {"backend": "transformers", "samples_per_prompt": 2, "max_new_tokens": 4},
        "pairs": {"method": "all_pairs"},
        "data": {"max_length": 32, "max_prompt_length": 16},
        "loss": {"eta": 0.5, "tau": 0.1},
        "optim": {"lr": 1e-3, "epochs": 1, "per_device_batch_size": 2, "warmup_ratio": 0.0},
        "output": {"save_steps": 0, "report_to": "none"},
    })
    oracle = PythonOracle(_shorter_wins)
    result = run_online(config, oracle=oracle, progress=False)
    run_dir = result.run_dir

    def prompts_sampled(name: str) -> int:
        rows = read_jsonl(run_dir / name)
        assert len(rows) == 2 * len({row["prompt_index"] for row in rows})
        return len({row["prompt_index"] for row in rows})

    assert prompts_sampled("iter_0/generations.jsonl") == 2
    assert prompts_sampled("iter_0/next_generations.jsonl") == 2
    assert prompts_sampled("iter_1/generations.jsonl") == 3
    assert prompts_sampled("iter_2/generations.jsonl") == 3
    assert not (run_dir / "iter_1" / "next_generations.jsonl").exists()
    assert [row["prompts"] for row in result.summaries] == [2, 3]
    assert {pair["prompt_index"] for pair in read_jsonl(run_dir / "iter_1" / "pairs.jsonl")} <= {0, 1, 2}

    current = read_jsonl(run_dir / "iter_0" / "generations.jsonl")
    following = read_jsonl(run_dir / "iter_0" / "next_generations.jsonl")
    judge_prompts = [f"split0 question {row['prompt_index']}?" for row in current]
    expected = PythonOracle(_shorter_wins).prob(judge_prompts, [r["text"] for r in following], [r["text"] for r in current])
    summary = read_json(run_dir / "iter_0" / "summary.json")
    assert summary["win_rate_next_vs_current"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    assert Path(result.final_model) == run_dir / "iter_1" / "train" / "final"
