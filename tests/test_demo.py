"""The demo's pieces: an intransitive oracle per family, exact evaluation, and a reduced end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nashalign.core.games import find_cycle
from nashalign.demo import (
    DemoSettings,
    FamilyGameOracle,
    build_families,
    exact_win_rate,
    family_prompts,
    format_demo_table,
    run_demo,
)


def test_every_family_is_a_condorcet_cycle_and_the_oracle_is_symmetric():
    families = build_families()
    prompts = family_prompts(families)
    for family in families:
        assert find_cycle(family.P) is not None
        np.testing.assert_allclose(family.P + family.P.T, 1.0, atol=1e-12)
        assert family.sft_distribution.sum() == pytest.approx(1.0)
    oracle = FamilyGameOracle(prompts)
    texts = [text for _, text in prompts]
    firsts = [f.answers[i % 5] for (f, _), i in zip(prompts, range(len(prompts)))]
    seconds = [f.answers[(i + 2) % 5] if i % 3 else "not an answer" for (f, _), i in zip(prompts, range(len(prompts)))]
    forward, backward = oracle.prob(texts, firsts, seconds), oracle.prob(texts, seconds, firsts)
    np.testing.assert_allclose(forward + backward, 1.0, atol=1e-12)
    # An answer outside the family's set loses with probability 1.
    invalid = [i for i in range(len(prompts)) if i % 3 == 0]
    np.testing.assert_array_equal(forward[invalid], 1.0)


def test_exact_win_rate_by_hand():
    """One family, π = δ_a, π' = δ_b: the win rate is P[a, b]; with masses m, m' the invalid remainder
    loses to valid answers and ties with itself: m·m'·P[a,b] + m·(1 − m') + ½(1 − m)(1 − m')."""
    family = build_families(1)[0]
    prompts = family_prompts([family])[:1]
    a, b = np.eye(5)[0], np.eye(5)[3]
    assert exact_win_rate([a], [b], prompts) == pytest.approx(family.P[0, 3])
    expected = 0.8 * 0.5 * family.P[0, 3] + 0.8 * 0.5 + 0.5 * 0.2 * 0.5
    assert exact_win_rate([a], [b], prompts, [0.8], [0.5]) == pytest.approx(expected)


def test_reduced_demo_runs_end_to_end_and_writes_the_report(tmp_path):
    settings = DemoSettings(output_dir=str(tmp_path / "demo"), iterations=1, families=1, sft_steps=30,
                            samples_per_prompt=4, hidden_size=32, epochs=1)
    summary = run_demo(settings)
    for algorithm in settings.algorithms:
        rows = summary["series"][algorithm]
        assert [row["iteration"] for row in rows] == [0, 1]
        assert all(np.isfinite(row["duality_gap"]) and row["duality_gap"] >= -1e-12 for row in rows)
        assert rows[0]["duality_gap"] == pytest.approx(summary["reference_gap"])
    assert list(summary["head_to_head"]) == ["inpo vs iterative-dpo"]
    assert summary["head_to_head"]["inpo vs iterative-dpo"][0] == pytest.approx(0.5)
    report = tmp_path / "demo" / "report"
    html = (report / "report.html").read_text()
    for name in ("duality_gap.png", "win_rate_vs_ref.png", "kl.png", "training_loss.png"):
        assert (report / name).stat().st_size > 1000 and f'src="{name}"' in html
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["reference_gap"] == summary["reference_gap"]


def test_demo_runs_inpo_with_refresh_and_optimistic_inpo_beside_inpo(tmp_path):
    """Same seed, same start: iteration 0 of inpo, inpo-refresh (π_ref ← π_t every iteration) and
    inpo-optimistic (plain INPO at t = 0) trains the same π_1; from iteration 1 they differ. Every row
    carries the unregularized gap DG₀, ≥ 0 and equal to the mean of 2·max_y (Pπ)(y) − 1 at π_0."""
    from nashalign.core.games import unregularized_gap
    from nashalign.demo import answer_distributions

    settings = DemoSettings(output_dir=str(tmp_path / "demo"), iterations=2, families=1, sft_steps=30,
                            samples_per_prompt=4, hidden_size=32, epochs=1, refresh_every=1,
                            algorithms=("inpo", "inpo-refresh", "inpo-optimistic"))
    summary = run_demo(settings)
    series = summary["series"]
    prompts = family_prompts(build_families(1))
    start, _ = answer_distributions(tmp_path / "demo" / "sft", prompts)
    expected = np.mean([unregularized_gap(f.P, p) for (f, _), p in zip(prompts, start)])
    for name in settings.algorithms:
        assert series[name][0]["unregularized_gap"] == pytest.approx(expected)
        assert all(row["unregularized_gap"] >= 0 for row in series[name])
    for other in ("inpo-refresh", "inpo-optimistic"):
        first = {key: value for key, value in series["inpo"][1].items() if not key.startswith("win_rate ")}
        assert series[other][1] == first  # (the head-to-head columns are on the first algorithm's rows)
        assert series[other][2]["unregularized_gap"] != series["inpo"][2]["unregularized_gap"]
    assert summary["head_to_head"]["inpo vs inpo-refresh"][1] == pytest.approx(0.5)
    run = tmp_path / "demo" / "inpo-refresh"
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["ref_update_every"] == 1
    assert (tmp_path / "demo" / "inpo-optimistic" / "iter_1" / "aux" / "final").is_dir()
    report = tmp_path / "demo" / "report"
    assert (report / "unregularized_gap.png").stat().st_size > 1000
    assert "DG₀ inpo-refresh" in format_demo_table(summary)


@pytest.mark.parametrize(("argv", "match"), [
    (["--algorithms", "inpo,dpo"], "--algorithms: expected a comma list of distinct names"),
    (["--algorithms", "inpo,inpo"], "--algorithms: expected a comma list of distinct names"),
    (["--refresh-every", "0"], "--refresh-every: expected a positive integer"),
    (["--families", "5"], "--families: expected 1 to 4"),
    (["--tau", "0.3", "--eta", "0.3"], "expected 0 < tau < eta"),
])
def test_demo_options_are_checked_before_any_work(tmp_path, capsys, argv, match):
    from nashalign import cli

    assert cli.main(["demo", "--output-dir", str(tmp_path / "demo"), *argv]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
