"""One online iteration with 2 processes equals 1 process, and resumes.

The 2-process runs go through the shipped DDP config on CPU (gloo), as tests/test_distributed.py:

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/ddp.yaml \\
        --num_processes 2 -m nashalign.cli online --config double.yaml

Setting: the tiny model, 7 prompts (process 0 samples 4 of them, process 1 samples 3), K = 4 samples,
tournament pairs (3K/2 − 1 = 5 comparisons per prompt in 3 oracle calls), one INPO iteration of 2
epochs with a global batch of 2 pairs (1 process × 2 pairs, or 2 processes × 1 pair), a
checkpoint after every step. The oracle is a `python` plugin (tests/plugins/recording_judge.py)
that records how many rows each process asked it, which a `game` oracle could not show.

Runs: (1) the 1-process reference, in this process; (2) 2 processes stopped on every process
right after training step 1 (this file as the worker script), so sampling, judging and scoring are
complete and training has one checkpoint; (3) `nashalign online` with 2 processes and the same config,
which must skip the finished stages and resume training; (4) the same config once more, in this
process, which must find everything complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).parent / "plugins"
DDP_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
PROMPTS, K = 7, 4
STAGE_ARTIFACTS = ["generations.jsonl", "judgments.jsonl", "pair_stats.json", "pairs.jsonl", "logps.safetensors"]


class _Stopped(Exception):
    pass


def _worker(config_path: str) -> None:
    """Inside each launched process: the online loop, stopped after training step 1 on every
    process (as a kill right after the step would, but at the same point on both)."""
    import nashalign.train.loop
    from nashalign.config import load_config
    from nashalign.online.loop import OnlineConfig, run_online

    train_pairs = nashalign.train.loop.train_pairs

    def stop(step: int, metrics: dict) -> None:
        if step == 1:
            raise _Stopped

    nashalign.train.loop.train_pairs = lambda *args, **kwargs: train_pairs(*args, **kwargs, callback=stop)
    try:
        run_online(load_config(OnlineConfig, config_path))
    except _Stopped:
        print(f"rank {os.environ['RANK']}: stopped after step 1")


def _mapping(root: Path, model_dir: Path, name: str, per_device_batch_size: int) -> dict:
    records = root / "records" / name
    records.mkdir(parents=True)
    return {
        "model": {"name_or_path": str(model_dir)},
        "oracle": {"type": "python", "function": "recording_judge:recorded_vowels",
                   "kwargs": {"record_dir": str(records)}},
        "run": {"name": name, "dir": str(root / "runs"), "iterations": 1, "seed": 5},
        "prompts": {"file": str(root / "prompts.jsonl")},
        "sampling": {"backend": "transformers", "samples_per_prompt": K, "max_new_tokens": 6, "batch_size": 8},
        "pairs": {"method": "tournament"},
        "data": {"max_length": 64, "max_prompt_length": 32, "scoring_batch_size": 16},
        "loss": {"eta": 0.5, "tau": 0.1},
        "optim": {"lr": 1e-3, "epochs": 2, "per_device_batch_size": per_device_batch_size, "warmup_ratio": 0.0},
        "output": {"save_steps": 1, "report_to": "none"},
    }


def _launch(arguments: list[str], log: Path) -> str:
    """accelerate launch with the DDP config on 2 CPU processes; its output, or a failure with the tail."""
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(DDP_CONFIG),
        "--num_processes", "2", "--main_process_port", str(free_port()), *arguments,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w", encoding="utf-8") as out:
        # a timeout turns a deadlock between the processes into a failure
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300, cwd=ROOT)
    text = log.read_text()
    if done.returncode != 0:
        pytest.fail(f"{' '.join(arguments[:3])} exited {done.returncode}:\n{text[-3000:]}")
    return text


def _judge_rows(records: Path) -> dict[int, list[int]]:
    """Rows per oracle call, by process, from the plugin's records; the files are then emptied."""
    rows = {}
    for path in sorted(records.glob("judge-rank*.jsonl")):
        rows[int(path.stem.removeprefix("judge-rank"))] = [json.loads(line)["rows"] for line in path.read_text().splitlines()]
        path.unlink()
    return rows


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from nashalign.config import load_config
    from nashalign.data.artifacts import write_jsonl
    from nashalign.online.loop import OnlineConfig, run_online

    root = tmp_path_factory.mktemp("online_distributed")
    write_jsonl(root / "prompts.jsonl", ({"prompt": [{"role": "user", "content": f"Question {i}: yes or no?"}]}
                                         for i in range(PROMPTS)))
    configs = {}
    for name, per_device in (("single", 2), ("double", 1)):
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(_mapping(root, tiny_model_dir, name, per_device)))

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PLUGINS))
        single = run_online(load_config(OnlineConfig, configs["single"]), progress=False)
        double_dir = root / "runs" / "double"
        stopped_log = _launch([str(Path(__file__)), "--worker", str(configs["double"])], root / "stopped.log")
        stopped = {
            "judge_rows": _judge_rows(root / "records" / "double"),
            "checkpoints": sorted(p.name for p in (double_dir / "iter_0" / "train" / "checkpoints").iterdir()),
            "final_exists": (double_dir / "iter_0" / "train" / "final").exists(),
            "stamps": {name: (double_dir / "iter_0" / name).stat().st_mtime_ns for name in STAGE_ARTIFACTS},
        }
        resumed_log = _launch(["-m", "nashalign.cli", "online", "--config", str(configs["double"])],
                              root / "resumed.log")
        resumed_rows = _judge_rows(root / "records" / "double")
        again = run_online(load_config(OnlineConfig, configs["double"]), progress=False)
        again_rows = _judge_rows(root / "records" / "double")
    return {"root": root, "single": single, "double": double_dir, "again": again, "stopped": stopped,
            "stopped_log": stopped_log, "resumed_log": resumed_log, "resumed_rows": resumed_rows,
            "again_rows": again_rows}


def _rows(path: Path) -> list[dict]:
    from nashalign.data.artifacts import read_jsonl

    return read_jsonl(path)


def _differing(first: list[dict], second: list[dict]) -> int:
    """Comparisons whose texts differ: the only ones a judge is asked (P(a ≻ a) = ½ without asking)."""
    return sum(a["text"] != b["text"] for a, b in zip(first, second))


def test_artifacts_are_complete_and_written_once(runs):
    """Every (prompt, sample) appears exactly once in each generations.jsonl; pair_stats and
    pairs agree with the judgments (5 per prompt; a kept pair is a final its winner won); nothing is
    left of the per-process shards or of temporary files."""
    double = runs["double"]
    for name in ("iter_0/generations.jsonl", "iter_1/generations.jsonl"):
        keys = [(row["prompt_index"], row["sample_index"]) for row in _rows(double / name)]
        assert sorted(keys) == [(p, j) for p in range(PROMPTS) for j in range(K)]
    judgments, pairs = _rows(double / "iter_0" / "judgments.jsonl"), _rows(double / "iter_0" / "pairs.jsonl")
    stats = json.loads((double / "iter_0" / "pair_stats.json").read_text())
    assert len(judgments) == stats["comparisons"] == PROMPTS * (3 * K // 2 - 1)
    assert stats["kept"] == len(pairs) > 0 and stats["kept"] + stats["dropped"] == PROMPTS
    finals = {(j["prompt_index"], j["first_index"], j["second_index"]): j["winner_index"] for j in judgments}
    for pair in pairs:
        assert finals[(pair["prompt_index"], pair["chosen_index"], pair["rejected_index"])] == pair["chosen_index"]
    leftovers = [p.name for p in double.rglob("*") if ".shard-" in p.name or p.name.startswith(".tmp")]
    assert leftovers == []
    assert sorted(p.name for p in (double / "iter_1").iterdir()) == ["generations.jsonl"]


def test_two_processes_equal_one_process(runs, tiny_model_dir):
    """Same seed, same artifacts: generations, judgments and pairs byte for byte (a sample's
    random stream depends only on the seed and its prompt index; every process builds the pairs from
    the same gathered answers and the same seeded draws); log-probs within 1e-5 (other batches);
    the final weights within 1e-5 (gradients averaged over the processes), though they moved; the
    summary rows agree."""
    single, double = runs["single"].run_dir, runs["double"]
    for name in ("iter_0/generations.jsonl", "iter_0/judgments.jsonl", "iter_0/pairs.jsonl",
                 "iter_0/pair_stats.json", "iter_1/generations.jsonl"):
        assert (double / name).read_bytes() == (single / name).read_bytes(), name
    one, two = load_file(single / "iter_0" / "logps.safetensors"), load_file(double / "iter_0" / "logps.safetensors")
    assert one.keys() == two.keys() == {"ref_chosen", "ref_rejected", "prev_chosen", "prev_rejected"}
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    final = "iter_0/train/final/model.safetensors"
    one, two, initial = load_file(single / final), load_file(double / final), load_file(tiny_model_dir / "model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    assert max(float((one[key] - initial[key]).abs().max()) for key in one) > 1e-4
    summary_one = json.loads((single / "iter_0" / "summary.json").read_text())
    summary_two = json.loads((double / "iter_0" / "summary.json").read_text())
    assert summary_two == pytest.approx(summary_one, rel=1e-5)
    assert runs["again"].summaries == [summary_two]


def test_judging_is_split_between_the_processes(runs):
    """Both processes asked the judge while pairs were built, and together asked it exactly the
    comparisons in judgments.jsonl whose texts differ, each once, in both orders (a python oracle
    symmetrizes): no comparison was judged twice or by both processes."""
    double = runs["double"]
    rows = runs["stopped"]["judge_rows"]
    assert sorted(rows) == [0, 1] and all(rows.values())
    texts = [[g["text"] for g in _rows(double / "iter_0" / "generations.jsonl")[p * K : (p + 1) * K]]
             for p in range(PROMPTS)]
    judged = _rows(double / "iter_0" / "judgments.jsonl")
    differing = sum(texts[j["prompt_index"]][j["first_index"]] != texts[j["prompt_index"]][j["second_index"]]
                    for j in judged)
    assert sum(map(sum, rows.values())) == 2 * differing


def test_a_stopped_two_process_run_resumes_and_skips_finished_stages(runs):
    """The stopped run had finished sampling, judging and scoring and checkpointed step 1 of 2 on
    both processes. The resumed run rewrote none of those artifacts, asked the judge only for the
    summary's win rate (π_1's sample j against π_0's sample j of each prompt), resumed training from
    step 1, and printed the summary table once. A further run finds everything complete and asks
    the judge nothing."""
    stopped, double = runs["stopped"], runs["double"]
    assert runs["stopped_log"].count("stopped after step 1") == 2
    assert stopped["checkpoints"] == ["step_00000001"] and not stopped["final_exists"]
    for name, stamp in stopped["stamps"].items():
        assert (double / "iter_0" / name).stat().st_mtime_ns == stamp, name
    summary_pairs = _differing(_rows(double / "iter_1" / "generations.jsonl"), _rows(double / "iter_0" / "generations.jsonl"))
    assert sum(map(sum, runs["resumed_rows"].values())) == 2 * summary_pairs
    assert "resuming from" in runs["resumed_log"] and "step_00000001" in runs["resumed_log"]
    assert runs["resumed_log"].count("win(t+1 vs t)") == 1
    assert runs["again_rows"] == {}
    assert runs["again"].final_model == double / "iter_0" / "train" / "final"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
