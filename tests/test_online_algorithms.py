"""The online algorithms beyond INPO on the tiny model: optimistic INPO, online IPO, Nash-MD and the
reference refresh (run.ref_update_every), two iterations end to end each: artifacts, which models
scored what, and resume (a second call recomputes nothing and returns the same weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nashalign.config import from_mapping
from nashalign.data.artifacts import read_json, read_jsonl
from nashalign.judges.oracles import GameOracle
from nashalign.online.loop import OnlineConfig, run_online
from test_online import ANSWERS, GAME_P, _config


def _run(tmp_path, model_dir, algorithm, **over):
    mapping = _config(tmp_path, model_dir, prompts=3, run__algorithm=algorithm, **over)
    mapping["summary"] = {"win_rate": False}
    if algorithm in ("online-ipo", "nash-md"):  # no π_t term, so no eta
        mapping["loss"] = {"tau": 0.1}
    if algorithm == "nash-md":
        del mapping["pairs"]
    config = from_mapping(OnlineConfig, mapping)
    oracle = GameOracle(ANSWERS, GAME_P, invalid="worst")
    return config, oracle, run_online(config, oracle=oracle, progress=False)


def _weights(path):
    return load_file(path / "model.safetensors")


def _assert_resumes(config, oracle, result):
    calls = oracle.counts.judge_calls
    again = run_online(config, oracle=oracle, progress=False)
    assert oracle.counts.judge_calls == calls
    assert again.summaries == result.summaries and again.final_model == result.final_model


def test_optimistic_inpo_trains_the_policy_and_the_auxiliary_policy(tmp_path, tiny_model_dir):
    """Iteration 0 is plain INPO (scored under π_ref, π_0); iteration 1 scores under π_ref, π_1 and
    π̂_0 = π_0, and trains π_2 from π_1 and π̂_1 from π̂_0 = π_0 on the same pairs."""
    config, oracle, result = _run(tmp_path, tiny_model_dir, "inpo-optimistic")
    run_dir = result.run_dir
    zero, one = load_file(run_dir / "iter_0" / "logps.safetensors"), load_file(run_dir / "iter_1" / "logps.safetensors")
    assert set(zero) == {"ref_chosen", "ref_rejected", "prev_chosen", "prev_rejected"}
    assert set(one) == {"ref_chosen", "ref_rejected", "prev_chosen", "prev_rejected", "aux_chosen", "aux_rejected"}
    torch.testing.assert_close(one["aux_chosen"], one["ref_chosen"])  # π̂_0 = π_0 = π_ref
    assert not torch.equal(one["prev_chosen"], one["ref_chosen"])  # π_1 moved
    assert not (run_dir / "iter_0" / "aux").exists()
    aux_final = run_dir / "iter_1" / "aux" / "final"
    assert (aux_final / "model.safetensors").exists() and (run_dir / "iter_1" / "aux" / "metrics.jsonl").exists()
    start, policy, aux = _weights(tiny_model_dir), _weights(result.final_model), _weights(aux_final)
    assert any(not torch.equal(start[k], aux[k]) for k in start)  # π̂_1 was trained from π_0
    assert any(not torch.equal(policy[k], aux[k]) for k in start)
    import yaml

    main_config = yaml.safe_load((run_dir / "iter_1" / "train" / "config.yaml").read_text())
    aux_config = yaml.safe_load((run_dir / "iter_1" / "aux" / "config.yaml").read_text())
    assert main_config["loss"]["name"] == "inpo-optimistic" and aux_config["loss"]["name"] == "inpo-optimistic-aux"
    assert main_config["model"]["name_or_path"] == str(run_dir / "iter_0" / "train" / "final")
    assert aux_config["model"]["name_or_path"] == str(tiny_model_dir)
    zero_config = yaml.safe_load((run_dir / "iter_0" / "train" / "config.yaml").read_text())
    assert zero_config["loss"]["name"] == "inpo"
    _assert_resumes(config, oracle, result)


def test_online_ipo_scores_only_the_fixed_reference(tmp_path, tiny_model_dir):
    config, oracle, result = _run(tmp_path, tiny_model_dir, "online-ipo")
    for t in range(2):
        logps = load_file(result.run_dir / f"iter_{t}" / "logps.safetensors")
        assert set(logps) == {"ref_chosen", "ref_rejected"}
    # iteration 1's pairs come from π_1 but are scored under π_0, the fixed reference
    one = load_file(result.run_dir / "iter_1" / "logps.safetensors")
    assert len(list((result.run_dir / "logp_cache").glob("*.safetensors"))) == 1  # one model scored: π_0
    assert one["ref_chosen"].shape[0] == read_json(result.run_dir / "iter_1" / "pair_stats.json")["kept"]
    _assert_resumes(config, oracle, result)


def test_nash_md_judges_each_sample_against_a_mixture_opponent(tmp_path, tiny_model_dir):
    config, oracle, result = _run(tmp_path, tiny_model_dir, "nash-md", sampling__mixture_coef=0.5)
    for t in range(2):
        it = result.run_dir / f"iter_{t}"
        samples, opponents = read_jsonl(it / "generations.jsonl"), read_jsonl(it / "opponents.jsonl")
        rows = read_jsonl(it / "pairs.jsonl")
        assert len(samples) == len(opponents) == len(rows) == 3 * 4
        stats = read_json(it / "pair_stats.json")
        assert stats["method"] == "mixture" and stats["comparisons"] == stats["kept"] == 12
        by_index = {(o["prompt_index"], o["sample_index"]): o for o in opponents}
        texts = {(s["prompt_index"], s["sample_index"]): s["text"] for s in samples}
        prompts = [f"Question {p}: yes or no?" for p in range(3)]
        for row in rows:
            key = (row["prompt_index"], row["chosen_index"])
            assert row["rejected_index"] == row["chosen_index"]
            expected = GameOracle(ANSWERS, GAME_P, invalid="worst").prob(
                [prompts[key[0]]], [texts[key]], [by_index[key]["text"]])[0]
            assert row["mixture_win_rate"] == pytest.approx(expected)
        assert set(load_file(it / "logps.safetensors")) == {"ref_chosen", "ref_rejected"}
    _assert_resumes(config, oracle, result)


def test_reference_refresh_scores_iteration_two_under_pi_two(tmp_path, tiny_model_dir):
    """run.ref_update_every 2 over 3 iterations: iterations 0, 1 score under π_0, iteration 2 under
    π_2 (= its π_t, so ref and prev agree); the cache holds entries of the new reference; resuming
    recomputes nothing."""
    config, oracle, result = _run(tmp_path, tiny_model_dir, "inpo", run__iterations=3, run__ref_update_every=2)
    run_dir = result.run_dir
    for t in range(3):
        logps = load_file(run_dir / f"iter_{t}" / "logps.safetensors")
        if t in (0, 2):
            torch.testing.assert_close(logps["ref_chosen"], logps["prev_chosen"])
        else:
            assert not torch.equal(logps["ref_chosen"], logps["prev_chosen"])
    import yaml

    phase = yaml.safe_load((run_dir / "iter_2" / "train" / "config.yaml").read_text())
    assert phase["model"]["ref_name_or_path"] == str(run_dir / "iter_1" / "train" / "final")
    cached = sorted(p.name for p in (run_dir / "logp_cache").glob("*.safetensors"))
    assert len(cached) == 3  # π_0 (the first reference), π_1, π_2 (prev, and the refreshed reference)
    _assert_resumes(config, oracle, result)
