"""Evaluation numbers: win rates with bootstrap intervals, length-controlled win rate, ranking
accuracy (measured and idealized), KL from samples, length statistics, and the exact duality gap of
a language model on a finite game. Pure functions of numpy arrays (torch tensors are accepted);
docs/evaluation.md gives every formula and how to read each number.

All rates are fractions in [0, 1] (multiply by 100 for percentages). Ties count ½ everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nashalign import NashalignError

BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000
"""Bootstrap resamples are drawn in chunks of at most this many (resample, example) entries."""


# ---------------------------------------------------------------------------------------------------
# Input checking


def _as_array(values, name: str, *, finite: bool = True) -> np.ndarray:
    """A 1-D float64 array from a list, numpy array or torch tensor; NashalignError naming `name`."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise NashalignError(f"{name} must be a sequence of numbers") from None
    if array.ndim != 1:
        raise NashalignError(
            f"{name} must be one-dimensional (one value per example), got shape {array.shape}"
        )
    if array.size == 0:
        raise NashalignError(f"{name} is empty")
    bad = ~np.isfinite(array) if finite else np.isnan(array)
    if bad.any():
        i = int(np.argmax(bad))
        raise NashalignError(f"{name}[{i}] = {array[i]} is not a finite number")
    return array


def _as_probabilities(values, name: str) -> np.ndarray:
    array = _as_array(values, name)
    bad = (array < 0) | (array > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise NashalignError(f"{name}[{i}] = {array[i]:.6g} is outside [0, 1]")
    return array


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise NashalignError(
            "inputs must have one value per example: " + ", ".join(f"{k} has {v}" for k, v in lengths.items())
        )
    return next(iter(lengths.values()))


def _check_bootstrap(n_bootstrap: int, confidence: float) -> None:
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise NashalignError(f"n_bootstrap must be an integer >= 0 (0: no interval), got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise NashalignError(f"confidence must be in (0, 1), got {confidence!r}")


def _bootstrap_counts(n: int, n_bootstrap: int, seed: int):
    """Yield (chunk, n) arrays of resample counts: row r says how often each example was drawn when
    n examples are drawn with replacement. Weighting by counts equals indexing by the resample."""
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // n)
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=rows).astype(np.float64)


def _percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------
# Win rate


@dataclass(frozen=True)
class WinRate:
    """`estimate` = mean P(policy ≻ baseline) over prompts; [low, high] = percentile bootstrap
    interval at `confidence` (None when n_bootstrap = 0); `n` prompts."""

    estimate: float
    low: float | None
    high: float | None
    n: int
    confidence: float


def win_rate(probs, *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate of a policy against a baseline with a percentile bootstrap interval.

    probs: (N,) per-prompt P(policy ≻ baseline) in [0, 1]: an oracle's probability, or a judgment
    1 (win), 0 (loss), ½ (tie). estimate = (1/N) Σ_i probs_i. The interval resamples the N prompts
    with replacement `n_bootstrap` times (vectorized, seeded by `seed`) and takes the
    (1−c)/2 and (1+c)/2 quantiles of the resampled means.
    """
    _check_bootstrap(n_bootstrap, confidence)
    p = _as_probabilities(probs, "probs")
    low = high = None
    if n_bootstrap:
        means = np.concatenate(
            [counts @ p / len(p) for counts in _bootstrap_counts(len(p), n_bootstrap, seed)]
        )
        low, high = _percentile_interval(means, confidence)
    return WinRate(float(p.mean()), low, high, len(p), confidence)


# ---------------------------------------------------------------------------------------------------
# Length-controlled win rate


@dataclass(frozen=True)
class LengthControlledWinRate:
    """`estimate` = σ(intercept): the win rate the fitted model predicts at zero length difference.

    `raw` is the plain win rate; `slope` the weight of tanh(Δ/scale) (> 0: the judge favours the
    longer response); `length_scale` the standard deviation of Δ = policy − baseline length;
    [low, high] a percentile bootstrap interval (None when n_bootstrap = 0).
    """

    estimate: float
    low: float | None
    high: float | None
    raw: float
    intercept: float
    slope: float
    length_scale: float
    n: int
    confidence: float


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _length_features(delta: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tanh(Δ / sd_w(Δ)) per resample (R, N) and sd_w (R,); the feature is 0 where sd_w = 0.

    sd_w is the sample standard deviation (ddof = 1, as pandas' .std() in AlpacaEval) of the
    resample that `weights` (counts) describe.
    """
    total = weights.sum(axis=1)
    mean = weights @ delta / total
    variance = (weights * (delta[None, :] - mean[:, None]) ** 2).sum(axis=1) / np.maximum(total - 1.0, 1.0)
    # A constant Δ must give exactly 0, not the rounding noise of (Δ − mean(Δ))².
    drawn = weights > 0
    constant = np.where(drawn, delta, -np.inf).max(axis=1) == np.where(drawn, delta, np.inf).min(axis=1)
    scale = np.where(constant, 0.0, np.sqrt(variance))
    safe = np.where(scale > 0, scale, 1.0)
    features = np.where(scale[:, None] > 0, np.tanh(delta[None, :] / safe[:, None]), 0.0)
    return features, scale


def _fit_length_glm(y: np.ndarray, f: np.ndarray, w: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted logistic regression with soft labels, one fit per row (R rows at once).

    Minimizes  L(a, b) = Σ_i w_i·[softplus(z_i) − y_i·z_i] / Σ_i w_i + ½·l2·b²,  z_i = a + b·f_i,
    i.e. the mean cross-entropy between y_i ∈ [0, 1] and σ(z_i), by Newton's method with Armijo
    backtracking. Hand-written because the model has two parameters and the bootstrap needs
    thousands of fits at once: a vectorized 2×2 Newton step does them together, where a library
    solver would loop. L is convex (strictly, when l2 > 0 and the labels are not all equal), so
    Newton converges to the global minimum. Rows whose labels are all 0 or all 1 have no finite
    minimizer (a → ∓∞); the caller handles them. Returns (a, b), each (R,).

    The 1e-12 added to the b-b entry of the Hessian keeps the 2×2 system solvable when f ≡ 0 (all
    lengths equal); changing the Hessian changes the path, never the stationary point.
    """
    total = w.sum(axis=1)
    theta = np.zeros((y.shape[0], 2))

    def objective(t):
        z = t[:, :1] + t[:, 1:] * f
        return (w * (np.logaddexp(0.0, z) - y * z)).sum(axis=1) / total + 0.5 * l2 * t[:, 1] ** 2

    value = objective(theta)
    done = np.zeros(len(theta), dtype=bool)
    for _ in range(200):
        z = theta[:, :1] + theta[:, 1:] * f
        sigma = _sigmoid(z)
        residual, curvature = w * (sigma - y), w * sigma * (1.0 - sigma)
        grad = np.stack([residual.sum(1), (residual * f).sum(1)], axis=1) / total[:, None]
        grad[:, 1] += l2 * theta[:, 1]
        done |= np.max(np.abs(grad), axis=1) < 1e-10
        if done.all():
            break
        h_aa = curvature.sum(1) / total
        h_ab = (curvature * f).sum(1) / total
        h_bb = (curvature * f * f).sum(1) / total + l2 + 1e-12
        det = h_aa * h_bb - h_ab**2
        step = np.stack([h_bb * grad[:, 0] - h_ab * grad[:, 1], h_aa * grad[:, 1] - h_ab * grad[:, 0]], 1)
        step /= det[:, None]
        descent = (grad * step).sum(1)
        size = np.ones(len(theta))
        pending = ~done
        for _ in range(60):
            candidate = theta - size[:, None] * step
            new_value = objective(candidate)
            # Armijo, with a rounding slack so that the full Newton step is taken near the minimum,
            # where L changes by less than its rounding error.
            accept = pending & (new_value <= value - 1e-4 * size * descent + 1e-14 * (1.0 + np.abs(value)))
            theta[accept], value[accept] = candidate[accept], new_value[accept]
            pending &= ~accept
            if not pending.any():
                break
            size[pending] *= 0.5
        done |= pending  # no step decreases L: at the minimum up to rounding (L is convex)
    else:
        raise NashalignError(
            "length-controlled win rate: the logistic fit did not converge in 200 Newton steps; increase l2"
        )
    return theta[:, 0], theta[:, 1]


def _length_controlled(y: np.ndarray, delta: np.ndarray, w: np.ndarray, l2: float):
    """(estimate, raw mean, a, b, scale) arrays over the rows of the weights w (R, N)."""
    mean = w @ y / w.sum(axis=1)
    f, scale = _length_features(delta, w)
    # Closed forms: with f ≡ 0 (all length differences equal) the fit is a = logit(mean), b = 0;
    # with all labels 0 (or 1) σ(a) → 0 (or 1) as a → ∓∞, b = 0. Either way LC = mean exactly.
    closed = (scale == 0) | (mean <= 0.0) | (mean >= 1.0)
    estimate, b = mean.copy(), np.zeros(len(w))
    with np.errstate(divide="ignore"):
        a = np.log(mean) - np.log1p(-mean)
    fit = ~closed
    if fit.any():
        a[fit], b[fit] = _fit_length_glm(np.broadcast_to(y, w.shape)[fit], f[fit], w[fit], l2)
        estimate[fit] = _sigmoid(a[fit])
    return estimate, mean, a, b, scale


def length_controlled_win_rate(
    judgments,
    policy_lengths,
    baseline_lengths,
    *,
    l2: float = 1e-3,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LengthControlledWinRate:
    """Length-controlled win rate in the style of AlpacaEval 2.0, without the instruction term.

    With y_i = judgment (P(policy ≻ baseline) ∈ [0, 1], ties ½), Δ_i = policy_lengths_i −
    baseline_lengths_i, s = sd(Δ) (ddof = 1) and f_i = tanh(Δ_i / s) (f_i = 0 when s = 0), fit

        P(policy ≻ baseline | Δ_i) = σ(a + b·f_i)

    by minimizing the mean soft-label cross-entropy + ½·l2·b² (l2 > 0: the small ridge on b keeps
    the fit finite when the judgments are perfectly separated by length, where the plain maximum
    likelihood fit does not exist; it does not touch a; l2 → 0 is the plain fit), and report
    LC = σ(a), the predicted win rate at zero length difference. Lengths can be in any unit
    (tokens, characters): only Δ/s enters. When all lengths are equal, f ≡ 0 and σ(a) = mean(y),
    the raw win rate. The interval resamples prompts (refitting s, a and b each time).

    Hand check (two length groups, l2 → 0): Δ = +d on five prompts with judgments (1,1,1,1,0) and
    Δ = −d on two with (1,0). f takes the two values ±c, so the model is saturated:
    σ(a + bc) = 0.8 and σ(a − bc) = 0.5, hence a = (logit 0.8 + logit 0.5)/2 = (ln 4 + 0)/2 = ln 2
    and LC = σ(ln 2) = 2/3, while the raw win rate is 5/7.
    """
    _check_bootstrap(n_bootstrap, confidence)
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 > 0):
        raise NashalignError(f"l2 must be a finite number > 0, got {l2!r}")
    y = _as_probabilities(judgments, "judgments")
    policy = _as_array(policy_lengths, "policy_lengths")
    baseline = _as_array(baseline_lengths, "baseline_lengths")
    n = _same_length(judgments=y, policy_lengths=policy, baseline_lengths=baseline)
    delta = policy - baseline
    estimate, raw, a, b, scale = _length_controlled(y, delta, np.ones((1, n)), l2)
    low = high = None
    if n_bootstrap:
        resampled = [_length_controlled(y, delta, w, l2)[0] for w in _bootstrap_counts(n, n_bootstrap, seed)]
        low, high = _percentile_interval(np.concatenate(resampled), confidence)
    return LengthControlledWinRate(
        float(estimate[0]),
        low,
        high,
        float(raw[0]),
        float(a[0]),
        float(b[0]),
        float(scale[0]),
        n,
        confidence,
    )


# ---------------------------------------------------------------------------------------------------
# Ranking accuracy


@dataclass(frozen=True)
class RankingAccuracy:
    """Fractions of pairs ranked chosen over rejected (ties ½) by the summed log-probs, the
    length-normalized log-probs (None without lengths) and the implicit reward log π − log π_ref
    (None without reference log-probs); `n` pairs."""

    summed: float
    length_normalized: float | None
    reward: float | None
    n: int


def _fraction_above(margins: np.ndarray) -> float:
    """Fraction of margins > 0, with margins = 0 counted ½."""
    return float(np.mean(np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))))


def ranking_accuracy(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    chosen_lengths=None,
    rejected_lengths=None,
) -> RankingAccuracy:
    """How often a model ranks the chosen response above the rejected one (Chen et al. 2024).

    All inputs (B,): summed response log-probs of the model (and optionally of the reference), and
    response lengths in tokens.
        summed:            mean 1[log π(y_w) > log π(y_l)]
        length_normalized: mean 1[log π(y_w)/|y_w| > log π(y_l)/|y_l|]
        reward:            mean 1[log π(y_w) − log π_ref(y_w) > log π(y_l) − log π_ref(y_l)]
                           (the "reward accuracy" of DPO-style training logs)
    """
    chosen = _as_array(chosen_logps, "chosen_logps")
    rejected = _as_array(rejected_logps, "rejected_logps")
    n = _same_length(chosen_logps=chosen, rejected_logps=rejected)
    summed = _fraction_above(chosen - rejected)

    normalized = None
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise NashalignError("ranking_accuracy: give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        chosen_len = _as_array(chosen_lengths, "chosen_lengths")
        rejected_len = _as_array(rejected_lengths, "rejected_lengths")
        _same_length(chosen_logps=chosen, chosen_lengths=chosen_len, rejected_lengths=rejected_len)
        for name, lengths in (("chosen_lengths", chosen_len), ("rejected_lengths", rejected_len)):
            if np.any(lengths <= 0):
                i = int(np.argmax(lengths <= 0))
                raise NashalignError(f"{name}[{i}] = {lengths[i]:g}, expected a length > 0")
        normalized = _fraction_above(chosen / chosen_len - rejected / rejected_len)

    reward = None
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise NashalignError(
            "ranking_accuracy: give both ref_chosen_logps and ref_rejected_logps, or neither"
        )
    if ref_chosen_logps is not None:
        ref_chosen = _as_array(ref_chosen_logps, "ref_chosen_logps")
        ref_rejected = _as_array(ref_rejected_logps, "ref_rejected_logps")
        _same_length(chosen_logps=chosen, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        reward = _fraction_above((chosen - ref_chosen) - (rejected - ref_rejected))
    return RankingAccuracy(summed, normalized, reward, n)


def idealized_ranking_accuracy(ref_chosen_logps, ref_rejected_logps, pref_probs, *, beta: float) -> float:
    """Ranking accuracy of the DPO-optimal policy (Chen et al. 2024, "Preference Learning
    Algorithms Do Not Learn Preference Rankings", their derivation of the idealized ranking accuracy).

    With Bradley–Terry preferences p = P(y_w ≻ y_l) = σ(r*(y_w) − r*(y_l)), the optimum of the DPO
    objective is π* ∝ π_ref·exp(r*/β), so

        log π*(y_w) − log π*(y_l) = [log π_ref(y_w) − log π_ref(y_l)] + σ⁻¹(p)/β,

    σ⁻¹(p) = log(p/(1−p)), and π* ranks the pair correctly iff this is > 0, i.e. iff
    π_ref(y_w)/π_ref(y_l) > ((1−p)/p)^(1/β). Returns the mean of that indicator (½ where it is
    exactly 0). ref_*_logps: (B,) summed reference log-probs; pref_probs: (B,) true P(y_w ≻ y_l),
    e.g. the fraction of annotators preferring y_w (a hard label 1 gives σ⁻¹ = +∞: always correct).
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise NashalignError(f"beta must be a finite number > 0, got {beta!r}")
    ref_chosen = _as_array(ref_chosen_logps, "ref_chosen_logps")
    ref_rejected = _as_array(ref_rejected_logps, "ref_rejected_logps")
    p = _as_probabilities(pref_probs, "pref_probs")
    _same_length(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, pref_probs=p)
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p)
    return _fraction_above((ref_chosen - ref_rejected) + logit / beta)


# ---------------------------------------------------------------------------------------------------
# KL from samples and lengths


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL(π‖π_ref): `estimate` ± `stderr` (standard error of the mean; NaN for n = 1)."""

    estimate: float
    stderr: float
    n: int
    estimator: str


def kl_from_samples(policy_logps, ref_logps, *, estimator: str = "k1") -> KLEstimate:
    """KL(π‖π_ref) from responses y_i sampled from the policy π, given log π(y_i) and log π_ref(y_i).

    With r_i = log π(y_i) − log π_ref(y_i):
        "k1": mean of r_i                      (unbiased; a single term can be negative)
        "k3": mean of (e^{−r_i} − 1) + r_i    (unbiased, every term ≥ 0, lower variance when
                                               π ≈ π_ref; overflows when π_ref ≫ π on a sample)
    Both are unbiased only for samples drawn from π itself (with its sampling temperature 1 and
    no top-p truncation; otherwise they estimate a KL from the truncated distribution, roughly).
    stderr = sd(terms, ddof = 1)/√n. With K samples per prompt, pass all N·K samples flattened.
    """
    if estimator not in ("k1", "k3"):
        raise NashalignError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
    policy = _as_array(policy_logps, "policy_logps")
    ref = _as_array(ref_logps, "ref_logps")
    n = _same_length(policy_logps=policy, ref_logps=ref)
    r = policy - ref
    terms = r if estimator == "k1" else np.expm1(-r) + r
    stderr = float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return KLEstimate(float(terms.mean()), stderr, n, estimator)


@dataclass(frozen=True)
class LengthStats:
    """Summary of response lengths (tokens or characters, as given)."""

    mean: float
    std: float
    min: float
    median: float
    max: float
    n: int


def length_stats(lengths) -> LengthStats:
    """mean, standard deviation (ddof = 0), min, median, max and count of (N,) lengths."""
    x = _as_array(lengths, "lengths")
    if np.any(x < 0):
        i = int(np.argmax(x < 0))
        raise NashalignError(f"lengths[{i}] = {x[i]:g} is negative")
    return LengthStats(
        float(x.mean()), float(x.std()), float(x.min()), float(np.median(x)), float(x.max()), len(x)
    )


# ---------------------------------------------------------------------------------------------------
# Exact duality gap of a language model on a finite game


@dataclass(frozen=True)
class LMGap:
    """`gap` = DualGap(π_LM); `policy` (n,) the LM's distribution renormalized over the allowed
    responses; `mass` = Σ_y π_LM(y | prompt), the probability the LM puts on the allowed set."""

    gap: float
    policy: np.ndarray
    mass: float


Scorer = Callable[[str, Sequence[str]], object]
"""score(prompt, responses) -> (n,) summed log π(response | prompt) (numpy array, list or tensor)."""


def lm_response_distribution(
    score: Scorer, prompt: str, responses: Sequence[str]
) -> tuple[np.ndarray, float]:
    """The LM's distribution over a finite set of allowed responses, and the mass it covers.

    ℓ_y = score(prompt, responses)_y = log π(y | prompt), summed over the response tokens (include
    the EOS token in the scored response so ℓ_y is the probability of answering exactly y and
    stopping). Returns softmax(ℓ) = π(y)/Σ_y' π(y') and Σ_y exp(ℓ_y).
    """
    if len(responses) < 2:
        raise NashalignError(f"a finite game needs at least 2 allowed responses, got {len(responses)}")
    logps = _as_array(score(prompt, list(responses)), "score(prompt, responses)")
    if len(logps) != len(responses):
        raise NashalignError(
            f"score(prompt, responses) returned {len(logps)} log-probs for {len(responses)} responses"
        )
    top = logps.max()
    weights = np.exp(logps - top)
    log_mass = top + math.log(weights.sum())
    return weights / weights.sum(), float(math.exp(min(log_mass, 0.0)))


def exact_duality_gap_of_lm(
    score: Scorer, prompt: str, responses: Sequence[str], P, ref, *, tau: float
) -> LMGap:
    """Exact DualGap of a language model's policy on one prompt's finite game.

    π_LM = lm_response_distribution(score, prompt, responses) (renormalized over the allowed
    responses), then DualGap(π) = 2τ·log Σ_y ρ(y)·exp((Pπ)(y)/τ) − 1 + 2τ·KL(π‖ρ) with
    `nashalign.core.games.duality_gap`. P (n, n): P[a, b] = P(responses[a] ≻ responses[b]); ref (n,):
    the reference policy ρ over the same responses (for π_ref itself use
    `lm_response_distribution(ref_score, prompt, responses)[0]`). Several prompt families: call
    once per family and average.
    """
    from nashalign.core.games import duality_gap, validate_game

    matrix, reference = validate_game(P, ref, source=f"game for prompt {prompt[:40]!r}")
    if matrix.shape[0] != len(responses):
        raise NashalignError(
            f"P is {matrix.shape[0]} × {matrix.shape[0]} but there are {len(responses)} responses"
        )
    policy, mass = lm_response_distribution(score, prompt, responses)
    return LMGap(float(duality_gap(matrix, reference, policy, tau)), policy, mass)
