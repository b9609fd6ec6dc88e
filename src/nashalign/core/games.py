"""Finite preference games: preference matrices, validation, best response, duality gap, exact Nash.

A game is a preference matrix `P` (n, n), `P[a, b] = P(a ≻ b)` with `P + Pᵀ = 1` (so the diagonal is
½), and a reference policy `ref` (n,), strictly positive and summing to 1. Policies are (n,)
probability vectors. Every function below also accepts a leading batch of games: `P` (G, n, n),
`ref` and policies (G, n); results gain the same leading dimension. Arithmetic is numpy float64.

The KL-regularized game (design notes, section 1), with ρ = ref and v = Pπ, i.e. v(y) = P(y ≻ π):

    J(π1, π2)     = π1ᵀ P π2 − τ·KL(π1‖ρ) + τ·KL(π2‖ρ)
    BR(π)         = argmax_π1 J(π1, π) = softmax(log ρ + Pπ/τ)
    DualGap(π)    = max_π1 J(π1, π) − min_π2 J(π, π2)
                  = 2τ·log Σ_y ρ(y)·exp((Pπ)(y)/τ) − 1 + 2τ·KL(π‖ρ)
    Nash policy   = the unique π with π = BR(π) (τ > 0), where DualGap = 0.

`numpy` has no logsumexp or xlogy; the two small helpers below are written by hand so that this module
needs numpy alone (scipy is only a development dependency).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nashalign import NashalignError
from nashalign.data.json_input import load_json

SYMMETRY_TOLERANCE = 1e-6
"""Largest accepted |P[a, b] + P[b, a] − 1| and |Σ ref − 1| in user input."""


@dataclass(frozen=True)
class Game:
    """A validated preference game: `P` (n, n), `reference` (n,), response `names` and a description."""

    P: np.ndarray
    reference: np.ndarray
    names: tuple[str, ...] = field(default=())
    description: str = ""

    @property
    def n(self) -> int:
        return int(self.P.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Numerics


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log Σ exp(x) along `axis`, shifted by the maximum so that nothing overflows."""
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(x - peak), axis=axis))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """x − logsumexp(x) over the last axis: normalized log-probabilities."""
    return x - logsumexp(x)[..., None]


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def safe_log(p: np.ndarray) -> np.ndarray:
    """log p with log 0 = −inf and no warning."""
    with np.errstate(divide="ignore"):
        return np.log(p)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p‖q) = Σ p·(log p − log q) over the last axis, with 0·log 0 = 0. q must be > 0 where p > 0."""
    positive = p > 0
    terms = np.where(
        positive, p * (safe_log(np.where(positive, p, 1.0)) - safe_log(np.where(positive, q, 1.0))), 0.0
    )
    return np.sum(terms, axis=-1)


def _matvec(P: np.ndarray, policy: np.ndarray) -> np.ndarray:
    """(Pπ)(y) = P(y ≻ π), batched: (..., n, n) @ (..., n) -> (..., n)."""
    return np.einsum("...ij,...j->...i", P, policy)


# ---------------------------------------------------------------------------------------------------
# Preference matrices


def bradley_terry(scores: np.ndarray) -> np.ndarray:
    """Bradley–Terry preferences from scores (..., n): P[a, b] = σ(s_a − s_b). Transitive by construction."""
    s = np.asarray(scores, dtype=np.float64)
    diff = s[..., :, None] - s[..., None, :]
    return 0.5 * (1.0 + np.tanh(diff / 2.0))


def random_intransitive(n: int, rng: np.random.Generator, games: int | None = None) -> np.ndarray:
    """Random preference matrix (n, n), or (games, n, n): strict lower triangle ~ U(0, 1), upper
    triangle = 1 − transpose, diagonal ½. Generically intransitive (cycles occur with high probability)."""
    shape = (n, n) if games is None else (games, n, n)
    lower = np.tril(rng.random(shape), k=-1)
    return lower + np.triu(1.0 - np.swapaxes(lower, -1, -2), k=1) + 0.5 * np.eye(n)


def random_reference(n: int, rng: np.random.Generator, games: int | None = None) -> np.ndarray:
    """Reference policy softmax(z) with logits z ~ N(0, 1): (n,), or (games, n)."""
    return softmax(rng.standard_normal((n,) if games is None else (games, n)))


def rock_paper_scissors(noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rock-paper-scissors (rock, paper, scissors): the winner is preferred with probability 1.

    With noise > 0 an antisymmetric perturbation noise·(U − Uᵀ), U ~ U(0, 1)³ˣ³, is added and entries are
    clipped to [0, 1] (clipping keeps P + Pᵀ = 1 because clip(1 − x) = 1 − clip(x)).
    """
    P = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])
    if noise:
        if rng is None:
            raise NashalignError("rock_paper_scissors: noise > 0 needs a random generator (rng)")
        u = rng.random((3, 3))
        P = np.clip(P + noise * (u - u.T), 0.0, 1.0)
    return P


def majority_vote(annotator_scores: np.ndarray) -> np.ndarray:
    """Preference of the majority of K independent Bradley–Terry annotators, scores (K, n) with K odd.

    Annotator k prefers a to b with probability p_k = σ(s_k(a) − s_k(b)); P[a, b] is the probability
    that more than K/2 of them do (a Poisson-binomial tail, by dynamic programming over annotators).
    With K odd there are no ties, so P + Pᵀ = 1 exactly; different annotators' orders yield Condorcet
    cycles (a ≻ b ≻ c ≻ a by majority) although every single annotator is transitive.
    """
    scores = np.asarray(annotator_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] % 2 == 0:
        raise NashalignError(f"majority_vote: expected scores of shape (K, n) with K odd, got {scores.shape}")
    votes = bradley_terry(scores)  # (K, n, n)
    n = scores.shape[1]
    count = np.zeros((scores.shape[0] + 1, n, n))
    count[0] = 1.0
    for p in votes:  # count[m] = P(exactly m annotators so far prefer a to b)
        count = count * (1.0 - p) + np.concatenate([np.zeros((1, n, n)), count[:-1]]) * p
    return count[scores.shape[0] // 2 + 1 :].sum(axis=0)


def find_cycle(P: np.ndarray) -> tuple[int, int, int] | None:
    """A Condorcet 3-cycle (a, b, c) with P[a, b], P[b, c], P[c, a] all > ½, or None if there is none.

    A majority tournament without a 3-cycle is transitive, so None means a total order exists.
    """
    beats = np.asarray(P) > 0.5
    n = beats.shape[0]
    for a in range(n):
        for b in np.flatnonzero(beats[a]):
            for c in np.flatnonzero(beats[b] & beats[:, a]):
                return int(a), int(b), int(c)
    return None


CONDORCET_SCORES = np.array(
    [
        [6.0, 4.0, 2.0, 1.0, 3.0],  # annotator 1: A ≻ B ≻ E ≻ C ≻ D
        [2.0, 6.0, 4.0, 3.0, 1.0],  # annotator 2: B ≻ C ≻ D ≻ A ≻ E
        [4.0, 2.0, 6.0, 1.0, 3.0],  # annotator 3: C ≻ A ≻ E ≻ B ≻ D
    ]
)
"""Scores of the three annotators of the built-in Condorcet game (logits of their Bradley–Terry models)."""

CONDORCET_REFERENCE = np.array([0.15, 0.1, 0.05, 0.4, 0.3])
"""The built-in game's reference policy: it mostly produces D and E, which the majority dislikes."""


def condorcet_game() -> Game:
    """Built-in deterministic game: five responses judged by the majority of three Bradley–Terry
    annotators (`CONDORCET_SCORES`). Each annotator is transitive, the majority is not:
    A ≻ B ≻ C ≻ A (P = 0.78 each way), and A, B, C each beat D and E by majority. The reference
    favours D and E, so alignment has to move mass to the cycle and mix over it."""
    return Game(
        P=majority_vote(CONDORCET_SCORES),
        reference=CONDORCET_REFERENCE.copy(),
        names=("A", "B", "C", "D", "E"),
        description="majority vote of 3 Bradley–Terry annotators over 5 responses (a Condorcet cycle)",
    )


def rock_paper_scissors_game(seed: int = 0) -> Game:
    """Built-in: rock-paper-scissors with noise 0.1, reference (0.5, 0.3, 0.2)."""
    return Game(
        P=rock_paper_scissors(0.1, np.random.default_rng(seed)),
        reference=np.array([0.5, 0.3, 0.2]),
        names=("rock", "paper", "scissors"),
        description="rock-paper-scissors with antisymmetric noise 0.1",
    )


def random_game(seed: int = 0, n: int = 10) -> Game:
    """Built-in: a random intransitive n-response game with reference logits ~ N(0, 1), from `seed`."""
    rng = np.random.default_rng(seed)
    return Game(
        P=random_intransitive(n, rng),
        reference=random_reference(n, rng),
        description=f"random intransitive game, {n} responses, reference logits ~ N(0, 1), seed {seed}",
    )


def bradley_terry_game() -> Game:
    """Built-in transitive control: Bradley–Terry with scores (0, 0.5, 1, 1.5, 2), uniform reference."""
    return Game(
        P=bradley_terry(np.array([0.0, 0.5, 1.0, 1.5, 2.0])),
        reference=np.full(5, 0.2),
        description="Bradley–Terry (transitive) with scores 0, 0.5, 1, 1.5, 2",
    )


BUILTIN_GAMES = {
    "condorcet": lambda seed: condorcet_game(),
    "rock-paper-scissors": rock_paper_scissors_game,
    "random": random_game,
    "bradley-terry": lambda seed: bradley_terry_game(),
}
"""Built-in games by name: each maps a seed to a `Game` (deterministic ones ignore it)."""


# ---------------------------------------------------------------------------------------------------
# Validation and loading


def validate_game(P: object, ref: object = None, *, source: str = "game") -> tuple[np.ndarray, np.ndarray]:
    """Check a single game and return it as float64 arrays (P (n, n), ref (n,)); ref None → uniform.

    Raises NashalignError with a one-line message prefixed by `source` for: a non-numeric or
    non-square P, fewer than 2 responses, NaN/inf, entries outside [0, 1], |P + Pᵀ − 1| above
    `SYMMETRY_TOLERANCE`, and a reference of the wrong length, not finite, not > 0 or not summing to 1.
    The returned P is symmetrized exactly, (P + 1 − Pᵀ)/2, and ref renormalized.
    """
    try:
        matrix = np.asarray(P, dtype=np.float64)
    except (TypeError, ValueError):
        raise NashalignError(
            f"{source}: P must be a square matrix (list of equal-length lists) of numbers"
        ) from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise NashalignError(f"{source}: P must be a square n × n matrix, got shape {matrix.shape}")
    n = matrix.shape[0]
    if n < 2:
        raise NashalignError(f"{source}: a game needs at least 2 responses, P is {n} × {n}")
    bad = np.argwhere(~np.isfinite(matrix))
    if bad.size:
        a, b = bad[0]
        raise NashalignError(f"{source}: P[{a}][{b}] = {matrix[a, b]} is not a finite number")
    bad = np.argwhere((matrix < 0) | (matrix > 1))
    if bad.size:
        a, b = bad[0]
        raise NashalignError(f"{source}: P[{a}][{b}] = {matrix[a, b]:.6g} is outside [0, 1]")
    asymmetry = np.abs(matrix + matrix.T - 1.0)
    if asymmetry.max() > SYMMETRY_TOLERANCE:
        a, b = np.unravel_index(int(np.argmax(asymmetry)), asymmetry.shape)
        raise NashalignError(
            f"{source}: P[{a}][{b}] + P[{b}][{a}] = {matrix[a, b] + matrix[b, a]:.6g}, expected 1 "
            f"(P(a ≻ b) + P(b ≻ a) = 1, diagonal ½; tolerance {SYMMETRY_TOLERANCE:g})"
        )
    matrix = 0.5 * (matrix + 1.0 - matrix.T)
    if ref is None:
        return matrix, np.full(n, 1.0 / n)
    try:
        reference = np.asarray(ref, dtype=np.float64)
    except (TypeError, ValueError):
        raise NashalignError(f"{source}: reference must be a list of {n} numbers") from None
    if reference.shape != (n,):
        raise NashalignError(
            f"{source}: reference must have length {n} (one per response), got shape {reference.shape}"
        )
    if not np.all(np.isfinite(reference)):
        raise NashalignError(f"{source}: reference contains a value that is not a finite number")
    if np.any(reference <= 0):
        i = int(np.argmax(reference <= 0))
        raise NashalignError(
            f"{source}: reference[{i}] = {reference[i]:.6g}, expected > 0 (KL to the reference must be finite)"
        )
    if abs(reference.sum() - 1.0) > SYMMETRY_TOLERANCE:
        raise NashalignError(f"{source}: reference sums to {reference.sum():.6g}, expected 1")
    return matrix, reference / reference.sum()


def load_game(path: str | Path) -> Game:
    """Read a game from JSON: {"P": [[...], ...], "reference": [...], "names": [...]}.

    "reference" (default uniform) and "names" (response labels) are optional; unknown keys, malformed
    JSON and invalid games raise NashalignError naming the file and what is wrong.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise NashalignError(f"{path}: cannot read game file: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise NashalignError(f"{path}: not a UTF-8 text file") from None
    try:
        data = load_json(text, path)
    except json.JSONDecodeError as error:
        raise NashalignError(
            f"{path}: line {error.lineno} column {error.colno}: invalid JSON: {error.msg}"
        ) from None
    if not isinstance(data, dict):
        raise NashalignError(
            f"{path}: expected a JSON object with key 'P' (and optional 'reference', 'names')"
        )
    unknown = sorted(set(data) - {"P", "reference", "names"})
    if unknown:
        raise NashalignError(f"{path}: unknown key {unknown[0]!r} (allowed: 'P', 'reference', 'names')")
    if "P" not in data:
        raise NashalignError(f"{path}: missing key 'P' (the n × n preference matrix, P[a][b] = P(a ≻ b))")
    P, reference = validate_game(data["P"], data.get("reference"), source=str(path))
    names = data.get("names")
    if names is None:
        names = ()
    elif not (
        isinstance(names, list) and len(names) == len(reference) and all(isinstance(x, str) for x in names)
    ):
        raise NashalignError(f"{path}: 'names' must be a list of {len(reference)} strings")
    return Game(P=P, reference=reference, names=tuple(names), description=f"game from {path}")


# ---------------------------------------------------------------------------------------------------
# Regularized game: payoff, best response, duality gap, Nash policy


def _check_tau(tau: float) -> float:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise NashalignError(f"tau must be a finite number > 0, got {tau!r}")
    return float(tau)


def payoff(P: np.ndarray, ref: np.ndarray, first: np.ndarray, second: np.ndarray, tau: float) -> np.ndarray:
    """J(π1, π2) = π1ᵀ P π2 − τ·KL(π1‖ρ) + τ·KL(π2‖ρ): the regularized payoff of the first player."""
    return (
        np.einsum("...i,...ij,...j->...", first, P, second)
        - tau * kl_divergence(first, ref)
        + tau * kl_divergence(second, ref)
    )


def best_response(P: np.ndarray, ref: np.ndarray, policy: np.ndarray, tau: float) -> np.ndarray:
    """argmax_π1 J(π1, π) = softmax(log ρ + Pπ/τ), (..., n): the Gibbs maximizer of π1ᵀv − τ·KL(π1‖ρ)."""
    _check_tau(tau)
    return softmax(np.log(ref) + _matvec(P, policy) / tau)


def duality_gap(P: np.ndarray, ref: np.ndarray, policy: np.ndarray, tau: float) -> np.ndarray:
    """DualGap(π) = 2τ·log Σ_y ρ(y)·exp((Pπ)(y)/τ) − 1 + 2τ·KL(π‖ρ), (...,); ≥ 0, 0 only at the Nash policy.

    Evaluated as 2τ·KL(π‖BR(π)) + (2πᵀPπ − 1), the same number rearranged (expand the KL to a
    best response whose log-normalizer is the logsumexp above): no two O(1/τ) quantities are
    subtracted, and the second term is 0 up to rounding for a valid game, so gaps of 1e-12 are
    meaningful even at τ = 0.01.
    """
    _check_tau(tau)
    v = _matvec(P, policy)
    logits = np.log(ref) + v / tau
    log_br = logits - logsumexp(logits)[..., None]
    positive = policy > 0
    log_policy = safe_log(np.where(positive, policy, 1.0))
    kl = np.sum(np.where(positive, policy * (log_policy - log_br), 0.0), axis=-1)
    return 2.0 * tau * kl + (2.0 * np.sum(policy * v, axis=-1) - 1.0)


def nash_residual(P: np.ndarray, ref: np.ndarray, policy: np.ndarray, tau: float) -> np.ndarray:
    """max_y |π(y) − BR(π)(y)|, (...,): 0 exactly at the regularized Nash policy."""
    return np.max(np.abs(policy - best_response(P, ref, policy, tau)), axis=-1)


def nash_policy(P: np.ndarray, ref: np.ndarray, tau: float, *, max_iterations: int = 200) -> np.ndarray:
    """The regularized Nash policy π* = softmax(log ρ + Pπ*/τ), (..., n), to a residual ≈ 1e-15.

    Damped Newton's method on F(π) = π − softmax(log ρ + Pπ/τ) over ℝⁿ, started at ρ, with
    backtracking on ‖F‖². Its Jacobian I − (diag s − s sᵀ)·A/τ, with A = P − ½·11ᵀ antisymmetric, has
    eigenvalues 1 − iλ/τ (λ real), so it is never singular: the Newton direction always decreases
    ‖F‖², whose only stationary point is the unique zero, and ‖F‖ grows without bound away from the
    simplex. This converges from any start, quadratically at the end. Written by hand because it
    is ~20 lines of batched numpy and needs no solver library. Raises RuntimeError if it stalls.
    """
    tau = _check_tau(tau)
    P = np.asarray(P, dtype=np.float64)
    log_ref = np.log(np.asarray(ref, dtype=np.float64))
    A = P - 0.5
    eye = np.eye(P.shape[-1])

    def residual(pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = softmax(log_ref + _matvec(A, pi) / tau)
        return pi - s, s

    pi = np.exp(log_ref - logsumexp(log_ref)[..., None])
    F, s = residual(pi)
    norm = np.sum(F * F, axis=-1)
    for _ in range(max_iterations):
        if np.all(np.max(np.abs(F), axis=-1) < 1e-15):
            break
        M = s[..., :, None] * eye - s[..., :, None] * s[..., None, :]
        jacobian = eye - M @ A / tau
        direction = -np.linalg.solve(jacobian, F[..., None])[..., 0]
        step = np.ones(norm.shape)
        for _ in range(60):
            trial = pi + step[..., None] * direction
            F_trial, s_trial = residual(trial)
            trial_norm = np.sum(F_trial * F_trial, axis=-1)
            accept = trial_norm <= (1.0 - 1e-4 * step) * norm
            if np.all(accept | (step < 1e-12)):
                break
            step = np.where(accept, step, step / 2)
        improved = trial_norm < norm
        if not np.any(improved):
            break
        pi = np.where(improved[..., None], trial, pi)
        F = np.where(improved[..., None], F_trial, F)
        s = np.where(improved[..., None], s_trial, s)
        norm = np.where(improved, trial_norm, norm)
    nash = s / np.sum(s, axis=-1, keepdims=True)
    if np.any(nash_residual(P, ref, nash, tau) > 1e-11):
        raise RuntimeError(
            f"nash_policy did not converge (residual {nash_residual(P, ref, nash, tau).max():.2e})"
        )
    return nash


# ---------------------------------------------------------------------------------------------------
# Unregularized game: duality gap and exact Nash policy


def unregularized_gap(P: np.ndarray, policy: np.ndarray) -> np.ndarray:
    """DG₀(π) = max_π1 π1ᵀPπ − min_π2 πᵀPπ2 = 2·max_y (Pπ)(y) − 1, (...,): the duality gap of the game
    without regularization (τ = 0). ≥ 0, and 0 exactly at a Nash policy of the preference itself.

    The second term is min_y' P(π ≻ y') = 1 − max_y' P(y' ≻ π), because P(π ≻ y) + P(y ≻ π) = 1.
    """
    return 2.0 * np.max(_matvec(P, policy), axis=-1) - 1.0


def unregularized_nash_policy(P: np.ndarray) -> np.ndarray:
    """A Nash policy of the unregularized game, (..., n), by linear programming: minimize v over
    (π, v) subject to (Pπ)(y) ≤ v for every y, π ≥ 0, Σ π = 1. The optimal v is the game's value ½
    (P + Pᵀ = 1 makes the game symmetric), and the optimal π has DG₀(π) = 0 up to rounding (≈ 1e-15).

    The LP is solved by scipy's HiGHS solver, imported here and nowhere else: this exact solver backs
    tests and analysis only (`nashalign game` computes DG₀ in closed form and never calls it), so scipy
    stays a development dependency instead of a run-time one, and a hand-written simplex method would
    be more code to trust than the few lines below. Raises NashalignError when scipy is missing or
    the solver fails.
    """
    try:
        from scipy.optimize import linprog
    except ImportError:
        raise NashalignError(
            "unregularized_nash_policy needs scipy (a development dependency: pip install scipy)"
        ) from None
    matrix = np.asarray(P, dtype=np.float64)
    n = matrix.shape[-1]
    games = matrix.reshape(-1, n, n)
    cost = np.concatenate([np.zeros(n), [1.0]])
    equality = np.concatenate([np.ones(n), [0.0]])[None, :]
    bounds = [(0.0, None)] * n + [(None, None)]
    policies = []
    for k, game in enumerate(games):
        result = linprog(
            cost,
            A_ub=np.concatenate([game, -np.ones((n, 1))], axis=1),
            b_ub=np.zeros(n),
            A_eq=equality,
            b_eq=[1.0],
            bounds=bounds,
            method="highs",
        )
        if result.status != 0:
            raise NashalignError(f"unregularized_nash_policy: the LP of game {k} failed: {result.message}")
        policy = np.clip(result.x[:n], 0.0, None)
        policies.append(policy / policy.sum())
    return np.stack(policies).reshape(matrix.shape[:-1])
