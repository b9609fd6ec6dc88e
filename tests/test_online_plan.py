"""`nashalign online --dry-run`: counts by hand for each pair method, no model loaded, and a real
run with the summary's win rate turned off (tournament pairs, truncated pairs) whose oracle counts
equal the plan's. The plan against a run with the win rate on: tests/test_online.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nashalign.cli import main
from nashalign.config import from_mapping
from nashalign.data.artifacts import read_json, read_jsonl, write_jsonl
from nashalign.online.loop import OnlineConfig, format_summary_table, run_online
from nashalign.online.plan import judge_orders, plan_online

PLUGINS = Path(__file__).parent / "plugins"


def _mapping(tmp_path: Path, prompts: int = 5, **sections) -> dict:
    file = tmp_path / "prompts.jsonl"
    write_jsonl(file, ({"prompt": [{"role": "user", "content": f"Question {i}: yes or no?"}]} for i in range(prompts)))
    mapping = {
        "model": {"name_or_path": str(tmp_path / "no-such-model")},
        "oracle": {"type": "python", "function": "vowel_judge:prefer_vowels"},
        "run": {"name": "run", "dir": str(tmp_path / "runs"), "iterations": 2, "seed": 2},
        "prompts": {"file": str(file)},
        "sampling": {"backend": "transformers", "samples_per_prompt": 8, "max_new_tokens": 10},
    }
    for section, values in sections.items():
        mapping.setdefault(section, {}).update(values)
    return mapping


@pytest.mark.parametrize("algorithm, method, per_prompt, exact, pairs", [
    ("inpo", "auto", 11, True, 5),  # tournament: 3K/2 − 1
    ("iterative-dpo", "auto", 28, True, 5),  # best_vs_worst with a pairwise judge: K(K − 1)/2
    ("sppo", "auto", 28, True, 5 * 28),  # all_pairs
    ("sppo", "tournament", 11, False, 5),  # + up to 2(K − 1) per kept pair for the win rates
])
def test_plan_counts_by_pair_method(tmp_path, algorithm, method, per_prompt, exact, pairs):
    """N = 5 prompts, K = 8, a judge asked both orders, 2 iterations on one prompts file."""
    plan = plan_online(from_mapping(OnlineConfig, _mapping(tmp_path, run={"algorithm": algorithm},
                                                           pairs={"method": method})))
    first, last = plan["iterations"]
    judge = first["judge"]
    assert judge["comparisons_per_prompt"] == per_prompt and judge["pairs_max"] == pairs
    assert judge["comparisons"] == (5 * per_prompt if exact else None)
    assert judge["comparisons_max"] == 5 * (per_prompt + (0 if exact else 2 * 7))
    assert judge["judge_calls_max"] == 2 * judge["comparisons_max"]
    assert first["sample"] == {"policy": str(tmp_path / "no-such-model"), "samples": 40, "new_tokens_max": 400,
                               "opponents": 0, "mixture_coef": None}
    assert first["train_aux"] is None
    # iteration 0's win rate reuses iteration 1's samples; the last one samples π_2 once more
    assert (first["summary"]["samples"], first["summary"]["samples_reused"]) == (0, True)
    assert (last["summary"]["samples"], last["summary"]["comparisons"], last["summary"]["judge_calls_max"]) == (40, 40, 80)
    assert plan["total"]["samples"] == 40 + 40 + 40
    assert plan["total"]["comparisons_max"] == 2 * (judge["comparisons_max"] + 40)


def test_plan_of_nash_md_counts_the_opponents_and_one_comparison_per_sample(tmp_path):
    """N = 5, K = 8: 40 samples of π_t plus 40 opponents from the mixture, 40 comparisons (80 judge
    calls both orders), 40 training rows; scored under π_ref only."""
    plan = plan_online(from_mapping(OnlineConfig, _mapping(tmp_path, run={"algorithm": "nash-md"},
                                                           sampling={"mixture_coef": 0.25}, loss={"tau": 0.1})))
    first, last = plan["iterations"]
    assert plan["pair_method"] == "mixture"
    assert first["sample"] == {"policy": str(tmp_path / "no-such-model"), "samples": 80, "new_tokens_max": 800,
                               "opponents": 40, "mixture_coef": 0.25}
    assert {k: first["judge"][k] for k in ("comparisons_per_prompt", "comparisons", "judge_calls_max", "pairs_max")} == {
        "comparisons_per_prompt": 8, "comparisons": 40, "judge_calls_max": 80, "pairs_max": 40}
    assert first["score"]["models"] == {"ref": str(tmp_path / "no-such-model")}
    assert first["train"]["loss"] == "nash-md"
    assert plan["total"]["samples"] == 80 + 80 + 40  # the last summary samples π_2 once more
    assert plan["total"]["comparisons_max"] == 2 * (40 + 40)
    from nashalign.online.plan import format_plan

    assert "40 opponents from the mixture" in format_plan(plan)


def test_plan_of_optimistic_inpo_names_the_auxiliary_phase_and_models(tmp_path):
    plan = plan_online(from_mapping(OnlineConfig, _mapping(tmp_path, run={"algorithm": "inpo-optimistic", "iterations": 3},
                                                           loss={"eta": 0.5, "tau": 0.1})))
    zero, one, two = plan["iterations"]
    runs, start = tmp_path / "runs" / "run", str(tmp_path / "no-such-model")
    assert (zero["train"]["loss"], zero["train_aux"], set(zero["score"]["models"])) == ("inpo", None, {"ref", "prev"})
    assert one["score"]["models"] == {"ref": start, "prev": str(runs / "iter_0" / "train" / "final"), "aux": start}
    assert one["train"]["loss"] == "inpo-optimistic"
    assert one["train_aux"] == {"loss": "inpo-optimistic-aux", "policy": start, "final": str(runs / "iter_1" / "aux" / "final")}
    assert two["score"]["models"]["aux"] == two["train_aux"]["policy"] == str(runs / "iter_1" / "aux" / "final")


def test_judge_orders_of_each_oracle_kind():
    assert judge_orders({"type": "pair_model", "path": "m"})[0] == 2
    assert judge_orders({"type": "http_judge", "both_orders": False})[0] == 1
    assert judge_orders({"type": "game"})[0] == judge_orders({"type": "labels"})[0] == 1
    assert judge_orders(None)[0] is None


def test_best_vs_worst_with_a_reward_model_scores_each_response_once(tmp_path):
    mapping = _mapping(tmp_path, run={"algorithm": "iterative-dpo"})
    mapping["oracle"] = {"type": "reward_model", "path": "rm"}
    judge = plan_online(from_mapping(OnlineConfig, mapping))["iterations"][0]["judge"]
    assert (judge["comparisons"], judge["judge_calls_max"], judge["pairs_max"]) == (0, 40, 5)


def test_dry_run_loads_no_model_and_writes_nothing(tmp_path, capsys):
    """The model directory does not exist, and no run directory is made; the text names every stage."""
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_mapping(tmp_path)))
    assert main(["online", "--config", str(config), "--dry-run", "--set", "summary.win_rate=false"]) == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    assert text.startswith("resolved config:\n  model:\n")
    for line in ("iteration 1: 5 prompts", "  judge    tournament (11 comparisons per prompt): 55 comparisons, "
                 "≤ 110 judge calls → ≤ 5 pairs", "summary  win rate off (summary.win_rate: false)",
                 "total: 80 samples, ≤ 800 new tokens, ≤ 110 comparisons, ≤ 220 judge calls"):
        assert line in text
    assert main(["online", "--config", str(config), "--json"]) == 2
    assert "--json: only with --dry-run" in capsys.readouterr().err


def test_win_rate_off_samples_and_judges_nothing_more(tmp_path, tiny_model_dir, monkeypatch):
    """summary.win_rate: false, one iteration of tournament pairs: the oracle is asked exactly the
    plan's 3K/2 − 1 comparisons per prompt and nothing for the summary, π_1 samples nothing, and
    the row says the win rate was not measured. The pairs are cut to data.max_length (20) and
    data.max_prompt_length (16) as offline, and the row counts the cuts."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.delitem(sys.modules, "vowel_judge", raising=False)
    from vowel_judge import prefer_vowels

    from nashalign.judges.oracles import PythonOracle

    mapping = _mapping(tmp_path, prompts=3, model={"name_or_path": str(tiny_model_dir)}, run={"iterations": 1},
                       sampling={"samples_per_prompt": 4, "max_new_tokens": 6},
                       pairs={"method": "tournament", "decide": "threshold"}, summary={"win_rate": False},
                       data={"max_length": 20, "max_prompt_length": 16},
                       optim={"lr": 1e-3, "epochs": 1, "per_device_batch_size": 4, "warmup_ratio": 0.0},
                       output={"save_steps": 0, "report_to": "none"})
    config = from_mapping(OnlineConfig, mapping)
    plan = plan_online(config)
    oracle = PythonOracle(prefer_vowels)
    result = run_online(config, oracle=oracle, progress=False)
    it = result.run_dir / "iter_0"
    (row,) = result.summaries
    assert row == read_json(it / "summary.json")
    assert row["win_rate_next_vs_current"] is None and row["win_rate_comparisons"] == 0
    assert format_summary_table(result.summaries).splitlines()[1].endswith(" off")
    assert oracle.counts.comparisons == row["comparisons"] == plan["iterations"][0]["judge"]["comparisons"] == 3 * 5
    assert oracle.counts.judge_calls == row["judge_calls"] == read_json(it / "pair_stats.json")["judge_calls"]
    assert row["judge_calls"] <= plan["total"]["judge_calls_max"] == 2 * 15
    assert not (result.run_dir / "iter_1").exists() and not (it / "next_generations.jsonl").exists()
    assert plan["total"]["samples"] == len(read_jsonl(it / "generations.jsonl")) == 12

    # truncation: every prompt (18 tokens) is cut to 16; a response longer than 20 − 16 = 4 tokens is cut
    samples = {(g["prompt_index"], g["sample_index"]): g for g in read_jsonl(it / "generations.jsonl")}
    pairs = read_jsonl(it / "pairs.jsonl")

    def length(p: int, j: int) -> int:
        sample = samples[p, j]
        return len(sample["token_ids"]) + (sample["finish_reason"] == "stop")

    cut = sum((length(p["prompt_index"], p["chosen_index"]) > 4) + (length(p["prompt_index"], p["rejected_index"]) > 4)
              for p in pairs)
    assert row["truncated_prompts"] == len(pairs) > 0 and row["truncated_responses"] == cut > 0
    from safetensors.torch import load_file

    assert load_file(it / "logps.safetensors")["ref_chosen"].shape == (len(pairs),)
