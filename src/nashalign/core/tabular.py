"""Tabular algorithms on finite preference games, and the runner behind `nashalign game`.

Every algorithm is a step function with one signature,

    step(P, log_ref, log_policy, log_previous, *, tau, eta, samples, rng) -> next log_policy

over normalized log-policies (log π_t, log π_{t−1}; a leading batch of games is allowed: P (G, n, n),
the rest (G, n)). Log-policies rather than policies keep the iterates finite when a probability
underflows (SPPO and iterative DPO drive some to exp(−1000)). `run_algorithm` starts at π_0 = ref,
applies the step for `iterations` steps with the step schedule η_t, and records two exact duality
gaps of every iterate π_0 … π_T: the gap of the KL-regularized game (`nashalign.core.games.duality_gap`,
0 at the regularized Nash policy, what INPO converges to) and the unregularized gap DG₀
(`nashalign.core.games.unregularized_gap`, 0 at a Nash policy of the preference itself).

Arithmetic is numpy float64 throughout, except `fit_inpo`: the real algorithm must minimize the
project's own loss, `nashalign.core.losses.inpo`, which is a torch function, and its gradients come from
torch autograd exactly as in the language-model trainer (float64 tensors, so nothing is lost).

One scale for all: η is the KL weight towards the current iterate π_t (1/η is the step size) and τ the
KL weight towards ρ = ref, as in INPO (design notes, section 1). With w_t(y) = P(y ≻ π_t) = (Pπ_t)(y)
and r = τ/η, the algorithms are (all normalized by softmax):

    inpo             log π_{t+1} = (1 − r)·log π_t + r·log ρ + w_t/η                  (OMD closed form)
    inpo-sampled     argmin of the INPO loss over `samples` pairs from π_t × π_t labelled by
                     sampling the oracle, by conjugate gradients on the logits from log π_t (`fit_inpo`)
    inpo-optimistic  log π_{t+1} = (1 − r)·log π_t + r·log ρ + (2·w_t − w_{t−1})/η     (w_{−1} = w_0)
    iterative-dpo    log π_{t+1} = log π_t + r̂_t/η, r̂_t the Bradley–Terry reward fitted to
                     `samples` sampled comparisons (`fit_bradley_terry`); DPO with reference π_t
    online-ipo       θ_{t+1} = θ_t + (1/η)·π_t ⊙ [(w_t − ½) − τ·(g − E_π_t g)],  g = log π_t − log ρ
    nash-md          μ_t ∝ π_t^(1−r)·ρ^r;   log π_{t+1} = log μ_t + P(y ≻ μ_t)/η
    sppo             log π_{t+1} = log π_t + (w_t − ½)/η
    comal            mirror-prox INPO steps against an anchor ρ_k, refreshed ρ_{k+1} = π_t (below)

Parameterizations of the baselines, chosen so that one η means one step size for every algorithm:

- iterative DPO (Dong et al. 2024, reference = the current iterate): DPO's β is η. INPO's step is
  argmax_π E_π[w_t] − τ·KL(π‖ρ) − (η − τ)·KL(π‖π_t), a total KL weight η per step; iterative DPO
  spends all of it on π_t (it has no anchor at ρ), and its reward is the fitted Bradley–Terry reward
  instead of the win rate w_t. The reward is the MAP estimate under a N(0, 1) prior on each entry:
  the maximum-likelihood estimate does not exist when a response wins (or loses) all of its
  comparisons, which happens routinely with 1,000 pairs; against 1,000 comparisons the prior is
  negligible for every response that is actually sampled, and unsampled responses get reward 0.
- online IPO (Calandriello et al. 2024): gradient descent on the logits θ of the IPO loss with
  β = τ and both responses sampled from sg(π_t), in exact expectation, with learning rate τ/(4η).
  The expected gradient is 4π(y)·[g(y) − E_π g − (w_t(y) − ½)/τ], so the step is the formula above:
  INPO's step taken in the Euclidean geometry of the logits (weighted by π_t(y)) instead of the KL
  geometry. Its fixed point is the regularized Nash policy.
- Nash-MD (Munos et al. 2023): learning rate 1/η and regularization τ, i.e. the mixture exponent is
  τ/η; in exact expectation (the published closed form). With a constant step its fixed point is not
  π* but within O(1/η) of it (its theorem needs decreasing steps for exact convergence).
- SPPO (Wu et al. 2024): π_{t+1} ∝ π_t·exp(η_SPPO·P(y ≻ π_t)) with η_SPPO = 1/η, in exact expectation
  (the published closed form); it has no τ and aims at the unregularized game.

- COMAL (Liu et al. 2024, "A Convergent Meta-Algorithm for Aligning LLMs with General
  Preferences"): a proximal-point outer loop. Each inner game is the regularized game with the anchor
  ρ_k in place of ρ; its Nash policy is the next anchor. As k grows the anchors converge to a Nash
  policy of the unregularized game, where INPO alone stops at the regularized Nash policy (DG₀ ≈ 0.1
  at τ = 0.1). The anchor is refreshed, ρ_{k+1} = π_t, every `refresh_every` steps (default 20),
  and, if `refresh_tolerance` > 0, also as soon as the inner game's regularized gap is ≤ it. The inner
  method is mirror prox (extragradient in the KL geometry): an INPO step from π_t to an extrapolated
  π_{t+½} and the INPO step from π_t driven by P(y ≻ π_{t+½}),

      log π_{t+½} = (1 − r)·log π_t + r·log ρ_k + w_t/η
      log π_{t+1} = (1 − r)·log π_t + r·log ρ_k + P(y ≻ π_{t+½})/η

  so one iteration evaluates the win rates twice. Extragradient steps converge on every monotone
  game with a small enough step 1/η, where plain INPO steps can keep oscillating on an inner game
  whose anchor has become nearly deterministic, and optimistic steps need a smaller step than mirror
  prox (both seen in trials on the games of docs/games.md). The regularized gap
  `duality_gap` reported for comal is still the gap of the game regularized towards the original ρ,
  which is not 0 at the unregularized Nash policy.

Step schedules: `fixed` (η_t = η) or `theory`, η_t = τ(t + 2)/2 from INPO's convergence theorem. The
paper numbers iterates from π_1 = ρ, so the first step uses t = 1 (η = 3τ/2, τ/η = 2/3) and τ/η_t =
2/(t + 2) < 1 throughout, as the INPO loss requires; under `theory`, `eta` is not used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nashalign import NashalignError
from nashalign.core.games import duality_gap, log_softmax, logsumexp, unregularized_gap
from nashalign.core.losses import inpo as inpo_loss

SCHEDULES = ("fixed", "theory")


def win_rates(P: np.ndarray, log_policy: np.ndarray) -> np.ndarray:
    """w(y) = P(y ≻ π) = (Pπ)(y), (..., n)."""
    return np.einsum("...ij,...j->...i", P, np.exp(log_policy))


# ---------------------------------------------------------------------------------------------------
# Sampling and the two fits (INPO loss, Bradley–Terry reward)


def sample_pairs(
    P: np.ndarray, log_policy: np.ndarray, samples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample `samples` pairs (y, y') ~ π × π per game and label each by the oracle: y wins with
    probability P[y, y']. Returns (chosen, rejected), int arrays (..., samples)."""
    n = P.shape[-1]
    batch = log_policy.shape[:-1]
    cdf = np.cumsum(np.exp(log_policy), axis=-1)
    u = rng.random(batch + (samples, 2))
    index = np.minimum(
        np.sum(u[..., None] * cdf[..., -1:, None, None] >= cdf[..., None, None, :], axis=-1), n - 1
    )
    first, second = index[..., 0], index[..., 1]
    p_first = np.take_along_axis(
        np.broadcast_to(P, batch + (n, n)).reshape(batch + (n * n,)), first * n + second, -1
    )
    first_wins = rng.random(batch + (samples,)) < p_first
    return np.where(first_wins, first, second), np.where(first_wins, second, first)


def fit_pair_loss(
    loss: Callable[..., torch.Tensor],
    log_models: dict[str, np.ndarray],
    log_start: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
    weights: np.ndarray,
    *,
    max_steps: int | None = None,
) -> np.ndarray:
    """Minimize Σ_i weights_i·loss(pair i) over the logits θ, from θ = log_start; returns log π_θ.

    `loss` is a bound pairwise loss of `nashalign.core.losses` whose log-prob inputs other than the
    policy's come from `log_models`: {"ref": log π_ref, "prev": log π_t, "aux": log π̂, ...}, each
    (..., n), gathered at the pairs as `<model>_chosen_logps` / `<model>_rejected_logps`. Shapes:
    log_start (..., n); chosen, rejected (int) and weights (..., B). The policy's log-probs are
    log_softmax(θ) gathered at the pairs, exactly what the language-model trainer feeds the loss, and
    the gradient and curvature come from torch autograd.

    Optimizer: conjugate gradients on θ with an exact line search, batched over games. For the squared
    losses (inpo, inpo-optimistic, online-ipo, ipo) the margin is linear in θ (the log-normalizer
    cancels in chosen − rejected), so the objective is a convex quadratic and the exact step along a
    direction d is −gᵀd / dᵀHd, with Hd from autograd (double backward). Conjugate gradients then
    reach the minimizer in at most n steps per game (we allow 4n + 10 for rounding and stop at a
    relative gradient of 1e-12). Fixed-rate methods (SGD, Adam) would need thousands of steps, because
    the curvature along a logit is proportional to how often π_t samples that response; torch's L-BFGS
    shares one line search across the batch of independent games and stalls near 1e-5. The loop is
    hand-written for these two reasons. Logits of responses that appear in no pair get no gradient and
    keep their value, like an unsampled response of a language model.
    """
    batch = log_start.shape[:-1]
    n = log_start.shape[-1]
    start = torch.tensor(log_start.reshape(-1, n))
    chosen_t = torch.as_tensor(np.ascontiguousarray(chosen).reshape(len(start), -1))
    rejected_t = torch.as_tensor(np.ascontiguousarray(rejected).reshape(len(start), -1))
    weights_t = torch.tensor(np.asarray(weights, dtype=np.float64).reshape(len(start), -1))
    constant = {}
    for model, log_policy in log_models.items():
        table = torch.tensor(np.broadcast_to(log_policy, log_start.shape).reshape(-1, n))
        constant[f"{model}_chosen_logps"] = table.gather(1, chosen_t).reshape(-1)
        constant[f"{model}_rejected_logps"] = table.gather(1, rejected_t).reshape(-1)

    def gradient(logits: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        log_policy = torch.log_softmax(logits, dim=-1)
        losses = loss(
            policy_chosen_logps=log_policy.gather(1, chosen_t).reshape(-1),
            policy_rejected_logps=log_policy.gather(1, rejected_t).reshape(-1),
            **constant,
        )
        objective = (losses.reshape(weights_t.shape) * weights_t).sum()
        return torch.autograd.grad(objective, logits, create_graph=create_graph)[0]

    logits = start.clone().requires_grad_(True)
    g = gradient(logits).detach()
    direction = -g
    initial = g.norm(dim=-1)
    for _ in range(4 * n + 10 if max_steps is None else max_steps):
        g_norm2 = (g * g).sum(-1)
        if bool(torch.all(g_norm2.sqrt() <= 1e-12 * initial + 1e-300)):
            break
        g_at = gradient(logits, create_graph=True)
        curvature = torch.autograd.grad((g_at * direction).sum(), logits)[0]
        d_h_d = (direction * curvature).sum(-1)
        step = torch.where(d_h_d > 0, -(g * direction).sum(-1) / d_h_d.clamp(min=1e-300), 0.0)
        with torch.no_grad():
            logits += step[:, None] * direction
        g_new = gradient(logits).detach()
        beta = torch.where(g_norm2 > 0, (g_new * g_new).sum(-1) / g_norm2.clamp(min=1e-300), 0.0)
        direction = -g_new + beta[:, None] * direction
        g = g_new
    with torch.no_grad():
        return torch.log_softmax(logits, dim=-1).numpy().reshape(batch + (n,))


def fit_inpo(
    log_ref: np.ndarray,
    log_previous: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
    weights: np.ndarray,
    *,
    tau: float,
    eta: float,
    max_steps: int | None = None,
) -> np.ndarray:
    """Minimize Σ_i weights_i·INPO_loss(pair i) over the logits θ, from θ = log π_t (`fit_pair_loss`
    with `nashalign.core.losses.inpo`); returns log π_θ. Shapes: log_ref, log_previous (..., n); chosen,
    rejected (int) and weights (..., B)."""
    return fit_pair_loss(
        functools.partial(inpo_loss, eta=eta, tau=tau),
        {"ref": log_ref, "prev": log_previous},
        log_previous,
        chosen,
        rejected,
        weights,
        max_steps=max_steps,
    )


def fit_bradley_terry(
    chosen: np.ndarray, rejected: np.ndarray, n: int, *, prior: float = 1.0, iterations: int = 50
) -> np.ndarray:
    """MAP Bradley–Terry rewards r (..., n) from comparisons (chosen beat rejected, (..., B) ints):

        minimize  −Σ_i log σ(r[chosen_i] − r[rejected_i]) + (prior/2)·‖r‖²

    by Newton's method with step halving (batched numpy: a strictly convex problem in n variables,
    where Newton is exact and a library optimizer would add nothing). The prior makes the optimum
    exist when a response wins all its comparisons and fixes Σ r = 0.
    """
    batch = chosen.shape[:-1]
    games = int(np.prod(batch))
    cells = np.arange(games)[:, None] * n * n + (chosen * n + rejected).reshape(games, -1)
    wins = np.bincount(cells.ravel(), minlength=games * n * n).reshape(batch + (n, n)).astype(np.float64)
    eye = np.eye(n)

    def objective(r: np.ndarray) -> np.ndarray:
        margin = r[..., :, None] - r[..., None, :]
        return np.sum(wins * np.logaddexp(0.0, -margin), axis=(-2, -1)) + 0.5 * prior * np.sum(r * r, axis=-1)

    r = np.zeros(batch + (n,))
    value = objective(r)
    for _ in range(iterations):
        margin = r[..., :, None] - r[..., None, :]
        lose = 0.5 * (1.0 - np.tanh(margin / 2.0))  # σ(−margin)
        flow = wins * lose
        gradient = np.sum(flow, axis=-2) - np.sum(flow, axis=-1) + prior * r
        weight = (wins + np.swapaxes(wins, -1, -2)) * lose * (1.0 - lose)
        hessian = eye * np.sum(weight, axis=-1)[..., None] - weight + prior * eye
        if np.max(np.abs(gradient)) < 1e-10:
            break
        direction = -np.linalg.solve(hessian, gradient[..., None])[..., 0]
        step = np.ones(batch)
        for _ in range(30):
            trial = r + step[..., None] * direction
            trial_value = objective(trial)
            accept = trial_value <= value
            if np.all(accept):
                break
            step = np.where(accept, step, step / 2)
        r = np.where(accept[..., None], trial, r)
        value = np.where(accept, trial_value, value)
    return r


# ---------------------------------------------------------------------------------------------------
# Step functions


def inpo_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """INPO's OMD step in closed form: π_{t+1} ∝ π_t^(1−τ/η)·ρ^(τ/η)·exp(P(y ≻ π_t)/η)."""
    ratio = tau / eta
    return log_softmax((1.0 - ratio) * log_policy + ratio * log_ref + win_rates(P, log_policy) / eta)


def inpo_sampled_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """INPO as run on a language model: `samples` oracle-labelled pairs from π_t, then `fit_inpo`."""
    chosen, rejected = sample_pairs(P, log_policy, samples, rng)
    weights = np.full(chosen.shape, 1.0 / samples)
    return fit_inpo(log_ref, log_policy, chosen, rejected, weights, tau=tau, eta=eta)


def inpo_optimistic_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Optimistic INPO: the OMD step driven by the prediction 2·P(y ≻ π_t) − P(y ≻ π_{t−1})."""
    ratio = tau / eta
    prediction = 2.0 * win_rates(P, log_policy) - win_rates(P, log_previous)
    return log_softmax((1.0 - ratio) * log_policy + ratio * log_ref + prediction / eta)


def iterative_dpo_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Iterative DPO with reference π_t: π_{t+1} ∝ π_t·exp(r̂/η), r̂ fitted to sampled comparisons."""
    chosen, rejected = sample_pairs(P, log_policy, samples, rng)
    reward = fit_bradley_terry(chosen, rejected, P.shape[-1])
    return log_softmax(log_policy + reward / eta)


def online_ipo_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Online IPO, exact expected gradient step on the logits (see the module docstring)."""
    policy = np.exp(log_policy)
    g = log_policy - log_ref
    advantage = (win_rates(P, log_policy) - 0.5) - tau * (g - np.sum(policy * g, axis=-1, keepdims=True))
    return log_softmax(log_policy + policy * advantage / eta)


def nash_md_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Nash-MD: play against the geometric mixture μ ∝ π_t^(1−τ/η)·ρ^(τ/η), then a mirror step from μ."""
    ratio = tau / eta
    log_mixture = log_softmax((1.0 - ratio) * log_policy + ratio * log_ref)
    return log_softmax(log_mixture + win_rates(P, log_mixture) / eta)


def inpo_extragradient_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Mirror prox: the INPO step from π_t driven by the win rates of INPO's own step π_{t+½}."""
    ratio = tau / eta
    anchor = (1.0 - ratio) * log_policy + ratio * log_ref
    extrapolated = log_softmax(anchor + win_rates(P, log_policy) / eta)
    return log_softmax(anchor + win_rates(P, extrapolated) / eta)


def sppo_step(
    P: np.ndarray,
    log_ref: np.ndarray,
    log_policy: np.ndarray,
    log_previous: np.ndarray,
    *,
    tau: float,
    eta: float,
    samples: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """SPPO in exact expectation: π_{t+1} ∝ π_t·exp((P(y ≻ π_t) − ½)/η); no regularization towards ρ."""
    return log_softmax(log_policy + (win_rates(P, log_policy) - 0.5) / eta)


Step = Callable[..., np.ndarray]

ALGORITHMS: dict[str, Step] = {
    "inpo": inpo_step,
    "inpo-sampled": inpo_sampled_step,
    "inpo-optimistic": inpo_optimistic_step,
    "iterative-dpo": iterative_dpo_step,
    "online-ipo": online_ipo_step,
    "nash-md": nash_md_step,
    "sppo": sppo_step,
    "comal": inpo_extragradient_step,
}
"""Algorithm name → step function (see the module docstring for the formulas)."""

REFRESHED = frozenset({"comal"})
"""Algorithms whose reference is refreshed to the current iterate (COMAL's outer loop)."""

SAMPLED = frozenset({"inpo-sampled", "iterative-dpo"})
"""Algorithms that learn from `samples` sampled, oracle-labelled pairs per iteration."""


# ---------------------------------------------------------------------------------------------------
# Runner


@dataclass(frozen=True)
class TabularRun:
    """One algorithm's run: `duality_gap` (..., T + 1), the regularized gap of π_0 = ref … π_T;
    `unregularized_gap` (..., T + 1), their DG₀; `policy` (..., n), the final π_T; `eta` (T,), the η_t
    used at each step; `refreshes` (...,), how many times the reference was refreshed (0 except comal)."""

    algorithm: str
    duality_gap: np.ndarray
    unregularized_gap: np.ndarray
    policy: np.ndarray
    eta: np.ndarray
    refreshes: np.ndarray


def step_schedule(schedule: str, *, tau: float, eta: float, iterations: int) -> np.ndarray:
    """η_t for the steps t = 0 … T−1: `fixed` → η; `theory` → τ(t + 3)/2 (the paper's τ(t' + 2)/2
    with its 1-based t' = t + 1)."""
    if schedule == "fixed":
        return np.full(iterations, float(eta))
    if schedule == "theory":
        return tau * (np.arange(iterations) + 3.0) / 2.0
    raise NashalignError(f"unknown schedule {schedule!r} (choose from: {', '.join(SCHEDULES)})")


def inner_gap(P: np.ndarray, log_ref: np.ndarray, log_policy: np.ndarray, tau: float) -> np.ndarray:
    """`nashalign.core.games.duality_gap` computed from log-probabilities, (...,): a refreshed reference
    may hold probabilities that underflow to 0, and its logarithm stays finite."""
    v = win_rates(P, log_policy)
    logits = log_ref + v / tau
    log_best_response = logits - logsumexp(logits)[..., None]
    policy = np.exp(log_policy)
    kl = np.sum(np.where(policy > 0, policy * (log_policy - log_best_response), 0.0), axis=-1)
    return 2.0 * tau * kl + (2.0 * np.sum(policy * v, axis=-1) - 1.0)


def check_settings(
    algorithms: Sequence[str],
    *,
    tau: float,
    eta: float,
    iterations: int,
    schedule: str,
    samples: int,
    refresh_every: int = 20,
    refresh_tolerance: float = 0.0,
) -> None:
    """Raise NashalignError, naming the setting, for values the algorithms cannot run with."""
    for name in algorithms:
        if name not in ALGORITHMS:
            raise NashalignError(f"unknown algorithm {name!r} (choose from: {', '.join(ALGORITHMS)})")
    if not algorithms:
        raise NashalignError(f"no algorithm given (choose from: {', '.join(ALGORITHMS)})")
    for key, value in (("tau", tau), ("eta", eta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise NashalignError(f"{key} must be a finite number > 0, got {value!r}")
    if schedule not in SCHEDULES:
        raise NashalignError(f"unknown schedule {schedule!r} (choose from: {', '.join(SCHEDULES)})")
    if schedule == "fixed" and not tau < eta:
        raise NashalignError(f"tau must be < eta (0 <= tau/eta < 1), got tau={tau:g}, eta={eta:g}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise NashalignError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not (isinstance(samples, int) and samples >= 1):
        raise NashalignError(f"samples must be an integer >= 1, got {samples!r}")
    if not (isinstance(refresh_every, int) and refresh_every >= 1):
        raise NashalignError(f"refresh_every must be an integer >= 1, got {refresh_every!r}")
    if not (
        isinstance(refresh_tolerance, (int, float))
        and math.isfinite(refresh_tolerance)
        and refresh_tolerance >= 0
    ):
        raise NashalignError(f"refresh_tolerance must be a finite number >= 0, got {refresh_tolerance!r}")


def run_algorithm(
    algorithm: str,
    P: np.ndarray,
    ref: np.ndarray,
    *,
    tau: float,
    eta: float,
    iterations: int,
    schedule: str = "fixed",
    samples: int = 1000,
    rng: np.random.Generator | None = None,
    refresh_every: int = 20,
    refresh_tolerance: float = 0.0,
) -> TabularRun:
    """Run one algorithm from π_0 = ref for `iterations` steps on a game (P (n, n), ref (n,)) or a
    batch of games (P (G, n, n), ref (G, n)); the games are assumed valid (`games.validate_game`).

    For the algorithms in REFRESHED, each game's reference is replaced by the current iterate once
    the inner gap (`inner_gap` against that reference) is ≤ `refresh_tolerance` (0: never on the gap),
    or `refresh_every` steps after its last refresh; the others ignore both settings."""
    check_settings(
        [algorithm],
        tau=tau,
        eta=eta,
        iterations=iterations,
        schedule=schedule,
        samples=samples,
        refresh_every=refresh_every,
        refresh_tolerance=refresh_tolerance,
    )
    step = ALGORITHMS[algorithm]
    rng = np.random.default_rng(0) if rng is None else rng
    P = np.asarray(P, dtype=np.float64)
    log_ref = np.log(np.asarray(ref, dtype=np.float64))
    etas = step_schedule(schedule, tau=tau, eta=eta, iterations=iterations)
    log_policy = log_previous = log_softmax(log_ref)
    log_anchor = log_policy
    since_refresh = np.zeros(log_policy.shape[:-1], dtype=np.int64)
    refreshes = np.zeros(log_policy.shape[:-1], dtype=np.int64)
    gaps = [duality_gap(P, ref, np.exp(log_policy), tau)]
    unregularized = [unregularized_gap(P, np.exp(log_policy))]
    for eta_t in etas:
        log_policy, log_previous = (
            step(P, log_anchor, log_policy, log_previous, tau=tau, eta=float(eta_t), samples=samples, rng=rng),
            log_policy,
        )
        if algorithm in REFRESHED:
            since_refresh += 1
            refresh = since_refresh >= refresh_every
            if refresh_tolerance > 0:
                refresh |= inner_gap(P, log_anchor, log_policy, tau) <= refresh_tolerance
            log_anchor = np.where(refresh[..., None], log_policy, log_anchor)
            since_refresh = np.where(refresh, 0, since_refresh)
            refreshes += refresh
        gaps.append(duality_gap(P, ref, np.exp(log_policy), tau))
        unregularized.append(unregularized_gap(P, np.exp(log_policy)))
    return TabularRun(
        algorithm,
        np.stack(gaps, axis=-1),
        np.stack(unregularized, axis=-1),
        np.exp(log_policy),
        etas,
        refreshes,
    )


def run_algorithms(
    algorithms: Sequence[str],
    P: np.ndarray,
    ref: np.ndarray,
    *,
    tau: float,
    eta: float,
    iterations: int,
    schedule: str = "fixed",
    samples: int = 1000,
    seed: int = 0,
    refresh_every: int = 20,
    refresh_tolerance: float = 0.0,
) -> dict[str, TabularRun]:
    """Run several algorithms on the same game(s). Each algorithm draws from its own generator,
    seeded by (seed, its index in ALGORITHMS), so its result does not depend on the others chosen."""
    check_settings(
        algorithms,
        tau=tau,
        eta=eta,
        iterations=iterations,
        schedule=schedule,
        samples=samples,
        refresh_every=refresh_every,
        refresh_tolerance=refresh_tolerance,
    )
    names = list(ALGORITHMS)
    return {
        name: run_algorithm(
            name,
            P,
            ref,
            tau=tau,
            eta=eta,
            iterations=iterations,
            schedule=schedule,
            samples=samples,
            rng=np.random.default_rng([seed, names.index(name)]),
            refresh_every=refresh_every,
            refresh_tolerance=refresh_tolerance,
        )
        for name in dict.fromkeys(algorithms)
    }
