"""Per-example preference losses: hand-derived values, invariances, gradients, validation, binding."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from nashalign import NashalignError
from nashalign.core.losses import (
    LOSSES,
    TENSOR_INPUTS,
    TOKEN_INPUTS,
    WITHOUT_SFT,
    dpo,
    inpo,
    inpo_optimistic,
    inpo_optimistic_aux,
    ipo,
    loss_hyperparameters,
    loss_inputs,
    make_loss,
    nash_md,
    online_ipo,
    preference_metrics,
    sft,
    sparsepo,
    sppo,
    srpo,
    with_sft,
)

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

# Log-probs are summed over response tokens, so they are negative and can be a few hundred nats.
logp = st.floats(min_value=-300.0, max_value=0.0, allow_nan=False)
shift = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False)
eta_tau = st.tuples(st.floats(min_value=0.001, max_value=2.0), st.floats(min_value=0.0, max_value=0.99)).map(
    lambda pair: (pair[0], pair[0] * pair[1])
)
beta_values = st.floats(min_value=0.01, max_value=2.0)
smoothing = st.floats(min_value=0.0, max_value=0.45)


def t(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


@st.composite
def pair_batches(draw, size: int = 3) -> dict[str, torch.Tensor]:
    """A batch of every tensor input a trainer can provide, float64, shape (size,)."""
    batch = {
        name: t(*draw(st.lists(logp, min_size=size, max_size=size)))
        for name in TENSOR_INPUTS
        if name.endswith("_logps")
    }
    for side in ("chosen", "rejected"):
        batch[f"{side}_lengths"] = t(*draw(st.lists(st.integers(1, 400), min_size=size, max_size=size)))
        rates = draw(st.lists(st.floats(0.0, 1.0), min_size=size, max_size=size))
        batch[f"{side}_win_rate"] = t(*rates)
    batch["mixture_win_rate"] = t(*draw(st.lists(st.floats(0.0, 1.0), min_size=size, max_size=size)))
    return batch


def call(fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Call a bound loss with exactly the inputs it declares (as a trainer does)."""
    return fn(**{name: batch[name] for name in loss_inputs(fn)})


def swapped(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same pairs with chosen and rejected exchanged (every model, lengths and win rates)."""
    return {
        name.replace("chosen", "@").replace("rejected", "chosen").replace("@", "rejected"): value
        for name, value in batch.items()
    }


ALL_VARIANTS = {
    "inpo": make_loss("inpo", eta=0.005, tau=0.005 / 3),
    "dpo": make_loss("dpo", beta=0.1),
    "cdpo": make_loss("dpo", beta=0.1, label_smoothing=0.2),
    "robust_dpo": make_loss("dpo", beta=0.1, label_smoothing=0.2, robust=True),
    "ipo_averaged": make_loss("ipo", beta=0.1),
    "ipo_summed": make_loss("ipo", beta=0.1, average_log_probs=False),
    "sppo": make_loss("sppo", beta=0.1),
    "sft": make_loss("sft"),
    "rpo": make_loss("dpo", beta=0.1, sft_weight=0.5),
    "srpo": make_loss("srpo", beta=0.1),
    "inpo_optimistic": make_loss("inpo-optimistic", eta=0.005, tau=0.005 / 3),
    "inpo_optimistic_aux": make_loss("inpo-optimistic-aux", eta=0.005, tau=0.005 / 3),
    "online_ipo": make_loss("online-ipo", tau=0.1),
    "nash_md": make_loss("nash-md", tau=0.1),
}


# ---------------------------------------------------------------- hand-derived values


def test_inpo_hand_values():
    """η = 1/4, τ = 1/8, so τ/η = 1/2 and the target 1/(2η) = 2.

    Pair 1: π = (−1, −3), ref = (−2, −2), prev = (−4, −1):
        h = (−1 + 3) − ½·(0) − ½·(−4 + 1) = 2 + 1.5 = 3.5,  loss = (3.5 − 2)² = 2.25.
    Pair 2: π = (−5, −5), ref = prev = (−1, −3):
        h = 0 − ½·2 − ½·2 = −2,  loss = (−2 − 2)² = 16.
    """
    losses = inpo(
        policy_chosen_logps=t(-1.0, -5.0),
        policy_rejected_logps=t(-3.0, -5.0),
        ref_chosen_logps=t(-2.0, -1.0),
        ref_rejected_logps=t(-2.0, -3.0),
        prev_chosen_logps=t(-4.0, -1.0),
        prev_rejected_logps=t(-1.0, -3.0),
        eta=0.25,
        tau=0.125,
    )
    assert_close(losses, t(2.25, 16.0))


def test_inpo_paper_defaults_hand_values():
    """η = 0.005, τ = η/3: target 1/(2η) = 100. With prev = ref = (−20, −20), h = π_c − π_r.

    π = (−10, −110): h = 100, loss 0.   π = (−10, −111.5): h = 101.5, loss 1.5² = 2.25.
    float32 inputs: all values are exact in float32, and so is the arithmetic.
    """
    ref = t(-20.0, -20.0, dtype=torch.float32)
    losses = inpo(
        policy_chosen_logps=t(-10.0, -10.0, dtype=torch.float32),
        policy_rejected_logps=t(-110.0, -111.5, dtype=torch.float32),
        ref_chosen_logps=ref,
        ref_rejected_logps=ref,
        prev_chosen_logps=ref,
        prev_rejected_logps=ref,
        eta=0.005,
        tau=0.005 / 3,
    )
    assert losses.dtype == torch.float32
    assert_close(losses, t(0.0, 2.25, dtype=torch.float32))


def test_inpo_optimistic_hand_values():
    """η = 1/4, τ = 1/8: r = ½, targets 1/η = 4 (policy) and 1/(2η) = 2 (auxiliary policy).

    Pair 1: π = (−1, −3), π̂ = aux = (−2, −1), ref = (−2, −2), prev = (−4, −1):
        h = (−1 + 3) − (−2 + 1) − ½·[(−2 + 2) − (−4 + 1)] = 2 + 1 − 1.5 = 1.5,
        policy loss (1.5 − 4)² = 6.25, auxiliary loss (1.5 − 2)² = 0.25.
    Pair 2: π = (−5, −5), aux = (−3, −3), ref = (−1, −3), prev = (−1, −3):
        h = 0 − 0 − ½·(2 − 2) = 0, losses 16 and 4.
    """
    inputs = {
        "policy_chosen_logps": t(-1.0, -5.0),
        "policy_rejected_logps": t(-3.0, -5.0),
        "aux_chosen_logps": t(-2.0, -3.0),
        "aux_rejected_logps": t(-1.0, -3.0),
        "ref_chosen_logps": t(-2.0, -1.0),
        "ref_rejected_logps": t(-2.0, -3.0),
        "prev_chosen_logps": t(-4.0, -1.0),
        "prev_rejected_logps": t(-1.0, -3.0),
    }
    assert_close(inpo_optimistic(**inputs, eta=0.25, tau=0.125), t(6.25, 16.0))
    assert_close(inpo_optimistic_aux(**inputs, eta=0.25, tau=0.125), t(0.25, 4.0))


def test_online_ipo_hand_value():
    """τ = 0.25: target 1/(2τ) = 2; z = (−1 + 2) − (−3 + 2.5) = 1.5, loss (1.5 − 2)² = 0.25."""
    losses = online_ipo(
        policy_chosen_logps=t(-1.0),
        policy_rejected_logps=t(-3.0),
        ref_chosen_logps=t(-2.0),
        ref_rejected_logps=t(-2.5),
        tau=0.25,
    )
    assert_close(losses, t(0.25))


def test_nash_md_hand_values_and_gradient():
    """τ = 0.5. Sample 1: π = −2, ref = −3, p̂ = 0.9: advantage (0.9 − 0.5) − 0.5·(−2 + 3) = −0.1,
    loss −(−0.1)·(−2) = −0.2, ∂loss/∂π = 0.1 (the stop-gradient keeps the KL part out of the
    derivative). Sample 2: π = −1, ref = −1, p̂ = 0: advantage −0.5, loss −0.5, ∂loss/∂π = 0.5."""
    policy = t(-2.0, -1.0).requires_grad_()
    losses = nash_md(policy_logps=policy, ref_logps=t(-3.0, -1.0), mixture_win_rate=t(0.9, 0.0), tau=0.5)
    assert_close(losses, t(-0.2, -0.5))
    losses.sum().backward()
    assert_close(policy.grad, t(0.1, 0.5))


def _dpo_inputs(margin: float) -> dict[str, torch.Tensor]:
    """π_c − ref_c = margin and π_r − ref_r = 0, so z = β·margin."""
    return {
        "policy_chosen_logps": t(margin - 7.0),
        "policy_rejected_logps": t(-4.0),
        "ref_chosen_logps": t(-7.0),
        "ref_rejected_logps": t(-4.0),
    }


def test_dpo_sigmoid_hand_values():
    """β = ½ and margin 2·ln 3 give z = ln 3, σ(z) = ¾: loss = −ln ¾ = ln(4/3). Margin 0: ln 2."""
    assert_close(dpo(**_dpo_inputs(2 * math.log(3)), beta=0.5), t(math.log(4 / 3)))
    assert_close(dpo(**_dpo_inputs(0.0), beta=0.5), t(math.log(2)))


def test_conservative_dpo_hand_value():
    """z = ln 3 (σ(z) = ¾, σ(−z) = ¼), ε = ¼:
    loss = −¾·ln ¾ − ¼·ln ¼ = ¾·ln(4/3) + ¼·ln 4.
    """
    losses = dpo(**_dpo_inputs(2 * math.log(3)), beta=0.5, label_smoothing=0.25)
    assert_close(losses, t(0.75 * math.log(4 / 3) + 0.25 * math.log(4)))


def test_robust_dpo_hand_values():
    """z = ln 3, ε = ¼: [−¾·ln ¾ + ¼·ln ¼] / (1 − ½) = 1.5·ln(4/3) − 0.5·ln 4.

    At z = 0 the robust loss is [(1 − ε)·ln 2 − ε·ln 2]/(1 − 2ε) = ln 2 for every ε.
    """
    losses = dpo(**_dpo_inputs(2 * math.log(3)), beta=0.5, label_smoothing=0.25, robust=True)
    assert_close(losses, t(1.5 * math.log(4 / 3) - 0.5 * math.log(4)))
    at_zero = dpo(**_dpo_inputs(0.0), beta=0.5, label_smoothing=0.4, robust=True)
    assert_close(at_zero, t(math.log(2)))


IPO_INPUTS = {
    "policy_chosen_logps": t(-1.0),
    "ref_chosen_logps": t(-2.0),
    "policy_rejected_logps": t(-3.0),
    "ref_rejected_logps": t(-1.0),
}


def test_ipo_summed_hand_value():
    """β = ¼, target 1/(2β) = 2. z' = (−1 + 2) − (−3 + 1) = 3, loss = (3 − 2)² = 1."""
    assert_close(ipo(**IPO_INPUTS, beta=0.25, average_log_probs=False), t(1.0))


def test_ipo_averaged_hand_values():
    """β = ¼, L_c = 4, L_r = 1: z' = 1/4 − (−2)/1 = 2.25, loss = 0.25² = 0.0625.

    A zero length is clamped to 1: L_c = 0, L_r = 2 give z' = 1 − (−2)/2 = 2, loss 0.
    """
    losses = ipo(**IPO_INPUTS, chosen_lengths=t(4.0), rejected_lengths=t(1.0), beta=0.25)
    assert_close(losses, t(0.0625))
    clamped = ipo(**IPO_INPUTS, chosen_lengths=t(0.0), rejected_lengths=t(2.0), beta=0.25)
    assert_close(clamped, t(0.0))


def test_ipo_averaged_accepts_integer_lengths():
    """Lengths as int64 counts (as a collator produces them) give the same value as float lengths."""
    losses = ipo(
        **IPO_INPUTS,
        chosen_lengths=torch.tensor([4]),
        rejected_lengths=torch.tensor([1]),
        beta=0.25,
    )
    assert_close(losses, t(0.0625))


def test_sppo_hand_values():
    """β = ½, targets (p̂ − ½)/β = 2p̂ − 1.

    Hard labels (1, 0), log-ratios (2, −2): (2 − 1)² + (−2 + 1)² = 2.
    Soft (0.75, 0.25), log-ratios (0, 1): (0 − 0.5)² + (1 + 0.5)² = 0.25 + 2.25 = 2.5.
    Soft (0.75, 0.5), log-ratios (0.5, 0): exactly on target, 0.
    """
    losses = sppo(
        policy_chosen_logps=t(-1.0, -3.0, -2.5),
        ref_chosen_logps=t(-3.0, -3.0, -3.0),
        policy_rejected_logps=t(-6.0, -4.0, -8.0),
        ref_rejected_logps=t(-4.0, -5.0, -8.0),
        chosen_win_rate=t(1.0, 0.75, 0.75),
        rejected_win_rate=t(0.0, 0.25, 0.5),
        beta=0.5,
    )
    assert_close(losses, t(2.0, 2.5, 0.0))


def test_sft_hand_values():
    """−π_c / max(L_c, 1): −(−6)/3 = 2, and a zero length counts as 1: −(−6)/1 = 6."""
    assert_close(sft(policy_chosen_logps=t(-6.0, -6.0), chosen_lengths=t(3.0, 0.0)), t(2.0, 6.0))


def test_preference_metrics_hand_values():
    """β = ½. Log-ratios chosen (2, −2), rejected (0, 0): rewards chosen (1, −1), rejected (0, 0).

    rewards/chosen = 0, rewards/rejected = 0, rewards/margin = mean(1, −1) = 0,
    rewards/accuracy = ½ (only the first pair has r_c > r_r), logps/chosen = mean(−1, −5) = −3,
    logps/rejected = mean(−4, −6) = −5. Metrics are detached 0-dim tensors.
    """
    policy_chosen = t(-1.0, -5.0).requires_grad_()
    metrics = preference_metrics(
        policy_chosen_logps=policy_chosen,
        ref_chosen_logps=t(-3.0, -3.0),
        policy_rejected_logps=t(-4.0, -6.0),
        ref_rejected_logps=t(-4.0, -6.0),
        beta=0.5,
    )
    expected = {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/margin": 0.0,
        "rewards/accuracy": 0.5,
        "logps/chosen": -3.0,
        "logps/rejected": -5.0,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].shape == ()
        assert not metrics[key].requires_grad
        assert_close(metrics[key], torch.tensor(value, dtype=torch.float64), msg=key)


def test_preference_metrics_accuracy_counts_ties_as_wrong():
    """Equal rewards are not a correct ranking (strict >, as in TRL): accuracy of a tie is 0."""
    zeros = t(-2.0)
    metrics = preference_metrics(
        policy_chosen_logps=zeros,
        policy_rejected_logps=zeros,
        ref_chosen_logps=zeros,
        ref_rejected_logps=zeros,
        beta=0.1,
    )
    assert metrics["rewards/accuracy"].item() == 0.0


# ---------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(batch=pair_batches(), chosen_shift=shift, rejected_shift=shift)
def test_losses_invariant_to_a_constant_added_to_a_response_under_all_models(
    batch, chosen_shift, rejected_shift
):
    """Adding c to log π(y), log π_ref(y) and log π_t(y) of one response leaves every pairwise loss
    unchanged: each depends on log-probs only through log-ratios of the same response or differences
    weighted by coefficients summing to zero (INPO: 1 − τ/η − (1 − τ/η) = 0 per response; optimistic
    INPO: 1 − 1 − τ/η + τ/η = 0). Nash-MD is a policy-gradient loss over single samples, not a pairwise one."""
    shifted = dict(batch)
    for model in ("policy", "ref", "prev", "aux"):
        shifted[f"{model}_chosen_logps"] = batch[f"{model}_chosen_logps"] + chosen_shift
        shifted[f"{model}_rejected_logps"] = batch[f"{model}_rejected_logps"] + rejected_shift
    for name, fn in ALL_VARIANTS.items():
        if name in ("sft", "rpo", "nash_md"):
            continue
        assert_close(call(fn, shifted), call(fn, batch), rtol=1e-9, atol=1e-6, msg=name)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), model=st.sampled_from(["policy", "ref", "prev", "aux"]), offset=shift)
def test_inpo_and_dpo_invariant_to_a_constant_added_to_one_model(batch, model, offset):
    """Adding c to both responses' log-probs under one model (e.g. a different normalizer) leaves INPO
    and DPO unchanged: they only see chosen − rejected differences per model."""
    shifted = dict(batch)
    for side in ("chosen", "rejected"):
        shifted[f"{model}_{side}_logps"] = batch[f"{model}_{side}_logps"] + offset
    for name in ("inpo", "dpo", "cdpo", "robust_dpo", "ipo_summed", "inpo_optimistic", "inpo_optimistic_aux"):
        fn = ALL_VARIANTS[name]
        assert_close(call(fn, shifted), call(fn, batch), rtol=1e-9, atol=1e-6, msg=name)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), beta=beta_values, epsilon=smoothing)
def test_dpo_swap_antisymmetry(batch, beta, epsilon):
    """Swapping chosen and rejected flips z. Since log σ(z) − log σ(−z) = z:
    plain (ε = 0):   L(z) − L(−z) = −z
    conservative:    L(z) − L(−z) = −(1 − 2ε)·z
    robust:          L(z) − L(−z) = −z/(1 − 2ε)
    """
    z = beta * (
        (batch["policy_chosen_logps"] - batch["ref_chosen_logps"])
        - (batch["policy_rejected_logps"] - batch["ref_rejected_logps"])
    )
    cases = {
        "plain": (make_loss("dpo", beta=beta), -z),
        "conservative": (make_loss("dpo", beta=beta, label_smoothing=epsilon), -(1 - 2 * epsilon) * z),
        "robust": (
            make_loss("dpo", beta=beta, label_smoothing=epsilon, robust=True),
            -z / (1 - 2 * epsilon),
        ),
    }
    for name, (fn, expected) in cases.items():
        difference = call(fn, batch) - call(fn, swapped(batch))
        assert_close(difference, expected, rtol=1e-7, atol=1e-7, msg=name)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), eta_and_tau=eta_tau, beta=beta_values)
def test_squared_losses_swap_relations(batch, eta_and_tau, beta):
    """Swapping chosen and rejected negates the margin m of a squared loss (m − a)², so
    L − L_swapped = (m − a)² − (m + a)² = −4am:
    INPO (m = h, a = 1/(2η)): −2h/η.   IPO (m = z', a = 1/(2β)): −2z'/β.
    SPPO is a sum of one term per response, so it is unchanged by the swap."""
    eta, tau = eta_and_tau
    ratio = tau / eta
    h = (
        (batch["policy_chosen_logps"] - batch["policy_rejected_logps"])
        - ratio * (batch["ref_chosen_logps"] - batch["ref_rejected_logps"])
        - (1 - ratio) * (batch["prev_chosen_logps"] - batch["prev_rejected_logps"])
    )
    inpo_fn = make_loss("inpo", eta=eta, tau=tau)
    inpo_difference = call(inpo_fn, batch) - call(inpo_fn, swapped(batch))
    assert_close(inpo_difference, -2 * h / eta, rtol=1e-7, atol=1e-4)

    lengths_c, lengths_r = batch["chosen_lengths"], batch["rejected_lengths"]
    z_averaged = (batch["policy_chosen_logps"] - batch["ref_chosen_logps"]) / lengths_c - (
        batch["policy_rejected_logps"] - batch["ref_rejected_logps"]
    ) / lengths_r
    ipo_fn = make_loss("ipo", beta=beta)
    assert_close(call(ipo_fn, batch) - call(ipo_fn, swapped(batch)), -2 * z_averaged / beta)

    sppo_fn = make_loss("sppo", beta=beta)
    assert_close(call(sppo_fn, swapped(batch)), call(sppo_fn, batch))


@PROPERTY_SETTINGS
@given(batch=pair_batches(), eta_and_tau=eta_tau)
def test_optimistic_losses_are_inpo_when_the_auxiliary_policy_is_the_previous_iterate(batch, eta_and_tau):
    """With π̂ = π_t, h = [π] − r·[ref] − (1 − r)·[prev], INPO's margin: the auxiliary loss is the INPO
    loss, and the policy loss (h − 1/η)² = 4·(h/2 − 1/(2η))² asks for twice INPO's margin."""
    eta, tau = eta_and_tau
    same = {**batch, "aux_chosen_logps": batch["prev_chosen_logps"], "aux_rejected_logps": batch["prev_rejected_logps"]}
    inpo_loss = call(make_loss("inpo", eta=eta, tau=tau), same)
    assert_close(call(make_loss("inpo-optimistic-aux", eta=eta, tau=tau), same), inpo_loss)
    ratio = tau / eta
    h = (
        (batch["policy_chosen_logps"] - batch["policy_rejected_logps"])
        - ratio * (batch["ref_chosen_logps"] - batch["ref_rejected_logps"])
        - (1 - ratio) * (batch["prev_chosen_logps"] - batch["prev_rejected_logps"])
    )
    assert_close(call(make_loss("inpo-optimistic", eta=eta, tau=tau), same), (h - 1 / eta) ** 2, atol=1e-4, rtol=1e-7)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), tau=beta_values)
def test_online_ipo_is_summed_ipo_with_beta_tau(batch, tau):
    expected = call(make_loss("ipo", beta=tau, average_log_probs=False), batch)
    assert_close(call(make_loss("online-ipo", tau=tau), batch), expected)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), eta_and_tau=eta_tau)
def test_inpo_equals_summed_ipo_when_previous_policy_is_reference(batch, eta_and_tau):
    """With π_t = π_ref (INPO's first iteration), h = (π_c − ref_c) − (π_r − ref_r) = z' for every τ,
    so INPO is the summed IPO loss with β = η."""
    eta, tau = eta_and_tau
    first_iteration = {
        **batch,
        "prev_chosen_logps": batch["ref_chosen_logps"],
        "prev_rejected_logps": batch["ref_rejected_logps"],
    }
    expected = call(make_loss("ipo", beta=eta, average_log_probs=False), first_iteration)
    assert_close(call(make_loss("inpo", eta=eta, tau=tau), first_iteration), expected)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), epsilon=st.just(0.0) | smoothing)
def test_conservative_and_robust_dpo_agree_without_smoothing_only(batch, epsilon):
    """At ε = 0 both variants are −log σ(z); for ε > 0 they differ by
    L_cons − L_rob = −(1−ε)lσ(z) − ε·lσ(−z) − [−(1−ε)lσ(z) + ε·lσ(−z)]/(1−2ε), checked literally."""
    conservative = call(make_loss("dpo", beta=0.3, label_smoothing=epsilon), batch)
    robust = call(make_loss("dpo", beta=0.3, label_smoothing=epsilon, robust=True), batch)
    z = 0.3 * (
        (batch["policy_chosen_logps"] - batch["ref_chosen_logps"])
        - (batch["policy_rejected_logps"] - batch["ref_rejected_logps"])
    )
    up, down = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
    expected = (
        -(1 - epsilon) * up - epsilon * down - (-(1 - epsilon) * up + epsilon * down) / (1 - 2 * epsilon)
    )
    assert_close(conservative - robust, expected)
    if epsilon == 0.0:
        assert torch.equal(conservative, robust)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), eta_and_tau=eta_tau)
def test_inpo_gradients_match_analytic(batch, eta_and_tau):
    """loss = (h − a)², a = 1/(2η), r = τ/η, so with g = 2(h − a):
    ∂/∂π_c = g, ∂/∂π_r = −g, ∂/∂ref_c = −r·g, ∂/∂ref_r = r·g, ∂/∂prev_c = −(1−r)·g, ∂/∂prev_r = (1−r)·g.
    """
    eta, tau = eta_and_tau
    ratio = tau / eta
    leaves = {name: batch[name].clone().requires_grad_() for name in loss_inputs(inpo)}
    losses = inpo(**leaves, eta=eta, tau=tau)
    losses.sum().backward()
    h = (
        (batch["policy_chosen_logps"] - batch["policy_rejected_logps"])
        - ratio * (batch["ref_chosen_logps"] - batch["ref_rejected_logps"])
        - (1 - ratio) * (batch["prev_chosen_logps"] - batch["prev_rejected_logps"])
    )
    g = 2 * (h - 1 / (2 * eta))
    expected = {
        "policy_chosen_logps": g,
        "policy_rejected_logps": -g,
        "ref_chosen_logps": -ratio * g,
        "ref_rejected_logps": ratio * g,
        "prev_chosen_logps": -(1 - ratio) * g,
        "prev_rejected_logps": (1 - ratio) * g,
    }
    for name, value in expected.items():
        assert_close(leaves[name].grad, value, rtol=1e-7, atol=1e-5, msg=name)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), eta_and_tau=eta_tau)
def test_inpo_zero_gradient_at_the_fixed_point(batch, eta_and_tau):
    """Choose π_c so that h = 1/(2η) exactly: the loss and its gradient wrt the policy log-probs are 0.
    π_c = π_r + 1/(2η) + r·(ref_c − ref_r) + (1 − r)·(prev_c − prev_r) solves h = 1/(2η)."""
    eta, tau = eta_and_tau
    ratio = tau / eta
    policy_chosen = (
        batch["policy_rejected_logps"]
        + 1 / (2 * eta)
        + ratio * (batch["ref_chosen_logps"] - batch["ref_rejected_logps"])
        + (1 - ratio) * (batch["prev_chosen_logps"] - batch["prev_rejected_logps"])
    ).requires_grad_()
    policy_rejected = batch["policy_rejected_logps"].clone().requires_grad_()
    losses = inpo(
        policy_chosen_logps=policy_chosen,
        policy_rejected_logps=policy_rejected,
        ref_chosen_logps=batch["ref_chosen_logps"],
        ref_rejected_logps=batch["ref_rejected_logps"],
        prev_chosen_logps=batch["prev_chosen_logps"],
        prev_rejected_logps=batch["prev_rejected_logps"],
        eta=eta,
        tau=tau,
    )
    losses.sum().backward()
    zeros = torch.zeros_like(losses)
    assert_close(losses, zeros, atol=1e-16, rtol=0)
    assert_close(policy_chosen.grad, zeros, atol=1e-8, rtol=0)
    assert_close(policy_rejected.grad, zeros, atol=1e-8, rtol=0)


@PROPERTY_SETTINGS
@given(batch=pair_batches(), beta=beta_values, epsilon=smoothing)
def test_dpo_gradient_matches_analytic(batch, beta, epsilon):
    """∂/∂π_c of −(1−ε)lσ(z) − ε·lσ(−z) is β·[−(1−ε)σ(−z) + ε·σ(z)] (since d lσ(z)/dz = σ(−z)),
    and the robust variant's is β·[−(1−ε)σ(−z) − ε·σ(z)]/(1 − 2ε); ∂/∂π_r is the negative."""
    z = beta * (
        (batch["policy_chosen_logps"] - batch["ref_chosen_logps"])
        - (batch["policy_rejected_logps"] - batch["ref_rejected_logps"])
    )
    expected = {
        False: beta * (-(1 - epsilon) * torch.sigmoid(-z) + epsilon * torch.sigmoid(z)),
        True: beta * (-(1 - epsilon) * torch.sigmoid(-z) - epsilon * torch.sigmoid(z)) / (1 - 2 * epsilon),
    }
    for robust, gradient in expected.items():
        leaves = {name: batch[name].clone().requires_grad_() for name in loss_inputs(dpo)}
        dpo(**leaves, beta=beta, label_smoothing=epsilon, robust=robust).sum().backward()
        assert_close(leaves["policy_chosen_logps"].grad, gradient, msg=f"robust={robust}")
        assert_close(leaves["policy_rejected_logps"].grad, -gradient, msg=f"robust={robust}")


def test_dpo_is_finite_for_huge_margins():
    """log σ is evaluated stably: margins of ±10⁴ nats give finite losses and gradients."""
    policy_chosen = t(0.0, -1e4, dtype=torch.float32).requires_grad_()
    losses = dpo(
        policy_chosen_logps=policy_chosen,
        policy_rejected_logps=t(-1e4, 0.0, dtype=torch.float32),
        ref_chosen_logps=t(0.0, 0.0, dtype=torch.float32),
        ref_rejected_logps=t(0.0, 0.0, dtype=torch.float32),
        beta=1.0,
        label_smoothing=0.1,
        robust=True,
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy_chosen.grad).all()


# ---------------------------------------------------------------- dtypes, shapes, differentiability


@pytest.mark.parametrize("name", sorted(ALL_VARIANTS))
def test_bfloat16_inputs_are_computed_in_float32_and_differentiable(name):
    """bfloat16 inputs give a float32 (B,) result equal to the float32 computation on the same values,
    and gradients flow back to the bfloat16 leaves with their dtype."""
    fn = ALL_VARIANTS[name]
    generator = torch.Generator().manual_seed(0)
    values = {
        name: -30 * torch.rand(5, generator=generator) for name in TENSOR_INPUTS if name.endswith("_logps")
    }
    values["chosen_lengths"] = torch.tensor([1, 2, 3, 4, 5])
    values["rejected_lengths"] = torch.tensor([5, 4, 3, 2, 1])
    values["chosen_win_rate"] = torch.rand(5, generator=generator)
    values["rejected_win_rate"] = torch.rand(5, generator=generator)
    values["mixture_win_rate"] = torch.rand(5, generator=generator)
    low = {
        key: value.to(torch.bfloat16).requires_grad_() if value.is_floating_point() else value
        for key, value in values.items()
    }
    reference = {
        key: value.detach().float() if value.is_floating_point() else value for key, value in low.items()
    }
    losses = call(fn, low)
    assert losses.shape == (5,) and losses.dtype == torch.float32
    assert_close(losses, call(fn, reference))
    losses.sum().backward()
    policy = "policy_chosen_logps" if "policy_chosen_logps" in loss_inputs(fn) else "policy_logps"
    gradient = low[policy].grad
    assert gradient is not None and gradient.dtype == torch.bfloat16
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ALL_VARIANTS))
def test_losses_are_per_example(name):
    """Each example's loss depends on that example only: the batch result equals the concatenation of
    batch-of-one results, in float32."""
    fn = ALL_VARIANTS[name]
    generator = torch.Generator().manual_seed(1)
    batch = {key: -20 * torch.rand(4, generator=generator) for key in TENSOR_INPUTS}
    batch["chosen_lengths"] = torch.tensor([3, 1, 7, 2])
    batch["rejected_lengths"] = torch.tensor([2, 9, 1, 4])
    batch["chosen_win_rate"] = torch.rand(4, generator=generator)
    batch["rejected_win_rate"] = torch.rand(4, generator=generator)
    batch["mixture_win_rate"] = torch.rand(4, generator=generator)
    together = call(fn, batch)
    one_by_one = torch.cat(
        [call(fn, {key: value[i : i + 1] for key, value in batch.items()}) for i in range(4)]
    )
    assert together.shape == (4,)
    assert_close(together, one_by_one)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("hyperparameters", "key"),
    [
        ({"eta": 0.005, "tau": 0.005}, "tau"),  # τ = η: τ/η = 1 is outside [0, 1)
        ({"eta": 0.005, "tau": 0.01}, "tau"),  # τ > η
        ({"eta": 0.005, "tau": -0.001}, "tau"),  # τ < 0
        ({"eta": 0.0, "tau": 0.0}, "eta"),
        ({"eta": -0.1, "tau": 0.0}, "eta"),
    ],
)
def test_inpo_rejects_out_of_range_eta_tau(hyperparameters, key):
    """Out-of-range η, τ fail both when binding and when calling inpo directly."""
    with pytest.raises(NashalignError, match=f"'{key}'"):
        make_loss("inpo", **hyperparameters)
    batch = {name: t(-1.0) for name in loss_inputs(inpo)}
    with pytest.raises(NashalignError, match=f"'{key}'"):
        inpo(**batch, **hyperparameters)


def test_inpo_error_states_the_allowed_range():
    with pytest.raises(NashalignError, match=r"0 <= tau/eta < 1"):
        make_loss("inpo", eta=0.005, tau=0.005)


@pytest.mark.parametrize("label_smoothing", [0.5, 0.7, -0.1, float("nan")])
@pytest.mark.parametrize("robust", [False, True])
def test_label_smoothing_out_of_range(label_smoothing, robust):
    with pytest.raises(NashalignError, match="'label_smoothing'"):
        make_loss("dpo", beta=0.1, label_smoothing=label_smoothing, robust=robust)


@pytest.mark.parametrize(
    ("name", "hyperparameters", "key"),
    [
        ("dpo", {"beta": 0.0}, "beta"),
        ("dpo", {"beta": -1.0}, "beta"),
        ("dpo", {"beta": "0.1"}, "beta"),
        ("dpo", {"beta": True}, "beta"),
        ("dpo", {"beta": float("inf")}, "beta"),
        ("dpo", {"beta": 0.1, "robust": "yes"}, "robust"),
        ("ipo", {"beta": 0.0}, "beta"),
        ("ipo", {"beta": 0.1, "average_log_probs": 1}, "average_log_probs"),
        ("sppo", {"beta": -0.5}, "beta"),
        ("inpo", {"eta": "0.005", "tau": 0.0}, "eta"),
        ("dpo", {"beta": 0.1, "sft_weight": -1.0}, "sft_weight"),
        ("dpo", {"beta": 0.1, "sft_weight": "1"}, "sft_weight"),
        ("inpo-optimistic", {"eta": 0.1, "tau": 0.1}, "tau"),
        ("inpo-optimistic-aux", {"eta": -0.1, "tau": 0.0}, "eta"),
        ("online-ipo", {"tau": 0.0}, "tau"),
        ("nash-md", {"tau": -0.1}, "tau"),
        ("nash-md", {"tau": float("nan")}, "tau"),
        ("ipo", {"beta": 0.1, "sft_weight": float("nan")}, "sft_weight"),
    ],
)
def test_out_of_range_or_mistyped_hyperparameters(name, hyperparameters, key):
    with pytest.raises(NashalignError, match=f"'{key}'"):
        make_loss(name, **hyperparameters)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(NashalignError, match="'dop'") as error:
        make_loss("dop", beta=0.1)
    for name in LOSSES:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("name", "hyperparameters", "unknown", "allowed"),
    [
        ("dpo", {"beta": 0.1, "gamma": 1.0}, "gamma", ["beta", "label_smoothing", "robust", "sft_weight"]),
        ("inpo", {"eta": 0.005, "tau": 0.001, "beta": 0.1}, "beta", ["eta", "tau", "sft_weight"]),
        ("sft", {"sft_weight": 1.0}, "sft_weight", ["none"]),
        ("nash-md", {"tau": 0.1, "sft_weight": 1.0}, "sft_weight", ["tau"]),
        ("dpo", {"beta": 0.1, "policy_chosen_logps": t(0.0)}, "policy_chosen_logps", ["beta"]),
    ],
)
def test_unknown_hyperparameter_lists_the_allowed_ones(name, hyperparameters, unknown, allowed):
    """A tensor input is not a hyperparameter, and sft (no hyperparameters) takes no sft_weight."""
    with pytest.raises(NashalignError, match=f"unknown hyperparameter '{unknown}'") as error:
        make_loss(name, **hyperparameters)
    for key in allowed:
        assert key in str(error.value)


@pytest.mark.parametrize(
    ("name", "missing"), [("dpo", "beta"), ("ipo", "beta"), ("sppo", "beta"), ("inpo", "eta")]
)
def test_missing_hyperparameter(name, missing):
    with pytest.raises(NashalignError, match=f"missing hyperparameter '{missing}'"):
        make_loss(name)


def test_inpo_missing_tau_is_named():
    with pytest.raises(NashalignError, match="missing hyperparameter 'tau'"):
        make_loss("inpo", eta=0.005)


# ---------------------------------------------------------------- make_loss, loss_inputs, sft composition


def test_make_loss_binds_with_partial():
    """make_loss returns a functools.partial of the LOSSES entry with exactly the given hyperparameters."""
    fn = make_loss("inpo", eta=0.005, tau=0.001)
    assert isinstance(fn, functools.partial)
    assert fn.func is LOSSES["inpo"] is inpo
    assert fn.keywords == {"eta": 0.005, "tau": 0.001}
    batch = {name: t(-float(i)) for i, name in enumerate(loss_inputs(fn))}
    assert_close(fn(**batch), inpo(**batch, eta=0.005, tau=0.001))


def test_loss_inputs():
    """The tensor inputs each bound loss reads, in contract order; summed IPO does not read lengths."""
    pair = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    assert loss_inputs(make_loss("inpo", eta=1.0, tau=0.0)) == (
        *pair,
        "prev_chosen_logps",
        "prev_rejected_logps",
    )
    assert loss_inputs(make_loss("dpo", beta=0.1, robust=True)) == pair
    assert loss_inputs(make_loss("ipo", beta=0.1)) == (*pair, "chosen_lengths", "rejected_lengths")
    assert loss_inputs(make_loss("ipo", beta=0.1, average_log_probs=False)) == pair
    assert loss_inputs(make_loss("sppo", beta=0.1)) == (*pair, "chosen_win_rate", "rejected_win_rate")
    assert loss_inputs(make_loss("sft")) == ("policy_chosen_logps", "chosen_lengths")
    assert loss_inputs(make_loss("dpo", beta=0.1, sft_weight=1.0)) == (*pair, "chosen_lengths")
    assert loss_inputs(make_loss("ipo", beta=0.1, sft_weight=1.0)) == (
        *pair,
        "chosen_lengths",
        "rejected_lengths",
    )
    assert loss_inputs(ipo) == (*pair, "chosen_lengths", "rejected_lengths")
    optimistic = (*pair, "prev_chosen_logps", "prev_rejected_logps", "aux_chosen_logps", "aux_rejected_logps")
    assert loss_inputs(make_loss("inpo-optimistic", eta=1.0, tau=0.1)) == optimistic
    assert loss_inputs(make_loss("inpo-optimistic-aux", eta=1.0, tau=0.1)) == optimistic
    assert loss_inputs(make_loss("online-ipo", tau=0.1)) == pair
    assert loss_inputs(make_loss("nash-md", tau=0.1)) == ("policy_logps", "ref_logps", "mixture_win_rate")
    for name in TENSOR_INPUTS:
        assert any(name in loss_inputs(fn) for fn in LOSSES.values()), name


def test_summed_ipo_ignores_lengths_even_if_given():
    fn = make_loss("ipo", beta=0.25, average_log_probs=False)
    with_lengths = fn(**IPO_INPUTS, chosen_lengths=t(4.0), rejected_lengths=t(7.0))
    assert_close(with_lengths, fn(**IPO_INPUTS))


def test_zero_sft_weight_is_the_pure_pairwise_loss():
    fn = make_loss("dpo", beta=0.1, sft_weight=0.0)
    assert fn.func is dpo and fn.keywords == {"beta": 0.1}


@PROPERTY_SETTINGS
@given(batch=pair_batches(), weight=st.floats(min_value=0.01, max_value=10.0))
def test_sft_composes_with_every_pairwise_loss(batch, weight):
    """make_loss(name, sft_weight=w) = pairwise + w·sft per example, for values and gradients."""
    for name, hyperparameters in [
        ("inpo", {"eta": 0.1, "tau": 0.02}),
        ("dpo", {"beta": 0.1, "label_smoothing": 0.1}),
        ("ipo", {"beta": 0.1}),
        ("sppo", {"beta": 0.1}),
    ]:
        pairwise = make_loss(name, **hyperparameters)
        composed = make_loss(name, sft_weight=weight, **hyperparameters)
        assert loss_inputs(with_sft(pairwise, weight)) == loss_inputs(composed)
        leaves = {key: value.clone().requires_grad_() for key, value in batch.items()}
        total = call(composed, leaves)
        sft_part = sft(
            policy_chosen_logps=batch["policy_chosen_logps"], chosen_lengths=batch["chosen_lengths"]
        )
        assert_close(total, call(pairwise, batch) + weight * sft_part, msg=name)
        total.sum().backward()
        plain = {key: value.clone().requires_grad_() for key, value in batch.items()}
        call(pairwise, plain).sum().backward()
        expected_grad = plain["policy_chosen_logps"].grad - weight / batch["chosen_lengths"]
        assert_close(leaves["policy_chosen_logps"].grad, expected_grad, msg=name)


def test_loss_hyperparameters():
    """The accepted hyperparameters per loss; every combination of them binds (defaults filled in)."""
    assert loss_hyperparameters("inpo") == ("eta", "tau", "sft_weight")
    assert loss_hyperparameters("dpo") == ("beta", "label_smoothing", "robust", "sft_weight")
    assert loss_hyperparameters("ipo") == ("beta", "average_log_probs", "sft_weight")
    assert loss_hyperparameters("sppo") == ("beta", "sft_weight")
    assert loss_hyperparameters("srpo") == ("beta", "alpha", "sft_weight")
    assert loss_hyperparameters("sparsepo") == ("beta", "lambda_u", "lambda_d", "sft_weight")
    assert loss_hyperparameters("sft") == ()
    assert loss_hyperparameters("inpo-optimistic") == ("eta", "tau", "sft_weight")
    assert loss_hyperparameters("inpo-optimistic-aux") == ("eta", "tau", "sft_weight")
    assert loss_hyperparameters("online-ipo") == ("tau", "sft_weight")
    assert loss_hyperparameters("nash-md") == ("tau",)
    assert WITHOUT_SFT == {"sft", "nash-md"}
    with pytest.raises(NashalignError, match="unknown loss 'rlhf'"):
        loss_hyperparameters("rlhf")
    flat_config = {
        "beta": 0.1,
        "label_smoothing": 0.1,
        "robust": True,
        "average_log_probs": False,
        "eta": 0.005,
        "tau": 0.001,
        "sft_weight": 0.0,
        "alpha": 0.8,
        "lambda_u": 0.001,
        "lambda_d": 0.001,
    }
    for name in LOSSES:
        fn = make_loss(name, **{key: flat_config[key] for key in loss_hyperparameters(name)})
        assert isinstance(fn, functools.partial)


# ---------------------------------------------------------------- srpo


def srpo_batch(h: dict[str, float], ref: float = -7.0) -> dict[str, torch.Tensor]:
    """srpo inputs with log π − log π_ref = h[name] for each of the six sequences (ref log-probs `ref`)."""
    batch = {}
    for name, value in h.items():
        batch[f"ref_{name}_logps"] = t(ref)
        batch[f"policy_{name}_logps"] = t(ref + value)
    return batch


SRPO_H = {"chosen": 1.0, "rejected": -1.0, "chosen_given_rejected": 2.0, "rejected_given_rejected": 0.0,
          "chosen_given_chosen": 0.5, "rejected_given_chosen": -0.5}


def test_srpo_hand_values():
    """β = 0.5, α = 0.25, h(y_w|x) = 1, h(y_l|x) = −1, h(y_w|T(x,y_l)) = 2, h(y_l|T(x,y_l)) = 0,
    h(y_w|T(x,y_w)) = 0.5, h(y_l|T(x,y_w)) = −0.5:

        L_SI  = (½ − 0.5·(2 − 0))² + (½ − 0.5·(0.5 + 0.5))² = 0.25 + 0 = 0.25
        L_gen = (0.5·(2 + 1 + 0.5 + 1) − 1)² = 1.25² = 1.5625
        L     = 0.25·0.25 + 0.75·1.5625 = 1.234375

    All h = 0 (policy = reference): L_SI = ¼ + ¼, L_gen = 1, L = 0.25·0.5 + 0.75 = 0.875.
    """
    assert_close(srpo(**srpo_batch(SRPO_H), beta=0.5, alpha=0.25), t(1.234375))
    assert_close(srpo(**srpo_batch(dict.fromkeys(SRPO_H, 0.0)), beta=0.5, alpha=0.25), t(0.875))
    assert_close(make_loss("srpo", beta=0.5)(**srpo_batch(dict.fromkeys(SRPO_H, 0.0))), t(0.8 * 0.5 + 0.2))


@PROPERTY_SETTINGS
@given(batch=pair_batches(), beta=beta_values, change=shift)
def test_srpo_alpha_zero_depends_only_on_the_generative_term(batch, beta, change):
    """α = 0: the loss is (β[h(y_w|T(x,y_l)) + h(y_w|x) − h(y_l|T(x,y_w)) − h(y_l|x)] − 1)²; changing
    the two sequences only L_SI reads (y_l | T(x,y_l)) and (y_w | T(x,y_w)) changes nothing, and their
    gradients are 0. α = 1 is the mirror image: the x-conditioned sequences drop out."""
    fn = make_loss("srpo", beta=beta, alpha=0.0)

    def h(name):
        return batch[f"policy_{name}_logps"] - batch[f"ref_{name}_logps"]

    generative = (beta * (h("chosen_given_rejected") + h("chosen") - h("rejected_given_chosen") - h("rejected")) - 1) ** 2
    assert_close(call(fn, batch), generative)
    moved = dict(batch)
    for name in ("policy_rejected_given_rejected_logps", "policy_chosen_given_chosen_logps"):
        moved[name] = batch[name] + change
    assert_close(call(fn, moved), call(fn, batch))
    leaves = {key: value.clone().requires_grad_() for key, value in batch.items()}
    call(fn, leaves).sum().backward()
    for name in ("policy_rejected_given_rejected_logps", "policy_chosen_given_chosen_logps"):
        assert_close(leaves[name].grad, torch.zeros_like(batch[name]))
    self_improvement = make_loss("srpo", beta=beta, alpha=1.0)
    for name in ("policy_chosen_logps", "policy_rejected_logps"):
        moved = {**batch, name: batch[name] + change}
        assert_close(call(self_improvement, moved), call(self_improvement, batch))


@PROPERTY_SETTINGS
@given(beta=beta_values, alpha=st.floats(0.0, 1.0), free=st.lists(shift, min_size=3, max_size=3))
def test_srpo_is_zero_at_the_closed_form_optimum(beta, alpha, free):
    """The optimum π†(y'|y,x) ∝ π_ref·exp(p(y' ≻ y)/β) with p(y_w ≻ y_l) = 1 gives
    β[h(y_w|T(x,y)) − h(y_l|T(x,y))] = ½ for y = y_l and y = y_w, and the robust generator
    β[h(y_w|x) − h(y_l|x)] = 1 + β[h(y_l|T(x,y_w)) − h(y_w|T(x,y_l))]: any h satisfying the three
    (three free values) has loss 0 for every α."""
    a, b, c = free
    h = {"rejected_given_rejected": a, "chosen_given_rejected": a + 1 / (2 * beta),
         "rejected_given_chosen": b, "chosen_given_chosen": b + 1 / (2 * beta), "rejected": c}
    h["chosen"] = c + 1 / beta + h["rejected_given_chosen"] - h["chosen_given_rejected"]
    assert_close(srpo(**srpo_batch(h), beta=beta, alpha=alpha), t(0.0), atol=1e-9, rtol=0)


def test_srpo_rejects_alpha_outside_the_unit_interval():
    for alpha in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(NashalignError, match="'alpha'"):
            make_loss("srpo", beta=0.1, alpha=alpha)


# ---------------------------------------------------------------- sparsepo


def test_sparsepo_hand_values():
    """One pair, T = 3 (last position outside the response), β = 2, λ_u = 0.1, λ_d = 0.01:

        chosen:   u = (0.5, −0.2), m_u = (1, 0.5)  → U_c = 0.5 − 0.1 = 0.4
                  d = (−0.1, −0.3), m_d = (1, 1)   → D_c = −0.4
        rejected: u = (−0.4, 0.6), m_u = (0.5, 0.5) → U_r = −0.2 + 0.3 = 0.1
                  d = (−0.2, −0.2), m_d = (0.5, 0) → D_r = −0.1
        z = β[(U_c − U_r) − (D_c − D_r)] = 2·(0.3 + 0.3) = 1.2
        loss = log(1 + e^−1.2) + 0.1·(1.5 + 1.0) + 0.01·(2 + 0.5) = log(1 + e^−1.2) + 0.275
    """
    inputs = {
        "chosen_token_log_ratios": [[0.5, -0.2, 0.0]], "chosen_reward_weights": [[1.0, 0.5, 0.0]],
        "chosen_token_kl_terms": [[-0.1, -0.3, 0.0]], "chosen_kl_weights": [[1.0, 1.0, 0.0]],
        "rejected_token_log_ratios": [[-0.4, 0.6, 0.0]], "rejected_reward_weights": [[0.5, 0.5, 0.0]],
        "rejected_token_kl_terms": [[-0.2, -0.2, 0.0]], "rejected_kl_weights": [[0.5, 0.0, 0.0]],
    }
    inputs = {key: torch.tensor(value, dtype=torch.float64) for key, value in inputs.items()}
    expected = math.log1p(math.exp(-1.2)) + 0.275
    assert_close(sparsepo(**inputs, beta=2.0, lambda_u=0.1, lambda_d=0.01), t(expected))
    fn = make_loss("sparsepo", beta=2.0, lambda_u=0.1, lambda_d=0.01)
    assert loss_inputs(fn) == TOKEN_INPUTS
    assert_close(fn(**inputs), t(expected))


@PROPERTY_SETTINGS
@given(beta=beta_values, seed=st.integers(0, 2**16))
def test_sparsepo_with_unit_reward_mask_and_no_divergence_term_is_dpo(beta, seed):
    """m_u = 1 on the response, m_d = 0, λ_u = λ_d = 0: U = Σ_t u_t = (π − ref) summed, so sparsepo is
    DPO exactly, whatever d_t is (random token log-probs, random response masks, float64)."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 6)
    response = torch.rand(shape, generator=g) < 0.7
    response[:, 0] = True
    token = {f"{model}_{side}": -5 * torch.rand(shape, generator=g, dtype=torch.float64) * response
             for model in ("policy", "ref") for side in ("chosen", "rejected")}
    inputs = {}
    for side in ("chosen", "rejected"):
        inputs[f"{side}_token_log_ratios"] = token[f"policy_{side}"] - token[f"ref_{side}"]
        inputs[f"{side}_reward_weights"] = response.double()
        inputs[f"{side}_token_kl_terms"] = -torch.rand(shape, generator=g, dtype=torch.float64) * response
        inputs[f"{side}_kl_weights"] = torch.zeros(shape, dtype=torch.float64)
    expected = dpo(**{f"{model}_{side}_logps": token[f"{model}_{side}"].sum(-1)
                      for model in ("policy", "ref") for side in ("chosen", "rejected")}, beta=beta)
    assert_close(sparsepo(**inputs, beta=beta, lambda_u=0.0, lambda_d=0.0), expected, rtol=1e-12, atol=1e-12)


def test_sparsepo_gradient_reaches_tokens_in_proportion_to_their_mask():
    """dL/du_t = −β·σ(−z)·m_u,t for the chosen response: a token with mask 0 gets no gradient, one
    with mask 0.5 half of what a mask-1 token gets; the divergence term enters with the opposite sign."""
    inputs = {name: torch.zeros(1, 3, dtype=torch.float64) for name in TOKEN_INPUTS}
    inputs["chosen_reward_weights"] = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    inputs["chosen_kl_weights"] = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    ratios = inputs["chosen_token_log_ratios"].requires_grad_()
    terms = inputs["chosen_token_kl_terms"].requires_grad_()
    sparsepo(**inputs, beta=0.5, lambda_u=0.0, lambda_d=0.0).sum().backward()
    assert_close(ratios.grad, torch.tensor([[-0.25, -0.125, 0.0]], dtype=torch.float64))  # −β·σ(0)·m_u
    assert_close(terms.grad, torch.tensor([[0.0, 0.25, 0.0]], dtype=torch.float64))


def test_sparsepo_rejects_negative_lambdas():
    for key in ("lambda_u", "lambda_d"):
        with pytest.raises(NashalignError, match=f"'{key}'"):
            make_loss("sparsepo", beta=0.1, **{key: -0.001})
