"""The token-level geometric mixture of policy and reference (Nash-MD's opponent)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from nashalign import NashalignError
from nashalign.core.mixture import geometric_mixture_logprobs


def test_hand_values_on_two_tokens():
    """π = (¼, ¾), π_ref = (¾, ¼). β = ½: √(¼·¾) for both tokens, so μ = (½, ½). β = ¼:
    μ ∝ (¼^¾·¾^¼, ¾^¾·¼^¼), so μ(1)/μ(0) = 3^¾·3^(−¼) = √3."""
    policy = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    ref = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64)
    assert_close(geometric_mixture_logprobs(policy, ref, 0.5).exp(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    quarter = geometric_mixture_logprobs(policy, ref, 0.25).exp()
    assert_close(quarter[1] / quarter[0], torch.tensor(math.sqrt(3.0), dtype=torch.float64))
    assert_close(quarter.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_ends_are_the_two_models_and_positions_are_independent():
    """β = 0 gives log π, β = 1 gives log π_ref (also with a masked, −inf, token in the other model);
    each (batch, position) row is mixed on its own, and adding a constant to a row of logits (a
    different log-normalizer) changes nothing."""
    generator = torch.Generator().manual_seed(0)
    policy = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    ref = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    assert_close(geometric_mixture_logprobs(policy, ref, 0.0), torch.log_softmax(policy, -1))
    assert_close(geometric_mixture_logprobs(policy, ref, 1.0), torch.log_softmax(ref, -1))
    masked = ref.clone()
    masked[..., 0] = -math.inf
    assert torch.isfinite(geometric_mixture_logprobs(policy, masked, 0.0)).all()
    mixed = geometric_mixture_logprobs(policy, ref, 0.3)
    for b in range(2):
        for position in range(3):
            expected = torch.log_softmax(
                0.7 * torch.log_softmax(policy[b, position], -1) + 0.3 * torch.log_softmax(ref[b, position], -1), -1
            )
            assert_close(mixed[b, position], expected)
    shift = torch.randn(2, 3, 1, generator=generator, dtype=torch.float64)
    assert_close(geometric_mixture_logprobs(policy + shift, ref - 5 * shift, 0.3), mixed)


def test_bfloat16_logits_are_mixed_in_float32():
    policy = torch.randn(4, 50, dtype=torch.bfloat16)
    ref = torch.randn(4, 50, dtype=torch.bfloat16)
    out = geometric_mixture_logprobs(policy, ref, 0.5)
    assert out.dtype == torch.float32
    assert_close(out.exp().sum(-1), torch.ones(4))


@pytest.mark.parametrize("coef", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_rejects_a_mixture_coefficient_outside_0_1(coef):
    with pytest.raises(NashalignError, match="mixture_coef must be a number in"):
        geometric_mixture_logprobs(torch.zeros(3), torch.zeros(3), coef)


def test_rejects_logits_of_different_shapes():
    with pytest.raises(NashalignError, match="same shape"):
        geometric_mixture_logprobs(torch.zeros(2, 5), torch.zeros(2, 6), 0.5)
