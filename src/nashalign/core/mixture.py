"""The token-level geometric mixture of the policy and the reference, Nash-MD's opponent.

Nash-MD (Munos et al. 2023) plays against μ ∝ π^(1−β)·π_ref^β. For a language model the mixture is
taken per token, as in the paper's experiments and in TRL's former Nash-MD trainer: at each position
the next-token distribution is the normalized geometric mixture of the two models' next-token
distributions, and the opponent's response is sampled from it token by token (both models read the
same prefix). `geometric_mixture_logprobs` computes those next-token log-probs from the two models'
logits; a sampling loop calls it once per generated token.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from nashalign import NashalignError


def geometric_mixture_logprobs(policy_logits: Tensor, ref_logits: Tensor, mixture_coef: float) -> Tensor:
    """log μ(v) = log_softmax((1 − β)·log π(v) + β·log π_ref(v)) over the last (vocabulary) dimension.

    `policy_logits`, `ref_logits`: (..., V) next-token logits of π and π_ref at the same positions
    (unnormalized; their log-normalizers cancel in the outer log_softmax, so the logits are mixed
    directly). β = `mixture_coef` in [0, 1]: 0 gives π, 1 gives π_ref. Computed in at least float32
    (a bfloat16 log_softmax over a large vocabulary loses the tail); returns (..., V) log-probs.
    """
    if (
        isinstance(mixture_coef, bool)
        or not isinstance(mixture_coef, Real)
        or not math.isfinite(float(mixture_coef))
        or not 0 <= float(mixture_coef) <= 1
    ):
        raise NashalignError(f"mixture_coef must be a number in [0, 1], got {mixture_coef!r}")
    if policy_logits.shape != ref_logits.shape:
        raise NashalignError(
            f"policy and reference logits must have the same shape, got {tuple(policy_logits.shape)} "
            f"and {tuple(ref_logits.shape)} (the same positions and the same vocabulary)"
        )
    dtype = torch.promote_types(torch.promote_types(policy_logits.dtype, ref_logits.dtype), torch.float32)
    beta = float(mixture_coef)
    if beta in (0.0, 1.0):  # one model alone: 0·(−inf) for a masked token of the other would be NaN
        return torch.log_softmax((ref_logits if beta else policy_logits).to(dtype), dim=-1)
    mixed = (1.0 - beta) * policy_logits.to(dtype) + beta * ref_logits.to(dtype)
    return torch.log_softmax(mixed, dim=-1)
