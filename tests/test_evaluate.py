"""Evaluation numbers against hand-derived values, an independent fit, simulation and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from nashalign import NashalignError
from nashalign.eval.metrics import (
    exact_duality_gap_of_lm,
    idealized_ranking_accuracy,
    kl_from_samples,
    length_controlled_win_rate,
    length_stats,
    lm_response_distribution,
    ranking_accuracy,
    win_rate,
)

ROCK_PAPER_SCISSORS = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])

# ---------------------------------------------------------------------------------------------------
# Win rate


def test_win_rate_point_estimate_and_interval():
    """estimate = mean of (1, 0, ½, 1, 0.8) = 3.3/5 = 0.66; every resampled mean lies in [0, 1] and
    the percentile interval brackets the estimate; the same seed gives the same interval."""
    result = win_rate([1, 0, 0.5, 1, 0.8], n_bootstrap=500, seed=3)
    assert result.estimate == pytest.approx(0.66)
    assert 0 <= result.low <= result.estimate <= result.high <= 1
    assert result.n == 5 and result.confidence == 0.95
    assert win_rate([1, 0, 0.5, 1, 0.8], n_bootstrap=500, seed=3) == result
    assert win_rate([1, 0], n_bootstrap=0).low is None


def test_win_rate_bootstrap_interval_width_matches_normal_theory():
    """For N = 400 Bernoulli(½) judgments the 95% interval's width is ≈ 2·1.96·sqrt(¼/400) = 0.098."""
    rng = np.random.default_rng(0)
    result = win_rate(rng.integers(0, 2, 400).astype(float), n_bootstrap=2000, seed=1)
    expected = 2 * 1.96 * math.sqrt(result.estimate * (1 - result.estimate) / 400)
    assert result.high - result.low == pytest.approx(expected, rel=0.1)


def test_bootstrap_interval_covers_true_win_rate():
    """100 simulated evaluations of 150 prompts: each prompt's true P(policy ≻ baseline) is
    q_i ~ Beta(2, 3) (mean 0.4) and the judge returns a Bernoulli(q_i) verdict. The true win rate
    is 0.4; the 95% percentile interval must contain it in at least 90 of the 100 runs."""
    covered = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        judgments = (rng.random(150) < rng.beta(2.0, 3.0, 150)).astype(float)
        result = win_rate(judgments, n_bootstrap=1000, seed=seed)
        covered += result.low <= 0.4 <= result.high
    assert covered >= 90


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        ([0.5, 1.2], r"probs\[1\] = 1.2 is outside \[0, 1\]"),
        ([], "probs is empty"),
        ([0.1, math.nan], r"probs\[1\]"),
    ],
)
def test_win_rate_rejects_bad_input(probs, message):
    with pytest.raises(NashalignError, match=message):
        win_rate(probs)


def test_win_rate_rejects_bad_confidence():
    with pytest.raises(NashalignError, match="confidence"):
        win_rate([1.0], confidence=95)


# ---------------------------------------------------------------------------------------------------
# Length-controlled win rate


def test_length_controlled_two_group_hand_case():
    """Δ = +10 on five prompts judged (1,1,1,1,0) and Δ = −10 on two judged (1,0). tanh(Δ/sd) takes
    two values ±c, the two-parameter model is saturated: σ(a + bc) = 0.8, σ(a − bc) = 0.5, so
    a = (logit 0.8 + logit 0.5)/2 = (ln 4)/2 = ln 2 and LC = σ(ln 2) = 2/3 (raw: 5/7).
    l2 = 1e-12 is the plain maximum-likelihood fit here (the data are not separated)."""
    result = length_controlled_win_rate(
        [1, 1, 1, 1, 0, 1, 0], [10] * 7, [0] * 5 + [20] * 2, l2=1e-12, n_bootstrap=0
    )
    assert result.estimate == pytest.approx(2 / 3, abs=1e-8)
    assert result.intercept == pytest.approx(math.log(2), abs=1e-7)
    assert result.raw == pytest.approx(5 / 7)
    deltas = np.array([10] * 5 + [-10] * 2)
    c = math.tanh(10 / deltas.std(ddof=1))
    assert result.slope * c == pytest.approx((math.log(4) - 0) / 2, abs=1e-7)  # (logit .8 − logit .5)/2
    assert result.length_scale == pytest.approx(deltas.std(ddof=1))
    assert result.low is None


def test_length_controlled_matches_independent_scipy_fit():
    """On a 12-row table with soft judgments the fit equals scipy's minimization of the same
    objective: mean[softplus(a + b·f) − y·(a + b·f)] + ½·l2·b², f = tanh(Δ / sd(Δ, ddof=1))."""
    from scipy.optimize import minimize

    y = np.array([1, 1, 0.5, 0, 1, 0.9, 0.2, 1, 0, 0.7, 1, 0.4])
    policy = np.array([120, 340, 80, 60, 500, 210, 90, 300, 150, 260, 410, 100], dtype=float)
    baseline = np.array([100, 200, 150, 90, 220, 230, 70, 180, 200, 250, 260, 130], dtype=float)
    l2 = 1e-3
    f = np.tanh((policy - baseline) / np.std(policy - baseline, ddof=1))

    def objective(theta):
        z = theta[0] + theta[1] * f
        return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * theta[1] ** 2

    expected = minimize(objective, x0=[0.0, 0.0], method="BFGS", options={"gtol": 1e-12}).x
    result = length_controlled_win_rate(y, policy, baseline, l2=l2, n_bootstrap=0)
    assert_allclose([result.intercept, result.slope], expected, atol=1e-6)
    assert result.estimate == pytest.approx(1 / (1 + math.exp(-expected[0])), abs=1e-6)
    assert result.slope > 0  # longer policy answers win more often in this table


judgment_lists = st.lists(st.sampled_from([0.0, 0.5, 1.0, 0.2, 0.9]), min_size=2, max_size=30)


@settings(max_examples=40, deadline=None)
@given(judgments=judgment_lists, policy_length=st.integers(1, 500), baseline_length=st.integers(1, 500))
def test_length_controlled_equals_raw_when_length_differences_are_constant(
    judgments, policy_length, baseline_length
):
    """Equal lengths (or a constant difference): sd(Δ) = 0, the feature is 0 and LC = raw exactly."""
    n = len(judgments)
    result = length_controlled_win_rate(judgments, [policy_length] * n, [baseline_length] * n, n_bootstrap=0)
    assert result.estimate == result.raw
    assert result.raw == pytest.approx(np.mean(judgments))
    assert result.slope == 0.0


@settings(max_examples=30, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.sampled_from([0.0, 0.5, 1.0, 0.3]), st.integers(1, 400), st.integers(1, 400)),
        min_size=3,
        max_size=25,
    ),
    unit=st.sampled_from([0.25, 3.0, 7.5]),
)
def test_length_controlled_symmetries(data, unit):
    """Changing the length unit changes nothing (only Δ/sd enters); swapping policy and baseline
    (y → 1 − y, Δ → −Δ) maps (a, b) to (−a, −b) and LC to 1 − LC."""
    y = np.array([d[0] for d in data])
    policy = np.array([d[1] for d in data], dtype=float)
    baseline = np.array([d[2] for d in data], dtype=float)
    base = length_controlled_win_rate(y, policy, baseline, n_bootstrap=0)
    scaled = length_controlled_win_rate(y, unit * policy, unit * baseline, n_bootstrap=0)
    swapped = length_controlled_win_rate(1 - y, baseline, policy, n_bootstrap=0)
    assert scaled.estimate == pytest.approx(base.estimate, abs=1e-7)
    assert swapped.estimate == pytest.approx(1 - base.estimate, abs=1e-7)
    assert 0 <= base.estimate <= 1


def test_length_controlled_removes_a_pure_length_bias():
    """Simulated judge with no quality difference (intercept 0) that prefers the longer answer:
    P = σ(1.5·tanh(Δ/sd)), with Δ skewed positive (the policy is longer). The raw win rate is
    inflated well above ½; LC recovers ½ within its interval; the fitted slope ≈ 1.5."""
    rng = np.random.default_rng(0)
    delta = rng.normal(80.0, 100.0, 3000)
    f = np.tanh(delta / delta.std(ddof=1))
    judgments = (rng.random(3000) < 1 / (1 + np.exp(-1.5 * f))).astype(float)
    result = length_controlled_win_rate(judgments, 300 + delta, np.full(3000, 300.0), n_bootstrap=200, seed=0)
    assert result.raw > 0.6
    assert result.low <= 0.5 <= result.high
    assert result.slope == pytest.approx(1.5, abs=0.2)


def test_length_controlled_all_wins_and_separated_data():
    """All judgments 1: LC = 1 (σ(a) → 1). Judgments separated by length: the ridge keeps the fit
    finite, and LC lies strictly inside (0, 1)."""
    assert length_controlled_win_rate([1, 1, 1], [5, 9, 2], [3, 3, 3], n_bootstrap=0).estimate == 1.0
    separated = length_controlled_win_rate([1, 1, 0, 0], [5, 6, 1, 2], [3, 3, 3, 3], n_bootstrap=50)
    assert 0 < separated.estimate < 1 and math.isfinite(separated.slope) and separated.slope > 0


def test_length_controlled_rejects_bad_input():
    with pytest.raises(NashalignError, match="policy_lengths has 2"):
        length_controlled_win_rate([1, 0, 1], [1, 2], [1, 2, 3])
    with pytest.raises(NashalignError, match="l2"):
        length_controlled_win_rate([1, 0], [1, 2], [1, 2], l2=0)
    with pytest.raises(NashalignError, match=r"judgments\[0\]"):
        length_controlled_win_rate([2, 0], [1, 2], [1, 2])


# ---------------------------------------------------------------------------------------------------
# Ranking accuracy


def test_ranking_accuracy_hand_values():
    """Four pairs (chosen, rejected) log-probs, lengths and reference log-probs:
    summed:     −1>−2 ✓, −5>−4 ✗, −3=−3 ½, −2>−6 ✓                         → 2.5/4 = 0.625
    per token:  −1/1>−2/4 ✗, −5/5>−4/2 ✓, −3/3>−3/1 ✓, −2/2>−6/3 ✓ (−1>−2)     → 3/4  = 0.75
    reward:     (−1+0.5)−(−2+1)=0.5 ✓, (−5+7)−(−4+3)=3 ✓, (−3+2)−(−3+4)=−2 ✗, (−2+1)−(−6+1)=4 ✓
                → 3/4 = 0.75; with ref_rejected[0] = −3 the first margin is −0.5 − 1 = −1.5 ✗ → 0.5."""
    chosen, rejected = [-1.0, -5.0, -3.0, -2.0], [-2.0, -4.0, -3.0, -6.0]
    result = ranking_accuracy(
        chosen,
        rejected,
        ref_chosen_logps=[-0.5, -7.0, -2.0, -1.0],
        ref_rejected_logps=[-1.0, -3.0, -4.0, -1.0],
        chosen_lengths=[1, 5, 3, 2],
        rejected_lengths=[4, 2, 1, 3],
    )
    assert (result.summed, result.length_normalized, result.reward, result.n) == (0.625, 0.75, 0.75, 4)
    lower = ranking_accuracy(
        torch.tensor(chosen), torch.tensor(rejected), [-0.5, -7.0, -2.0, -1.0], [-3.0, -3.0, -4.0, -1.0]
    )
    assert (lower.summed, lower.length_normalized, lower.reward) == (0.625, None, 0.5)


def test_ranking_accuracy_rejects_bad_input():
    with pytest.raises(NashalignError, match="both chosen_lengths and rejected_lengths"):
        ranking_accuracy([1.0], [0.0], chosen_lengths=[1])
    with pytest.raises(NashalignError, match=r"rejected_lengths\[0\] = 0"):
        ranking_accuracy([1.0], [0.0], chosen_lengths=[1], rejected_lengths=[0])
    with pytest.raises(NashalignError, match="rejected_logps has 1"):
        ranking_accuracy([1.0, 2.0], [0.0])


def test_idealized_ranking_accuracy_hand_values():
    """β = 0.1; margin = Δref + logit(p)/β (Chen et al. 2024, idealized ranking accuracy):
    Δref = −1,  p = 0.75: −1 + ln 3/0.1 = 9.99 > 0 ✓
    Δref = −1,  p = 0.51: −1 + ln(51/49)/0.1 = −1 + 0.400 = −0.60 ✗
    Δref = 2,   p = 0.4:  2 + ln(2/3)/0.1 = 2 − 4.055 = −2.05 ✗
    Δref = 0,   p = 0.5:  0 → ½
    Δref = −30, p = 0.99: −30 + ln 99/0.1 = 15.95 ✓          → 2.5/5 = 0.5
    Equivalent threshold form for the second pair: π_ref ratio e^{−1} = 0.368 < (0.49/0.51)^{10} = 0.670."""
    ref_chosen = [-3.0, -3.0, -1.0, -2.0, -40.0]
    ref_rejected = [-2.0, -2.0, -3.0, -2.0, -10.0]
    p = [0.75, 0.51, 0.4, 0.5, 0.99]
    assert idealized_ranking_accuracy(ref_chosen, ref_rejected, p, beta=0.1) == 0.5
    assert math.exp(-1) < (0.49 / 0.51) ** 10
    # β → ∞: π* = π_ref, so only the reference's ranking counts: ✗ ✗ ✓ ½ ✗
    assert idealized_ranking_accuracy(ref_chosen, ref_rejected, p, beta=1e9) == 1.5 / 5
    # β → 0: only the true preference counts: ✓ ✓ ✗ ½ ✓
    assert idealized_ranking_accuracy(ref_chosen, ref_rejected, p, beta=1e-6) == 3.5 / 5
    # A hard label p = 1 has logit +∞: the DPO optimum ranks the pair correctly whatever π_ref says.
    assert idealized_ranking_accuracy([-1000.0], [0.0], [1.0], beta=1.0) == 1.0
    assert idealized_ranking_accuracy([0.0], [-1000.0], [0.0], beta=1.0) == 0.0
    with pytest.raises(NashalignError, match="beta"):
        idealized_ranking_accuracy(ref_chosen, ref_rejected, p, beta=0.0)


# ---------------------------------------------------------------------------------------------------
# KL and lengths


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_from_samples_matches_exact_categorical_kl(estimator):
    """π = (0.5, 0.3, 0.2), ρ = (0.2, 0.3, 0.5): KL(π‖ρ) = 0.5·ln 2.5 + 0.2·ln 0.4 = 0.3·ln 2.5
    = 0.27489. From 20,000 samples of π the estimate lies within 4 standard errors, and the standard
    error matches the exact one, sd_π(term)/√n, within 10%."""
    pi, rho = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    exact = 0.3 * math.log(2.5)
    assert exact == pytest.approx(float(np.sum(pi * np.log(pi / rho))))
    samples = np.random.default_rng(0).choice(3, size=20_000, p=pi)
    result = kl_from_samples(np.log(pi)[samples], np.log(rho)[samples], estimator=estimator)
    assert abs(result.estimate - exact) < 4 * result.stderr
    r = np.log(pi / rho)
    terms = r if estimator == "k1" else np.expm1(-r) + r
    assert float(np.sum(pi * terms)) == pytest.approx(exact)  # both estimators are unbiased
    true_sd = math.sqrt(float(np.sum(pi * (terms - exact) ** 2)))
    assert result.stderr == pytest.approx(true_sd / math.sqrt(20_000), rel=0.1)
    assert result.n == 20_000 and result.estimator == estimator


def test_kl_from_samples_edge_cases():
    same = kl_from_samples([-3.0, -1.0], [-3.0, -1.0])
    assert same.estimate == 0.0 and same.stderr == 0.0
    assert math.isnan(kl_from_samples([-1.0], [-2.0]).stderr)
    with pytest.raises(NashalignError, match="estimator"):
        kl_from_samples([-1.0], [-2.0], estimator="k2")


def test_length_stats_hand_values():
    """(1, 2, 3, 10): mean 4, sd sqrt((9 + 4 + 1 + 36)/4) = sqrt(12.5), median 2.5."""
    stats = length_stats([1, 2, 3, 10])
    assert (stats.mean, stats.min, stats.median, stats.max, stats.n) == (4.0, 1.0, 2.5, 10.0, 4)
    assert stats.std == pytest.approx(math.sqrt(12.5))
    with pytest.raises(NashalignError, match=r"lengths\[1\] = -2"):
        length_stats([1, -2])


# ---------------------------------------------------------------------------------------------------
# Exact duality gap of a language model


def test_exact_gap_of_uniform_lm_on_rock_paper_scissors_is_zero():
    """An LM that puts e^{−3}/3 on each of rock, paper, scissors renormalizes to uniform, the Nash
    policy of RPS with a uniform reference: gap 0; the covered mass is e^{−3}."""
    responses = ["rock", "paper", "scissors"]

    def score(prompt, candidates):
        assert prompt == "play" and candidates == responses
        return np.full(3, math.log(1 / 3) - 3.0)

    result = exact_duality_gap_of_lm(
        score, "play", responses, ROCK_PAPER_SCISSORS, np.full(3, 1 / 3), tau=0.5
    )
    assert result.gap == pytest.approx(0.0, abs=1e-12)
    assert_allclose(result.policy, np.full(3, 1 / 3))
    assert result.mass == pytest.approx(math.exp(-3.0))


def test_exact_gap_hand_value():
    """π = (½, ¼, ¼) on RPS, uniform ρ, τ = ½. Pπ = (0.5, 0.625, 0.375);
    2τ·log Σ ρ·e^{Pπ/τ} − 1 = log((e + e^{1.25} + e^{0.75})/3) − 1 = log(8.32562/3) − 1 = 0.020727;
    2τ·KL(π‖ρ) = ½·ln 1.5 + ½·ln 0.75 = 0.058892; gap = 0.079619."""
    responses = ["rock", "paper", "scissors"]
    result = exact_duality_gap_of_lm(
        lambda prompt, candidates: torch.log(torch.tensor([0.5, 0.25, 0.25])) - 1.0,
        "play",
        responses,
        ROCK_PAPER_SCISSORS,
        [1 / 3, 1 / 3, 1 / 3],
        tau=0.5,
    )
    assert_allclose(result.policy, [0.5, 0.25, 0.25])
    assert result.gap == pytest.approx(0.079619, abs=2e-6)


def test_exact_gap_of_a_tiny_language_model(tiny_model, tiny_tokenizer):
    """Scoring each allowed answer (plus EOS) with a tiny LM: the distribution is the softmax of the
    summed log-probs, the covered mass is below 1, and the gap against π_ref = the same LM is
    2τ·log Σ ρ·e^{Pρ/τ} − 1 ≥ 0 (KL term 0)."""
    responses = [" rock", " paper", " scissors"]

    def score(prompt, candidates):
        prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logps = []
        for text in candidates:
            answer = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [
                tiny_tokenizer.eos_token_id
            ]
            ids = torch.tensor([prompt_ids + answer])
            with torch.no_grad():
                token_logps = torch.log_softmax(tiny_model(ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            logps.append(float(token_logps[torch.arange(len(targets)), targets][-len(answer) :].sum()))
        return logps

    policy, mass = lm_response_distribution(score, "Rock beats", responses)
    logps = np.array(score("Rock beats", responses))
    assert_allclose(policy, np.exp(logps) / np.exp(logps).sum())
    assert mass == pytest.approx(float(np.exp(logps).sum())) and 0 < mass < 1
    result = exact_duality_gap_of_lm(score, "Rock beats", responses, ROCK_PAPER_SCISSORS, policy, tau=0.2)
    v = ROCK_PAPER_SCISSORS @ policy
    assert result.gap == pytest.approx(0.4 * math.log(np.sum(policy * np.exp(v / 0.2))) - 1.0, abs=1e-10)
    assert result.gap >= 0


def test_exact_gap_rejects_bad_input():
    responses = ["rock", "paper", "scissors"]
    with pytest.raises(NashalignError, match="3 log-probs for 2 responses"):
        exact_duality_gap_of_lm(
            lambda p, c: [0.0, 0.0, 0.0], "x", responses[:2], [[0.5, 0.5], [0.5, 0.5]], [0.5, 0.5], tau=0.1
        )
    with pytest.raises(NashalignError, match="P is 3 × 3 but there are 2 responses"):
        exact_duality_gap_of_lm(
            lambda p, c: [0.0, 0.0], "x", responses[:2], ROCK_PAPER_SCISSORS, None, tau=0.1
        )
    with pytest.raises(NashalignError, match="tau"):
        exact_duality_gap_of_lm(
            lambda p, c: [0.0, 0.0, 0.0], "x", responses, ROCK_PAPER_SCISSORS, None, tau=0
        )
