"""Tabular algorithms on finite games, checked against theory.

The claims of the project's core issue are tested on 24 random intransitive 10-response games
(lower triangle ~ U(0, 1), reference logits ~ N(0, 1)), all run at once as one batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy.optimize import minimize

from nashalign import NashalignError
from nashalign.core import games as g
from nashalign.core import tabular as tb
from nashalign.core.losses import ipo, make_loss, nash_md, online_ipo
from nashalign.core.mixture import geometric_mixture_logprobs

GAMES, ACTIONS = 24, 10


@pytest.fixture(scope="module")
def random_games():
    rng = np.random.default_rng(2024)
    return g.random_intransitive(ACTIONS, rng, GAMES), g.random_reference(ACTIONS, rng, GAMES)


@pytest.fixture(scope="module")
def plain_inpo_small_tau(random_games):
    """Closed-form INPO, τ = 0.01, fixed η = 0.5, 2,000 iterations (shared by two tests)."""
    P, ref = random_games
    return tb.run_algorithm("inpo", P, ref, tau=0.01, eta=0.5, iterations=2000)


def _all_ordered_pairs(P: np.ndarray, policy: np.ndarray):
    """Every (chosen, rejected) pair with its probability under sampling y, y' ~ π × π and labelling
    by the oracle: (w, l) arises from (w, l) when w wins and from (l, w) when w wins, 2·π(w)π(l)P[w, l]."""
    batch, n = policy.shape
    chosen, rejected = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    weights = 2 * policy[:, :, None] * policy[:, None, :] * P
    return (
        np.broadcast_to(chosen.reshape(-1), (batch, n * n)),
        np.broadcast_to(rejected.reshape(-1), (batch, n * n)),
        weights.reshape(batch, -1),
    )


def _maximizes(objective, best: np.ndarray, rng: np.random.Generator) -> bool:
    """objective(best) beats multiplicative perturbations of `best` that stay on the simplex."""
    value = objective(best)
    for scale in (0.1, 1e-3):
        for _ in range(10):
            other = best * np.exp(scale * rng.standard_normal(best.shape))
            other /= other.sum(-1, keepdims=True)
            if not (objective(other) < value).all():
                return False
    return True


# ---------------------------------------------------------------------------------------------------
# The INPO loss and the OMD step


@pytest.mark.parametrize(("eta", "tau"), [(0.3, 0.1), (1.0, 0.0), (0.05, 0.01), (2.0, 1.5), (0.5, 0.49)])
def test_minimizer_of_the_expected_inpo_loss_is_the_omd_step(random_games, eta, tau):
    """Design notes §1. With labels I ~ Bernoulli(P[y, y']) and d = g(y) − g(y'),
    g = θ − (τ/η)·log ρ − (1 − τ/η)·log π_t, the expected loss of a sampled pair is
    P·(d − c)² + (1 − P)·(−d − c)² = (d − c·(2P − 1))² + const, c = 1/(2η): a least-squares regression of
    g(y) − g(y') on (P[y, y'] − ½)/η over y, y' ~ π_t. Its normal equations give
    g(a) = E_π_t g + (P(a ≻ π_t) − ½)/η, i.e. θ = (1 − τ/η)·log π_t + (τ/η)·log ρ + P(· ≻ π_t)/η + const:
    the OMD step. Checked by minimizing `nashalign.core.losses.inpo` over all weighted pairs."""
    P, ref = random_games
    log_policy = np.log(np.random.default_rng(11).dirichlet(np.ones(ACTIONS), GAMES))
    chosen, rejected, weights = _all_ordered_pairs(P, np.exp(log_policy))
    fitted = tb.fit_inpo(np.log(ref), log_policy, chosen, rejected, weights, tau=tau, eta=eta)
    omd = tb.inpo_step(P, np.log(ref), log_policy, log_policy, tau=tau, eta=eta, samples=0, rng=None)
    assert np.abs(np.exp(fitted) - np.exp(omd)).max() < 1e-6


@pytest.mark.parametrize(("eta", "tau"), [(0.3, 0.1), (1.0, 0.0), (0.05, 0.01), (0.5, 0.49)])
def test_minimizers_of_the_expected_optimistic_losses_are_the_optimistic_step(random_games, eta, tau):
    """ONPO in INPO's convention. Pairs from π_t, exact expectations; the auxiliary policy of the last
    iteration satisfies π̂_{t−1} ∝ π_t·exp(−w_{t−1}/η) (what the previous iteration left, see the
    next test). Minimizing `inpo-optimistic` over the policy gives the finite-game optimistic step
    π_{t+1} ∝ π_t^(1−r)·ρ^r·exp((2w_t − w_{t−1})/η), and minimizing `inpo-optimistic-aux` gives
    π̂_t ∝ π_{t+1}·exp(−w_t/η), the same relation one iteration later."""
    P, ref = random_games
    rng = np.random.default_rng(13)
    log_previous = np.log(rng.dirichlet(np.ones(ACTIONS), GAMES))
    log_policy = np.log(rng.dirichlet(np.ones(ACTIONS), GAMES))
    log_aux = g.log_softmax(log_policy - tb.win_rates(P, log_previous) / eta)
    chosen, rejected, weights = _all_ordered_pairs(P, np.exp(log_policy))
    models = {"ref": np.log(ref), "prev": log_policy, "aux": log_aux}
    policy_loss = make_loss("inpo-optimistic", eta=eta, tau=tau)
    aux_loss = make_loss("inpo-optimistic-aux", eta=eta, tau=tau)
    fitted = tb.fit_pair_loss(policy_loss, models, log_policy, chosen, rejected, weights)
    fitted_aux = tb.fit_pair_loss(aux_loss, models, log_policy, chosen, rejected, weights)
    step = tb.inpo_optimistic_step(
        P, np.log(ref), log_policy, log_previous, tau=tau, eta=eta, samples=0, rng=None
    )
    assert np.abs(np.exp(fitted) - np.exp(step)).max() < 1e-6
    invariant = g.softmax(step - tb.win_rates(P, log_policy) / eta)
    assert np.abs(np.exp(fitted_aux) - invariant).max() < 1e-6


def test_optimistic_losses_reproduce_the_optimistic_run_from_the_reference(random_games):
    """The recipe for the online loop: iteration 0 trains π_1 with `inpo` and takes π̂_0 = π_0 = ρ; each
    later iteration trains π_{t+1} with `inpo-optimistic` and π̂_t with `inpo-optimistic-aux` on the
    same pairs from π_t, scored under ρ, π_t and π̂_{t−1}. With exact expectations the iterates are
    those of `run_algorithm("inpo-optimistic")` (whose first step uses w_{−1} = w_0)."""
    P, ref = random_games[0][:4], random_games[1][:4]
    tau, eta, iterations = 0.1, 0.3, 6
    log_ref = np.log(ref)
    chosen, rejected, weights = _all_ordered_pairs(P, ref)
    log_policy = tb.fit_inpo(log_ref, log_ref, chosen, rejected, weights, tau=tau, eta=eta)
    log_aux = log_ref
    policy_loss = make_loss("inpo-optimistic", eta=eta, tau=tau)
    aux_loss = make_loss("inpo-optimistic-aux", eta=eta, tau=tau)
    for _ in range(iterations - 1):
        chosen, rejected, weights = _all_ordered_pairs(P, np.exp(log_policy))
        models = {"ref": log_ref, "prev": log_policy, "aux": log_aux}
        log_policy, log_aux = (
            tb.fit_pair_loss(policy_loss, models, log_policy, chosen, rejected, weights),
            tb.fit_pair_loss(aux_loss, models, log_policy, chosen, rejected, weights),
        )
    run = tb.run_algorithm("inpo-optimistic", P, ref, tau=tau, eta=eta, iterations=iterations)
    assert np.abs(np.exp(log_policy) - run.policy).max() < 1e-6


def test_fit_inpo_on_samples_reaches_the_least_squares_minimizer(random_games):
    """On sampled pairs the INPO loss is Σ_i (θ_w − θ_l − y_i)², y_i = 1/(2η) + (τ/η)·Δlog ρ + (1 − τ/η)·Δlog π_t:
    linear least squares in θ. The minimizer nearest to the start θ = log π_t is θ + lstsq(X, y − Xθ)
    (minimum-norm correction, numpy), which conjugate gradients from θ must reproduce; responses in no
    pair keep their logits relative to each other."""
    P, ref = random_games
    rng = np.random.default_rng(12)
    log_policy = np.log(rng.dirichlet(np.full(ACTIONS, 0.3), GAMES))
    chosen, rejected = tb.sample_pairs(P, log_policy, 300, rng)
    eta, tau = 0.3, 0.1
    fitted = tb.fit_inpo(
        np.log(ref), log_policy, chosen, rejected, np.full(chosen.shape, 1 / 300), tau=tau, eta=eta
    )
    ratio, log_ref = tau / eta, np.log(ref)
    for k in range(GAMES):
        rows = np.arange(300)
        X = np.zeros((300, ACTIONS))
        X[rows, chosen[k]] += 1
        X[rows, rejected[k]] -= 1
        y = (
            1 / (2 * eta)
            + ratio * (log_ref[k, chosen[k]] - log_ref[k, rejected[k]])
            + (1 - ratio) * (log_policy[k, chosen[k]] - log_policy[k, rejected[k]])
        )
        theta = log_policy[k] + np.linalg.lstsq(X, y - X @ log_policy[k], rcond=None)[0]
        assert_allclose(np.exp(fitted[k]), np.exp(theta - g.logsumexp(theta)), atol=1e-10)
        unseen = np.setdiff1d(np.arange(ACTIONS), np.concatenate([chosen[k], rejected[k]]))
        if len(unseen) >= 2:
            assert_allclose(np.diff(fitted[k, unseen]), np.diff(log_policy[k, unseen]), atol=1e-10)


def test_sample_pairs_follows_policy_and_oracle():
    """(w, l) with w ≠ l has probability 2·π(w)π(l)·P[w, l]; (y, y) has π(y)². 200,000 pairs: 5σ ≤ 0.006."""
    P = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.6], [0.8, 0.4, 0.5]])
    policy = np.array([0.5, 0.3, 0.2])
    chosen, rejected = tb.sample_pairs(P, np.log(policy), 200_000, np.random.default_rng(0))
    frequency = np.zeros((3, 3))
    np.add.at(frequency, (chosen, rejected), 1 / 200_000)
    expected = 2 * policy[:, None] * policy[None, :] * P
    np.fill_diagonal(expected, policy**2)
    assert_allclose(frequency, expected, atol=0.006)
    batched = tb.sample_pairs(
        np.stack([P, P]), np.log(np.stack([policy, policy])), 7, np.random.default_rng(0)
    )
    assert batched[0].shape == (2, 7)


# ---------------------------------------------------------------------------------------------------
# The other steps, each against an independent characterization


def test_bradley_terry_fit_matches_a_generic_optimizer_and_recovers_scores():
    """The MAP objective minimized by scipy (BFGS) gives the same rewards; with 100,000 comparisons of a
    Bradley–Terry oracle, the rewards are the true scores up to a constant (the prior is negligible)."""
    scores = np.array([0.0, 1.0, -0.5, 2.0])
    P = g.bradley_terry(scores)
    rng = np.random.default_rng(3)
    log_uniform = np.log(np.full(4, 0.25))
    chosen, rejected = tb.sample_pairs(P, log_uniform, 60, rng)
    reward = tb.fit_bradley_terry(chosen, rejected, 4)

    def objective(r):
        return np.sum(np.logaddexp(0, -(r[chosen] - r[rejected]))) + 0.5 * np.sum(r * r)

    reference = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    assert_allclose(reward, reference, atol=1e-6)
    assert abs(reward.sum()) < 1e-9
    chosen, rejected = tb.sample_pairs(P, log_uniform, 100_000, rng)
    reward = tb.fit_bradley_terry(chosen, rejected, 4)
    assert_allclose(reward - reward.mean(), scores - scores.mean(), atol=0.05)


def test_iterative_dpo_step_on_a_bradley_terry_game_is_exp_reward_over_eta():
    """With a Bradley–Terry oracle of scores s and many comparisons, r̂ → s + const, so the step from π_t
    is π_t·exp(s/η) normalized (DPO's β = η)."""
    scores = np.array([0.0, 0.5, 1.0])
    P = g.bradley_terry(scores)
    log_policy = np.log(np.array([0.5, 0.3, 0.2]))
    rng = np.random.default_rng(4)
    step = tb.iterative_dpo_step(
        P, np.log(np.full(3, 1 / 3)), log_policy, log_policy, tau=0.1, eta=2.0, samples=100_000, rng=rng
    )
    assert_allclose(np.exp(step), g.softmax(log_policy + scores / 2.0), atol=0.01)


def test_closed_form_steps_are_the_argmax_of_their_proximal_objectives(random_games):
    """INPO: argmax_π E_π[w] − τ·KL(π‖ρ) − (η − τ)·KL(π‖π_t), with w = P(· ≻ π_t).
    SPPO: argmax_π E_π[w] − η·KL(π‖π_t). Nash-MD: argmax_π E_π[P(· ≻ μ)] − η·KL(π‖μ), μ ∝ π_t^(1−τ/η)ρ^(τ/η)."""
    P, ref = random_games
    rng = np.random.default_rng(5)
    log_policy = np.log(rng.dirichlet(np.ones(ACTIONS), GAMES))
    policy, log_ref = np.exp(log_policy), np.log(ref)
    tau, eta = 0.1, 0.3
    w = tb.win_rates(P, log_policy)
    kwargs = {"tau": tau, "eta": eta, "samples": 0, "rng": None}
    inpo = np.exp(tb.inpo_step(P, log_ref, log_policy, log_policy, **kwargs))
    assert _maximizes(
        lambda q: (q * w).sum(-1) - tau * g.kl_divergence(q, ref) - (eta - tau) * g.kl_divergence(q, policy),
        inpo,
        rng,
    )
    sppo = np.exp(tb.sppo_step(P, log_ref, log_policy, log_policy, **kwargs))
    assert _maximizes(lambda q: (q * w).sum(-1) - eta * g.kl_divergence(q, policy), sppo, rng)
    mixture = g.softmax((1 - tau / eta) * log_policy + (tau / eta) * log_ref)
    w_mixture = tb.win_rates(P, np.log(mixture))
    nash_md = np.exp(tb.nash_md_step(P, log_ref, log_policy, log_policy, **kwargs))
    assert _maximizes(lambda q: (q * w_mixture).sum(-1) - eta * g.kl_divergence(q, mixture), nash_md, rng)


def test_online_ipo_step_is_a_gradient_step_on_the_expected_ipo_loss(random_games):
    """Online IPO: θ_{t+1} = θ_t − (1/η)·(τ/4)·∇_θ E[IPO loss], β = τ, pairs from sg(π_t) labelled by
    the oracle, the expectation computed over all weighted pairs with `nashalign.core.losses.ipo` (summed
    log-probs) and differentiated by autograd; `nashalign.core.losses.online_ipo` is that loss."""
    P, ref = random_games
    log_policy = np.log(np.random.default_rng(6).dirichlet(np.ones(ACTIONS), GAMES))
    tau, eta = 0.1, 0.3
    chosen, rejected, weights = (
        torch.as_tensor(np.ascontiguousarray(a)) for a in _all_ordered_pairs(P, np.exp(log_policy))
    )
    theta = torch.tensor(log_policy, requires_grad=True)
    log_pi, log_ref = torch.log_softmax(theta, -1), torch.tensor(np.log(ref))
    losses = ipo(
        policy_chosen_logps=log_pi.gather(1, chosen).reshape(-1),
        policy_rejected_logps=log_pi.gather(1, rejected).reshape(-1),
        ref_chosen_logps=log_ref.gather(1, chosen).reshape(-1),
        ref_rejected_logps=log_ref.gather(1, rejected).reshape(-1),
        beta=tau,
        average_log_probs=False,
    )
    pair_logps = {
        "policy_chosen_logps": log_pi.gather(1, chosen).reshape(-1),
        "policy_rejected_logps": log_pi.gather(1, rejected).reshape(-1),
        "ref_chosen_logps": log_ref.gather(1, chosen).reshape(-1),
        "ref_rejected_logps": log_ref.gather(1, rejected).reshape(-1),
    }
    assert torch.equal(online_ipo(**pair_logps, tau=tau), losses)
    (gradient,) = torch.autograd.grad((losses.reshape(weights.shape) * weights).sum(), theta)
    expected = g.log_softmax(log_policy - (tau / 4) * gradient.numpy() / eta)
    step = tb.online_ipo_step(P, np.log(ref), log_policy, log_policy, tau=tau, eta=eta, samples=0, rng=None)
    assert_allclose(step, expected, atol=1e-12)


def test_online_ipo_minimized_to_convergence_is_the_best_response(random_games):
    """Why online IPO takes gradient steps: the minimizer of E[(z − 1/(2τ))²] over pairs from π_t
    (z = margin of log π − log ρ) solves g(y) − E g = (w_t(y) − ½)/τ, g = log π − log ρ, i.e.
    π = softmax(log ρ + w_t/τ) = BR(π_t), a full best response (which cycles on intransitive games)."""
    P, ref = random_games
    tau = 0.1
    log_policy = np.log(np.random.default_rng(14).dirichlet(np.ones(ACTIONS), GAMES))
    chosen, rejected, weights = _all_ordered_pairs(P, np.exp(log_policy))
    fitted = tb.fit_pair_loss(
        make_loss("online-ipo", tau=tau), {"ref": np.log(ref)}, log_policy, chosen, rejected, weights
    )
    assert np.abs(np.exp(fitted) - g.best_response(P, ref, np.exp(log_policy), tau)).max() < 1e-6


def test_nash_md_step_is_a_natural_gradient_step_on_the_expected_policy_gradient_loss(random_games):
    """Nash-MD-PG in exact expectation: y ~ π_t, opponent y' ~ μ, the geometric mixture with
    mixture_coef β = τ/η (for one "token" the token-level mixture of `geometric_mixture_logprobs` is
    the mixture itself), p̂(y) = P(y ≻ μ). The expected loss Σ_y π_t(y)·nash_md(y) has the gradient
    −π_t ⊙ (a − E_π_t a) in the logits at θ = log π_t, a = P(· ≻ μ) − τ·(log π_t − log ρ); the
    natural-gradient step θ − ∇/(η·π_t) is log π_t + a/η + const = log μ + P(· ≻ μ)/η, the finite
    game's Nash-MD step."""
    P, ref = random_games
    tau, eta = 0.1, 0.3
    log_policy = np.log(np.random.default_rng(15).dirichlet(np.ones(ACTIONS), GAMES))
    log_mixture = geometric_mixture_logprobs(
        torch.tensor(log_policy), torch.tensor(np.log(ref)), mixture_coef=tau / eta
    ).numpy()
    theta = torch.tensor(log_policy, requires_grad=True)
    losses = nash_md(
        policy_logps=torch.log_softmax(theta, -1).reshape(-1),
        ref_logps=torch.tensor(np.log(ref)).reshape(-1),
        mixture_win_rate=torch.tensor(tb.win_rates(P, log_mixture)).reshape(-1),
        tau=tau,
    )
    expected_loss = (losses.reshape(GAMES, ACTIONS) * torch.tensor(np.exp(log_policy))).sum()
    (gradient,) = torch.autograd.grad(expected_loss, theta)
    natural = g.log_softmax(log_policy - gradient.numpy() / (eta * np.exp(log_policy)))
    step = tb.nash_md_step(P, np.log(ref), log_policy, log_policy, tau=tau, eta=eta, samples=0, rng=None)
    assert_allclose(natural, step, atol=1e-12)


def test_regularized_nash_is_a_fixed_point_of_inpo_optimistic_inpo_online_ipo_and_mirror_prox(random_games):
    P, ref = random_games
    tau, eta = 0.1, 0.3
    log_nash = np.log(g.nash_policy(P, ref, tau))
    for step in (tb.inpo_step, tb.inpo_optimistic_step, tb.online_ipo_step, tb.inpo_extragradient_step):
        out = step(P, np.log(ref), log_nash, log_nash, tau=tau, eta=eta, samples=0, rng=None)
        assert_allclose(np.exp(out), np.exp(log_nash), atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Convergence claims on 24 random intransitive games


def test_closed_form_inpo_gap_below_1e6_by_iteration_100(random_games):
    """τ = 0.1, τ/η = 1/3 (η = 0.3): every game, not only the median."""
    P, ref = random_games
    run = tb.run_algorithm("inpo", P, ref, tau=0.1, eta=0.3, iterations=100)
    assert run.duality_gap[:, 100].max() < 1e-6
    assert_allclose(run.policy, g.nash_policy(P, ref, 0.1), atol=1e-4)


def test_sampled_inpo_below_1e2_by_iteration_30_and_iterative_dpo_is_10x_worse(random_games):
    """1,000 sampled, oracle-labelled pairs per iteration, τ = 0.1, η = 0.3, medians over the games."""
    P, ref = random_games
    kwargs = {"tau": 0.1, "eta": 0.3, "iterations": 30, "samples": 1000}
    sampled = tb.run_algorithm("inpo-sampled", P, ref, rng=np.random.default_rng(1), **kwargs)
    dpo = tb.run_algorithm("iterative-dpo", P, ref, rng=np.random.default_rng(2), **kwargs)
    sampled_median = np.median(sampled.duality_gap[:, 30])
    assert sampled_median < 1e-2
    assert np.median(dpo.duality_gap[:, 30]) >= 10 * sampled_median
    assert np.median(dpo.duality_gap[:, 30] / sampled.duality_gap[:, 30]) >= 10


def test_small_tau_fixed_step_cycles_and_theory_schedule_converges(random_games, plain_inpo_small_tau):
    """τ = 0.01: with a fixed step (η = 0.5) the gap keeps oscillating in most games; with
    η_t = τ(t+2)/2 the median gap after 2,000 iterations is below 0.05 and still falling."""
    P, ref = random_games
    fixed = plain_inpo_small_tau.duality_gap
    tail = fixed[:, -200:]
    assert np.median(tail.max(1) - tail.min(1)) > 0.1  # oscillation over the last 200 iterations
    theory = tb.run_algorithm(
        "inpo", P, ref, tau=0.01, eta=0.5, iterations=2000, schedule="theory"
    ).duality_gap
    medians = np.median(theory[:, [500, 1000, 1500, 2000]], axis=0)
    assert medians[-1] < 0.05
    assert (np.diff(medians) < 0).all()


def test_condorcet_game_cycles_with_a_fixed_step_at_small_tau():
    """The built-in game, τ = 0.01, η = 0.03: the iterate goes round the cycle A → B → C and its gap
    repeats instead of shrinking."""
    game = g.condorcet_game()
    gaps = tb.run_algorithm("inpo", game.P, game.reference, tau=0.01, eta=0.03, iterations=300).duality_gap
    assert gaps[-60:].min() > 0.3
    assert gaps[-60:].max() - gaps[-60:].min() > 0.01


def test_optimistic_inpo_converges_where_plain_inpo_does_not(random_games, plain_inpo_small_tau):
    """τ = 0.01, η = 0.5, 2,000 iterations: optimistic median gap < 1e-8, plain median gap > 0.1."""
    P, ref = random_games
    optimistic = tb.run_algorithm("inpo-optimistic", P, ref, tau=0.01, eta=0.5, iterations=2000)
    assert np.median(optimistic.duality_gap[:, 2000]) < 1e-8
    assert np.median(plain_inpo_small_tau.duality_gap[:, 2000]) > 0.1


# ---------------------------------------------------------------------------------------------------
# Beyond the regularized fixed point: COMAL's reference refresh


def _games_of_several_sizes(seed: int, count: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """`count` random intransitive games of 5 to 12 responses, generated as in docs/games.md, stacked
    into one batch per number of responses: {n: (P (G, n, n), ref (G, n))}."""
    rng = np.random.default_rng(seed)
    by_size: dict[int, list] = {}
    for _ in range(count):
        n = int(rng.integers(5, 13))
        by_size.setdefault(n, []).append((g.random_intransitive(n, rng), g.random_reference(n, rng)))
    return {n: (np.stack([P for P, _ in games]), np.stack([r for _, r in games])) for n, games in by_size.items()}


def test_comal_reaches_the_unregularized_nash_policy_where_inpo_stalls():
    """24 games of 5 to 12 responses, τ = 0.1, η = 0.3 (a smaller version of the docs/games.md claim):
    after 2,000 iterations comal's median DG₀ is ≤ 1e-3 (measured: 1.7e-5), while INPO's fixed point,
    the regularized Nash policy, keeps a median DG₀ above 0.1 (measured: 0.19), and INPO is there."""
    comal, inpo, stalled = [], [], []
    for P, ref in _games_of_several_sizes(2024, 24).values():
        comal.extend(tb.run_algorithm("comal", P, ref, tau=0.1, eta=0.3, iterations=2000).unregularized_gap[:, -1])
        run = tb.run_algorithm("inpo", P, ref, tau=0.1, eta=0.3, iterations=200)
        assert run.duality_gap[:, -1].max() < 1e-9
        inpo.extend(run.unregularized_gap[:, -1])
        stalled.extend(g.unregularized_gap(P, g.nash_policy(P, ref, 0.1)))
    assert len(comal) == 24
    assert np.median(comal) <= 1e-3
    assert np.median(inpo) > 0.1
    assert_allclose(inpo, stalled, atol=1e-4)


def test_comal_refreshes_on_schedule_and_a_refresh_every_step_is_extragradient_without_regularization(
    random_games,
):
    """With refresh_tolerance 0 the anchor is refreshed exactly every `refresh_every` steps. With
    refresh_every 1 the anchor is always π_t, so the τ-terms of the inner step cancel:
    log π_{t+½} = log π_t + P(· ≻ π_t)/η, log π_{t+1} = log π_t + P(· ≻ π_{t+½})/η, the unregularized
    extragradient step, whatever τ is. Without refreshes, comal is mirror prox on the regularized game and
    converges to its Nash policy."""
    P, ref = random_games
    run = tb.run_algorithm("comal", P, ref, tau=0.1, eta=0.3, iterations=23, refresh_every=5, refresh_tolerance=0)
    assert (run.refreshes == 4).all()
    every_step = tb.run_algorithm(
        "comal", P, ref, tau=0.1, eta=0.3, iterations=30, refresh_every=1, refresh_tolerance=0
    )
    other_tau = tb.run_algorithm(
        "comal", P, ref, tau=0.2, eta=0.3, iterations=30, refresh_every=1, refresh_tolerance=0
    )
    log_policy = np.log(ref)
    for _ in range(30):
        half = g.log_softmax(log_policy + tb.win_rates(P, log_policy) / 0.3)
        log_policy = g.log_softmax(log_policy + tb.win_rates(P, half) / 0.3)
    assert_allclose(every_step.policy, np.exp(log_policy), atol=1e-12)
    assert_allclose(other_tau.policy, np.exp(log_policy), atol=1e-12)
    never = tb.run_algorithm(
        "comal", P, ref, tau=0.1, eta=0.3, iterations=200, refresh_every=10**6, refresh_tolerance=0
    )
    assert (never.refreshes == 0).all() and never.duality_gap[:, -1].max() < 1e-9


def test_comal_refreshes_as_soon_as_the_inner_gap_is_below_the_tolerance():
    """The inner gap is the regularized gap against the current anchor: at the first step the anchor is
    ρ, so a tolerance above the gap of π_1 refreshes at once, and `inner_gap` with the anchor ρ is
    `games.duality_gap`."""
    game = g.condorcet_game()
    first = tb.run_algorithm("comal", game.P, game.reference, tau=0.1, eta=0.3, iterations=1)
    log_first = np.log(first.policy)
    assert_allclose(
        tb.inner_gap(game.P, np.log(game.reference), log_first, 0.1),
        g.duality_gap(game.P, game.reference, first.policy, 0.1),
        atol=1e-14,
    )
    gap = float(first.duality_gap[-1])
    kwargs = {"tau": 0.1, "eta": 0.3, "iterations": 1, "refresh_every": 100}
    assert tb.run_algorithm("comal", game.P, game.reference, refresh_tolerance=gap * 1.01, **kwargs).refreshes == 1
    assert tb.run_algorithm("comal", game.P, game.reference, refresh_tolerance=gap * 0.99, **kwargs).refreshes == 0


# ---------------------------------------------------------------------------------------------------
# Runner


def test_runner_shapes_start_and_schedule():
    game = g.condorcet_game()
    runs = tb.run_algorithms(
        list(tb.ALGORITHMS), game.P, game.reference, tau=0.1, eta=0.3, iterations=5, samples=50
    )
    assert list(runs) == list(tb.ALGORITHMS)
    for run in runs.values():
        assert run.duality_gap.shape == (6,) and run.policy.shape == (5,)
        assert_allclose(run.duality_gap[0], g.duality_gap(game.P, game.reference, game.reference, 0.1))
        assert_allclose(run.policy.sum(), 1.0)
        assert_allclose(run.duality_gap[-1], g.duality_gap(game.P, game.reference, run.policy, 0.1))
        assert run.unregularized_gap.shape == (6,)
        assert_allclose(run.unregularized_gap[0], g.unregularized_gap(game.P, game.reference))
        assert_allclose(run.unregularized_gap[-1], g.unregularized_gap(game.P, run.policy))
    assert_allclose(tb.step_schedule("theory", tau=0.1, eta=9.0, iterations=3), [0.15, 0.2, 0.25])
    assert_allclose(tb.step_schedule("fixed", tau=0.1, eta=0.3, iterations=2), [0.3, 0.3])


def test_runner_is_reproducible_and_independent_of_the_other_algorithms():
    game = g.condorcet_game()
    kwargs = {"tau": 0.1, "eta": 0.3, "iterations": 4, "samples": 100, "seed": 7}
    both = tb.run_algorithms(["iterative-dpo", "inpo-sampled"], game.P, game.reference, **kwargs)
    alone = tb.run_algorithms(["inpo-sampled"], game.P, game.reference, **kwargs)
    assert np.array_equal(both["inpo-sampled"].duality_gap, alone["inpo-sampled"].duality_gap)
    other_seed = tb.run_algorithms(["inpo-sampled"], game.P, game.reference, **{**kwargs, "seed": 8})
    assert not np.array_equal(other_seed["inpo-sampled"].policy, alone["inpo-sampled"].policy)


def test_batched_games_equal_separate_runs(random_games):
    P, ref = random_games
    for name in ("inpo", "inpo-optimistic", "online-ipo", "nash-md", "sppo", "comal"):
        batch = tb.run_algorithm(name, P[:3], ref[:3], tau=0.1, eta=0.3, iterations=20, refresh_tolerance=1e-3)
        for k in range(3):
            single = tb.run_algorithm(name, P[k], ref[k], tau=0.1, eta=0.3, iterations=20, refresh_tolerance=1e-3)
            assert_allclose(batch.duality_gap[k], single.duality_gap, atol=1e-13)
            assert_allclose(batch.unregularized_gap[k], single.unregularized_gap, atol=1e-13)
            assert batch.refreshes[k] == single.refreshes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithms": ["inpo", "dpo"]}, "unknown algorithm 'dpo'"),
        ({"algorithms": []}, "no algorithm given"),
        ({"tau": 0.3}, r"tau must be < eta \(0 <= tau/eta < 1\), got tau=0.3, eta=0.3"),
        ({"tau": 0.0}, "tau must be a finite number > 0"),
        ({"eta": float("nan")}, "eta must be a finite number > 0"),
        ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"samples": 0}, "samples must be an integer >= 1"),
        ({"refresh_every": 0}, "refresh_every must be an integer >= 1"),
        ({"refresh_tolerance": float("inf")}, "refresh_tolerance must be a finite number >= 0"),
    ],
)
def test_check_settings_rejects_bad_values(kwargs, match):
    settings = {
        "algorithms": ["inpo"],
        "tau": 0.1,
        "eta": 0.3,
        "iterations": 10,
        "schedule": "fixed",
        "samples": 10,
    }
    settings.update(kwargs)
    algorithms = settings.pop("algorithms")
    with pytest.raises(NashalignError, match=match):
        tb.check_settings(algorithms, **settings)


def test_theory_schedule_allows_tau_above_eta():
    """Under `theory` the step sizes come from τ alone, so --eta is not checked against τ."""
    tb.check_settings(["inpo"], tau=0.5, eta=0.1, iterations=1, schedule="theory", samples=1)
