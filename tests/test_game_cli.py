"""`nashalign game`: the table, the plot, --json, and one-line errors for invalid input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

from nashalign import cli
from nashalign.commands.game import shown_iterations, trend
from nashalign.core import games as g
from nashalign.core import tabular as tb
from nashalign.core.tabular import run_algorithms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(tmp_path, data, name="game.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_default_run_prints_the_gap_table_and_writes_the_plot(tmp_path, monkeypatch, capsys):
    """No arguments: the built-in Condorcet game, every algorithm, 100 iterations; two tables (the
    regularized gap, then DG₀), rows 0 … 100 each. INPO drives the first to 0 and stalls in the second
    at the DG₀ of the regularized Nash policy; comal drives DG₀ towards 0."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["game"]) == 0
    out = capsys.readouterr().out
    assert "game: condorcet" in out and "majority cycle: A ≻ B ≻ C ≻ A" in out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [0, 1, 2, 5, 10, 20, 50, 100] * 2
    regularized, unregularized = rows[:8], rows[8:]
    headers = [line.split()[1:] for line in out.splitlines() if line.startswith("iteration")]
    assert headers == [list(tb.ALGORITHMS)] * 2
    assert list(tb.ALGORITHMS)[-1] == "comal"
    assert float(regularized[-1][1]) < 1e-12 < float(regularized[0][1])
    game = g.condorcet_game()
    stalled = g.unregularized_gap(game.P, g.nash_policy(game.P, game.reference, 0.1))
    assert abs(float(unregularized[-1][1]) - stalled) < 1e-3 and stalled > 0.1
    assert float(unregularized[0][1]) == pytest.approx(g.unregularized_gap(game.P, game.reference), abs=1e-3)
    assert float(unregularized[-1][-1]) < 0.1 * float(unregularized[-1][1])  # comal: 8.6e-3
    assert "DG₀ " in out and "reference refreshes" in out
    plot = tmp_path / "runs" / "game" / "duality_gap.png"
    assert "plot: runs/game/duality_gap.png" in out
    assert plot.read_bytes().startswith(PNG_MAGIC) and plot.stat().st_size > 10_000


def test_json_output_has_the_documented_shape_and_matches_the_library(tmp_path, capsys):
    plot = tmp_path / "gap.png"
    argv = [
        "game",
        "--json",
        "--iterations",
        "12",
        "--algorithms",
        "inpo,inpo-sampled,sppo,comal",
        "--samples",
        "200",
        "--refresh-every",
        "4",
        "--refresh-tolerance",
        "0",
    ]
    assert cli.main([*argv, "--seed", "3", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["inpo", "inpo-sampled", "sppo", "comal"]
    game = g.condorcet_game()
    expected = run_algorithms(
        ["inpo", "inpo-sampled", "sppo", "comal"],
        game.P,
        game.reference,
        tau=0.1,
        eta=0.3,
        iterations=12,
        samples=200,
        seed=3,
        refresh_every=4,
        refresh_tolerance=0.0,
    )
    for name, entry in result.items():
        assert set(entry) == {"duality_gap", "unregularized_gap", "policy", "refreshes"}
        assert len(entry["duality_gap"]) == len(entry["unregularized_gap"]) == 13 and len(entry["policy"]) == 5
        assert_allclose(entry["duality_gap"], expected[name].duality_gap, rtol=1e-12, atol=1e-15)
        assert_allclose(entry["unregularized_gap"], expected[name].unregularized_gap, rtol=1e-12, atol=1e-15)
        assert_allclose(entry["policy"], expected[name].policy, rtol=1e-12, atol=1e-15)
        assert entry["unregularized_gap"][-1] == pytest.approx(g.unregularized_gap(game.P, np.array(entry["policy"])))
        assert entry["refreshes"] == (3 if name == "comal" else 0)  # after steps 4, 8, 12
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_json_without_plot_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["game", "--json", "--iterations", "2", "--algorithms", "inpo"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"inpo"}
    assert not (tmp_path / "runs").exists()


def test_game_file_rock_paper_scissors_converges_to_uniform(tmp_path, capsys):
    """RPS with a uniform reference: the Nash policy is uniform (Pπ = ½ for uniform π), and INPO starts
    there, so every iterate stays uniform and every gap is 0."""
    path = _write(tmp_path, {"P": [[0.5, 0, 1], [1, 0.5, 0], [0, 1, 0.5]]})
    assert cli.main(["game", path, "--json", "--iterations", "5", "--algorithms", "inpo,nash-md"]) == 0
    result = json.loads(capsys.readouterr().out)
    for entry in result.values():
        assert_allclose(entry["policy"], [1 / 3] * 3, atol=1e-15)
        assert max(abs(x) for x in entry["duality_gap"]) < 1e-15


def test_small_tau_shows_cycling_honestly_and_theory_schedule_falls(tmp_path, capsys):
    common = ["game", "--tau", "0.01", "--algorithms", "inpo", "--plot", str(tmp_path / "p.png")]
    assert cli.main([*common, "--eta", "0.03", "--iterations", "300"]) == 0
    out = capsys.readouterr().out
    assert "inpo  cycling" in out and "oscillates instead of converging" in out
    assert cli.main([*common, "--schedule", "theory", "--iterations", "1000"]) == 0
    out = capsys.readouterr().out
    assert "inpo  falling" in out and "schedule theory" in out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--tau", "0.3", "--eta", "0.3"], "tau must be < eta"),
        (["--tau", "nan"], "tau must be a finite number > 0"),
        (["--algorithms", "inpo,dpo"], "unknown algorithm 'dpo'"),
        (["--iterations", "0"], "iterations must be an integer >= 1"),
        (["--refresh-every", "0"], "refresh_every must be an integer >= 1"),
        (["--refresh-tolerance", "-1"], "refresh_tolerance must be a finite number >= 0"),
        (["GAME", "--game", "random"], "give either GAME_JSON"),
        ([{"P": [[0.5, 0.7], [0.7, 0.5]]}], r"P\[0\]\[1\] \+ P\[1\]\[0\] = 1.4, expected 1"),
        ([{"P": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}], "square n × n matrix"),
        (['{"P": [[0.5, NaN], [0.5, 0.5]]}'], "is not a finite number"),
        ([{"P": [[0.5, 0.5], [0.5, 0.5]], "reference": [0.7, 0.7]}], "reference sums to 1.4, expected 1"),
        ([{"P": [[0.5, 0.5], [0.5, 0.5]], "reference": [1.5, -0.5]}], "expected > 0"),
        ([{"P": [[0.5, 0.5], [0.5, 0.5]], "reference": [1.0]}], "reference must have length 2"),
        (['{"P": [[0.5, 0.5], [0.5, 0.5]]'], "invalid JSON"),
        ([{"reference": [0.5, 0.5]}], "missing key 'P'"),
        (["missing.json"], "cannot read game file"),
    ],
)
def test_invalid_input_gives_one_line_and_status_2(tmp_path, capsys, argv, match):
    """A dict or a "{..." string becomes a game file; GAME and missing.json are paths in tmp_path."""
    resolved = []
    for arg in argv:
        if isinstance(arg, dict) or arg.startswith("{"):
            resolved.append(_write(tmp_path, arg))
        elif arg in ("GAME", "missing.json"):
            resolved.append(str(tmp_path / arg))
        else:
            resolved.append(arg)
    if "--iterations" not in resolved:
        resolved += ["--iterations", "3"]
    assert cli.main(["game", *resolved]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nashalign game: error: ")
    assert re.search(match, lines[0])
    assert "Traceback" not in captured.err and captured.out == ""


def test_subprocess_error_has_no_traceback(tmp_path):
    """A real process, end to end: exit status 2 and exactly one stderr line for a bad game file."""
    bad = _write(tmp_path, {"P": [[0.5, 0.9], [0.9, 0.5]]})
    command = [sys.executable, "-m", "nashalign.cli", "game"]
    result = subprocess.run([*command, bad], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.count("\n") == 1 and "expected 1" in result.stderr and "Traceback" not in result.stderr
    )
    result = subprocess.run(
        [*command, "--json", "--iterations", "3", "--algorithms", "inpo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)) == ["inpo"]


def test_shown_iterations_is_a_readable_subset_ending_with_the_last():
    assert shown_iterations(100) == [0, 1, 2, 5, 10, 20, 50, 100]
    assert shown_iterations(7) == [0, 1, 2, 5, 7]
    assert shown_iterations(1) == [0, 1]
    assert shown_iterations(2000) == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert shown_iterations(30)[-2:] == [20, 30]


def test_trend_words():
    t = np.arange(101)
    assert trend(np.exp(-t / 2.0), sampled=False) == "converged"
    assert trend(1 / (t + 1.0), sampled=False) == "falling"
    assert trend(0.4 + 0.1 * np.sin(t), sampled=False) == "cycling"
    assert trend(0.4 + 0.1 * np.sin(t), sampled=True) == "noisy"
    assert trend(np.full(101, 0.3), sampled=False) == "flat"
