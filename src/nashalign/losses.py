"""Pure per-example preference losses over summed response log-probs.

Every loss takes keyword tensors of shape (B,) and keyword-only hyperparameters and returns a (B,)
tensor of per-example losses: averaging, weighting and logging live in the trainer. Names follow the
project contract: `policy_*`, `ref_*`, `prev_*` are the summed response log-probs of the trained
policy π, the reference π_ref and the previous iterate π_t; `*_lengths` count response tokens;
`*_win_rate` are estimated probabilities that a response beats the current policy.

Losses are computed in at least float32: bfloat16 numbers near 200 (a summed log-prob of a long response) are spaced
by 1.0, and INPO's target 1/(2η) = 100 by 0.5, so doing the arithmetic in bfloat16 would swamp the
signal. The result has dtype promote(input, float32); gradients flow back in the input dtype.

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
)
"""Every tensor input a trainer can provide, each of shape (B,)."""


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


def _check_inpo(eta: object, tau: object) -> None:
    eta_value = _check_real("inpo", "eta", eta)
    tau_value = _check_real("inpo", "tau", tau)
    if eta_value <= 0:
        raise NashalignError(f"loss 'inpo': hyperparameter 'eta' must be > 0, got eta={eta!r}")
    if not 0 <= tau_value / eta_value < 1:
        raise NashalignError(
            f"loss 'inpo': hyperparameters 'tau' and 'eta' must satisfy 0 <= tau/eta < 1 "
            f"(0 <= tau < eta), got tau={tau!r}, eta={eta!r}"
        )


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


LOSSES: dict[str, Callable[..., Tensor]] = {"inpo": inpo, "dpo": dpo, "ipo": ipo, "sppo": sppo, "sft": sft}

_CHECKS: dict[str, Callable[..., None]] = {
    "inpo": _check_inpo,
    "dpo": _check_dpo,
    "ipo": _check_ipo,
    "sppo": _check_sppo,
    "sft": _check_sft,
}


def _hyperparameters(fn: Callable[..., Tensor]) -> dict[str, inspect.Parameter]:
    return {
        name: parameter
        for name, parameter in inspect.signature(fn).parameters.items()
        if name not in TENSOR_INPUTS
    }


def loss_hyperparameters(name: str) -> tuple[str, ...]:
    """The hyperparameters `make_loss(name, ...)` accepts (sft_weight for every pairwise loss).

    Lets a caller holding one flat loss config pass only the keys the chosen loss takes.
    """
    if name not in LOSSES:
        raise NashalignError(f"unknown loss {name!r}; expected one of {', '.join(sorted(LOSSES))}")
    return (*_hyperparameters(LOSSES[name]), *(("sft_weight",) if name != "sft" else ()))


def make_loss(name: str, **hyperparameters: object) -> functools.partial:
    """Validate hyperparameters and bind them: `make_loss("inpo", eta=0.005, tau=0.005 / 3)`.

    `sft_weight` (>= 0) is accepted for every pairwise loss and adds sft_weight·sft (see `with_sft`);
    0 or absent means the pure pairwise loss. Raises NashalignError on an unknown loss name, an unknown
    or missing hyperparameter, or an out-of-range value, naming the key and what is allowed.
    """
    allowed_text = ", ".join(loss_hyperparameters(name)) or "none"
    fn = LOSSES[name]
    sft_weight = hyperparameters.pop("sft_weight", 0.0) if name != "sft" else 0.0
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
    """The tensor keyword inputs a (bound) loss reads, in contract order."""
    if isinstance(fn, functools.partial) and fn.func is _pairwise_plus_sft:
        needed = set(loss_inputs(fn.keywords["pairwise"])) | set(loss_inputs(sft))
    else:
        bound = fn.keywords if isinstance(fn, functools.partial) else {}
        target = fn.func if isinstance(fn, functools.partial) else fn
        needed = set(inspect.signature(target).parameters) - set(bound)
    return tuple(name for name in TENSOR_INPUTS if name in needed)


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
