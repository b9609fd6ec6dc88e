"""Finite preference games: matrices, validation, loading, best response, duality gap, exact Nash."""

from __future__ import annotations

import json
import math
import sys
from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from nashalign import NashalignError
from nashalign.core import games as g


def _random_games(seed: int, count: int, n: int):
    rng = np.random.default_rng(seed)
    return g.random_intransitive(n, rng, count), g.random_reference(n, rng, count)


# ---------------------------------------------------------------------------------------------------
# Preference matrices


def test_bradley_terry_hand_values():
    """Scores (0, log 3, log 9): P[1, 0] = 3/(1 + 3) = 0.75, P[2, 0] = 9/10, P[2, 1] = 9/(9 + 3) = 0.75,
    and P[a, b] = 1 − P[b, a]; a Bradley–Terry majority is transitive, so there is no cycle."""
    P = g.bradley_terry(np.log([1.0, 3.0, 9.0]))
    assert_allclose(P, [[0.5, 0.25, 0.1], [0.75, 0.5, 0.25], [0.9, 0.75, 0.5]], atol=1e-15)
    assert g.find_cycle(P) is None


def test_random_intransitive_structure():
    rng = np.random.default_rng(0)
    P = g.random_intransitive(7, rng, games=50)
    assert P.shape == (50, 7, 7)
    assert_allclose(P + np.swapaxes(P, -1, -2), 1.0, atol=1e-15)
    assert_allclose(np.diagonal(P, axis1=-2, axis2=-1), 0.5)
    assert P.min() >= 0 and P.max() <= 1
    lower = P[:, np.tril_indices(7, -1)[0], np.tril_indices(7, -1)[1]]
    assert 0.4 < lower.mean() < 0.6  # U(0, 1) entries
    assert sum(g.find_cycle(p) is not None for p in P) >= 45  # generically intransitive
    ref = g.random_reference(7, rng, games=50)
    assert_allclose(ref.sum(-1), 1.0) and (ref > 0).all()


def test_rock_paper_scissors_and_its_uniform_nash():
    """Rock loses to paper, beats scissors. With a uniform reference, the uniform policy has Pπ = ½·1, so
    BR(uniform) = softmax(log ⅓ + ½/τ) = uniform: it is the Nash policy for every τ."""
    P = g.rock_paper_scissors()
    assert P[0, 1] == 0 and P[0, 2] == 1 and P[1, 2] == 0
    assert g.find_cycle(P) is not None
    uniform = np.full(3, 1 / 3)
    for tau in (1.0, 0.1, 0.01):
        assert_allclose(g.nash_policy(P, uniform, tau), uniform, atol=1e-14)
    noisy = g.rock_paper_scissors(0.2, np.random.default_rng(1))
    g.validate_game(noisy)
    assert not np.allclose(noisy, P)
    with pytest.raises(NashalignError, match="rng"):
        g.rock_paper_scissors(0.1)


def test_majority_vote_matches_enumeration_of_votes():
    """P[a, b] = Σ over the 2³ vote patterns with at least 2 votes for a of Π p_k or (1 − p_k)."""
    scores = np.array([[0.0, 1.0, -0.5], [2.0, 0.0, 1.0], [0.3, -1.0, 0.0]])
    p = g.bradley_terry(scores)  # (3, n, n): annotator k's P(a ≻ b)
    expected = np.zeros((3, 3))
    for votes in product((0, 1), repeat=3):
        if sum(votes) >= 2:
            expected += np.prod([p[k] if v else 1 - p[k] for k, v in enumerate(votes)], axis=0)
    assert_allclose(g.majority_vote(scores), expected, atol=1e-15)
    with pytest.raises(NashalignError, match="K odd"):
        g.majority_vote(scores[:2])


def test_condorcet_game_has_a_cycle_although_every_annotator_is_transitive():
    game = g.condorcet_game()
    g.validate_game(game.P, game.reference)
    assert g.find_cycle(game.P) == (0, 1, 2)  # A ≻ B ≻ C ≻ A
    assert game.P[0, 1] > 0.5 and game.P[1, 2] > 0.5 and game.P[2, 0] > 0.5
    for scores in g.CONDORCET_SCORES:
        assert g.find_cycle(g.bradley_terry(scores)) is None
    assert (game.P[:3, 3:] > 0.5).all()  # the cycle beats D and E by majority
    assert g.condorcet_game().P.tobytes() == game.P.tobytes()  # deterministic


def test_builtin_games_are_valid():
    for name, make in g.BUILTIN_GAMES.items():
        game = make(3)
        P, ref = g.validate_game(game.P, game.reference, source=name)
        assert_allclose(P, game.P, atol=1e-15)
        assert not game.names or len(game.names) == game.n


# ---------------------------------------------------------------------------------------------------
# Validation and loading


@pytest.mark.parametrize(
    ("P", "ref", "match"),
    [
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], None, r"square n × n matrix, got shape \(2, 3\)"),
        ([[0.5, 0.5], [0.5]], None, "square matrix"),
        ([["a", "b"], ["c", "d"]], None, "square matrix"),
        ([[0.5]], None, "at least 2 responses"),
        ([[0.5, float("nan")], [0.5, 0.5]], None, r"P\[0\]\[1\] = nan is not a finite number"),
        ([[0.5, float("inf")], [0.5, 0.5]], None, "not a finite number"),
        ([[0.5, 1.5], [-0.5, 0.5]], None, r"P\[0\]\[1\] = 1.5 is outside \[0, 1\]"),
        ([[0.5, 0.7], [0.7, 0.5]], None, r"P\[0\]\[1\] \+ P\[1\]\[0\] = 1.4, expected 1"),
        ([[0.4, 0.5], [0.5, 0.5]], None, r"P\[0\]\[0\] \+ P\[0\]\[0\] = 0.8, expected 1"),
        ([[0.5, 0.3], [0.7, 0.5]], [0.5, 0.3, 0.2], "reference must have length 2"),
        ([[0.5, 0.3], [0.7, 0.5]], [1.2, -0.2], r"reference\[1\] = -0.2, expected > 0"),
        ([[0.5, 0.3], [0.7, 0.5]], [1.0, 0.0], r"reference\[1\] = 0, expected > 0"),
        ([[0.5, 0.3], [0.7, 0.5]], [0.5, 0.4], "reference sums to 0.9, expected 1"),
        ([[0.5, 0.3], [0.7, 0.5]], [0.5, float("nan")], "not a finite number"),
        ([[0.5, 0.3], [0.7, 0.5]], "uniform", "reference must be a list of 2 numbers"),
    ],
)
def test_validate_game_rejects_invalid_input_with_one_line(P, ref, match):
    with pytest.raises(NashalignError, match=match) as info:
        g.validate_game(P, ref, source="my.json")
    message = str(info.value)
    assert message.startswith("my.json: ") and "\n" not in message


def test_validate_game_symmetrizes_within_tolerance_and_defaults_to_uniform():
    P, ref = g.validate_game([[0.5, 0.3 + 4e-7], [0.7, 0.5]])
    assert_allclose(P + P.T, 1.0, atol=1e-16)
    assert_allclose(P[0, 1], 0.3 + 2e-7)
    assert_allclose(ref, [0.5, 0.5])
    _, ref = g.validate_game([[0.5, 0.3], [0.7, 0.5]], [0.25, 0.75 + 5e-7])
    assert_allclose(ref.sum(), 1.0, atol=1e-15)


def test_load_game_reads_p_reference_and_names(tmp_path):
    path = tmp_path / "rps.json"
    path.write_text(json.dumps({"P": [[0.5, 0, 1], [1, 0.5, 0], [0, 1, 0.5]], "names": ["r", "p", "s"]}))
    game = g.load_game(path)
    assert_allclose(game.P, g.rock_paper_scissors())
    assert_allclose(game.reference, np.full(3, 1 / 3))
    assert game.names == ("r", "p", "s")
    path.write_text(json.dumps({"P": [[0.5, 0.2], [0.8, 0.5]], "reference": [0.9, 0.1]}))
    assert_allclose(g.load_game(path).reference, [0.9, 0.1])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"P": [[0.5, 0.5], [0.5, 0.5]', "line 1 column 30: invalid JSON"),
        ("[[0.5, 0.5], [0.5, 0.5]]", "expected a JSON object with key 'P'"),
        ('{"reference": [0.5, 0.5]}', "missing key 'P'"),
        ('{"P": [[0.5, 0.5], [0.5, 0.5]], "ref": [1, 0]}', "unknown key 'ref'"),
        ('{"P": [[0.5, NaN], [0.5, 0.5]]}', "not a finite number"),
        ('{"P": [[0.5, 0.5], [0.5, 0.5]], "names": ["a"]}', "'names' must be a list of 2 strings"),
    ],
)
def test_load_game_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "game.json"
    path.write_text(text)
    with pytest.raises(NashalignError, match=match) as info:
        g.load_game(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_load_game_missing_file(tmp_path):
    with pytest.raises(NashalignError, match="cannot read game file"):
        g.load_game(tmp_path / "absent.json")


# ---------------------------------------------------------------------------------------------------
# Best response, duality gap, Nash policy


def test_best_response_is_a_maximizer():
    """J(·, π) is strictly concave in its first argument, so BR(π) must beat every perturbation of it
    (multiplicative perturbations that stay on the simplex) and every random policy."""
    P, ref = _random_games(1, 20, 6)
    rng = np.random.default_rng(2)
    policy = rng.dirichlet(np.ones(6), 20)
    for tau in (0.5, 0.1, 0.02):
        best = g.best_response(P, ref, policy, tau)
        value = g.payoff(P, ref, best, policy, tau)
        for scale in (1e-1, 1e-3):
            for _ in range(10):
                other = best * np.exp(scale * rng.standard_normal(best.shape))
                other /= other.sum(-1, keepdims=True)
                assert (g.payoff(P, ref, other, policy, tau) < value).all()
        assert (g.payoff(P, ref, rng.dirichlet(np.ones(6), 20), policy, tau) < value).all()


def test_duality_gap_matches_the_design_formula():
    """The implementation rearranges 2τ·log Σ ρ·exp(Pπ/τ) − 1 + 2τ·KL(π‖ρ); evaluate that directly."""
    P, ref = _random_games(3, 50, 8)
    policy = np.random.default_rng(4).dirichlet(np.full(8, 0.5), 50)
    for tau in (1.0, 0.1, 0.01):
        direct = (
            2 * tau * g.logsumexp(np.log(ref) + np.einsum("gij,gj->gi", P, policy) / tau)
            - 1
            + 2 * tau * g.kl_divergence(policy, ref)
        )
        assert_allclose(g.duality_gap(P, ref, policy, tau), direct, atol=1e-12)


@pytest.mark.parametrize("tau", [0.3, 0.1])
def test_duality_gap_matches_brute_force_max_min_on_a_small_game(tau):
    """n = 3: max_π1 J(π1, π) and min_π2 J(π, π2) by exhaustive search over a simplex grid of step 1/400
    (including its boundary). A grid point is a feasible policy, so the grid gap is at most the exact
    gap; J is smooth with curvature O(1/τ) near its optimum, so the grid misses it by O(h²/τ) ≈ 1e-4."""
    rng = np.random.default_rng(5)
    P = g.random_intransitive(3, rng)
    ref = g.random_reference(3, rng)
    steps = 400
    i, j = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    grid = np.stack([i[keep], j[keep], steps - i[keep] - j[keep]], axis=-1) / steps
    for policy in (ref, rng.dirichlet(np.ones(3)), np.array([0.7, 0.2, 0.1])):
        best = g.payoff(P, ref, grid, policy, tau).max()
        worst = g.payoff(P, ref, policy, grid, tau).min()
        exact = g.duality_gap(P, ref, policy, tau)
        assert best - worst <= exact + 1e-12
        assert exact - (best - worst) < 1e-3
        assert_allclose(best, g.payoff(P, ref, g.best_response(P, ref, policy, tau), policy, tau), atol=5e-4)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 8),
    tau=st.floats(0.005, 5.0),
    concentration=st.floats(0.05, 5.0),
)
def test_duality_gap_is_nonnegative(seed, n, tau, concentration):
    rng = np.random.default_rng(seed)
    P = g.random_intransitive(n, rng)
    ref = g.random_reference(n, rng)
    policy = rng.dirichlet(np.full(n, concentration))
    assert g.duality_gap(P, ref, policy, tau) >= -1e-12
    assert g.duality_gap(P, ref, np.eye(n)[0], tau) >= 0  # a pure policy, with 0·log 0 terms


@pytest.mark.parametrize("tau", [2.0, 0.1, 0.01, 0.002])
def test_nash_policy_is_a_fixed_point_with_zero_gap(tau):
    P, ref = _random_games(6, 40, 10)
    nash = g.nash_policy(P, ref, tau)
    assert_allclose(nash.sum(-1), 1.0, atol=1e-14)
    assert g.nash_residual(P, ref, nash, tau).max() < 1e-10
    assert np.abs(g.duality_gap(P, ref, nash, tau)).max() < 1e-9
    rng = np.random.default_rng(7)
    nearby = nash * np.exp(0.01 * rng.standard_normal(nash.shape))
    nearby /= nearby.sum(-1, keepdims=True)
    assert (g.duality_gap(P, ref, nearby, tau) > 1e-9).all()


def test_nash_policy_of_a_bradley_terry_game_in_closed_form():
    """Two responses, P(1 ≻ 0) = p, π = (1 − x, x). Then (Pπ)(1) − (Pπ)(0)
    = [p(1 − x) + ½x] − [½(1 − x) + (1 − p)x] = (p − ½)(1 − x) + (p − ½)x = p − ½ for every x, so the
    fixed point π = softmax(log ρ + Pπ/τ) is explicit: logit(x) = logit(ρ_1) + (p − ½)/τ."""
    p, tau = 0.8, 0.25
    P = np.array([[0.5, 1 - p], [p, 0.5]])
    ref = np.array([0.6, 0.4])
    x = 1 / (1 + math.exp(-(math.log(0.4 / 0.6) + (p - 0.5) / tau)))
    assert_allclose(g.nash_policy(P, ref, tau), [1 - x, x], atol=1e-14)


def test_gap_and_nash_reject_nonpositive_tau():
    P, ref = g.validate_game([[0.5, 0.3], [0.7, 0.5]])
    for function in (lambda: g.nash_policy(P, ref, 0.0), lambda: g.duality_gap(P, ref, ref, -1.0)):
        with pytest.raises(NashalignError, match="tau must be a finite number > 0"):
            function()


# ---------------------------------------------------------------------------------------------------
# Unregularized game


def test_unregularized_gap_hand_values():
    """Rock-paper-scissors: a pure policy loses to its counter with probability 1, DG₀ = 2·1 − 1 = 1;
    uniform: P(y ≻ uniform) = ½ for every y, DG₀ = 0. π = (½, ½, 0) (rock or paper): P(· ≻ π) =
    (½·½ + ½·0, ½·1 + ½·½, ½·0 + ½·1) = (¼, ¾, ½), paper is the best response, DG₀ = 2·¾ − 1 = ½."""
    P = g.rock_paper_scissors()
    assert_allclose(g.unregularized_gap(P, np.eye(3)), [1.0, 1.0, 1.0])
    assert abs(g.unregularized_gap(P, np.full(3, 1 / 3))) < 1e-15
    assert_allclose(P @ np.array([0.5, 0.5, 0.0]), [0.25, 0.75, 0.5])
    assert g.unregularized_gap(P, np.array([0.5, 0.5, 0.0])) == pytest.approx(0.5)


def test_unregularized_gap_is_the_max_min_over_pure_strategies():
    """max_π1 π1ᵀPπ − min_π2 πᵀPπ2 is attained at pure strategies (linear in π1 and π2)."""
    P, _ = _random_games(8, 20, 7)
    policy = np.random.default_rng(9).dirichlet(np.ones(7), 20)
    best = np.einsum("gij,gj->gi", P, policy).max(-1)
    worst = np.einsum("gi,gij->gj", policy, P).min(-1)
    assert_allclose(g.unregularized_gap(P, policy), best - worst, atol=1e-14)
    assert (g.unregularized_gap(P, policy) > 0).all()


def test_unregularized_nash_policy_has_zero_gap_and_is_the_limit_of_small_tau():
    """On 24 random games (5 to 12 responses) the LP's policy has DG₀ = 0 up to rounding and no pure
    strategy beats it; as τ → 0 the regularized Nash policy approaches it (DG₀ falls with τ)."""
    rng = np.random.default_rng(10)
    for _ in range(24):
        n = int(rng.integers(5, 13))
        P, ref = g.random_intransitive(n, rng), g.random_reference(n, rng)
        nash = g.unregularized_nash_policy(P)
        assert nash.min() >= 0 and abs(nash.sum() - 1) < 1e-12
        assert g.unregularized_gap(P, nash) < 1e-9
        gaps = [g.unregularized_gap(P, g.nash_policy(P, ref, tau)) for tau in (0.1, 0.01, 0.001)]
        assert gaps[2] < gaps[0] and gaps[2] < 0.05
    assert_allclose(g.unregularized_nash_policy(g.rock_paper_scissors()), np.full(3, 1 / 3), atol=1e-12)
    top = g.unregularized_nash_policy(g.bradley_terry(np.array([0.0, 2.0, 1.0])))
    assert_allclose(top, [0.0, 1.0, 0.0], atol=1e-12)  # transitive: the best response is pure
    batch = g.unregularized_nash_policy(np.stack([g.rock_paper_scissors()] * 2))
    assert batch.shape == (2, 3)


def test_unregularized_nash_policy_without_scipy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(NashalignError, match="needs scipy"):
        g.unregularized_nash_policy(g.rock_paper_scissors())
