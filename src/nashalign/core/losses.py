"""Pure per-example preference losses over summed response log-probs.

Every loss takes keyword tensors of shape (B,) and keyword-only hyperparameters and returns a (B,)
tensor of per-example losses: averaging, weighting and logging live in the trainer. Names follow the
project contract: `policy_*`, `ref_*`, `prev_*`, `aux_*` are the summed response log-probs of the
trained policy π, the reference π_ref, the previous iterate π_t and optimistic INPO's auxiliary
policy π̂_{t−1}; `*_lengths` count response tokens; `*_win_rate` are estimated probabilities that a
response beats the current policy. Pairwise losses read `*_chosen_*` / `*_rejected_*`; Nash-MD, a
policy-gradient loss over single samples, reads `policy_logps` / `ref_logps` of a response sampled
from π_t and `mixture_win_rate`, its estimated probability of beating an opponent sampled from the
geometric mixture of π_t and π_ref (`nashalign.core.mixture`).

Losses are computed in at least float32: bfloat16 numbers near 200 (a summed log-prob of a long response) are spaced
by 1.0, and INPO's target 1/(2η) = 100 by 0.5, so doing the arithmetic in bfloat16 would swamp the
signal. The result has dtype promote(input, float32); gradients flow back in the input dtype.

sparsepo is the exception to the (B,) rule: it weighs individual tokens, so it reads the per-token
TOKEN_INPUTS of shape (B, T) and still returns (B,).

Pick a loss once with `make_loss(name, **hyperparameters)`, which validates the hyperparameters and
binds them with functools.partial; `loss_hyperparameters(name)` names the hyperparameters it takes and
`loss_inputs(fn)` the tensors the bound loss reads.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from nashalign import NashalignError

TENSOR_INPUTS: tuple[str, ...] = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "prev_chosen_logps",
    "prev_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
    "chosen_win_rate",
    "rejected_win_rate",
    "aux_chosen_logps",
    "aux_rejected_logps",
    "policy_logps",
    "ref_logps",
    "mixture_win_rate",
    "policy_chosen_given_rejected_logps",
    "policy_rejected_given_rejected_logps",
    "policy_chosen_given_chosen_logps",
    "policy_rejected_given_chosen_logps",
    "ref_chosen_given_rejected_logps",
    "ref_rejected_given_rejected_logps",
    "ref_chosen_given_chosen_logps",
    "ref_rejected_given_chosen_logps",
)
"""Every tensor input of shape (B,) a trainer can provide. `*_given_rejected_logps` are log-probs of a
response as a revision of the rejected one, log π(y | T(x, y_l)) (srpo); `*_given_chosen_*` of y_w."""

TOKEN_INPUTS: tuple[str, ...] = (
    "chosen_token_log_ratios",
    "rejected_token_log_ratios",
    "chosen_token_kl_terms",
    "rejected_token_kl_terms",
    "chosen_reward_weights",
    "rejected_reward_weights",
    "chosen_kl_weights",
    "rejected_kl_weights",
)
"""Per-token inputs of shape (B, T), 0 outside the response (sparsepo): u_t = log π(y_t) − log π_ref(y_t),
d_t = Σ_v π_ref(v)·(log π(v) − log π_ref(v)) at the position predicting y_t, and the mask weights
m_u, m_d ≥ 0 applied to them."""


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _log_ratio(policy: Tensor, ref: Tensor) -> Tensor:
    """log π(y) − log π_ref(y), (B,), in the compute dtype."""
    dtype = _compute_dtype(policy)
    return policy.to(dtype) - ref.to(dtype)


def _check_real(loss: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise NashalignError(f"loss {loss!r}: hyperparameter {key!r} must be a finite number, got {value!r}")
    return float(value)


def _check_bool(loss: str, key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise NashalignError(f"loss {loss!r}: hyperparameter {key!r} must be true or false, got {value!r}")


def _check_beta(loss: str, beta: object) -> None:
    if _check_real(loss, "beta", beta) <= 0:
        raise NashalignError(f"loss {loss!r}: hyperparameter 'beta' must be > 0, got {beta!r}")


def _check_eta_tau(loss: str, eta: object, tau: object) -> None:
    eta_value = _check_real(loss, "eta", eta)
    tau_value = _check_real(loss, "tau", tau)
    if eta_value <= 0:
        raise NashalignError(f"loss {loss!r}: hyperparameter 'eta' must be > 0, got eta={eta!r}")
    if not 0 <= tau_value / eta_value < 1:
        raise NashalignError(
            f"loss {loss!r}: hyperparameters 'tau' and 'eta' must satisfy 0 <= tau/eta < 1 "
            f"(0 <= tau < eta), got tau={tau!r}, eta={eta!r}"
        )


def _check_inpo(eta: object, tau: object) -> None:
    _check_eta_tau("inpo", eta, tau)


def _check_inpo_optimistic(eta: object, tau: object) -> None:
    _check_eta_tau("inpo-optimistic", eta, tau)


def _check_inpo_optimistic_aux(eta: object, tau: object) -> None:
    _check_eta_tau("inpo-optimistic-aux", eta, tau)


def _check_online_ipo(tau: object) -> None:
    if _check_real("online-ipo", "tau", tau) <= 0:
        raise NashalignError(f"loss 'online-ipo': hyperparameter 'tau' must be > 0, got {tau!r}")


def _check_nash_md(tau: object) -> None:
    if _check_real("nash-md", "tau", tau) < 0:
        raise NashalignError(f"loss 'nash-md': hyperparameter 'tau' must be >= 0, got {tau!r}")


def _check_dpo(beta: object, label_smoothing: object, robust: object) -> None:
    _check_beta("dpo", beta)
    if not 0 <= _check_real("dpo", "label_smoothing", label_smoothing) < 0.5:
        raise NashalignError(
            f"loss 'dpo': hyperparameter 'label_smoothing' must be in [0, 0.5), got {label_smoothing!r}"
        )
    _check_bool("dpo", "robust", robust)


def _check_ipo(beta: object, average_log_probs: object) -> None:
    _check_beta("ipo", beta)
    _check_bool("ipo", "average_log_probs", average_log_probs)


def _check_sppo(beta: object) -> None:
    _check_beta("sppo", beta)


def _check_srpo(beta: object, alpha: object) -> None:
    _check_beta("srpo", beta)
    if not 0 <= _check_real("srpo", "alpha", alpha) <= 1:
        raise NashalignError(f"loss 'srpo': hyperparameter 'alpha' must be in [0, 1], got {alpha!r}")


def _check_sparsepo(beta: object, lambda_u: object, lambda_d: object) -> None:
    _check_beta("sparsepo", beta)
    for key, value in (("lambda_u", lambda_u), ("lambda_d", lambda_d)):
        if _check_real("sparsepo", key, value) < 0:
            raise NashalignError(f"loss 'sparsepo': hyperparameter {key!r} must be >= 0, got {value!r}")


def _check_sft() -> None:
    """sft has no hyperparameters."""


def _check_sft_weight(sft_weight: object) -> None:
    if (
        isinstance(sft_weight, bool)
        or not isinstance(sft_weight, Real)
        or not 0 <= float(sft_weight) < math.inf
    ):
        raise NashalignError(f"hyperparameter 'sft_weight' must be a finite number >= 0, got {sft_weight!r}")


def inpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    prev_chosen_logps: Tensor,
    prev_rejected_logps: Tensor,
    eta: float,
    tau: float,
) -> Tensor:
    """INPO loss (Zhang et al., ICLR 2025), per example. All inputs (B,), returns (B,).

        h = [π_c − π_r] − (τ/η)·[ref_c − ref_r] − (1 − τ/η)·[prev_c − prev_r]      (log-probs)
        loss = (h − 1/(2η))²

    η is the KL weight towards the previous iterate π_t (1/η is the step size), τ the KL weight
    towards π_ref; requires η > 0 and 0 ≤ τ/η < 1. Paper defaults: η = 0.005, τ = η/3.
    h is evaluated as [(π_c − prev_c) − (π_r − prev_r)] − (τ/η)·[(ref_c − prev_c) − (ref_r − prev_r)],
    the same quantity written with differences of log-probs of the same response, which keeps the
    float32 arithmetic exact when prev = ref (the first iteration).
    """
    _check_inpo(eta, tau)
    ratio = tau / eta
    policy_margin = _log_ratio(policy_chosen_logps, prev_chosen_logps) - _log_ratio(
        policy_rejected_logps, prev_rejected_logps
    )
    ref_margin = _log_ratio(ref_chosen_logps, prev_chosen_logps) - _log_ratio(
        ref_rejected_logps, prev_rejected_logps
    )
    h = policy_margin - ratio * ref_margin
    return (h - 1 / (2 * eta)) ** 2


def _optimistic_margin(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    prev_chosen: Tensor,
    prev_rejected: Tensor,
    aux_chosen: Tensor,
    aux_rejected: Tensor,
    ratio: float,
) -> Tensor:
    """h = [π_c − π_r] − [π̂_c − π̂_r] − (τ/η)·([ref_c − ref_r] − [prev_c − prev_r]), written with
    differences of log-probs of the same response (as in `inpo`) so that float32 stays exact."""
    policy_margin = _log_ratio(policy_chosen, aux_chosen) - _log_ratio(policy_rejected, aux_rejected)
    ref_margin = _log_ratio(ref_chosen, prev_chosen) - _log_ratio(ref_rejected, prev_rejected)
    return policy_margin - ratio * ref_margin


def inpo_optimistic(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    prev_chosen_logps: Tensor,
    prev_rejected_logps: Tensor,
    aux_chosen_logps: Tensor,
    aux_rejected_logps: Tensor,
    eta: float,
    tau: float,
) -> Tensor:
    """Optimistic INPO, the policy's loss (ONPO, Zhang et al. 2025, arXiv 2502.16852), per example.

        h = [π_c − π_r] − [π̂_c − π̂_r] − (τ/η)·([ref_c − ref_r] − [prev_c − prev_r])
        loss = (h − 1/η)²

    on pairs sampled from the previous iterate π_t (`prev`) and labelled by the oracle, π̂ = `aux` the
    auxiliary policy π̂_{t−1}. Trained together with `inpo_optimistic_aux` on the same pairs; see there
    for the two updates, the convention for η and the first iteration. With exact expectations the
    minimizer is π_{t+1} ∝ π̂_{t−1}·(π_ref/π_t)^(τ/η)·exp(2·P(y ≻ π_t)/η), which is the finite-game
    step π_{t+1} ∝ π_t^(1−τ/η)·π_ref^(τ/η)·exp((2·P(y ≻ π_t) − P(y ≻ π_{t−1}))/η) of
    `nashalign.core.tabular.inpo_optimistic_step` (tests/test_tabular.py checks this).
    """
    _check_inpo_optimistic(eta, tau)
    h = _optimistic_margin(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        prev_chosen_logps,
        prev_rejected_logps,
        aux_chosen_logps,
        aux_rejected_logps,
        tau / eta,
    )
    return (h - 1 / eta) ** 2


def inpo_optimistic_aux(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    prev_chosen_logps: Tensor,
    prev_rejected_logps: Tensor,
    aux_chosen_logps: Tensor,
    aux_rejected_logps: Tensor,
    eta: float,
    tau: float,
) -> Tensor:
    """Optimistic INPO, the auxiliary policy's loss, per example: the same h as `inpo_optimistic`
    with `policy` the auxiliary model being trained (π̂_t), and target 1/(2η):

        loss = (h − 1/(2η))²

    ONPO's Algorithm 1 (optimistic online mirror descent with an auxiliary sequence) in INPO's
    convention, where η is the KL weight of a step (1/η is the step size, so INPO's target is 1/(2η));
    ONPO writes the step size itself as η (its target is η/2), i.e. η_ONPO = 1/η. With w_t = P(· ≻ π_t)
    and r = τ/η, and exact expectations over pairs from π_t, the two losses give

        π̂_t     ∝ π̂_{t−1}·(π_ref/π_t)^r·exp(w_t/η)        (this loss)
        π_{t+1} ∝ π̂_{t−1}·(π_ref/π_t)^r·exp(2·w_t/η)      (`inpo_optimistic`) = π̂_t·exp(w_t/η)

    which keeps π̂_t ∝ π_{t+1}·exp(−w_t/η), and so π_{t+1} ∝ π_t^(1−r)·π_ref^r·exp((2w_t − w_{t−1})/η).
    With τ = 0 these are ONPO's two regressions (ONPO fits π_{t+1} against π̂_t, the form on the right;
    both losses here read π̂_{t−1}, so they need no scoring under the freshly trained π̂_t and can run
    side by side on the same scored pairs). First iteration: train π_1 with `inpo` and take π̂_0 = π_0
    (= π_ref when the run starts at the reference); this is the finite game's w_{−1} = w_0.
    """
    _check_inpo_optimistic_aux(eta, tau)
    h = _optimistic_margin(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        prev_chosen_logps,
        prev_rejected_logps,
        aux_chosen_logps,
        aux_rejected_logps,
        tau / eta,
    )
    return (h - 1 / (2 * eta)) ** 2


def online_ipo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    tau: float,
) -> Tensor:
    """Online IPO (Calandriello et al. 2024), per example. All inputs (B,), returns (B,).

        z = (π_c − ref_c) − (π_r − ref_r)      (summed log-probs)
        loss = (z − 1/(2τ))²

    The IPO loss with β = τ on pairs sampled from the current policy (stop-gradient) against a fixed
    reference, and optimized by gradient steps on fresh samples: minimized to convergence on pairs from
    π_t it gives the best response softmax(log π_ref + P(· ≻ π_t)/τ), which cycles on intransitive
    preferences; a gradient step of size τ/(4η) on its expectation is `nashalign.core.tabular.online_ipo_step`,
    whose fixed point is the regularized Nash policy (both checked in tests/test_tabular.py).
    """
    _check_online_ipo(tau)
    z = _log_ratio(policy_chosen_logps, ref_chosen_logps) - _log_ratio(policy_rejected_logps, ref_rejected_logps)
    return (z - 1 / (2 * tau)) ** 2


def nash_md(*, policy_logps: Tensor, ref_logps: Tensor, mixture_win_rate: Tensor, tau: float) -> Tensor:
    """Nash-MD policy-gradient loss (Munos et al. 2023, Nash-MD-PG), per example. Inputs (B,), returns (B,).

        loss = −[(p̂ − ½) − τ·sg(π − ref)]·π

    for a response y sampled from the current policy π_t, with π = log π(y), ref = log π_ref(y) summed
    over its tokens, p̂ = `mixture_win_rate` the oracle's P(y ≻ y') (or a 0/1 label) against an
    opponent y' sampled from the token-level geometric mixture μ ∝ π_t^(1−β)·π_ref^β (β = mixture_coef;
    `nashalign.core.mixture.geometric_mixture_logprobs`), and sg the stop-gradient. Its expected gradient is
    −∇[E_π P(y ≻ μ) − τ·KL(π‖π_ref)] (REINFORCE with the baseline ½). The value itself has no meaning;
    only the gradient does. With β = τ/η, a natural-gradient step of size 1/η on its expectation is the
    finite-game step `nashalign.core.tabular.nash_md_step`, π_{t+1} ∝ μ·exp(P(· ≻ μ)/η) (tests/test_tabular.py).
    """
    _check_nash_md(tau)
    dtype = _compute_dtype(policy_logps)
    log_policy = policy_logps.to(dtype)
    advantage = (mixture_win_rate.to(dtype) - 0.5) - tau * (log_policy.detach() - ref_logps.to(dtype))
    return -advantage * log_policy


def dpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    robust: bool = False,
) -> Tensor:
    """DPO sigmoid loss and its label-noise variants, per example. All inputs (B,), returns (B,).

        z = β·[(π_c − ref_c) − (π_r − ref_r)]
        conservative (robust=False):  −(1 − ε)·log σ(z) − ε·log σ(−z)
        robust (Chowdhury et al. 2024): [−(1 − ε)·log σ(z) + ε·log σ(−z)] / (1 − 2ε)

    ε = label_smoothing in [0, 0.5) is the assumed probability that a label is flipped; ε = 0 gives
    plain DPO in both variants. Same conventions as TRL's DPOTrainer: its `robust` loss is the robust
    variant and its `sigmoid` loss is ε = 0 (TRL 1.x's `sigmoid` ignores label_smoothing; the
    conservative form is the one older TRL releases used for `sigmoid` with label_smoothing > 0).
    """
    _check_dpo(beta, label_smoothing, robust)
    z = beta * (
        _log_ratio(policy_chosen_logps, ref_chosen_logps)
        - _log_ratio(policy_rejected_logps, ref_rejected_logps)
    )
    clean = -(1 - label_smoothing) * F.logsigmoid(z)
    flipped = -label_smoothing * F.logsigmoid(-z)
    if robust:
        return (clean - flipped) / (1 - 2 * label_smoothing)
    return clean + flipped


def ipo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float,
    average_log_probs: bool = True,
) -> Tensor:
    """IPO loss (Azar et al. 2024, eq. 17), per example. All inputs (B,), returns (B,).

        z' = (π_c − ref_c)/L_c − (π_r − ref_r)/L_r      (average_log_probs=True, the default)
        z' = (π_c − ref_c) − (π_r − ref_r)              (average_log_probs=False, the paper's formula)
        loss = (z' − 1/(2β))²

    L = max(length, 1) counts response tokens. The per-token average is what the IPO authors ran and
    what TRL's DPOTrainer computes for `ipo`; the summed form makes the loss scale with length.
    The lengths are read only when averaging (make_loss binds them to None otherwise).
    """
    _check_ipo(beta, average_log_probs)
    chosen = _log_ratio(policy_chosen_logps, ref_chosen_logps)
    rejected = _log_ratio(policy_rejected_logps, ref_rejected_logps)
    if average_log_probs:
        if chosen_lengths is None or rejected_lengths is None:
            raise TypeError("ipo with average_log_probs=True needs chosen_lengths and rejected_lengths")
        chosen = chosen / chosen_lengths.to(chosen.dtype).clamp(min=1)
        rejected = rejected / rejected_lengths.to(rejected.dtype).clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def sppo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_win_rate: Tensor,
    rejected_win_rate: Tensor,
    beta: float,
) -> Tensor:
    """SPPO loss (Wu et al. 2024, eq. 4.7), per example. All inputs (B,), returns (B,).

        loss = (π_c − ref_c − (p̂_c − ½)/β)² + (π_r − ref_r − (p̂_r − ½)/β)²

    p̂ in [0, 1] is a response's estimated probability of beating the current policy (ref plays the
    role of π_t). Without estimates, the trainer passes hard labels p̂_c = 1, p̂_r = 0 (tensors of
    ones and zeros), which gives TRL's `sppo_hard` loss. p̂ is not range-checked here (that would
    synchronize the device on every step); whoever estimates it keeps it in [0, 1].
    """
    _check_sppo(beta)
    chosen = _log_ratio(policy_chosen_logps, ref_chosen_logps)
    rejected = _log_ratio(policy_rejected_logps, ref_rejected_logps)
    chosen_target = (chosen_win_rate.to(chosen.dtype) - 0.5) / beta
    rejected_target = (rejected_win_rate.to(rejected.dtype) - 0.5) / beta
    return (chosen - chosen_target) ** 2 + (rejected - rejected_target) ** 2


def srpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    policy_chosen_given_rejected_logps: Tensor,
    policy_rejected_given_rejected_logps: Tensor,
    policy_chosen_given_chosen_logps: Tensor,
    policy_rejected_given_chosen_logps: Tensor,
    ref_chosen_given_rejected_logps: Tensor,
    ref_rejected_given_rejected_logps: Tensor,
    ref_chosen_given_chosen_logps: Tensor,
    ref_rejected_given_chosen_logps: Tensor,
    beta: float,
    alpha: float = 0.8,
) -> Tensor:
    """SRPO loss (Choi et al., ICLR 2025) with hard labels, per example. All inputs (B,), returns (B,).

    One model generates (y | x) and revises (y' | T(x, y), T the revision template). With
    h(y | c) = log π(y | c) − log π_ref(y | c):

        L_SI  = (½ − β[h(y_w | T(x,y_l)) − h(y_l | T(x,y_l))])² + (½ − β[h(y_w | T(x,y_w)) − h(y_l | T(x,y_w))])²
        L_gen = (β[h(y_w | T(x,y_l)) + h(y_w | x) − h(y_l | T(x,y_w)) − h(y_l | x)] − 1)²
        loss  = α·L_SI + (1 − α)·L_gen

    α in [0, 1] weighs self-improvement against generation (0.8 and β = 0.1 in the closed TRL pull
    request). Both terms are the closed-form optimum π†(y' | y, x) ∝ π_ref·exp(p(y' ≻ y | x)/β) written
    for p(y_w ≻ y_l) = 1; docs/training.md derives them and says where this differs from the paper.
    """
    _check_srpo(beta, alpha)
    h_chosen = _log_ratio(policy_chosen_logps, ref_chosen_logps)
    h_rejected = _log_ratio(policy_rejected_logps, ref_rejected_logps)
    h_chosen_given_rejected = _log_ratio(policy_chosen_given_rejected_logps, ref_chosen_given_rejected_logps)
    h_rejected_given_rejected = _log_ratio(policy_rejected_given_rejected_logps, ref_rejected_given_rejected_logps)
    h_chosen_given_chosen = _log_ratio(policy_chosen_given_chosen_logps, ref_chosen_given_chosen_logps)
    h_rejected_given_chosen = _log_ratio(policy_rejected_given_chosen_logps, ref_rejected_given_chosen_logps)
    self_improvement = (0.5 - beta * (h_chosen_given_rejected - h_rejected_given_rejected)) ** 2 + (
        0.5 - beta * (h_chosen_given_chosen - h_rejected_given_chosen)
    ) ** 2
    generative = (
        beta * (h_chosen_given_rejected + h_chosen - h_rejected_given_chosen - h_rejected) - 1
    ) ** 2
    return alpha * self_improvement + (1 - alpha) * generative


def sparsepo(
    *,
    chosen_token_log_ratios: Tensor,
    rejected_token_log_ratios: Tensor,
    chosen_token_kl_terms: Tensor,
    rejected_token_kl_terms: Tensor,
    chosen_reward_weights: Tensor,
    rejected_reward_weights: Tensor,
    chosen_kl_weights: Tensor,
    rejected_kl_weights: Tensor,
    beta: float,
    lambda_u: float = 0.001,
    lambda_d: float = 0.001,
) -> Tensor:
    """SparsePO loss (Christopoulou et al., 2024), per example. Token inputs (B, T), returns (B,).

    u_t = log π(y_t) − log π_ref(y_t), d_t = Σ_v π_ref(v)·(log π(v) − log π_ref(v)) (= −KL(π_ref ‖ π)
    at the position predicting y_t), masks m_u, m_d ≥ 0; every input is 0 outside the response, and
    the sums run over tokens (not means):

        U = Σ_t m_u,t·u_t        D = Σ_t m_d,t·d_t
        loss = −log σ(β[(U_c − U_r) − (D_c − D_r)]) + λ_u(‖m_u,c‖₁ + ‖m_u,r‖₁) + λ_d(‖m_d,c‖₁ + ‖m_d,r‖₁)

    With m_u = 1 on the response, m_d = 0 and λ_u = λ_d = 0 this is DPO. The authors' defaults:
    β = 0.1, λ_u = λ_d = 0.001. The masks are not range-checked here (no device synchronization).
    """
    _check_sparsepo(beta, lambda_u, lambda_d)
    dtype = _compute_dtype(chosen_token_log_ratios)

    def weighted(values: Tensor, weights: Tensor) -> Tensor:
        return (values.to(dtype) * weights.to(dtype)).sum(-1)

    rewards = weighted(chosen_token_log_ratios, chosen_reward_weights) - weighted(
        rejected_token_log_ratios, rejected_reward_weights
    )
    divergences = weighted(chosen_token_kl_terms, chosen_kl_weights) - weighted(
        rejected_token_kl_terms, rejected_kl_weights
    )
    sparsity = lambda_u * (
        chosen_reward_weights.to(dtype).abs().sum(-1) + rejected_reward_weights.to(dtype).abs().sum(-1)
    ) + lambda_d * (chosen_kl_weights.to(dtype).abs().sum(-1) + rejected_kl_weights.to(dtype).abs().sum(-1))
    return -F.logsigmoid(beta * (rewards - divergences)) + sparsity


def sft(*, policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token negative log-likelihood of the chosen response, per example. Inputs (B,), returns (B,).

        loss = −π_c / max(L_c, 1)

    Composes with any pairwise loss (RPO): total = pairwise + sft_weight·sft (see `with_sft`).
    Averaged over examples this is a mean of per-example token means, not a mean over all tokens.
    """
    dtype = _compute_dtype(policy_chosen_logps)
    return -policy_chosen_logps.to(dtype) / chosen_lengths.to(dtype).clamp(min=1)


def z_loss(
    *, chosen_logz_squared: Tensor, rejected_logz_squared: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """Output-logit z-loss per example (Wortsman et al. 2023; PaLM): inputs (B,), returns (B,).

        loss = (Σ_chosen (log Z)² + Σ_rejected (log Z)²) / max(L_c + L_r, 1)

    the mean over the pair's response tokens of the squared log-normalizer log Z = logsumexp of the
    logits that predict the token (`*_logz_squared` are the sums from `logprobs.pair_logps`). The
    trainer adds `loss.z_loss` times it to the pairwise loss; it pulls log Z towards 0 without changing
    the log-probs, whose softmax is invariant to a shift of the logits.
    """
    squares = chosen_logz_squared.to(_compute_dtype(chosen_logz_squared)) + rejected_logz_squared
    return squares / (chosen_lengths + rejected_lengths).clamp(min=1).to(squares.dtype)


def _pairwise_plus_sft(*, pairwise: Callable[..., Tensor], sft_weight: float, **inputs: Tensor) -> Tensor:
    sft_inputs = {key: inputs[key] for key in loss_inputs(sft)}
    pairwise_inputs = {key: inputs[key] for key in loss_inputs(pairwise)}
    return pairwise(**pairwise_inputs) + sft_weight * sft(**sft_inputs)


def with_sft(pairwise: Callable[..., Tensor], sft_weight: float) -> functools.partial:
    """A bound loss computing pairwise(...) + sft_weight·sft(...) per example (RPO when pairwise is dpo)."""
    _check_sft_weight(sft_weight)
    return functools.partial(_pairwise_plus_sft, pairwise=pairwise, sft_weight=float(sft_weight))


LOSSES: dict[str, Callable[..., Tensor]] = {
    "inpo": inpo,
    "dpo": dpo,
    "ipo": ipo,
    "sppo": sppo,
    "srpo": srpo,
    "sparsepo": sparsepo,
    "sft": sft,
    "inpo-optimistic": inpo_optimistic,
    "inpo-optimistic-aux": inpo_optimistic_aux,
    "online-ipo": online_ipo,
    "nash-md": nash_md,
}

_CHECKS: dict[str, Callable[..., None]] = {
    "inpo": _check_inpo,
    "dpo": _check_dpo,
    "ipo": _check_ipo,
    "sppo": _check_sppo,
    "srpo": _check_srpo,
    "sparsepo": _check_sparsepo,
    "sft": _check_sft,
    "inpo-optimistic": _check_inpo_optimistic,
    "inpo-optimistic-aux": _check_inpo_optimistic_aux,
    "online-ipo": _check_online_ipo,
    "nash-md": _check_nash_md,
}

WITHOUT_SFT = frozenset({"sft", "nash-md"})
"""Losses that take no `sft_weight`: sft itself, and nash-md, which reads no chosen response."""


def _hyperparameters(fn: Callable[..., Tensor]) -> dict[str, inspect.Parameter]:
    return {
        name: parameter
        for name, parameter in inspect.signature(fn).parameters.items()
        if name not in TENSOR_INPUTS and name not in TOKEN_INPUTS
    }


def loss_hyperparameters(name: str) -> tuple[str, ...]:
    """The hyperparameters `make_loss(name, ...)` accepts (sft_weight for every pairwise loss, i.e.
    every loss outside WITHOUT_SFT).

    Lets a caller holding one flat loss config pass only the keys the chosen loss takes.
    """
    if name not in LOSSES:
        raise NashalignError(f"unknown loss {name!r}; expected one of {', '.join(sorted(LOSSES))}")
    return (*_hyperparameters(LOSSES[name]), *(("sft_weight",) if name not in WITHOUT_SFT else ()))


def make_loss(name: str, **hyperparameters: object) -> functools.partial:
    """Validate hyperparameters and bind them: `make_loss("inpo", eta=0.005, tau=0.005 / 3)`.

    `sft_weight` (>= 0) is accepted for every pairwise loss and adds sft_weight·sft (see `with_sft`);
    0 or absent means the pure pairwise loss. Raises NashalignError on an unknown loss name, an unknown
    or missing hyperparameter, or an out-of-range value, naming the key and what is allowed.
    """
    allowed_text = ", ".join(loss_hyperparameters(name)) or "none"
    fn = LOSSES[name]
    sft_weight = hyperparameters.pop("sft_weight", 0.0) if name not in WITHOUT_SFT else 0.0
    allowed = _hyperparameters(fn)
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise NashalignError(f"loss {name!r}: unknown hyperparameter {unknown[0]!r}; allowed: {allowed_text}")
    missing = [
        key
        for key, parameter in allowed.items()
        if parameter.default is inspect.Parameter.empty and key not in hyperparameters
    ]
    if missing:
        raise NashalignError(f"loss {name!r}: missing hyperparameter {missing[0]!r}; allowed: {allowed_text}")
    bound = {key: parameter.default for key, parameter in allowed.items()} | hyperparameters
    _CHECKS[name](**bound)
    if name == "ipo" and not bound["average_log_probs"]:
        hyperparameters = {**hyperparameters, "chosen_lengths": None, "rejected_lengths": None}
    _check_sft_weight(sft_weight)
    loss = functools.partial(fn, **hyperparameters)
    return with_sft(loss, sft_weight) if sft_weight != 0 else loss


def loss_inputs(fn: Callable[..., Tensor]) -> tuple[str, ...]:
    """The tensor keyword inputs a (bound) loss reads, in contract order (TENSOR_INPUTS, then TOKEN_INPUTS)."""
    if isinstance(fn, functools.partial) and fn.func is _pairwise_plus_sft:
        needed = set(loss_inputs(fn.keywords["pairwise"])) | set(loss_inputs(sft))
    else:
        bound = fn.keywords if isinstance(fn, functools.partial) else {}
        target = fn.func if isinstance(fn, functools.partial) else fn
        needed = set(inspect.signature(target).parameters) - set(bound)
    return tuple(name for name in (*TENSOR_INPUTS, *TOKEN_INPUTS) if name in needed)


@torch.no_grad()
def preference_metrics(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    """Batch means of the implicit DPO rewards r = β·(π − ref), as detached scalar tensors.

    Keys: rewards/chosen, rewards/rejected, rewards/margin (mean of r_c − r_r), rewards/accuracy
    (fraction of pairs with r_c > r_r), logps/chosen, logps/rejected (means of the policy log-probs).
    """
    chosen_rewards = beta * _log_ratio(policy_chosen_logps, ref_chosen_logps)
    rejected_rewards = beta * _log_ratio(policy_rejected_logps, ref_rejected_logps)
    dtype = chosen_rewards.dtype
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).to(dtype).mean(),
        "logps/chosen": policy_chosen_logps.to(dtype).mean(),
        "logps/rejected": policy_rejected_logps.to(dtype).mean(),
    }
