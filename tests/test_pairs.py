"""Pair construction: the tournament's comparison count and bracket logic, best-vs-worst, all pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nashalign import NashalignError
from nashalign.judges.oracles import GameOracle
from nashalign.judges.pairs import all_pairs, best_vs_worst, make_pairs, tournament

NAMES = [f"response {i}" for i in range(16)]


def _random_matrix(rng, n):
    upper = np.triu(rng.random((n, n)), 1)
    return upper + np.tril(1.0 - upper.T, -1) + 0.5 * np.eye(n)


class CallCounter:
    """Wraps an oracle and counts `prob` calls (one per batched round)."""

    def __init__(self, oracle):
        self.oracle, self.calls = oracle, 0
        self.counts = oracle.counts

    def prob(self, prompts, first, second):
        self.calls += 1
        return self.oracle.prob(prompts, first, second)


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_tournament_comparison_count(k):
    """Comparisons per prompt: K/2 first-round + (K/2 − 1) winners' bracket + (K/2 − 1) losers'
    bracket + 1 final = 3K/2 − 1, i.e. 2, 5, 11, 23 for K = 2, 4, 8, 16; the rounds of all prompts
    are batched: log2 K + 1 oracle calls."""
    rng = np.random.default_rng(k)
    oracle = CallCounter(GameOracle(NAMES, _random_matrix(rng, 16)))
    prompts = ["p0", "p1", "p2"]
    responses = [list(rng.choice(NAMES, size=k, replace=False)) for _ in prompts]
    result = tournament(oracle, prompts, responses, rng=rng)
    per_prompt = {2: 2, 4: 5, 8: 11, 16: 23}[k]
    assert oracle.counts.comparisons == 3 * per_prompt
    assert result.stats.comparisons == len(result.judgments) == 3 * per_prompt
    assert oracle.calls == int(math.log2(k)) + 1
    assert result.stats.kept + result.stats.dropped == 3 == result.stats.prompts


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["sample", "threshold"]), st.sampled_from([4, 8]))
def test_tournament_keeps_only_pairs_whose_winner_won(seed, decide, k):
    """For any preference matrix: y_w won every comparison it took part in (round one, the winners'
    bracket, the final) and y_l lost every one (round one, then advancing as the loser of each
    losers'-bracket match, then the final); each takes part in log2 K + 1 comparisons. A prompt
    without a pair lost or tied its final. In threshold mode each winner agrees with P > ½."""
    rng = np.random.default_rng(seed)
    P = _random_matrix(rng, 16)
    oracle = GameOracle(NAMES, P)
    prompts = [f"p{b}" for b in range(3)]
    responses = [list(rng.choice(NAMES, size=k, replace=False)) for _ in prompts]
    result = tournament(oracle, prompts, responses, decide=decide, rng=rng)
    kept = {pair.prompt_index: pair for pair in result.pairs}
    for b in range(3):
        trace = [j for j in result.judgments if j.prompt_index == b]
        assert len(trace) == 3 * k // 2 - 1
        for j in trace:
            assert j.winner_index in (j.first_index, j.second_index)
            index = [NAMES.index(responses[b][j.first_index]), NAMES.index(responses[b][j.second_index])]
            assert j.prob == pytest.approx(P[index[0], index[1]], abs=1e-12)
            if decide == "threshold":
                assert j.winner_index == (j.first_index if j.prob > 0.5 else j.second_index)
        final = trace[-1]
        if b in kept:
            pair = kept[b]
            assert (final.first_index, final.second_index) == (pair.chosen_index, pair.rejected_index)
            assert final.winner_index == pair.chosen_index
            assert (pair.chosen, pair.rejected) == (responses[b][pair.chosen_index], responses[b][pair.rejected_index])
            games_of_chosen = [j for j in trace if pair.chosen_index in (j.first_index, j.second_index)]
            games_of_rejected = [j for j in trace if pair.rejected_index in (j.first_index, j.second_index)]
            assert len(games_of_chosen) == len(games_of_rejected) == int(math.log2(k)) + 1
            assert all(j.winner_index == pair.chosen_index for j in games_of_chosen)
            assert all(j.winner_index != pair.rejected_index for j in games_of_rejected)
        else:
            assert final.winner_index == final.second_index
    assert result.stats.kept == len(kept) and result.stats.dropped_lost == 3 - len(kept)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_tournament_with_a_transitive_oracle_returns_best_and_worst(seed):
    """In a strict total order the best response wins all its matches (so it is y_w) and the worst
    loses round one and every losers'-bracket match (so it is y_l), and best beats worst in the final:
    with P ∈ {0, 1} (sample mode) or P = σ(s_i − s_j) (threshold mode) the pair is (best, worst)."""
    rng = np.random.default_rng(seed)
    scores = rng.permutation(16).astype(float)
    hard = GameOracle(NAMES, (scores[:, None] > scores[None, :]) + 0.5 * np.eye(16))
    soft = GameOracle(NAMES, 1.0 / (1.0 + np.exp(scores[None, :] - scores[:, None])))
    prompts = ["p0", "p1"]
    responses = [list(rng.choice(NAMES, size=8, replace=False)) for _ in prompts]
    for oracle, decide in ((hard, "sample"), (soft, "threshold")):
        result = tournament(oracle, prompts, responses, decide=decide, rng=rng)
        assert len(result.pairs) == 2
        for pair, group in zip(result.pairs, responses):
            group_scores = [scores[NAMES.index(text)] for text in group]
            assert pair.chosen_index == int(np.argmax(group_scores))
            assert pair.rejected_index == int(np.argmin(group_scores))


def test_tournament_threshold_ties_go_to_the_first_and_drop_the_pair():
    """All P = ½: in the winners' bracket the first of each match goes through (0 beats 1, 0 beats 2,
    0 beats 4: y_w = 0); round-one losers are 1, 3, 5, 7 and in the losers' bracket the second of
    each match goes through as the loser (3, 7, then 7): y_l = 7; the final (0, 7) ties, so the
    prompt is dropped as a tie."""
    oracle = GameOracle(NAMES[:8], np.full((8, 8), 0.5))
    result = tournament(oracle, ["p"], [NAMES[:8]], decide="threshold")
    assert result.pairs == [] and result.stats.dropped_tie == 1
    matches = [(j.first_index, j.second_index) for j in result.judgments]
    assert matches == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (4, 6), (1, 3), (5, 7), (0, 4), (3, 7), (0, 7)]


def test_tournament_drops_identical_texts_without_asking_the_judge():
    oracle = GameOracle(NAMES, np.full((16, 16), 0.5))
    result = tournament(oracle, ["p", "q"], [["same"] * 8, ["same"] * 8], rng=np.random.default_rng(0))
    assert result.stats.dropped_identical == 2 and result.pairs == []
    assert oracle.counts.comparisons == 22 and oracle.counts.judge_calls == 0


def test_tournament_win_rates_on_request():
    """With win_rates the kept pair's rates are mean_k≠i P(y_i ≻ y_k) over the K − 1 other samples,
    from 2(K − 1) = 14 more comparisons per kept pair."""
    rng = np.random.default_rng(3)
    oracle = GameOracle(NAMES[:8], (np.arange(8)[:, None] > np.arange(8)[None, :]) + 0.5 * np.eye(8))
    result = tournament(oracle, ["p"], [NAMES[:8]], rng=rng, win_rates=True)
    (pair,) = result.pairs
    assert (pair.chosen_index, pair.rejected_index) == (7, 0)
    assert pair.chosen_win_rate == pytest.approx(1.0) and pair.rejected_win_rate == pytest.approx(0.0)
    assert result.stats.comparisons == 11 + 14 == oracle.counts.comparisons
    rng = np.random.default_rng(4)
    P = _random_matrix(rng, 8)
    result = tournament(GameOracle(NAMES[:8], P), ["p"] * 20, [list(rng.permutation(NAMES[:8])) for _ in range(20)], rng=rng, win_rates=True)
    for pair in result.pairs:
        i, j = NAMES.index(pair.chosen), NAMES.index(pair.rejected)
        assert pair.chosen_win_rate == pytest.approx((P[i].sum() - 0.5) / 7)
        assert pair.rejected_win_rate == pytest.approx((P[j].sum() - 0.5) / 7)
    assert result.stats.comparisons == 20 * 11 + 14 * len(result.pairs)


def test_tournament_is_reproducible_from_the_seed():
    rng = np.random.default_rng(0)
    oracle = GameOracle(NAMES, _random_matrix(rng, 16))
    responses = [list(rng.choice(NAMES, size=8, replace=False)) for _ in range(10)]
    runs = [tournament(oracle, ["p"] * 10, responses, rng=np.random.default_rng(seed)) for seed in (5, 5, 6)]
    assert runs[0].pairs == runs[1].pairs and runs[0].judgments == runs[1].judgments
    assert [j.winner_index for j in runs[0].judgments] != [j.winner_index for j in runs[2].judgments]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda o: tournament(o, ["p"], [NAMES[:6]], rng=np.random.default_rng(0)), "K must be a power of two, got 6"),
        (lambda o: tournament(o, ["p", "q"], [NAMES[:4], NAMES[:2]], rng=np.random.default_rng(0)), "prompt 1 has 2 responses, prompt 0 has 4"),
        (lambda o: tournament(o, ["p"], [NAMES[:4]], decide="vote"), "pairs.decide: expected one of sample, threshold"),
        (lambda o: tournament(o, ["p"], [NAMES[:4]]), "needs a seeded numpy Generator"),
        (lambda o: all_pairs(o, ["p", "q"], [NAMES[:4]], decide="threshold"), "2 prompts but 1 groups"),
        (lambda o: best_vs_worst(o, ["p"], [NAMES[:1]]), "at least 2 responses per prompt, got 1"),
        (lambda o: best_vs_worst(o, ["p"], [NAMES[:3]], score="elo"), "pairs.score: expected one of borda, copeland"),
        (lambda o: best_vs_worst(o, ["p"], [NAMES[:3]], use_rewards=True), "needs an oracle that scores responses"),
        (lambda o: make_pairs("swiss", o, ["p"], [NAMES[:4]]), "pairs.method: expected one of tournament"),
    ],
)
def test_pair_construction_errors(call, message):
    with pytest.raises(NashalignError, match=message):
        call(GameOracle(NAMES, np.full((16, 16), 0.5)))


# --- best versus worst ------------------------------------------------------------------------------


def test_best_vs_worst_borda_on_rock_paper_scissors_plus_a_dud():
    """R, P, S beat each other in a cycle (prob 1) and all beat D. Borda Σ_j≠i P(i ≻ j): R = 0 + 1 + 1
    = 2, likewise P and S, D = 0; the tie among R, P, S goes to the lowest index: (R, D), with win
    rates 2/3 and 0; all K(K−1)/2 = 6 pairs are judged in one call."""
    names = ["rock", "paper", "scissors", "dud"]
    P = [[0.5, 0, 1, 1], [1, 0.5, 0, 1], [0, 1, 0.5, 1], [0, 0, 0, 0.5]]
    oracle = CallCounter(GameOracle(names, P))
    result = best_vs_worst(oracle, ["p"], [names])
    (pair,) = result.pairs
    assert (pair.chosen, pair.rejected, pair.chosen_index, pair.rejected_index) == ("rock", "dud", 0, 3)
    assert (pair.chosen_win_rate, pair.rejected_win_rate) == pytest.approx((2 / 3, 0.0))
    assert result.stats.comparisons == 6 == oracle.counts.comparisons and oracle.calls == 1


def test_best_vs_worst_borda_and_copeland_differ():
    """P = [[.5, .6, .6], [.4, .5, 1], [.4, 0, .5]]. Borda (Σ_j≠i): y0 = 1.2, y1 = 1.4, y2 = 0.4 → (y1, y2).
    Copeland (wins): y0 beats both (2), y1 beats y2 (1), y2 none (0) → (y0, y2)."""
    names = ["y0", "y1", "y2"]
    oracle = GameOracle(names, [[0.5, 0.6, 0.6], [0.4, 0.5, 1.0], [0.4, 0.0, 0.5]])
    borda = best_vs_worst(oracle, ["p"], [names]).pairs[0]
    copeland = best_vs_worst(oracle, ["p"], [names], score="copeland").pairs[0]
    assert (borda.chosen, borda.rejected) == ("y1", "y2")
    assert (copeland.chosen, copeland.rejected) == ("y0", "y2")
    assert borda.chosen_win_rate == pytest.approx(0.7) and borda.rejected_win_rate == pytest.approx(0.2)
    flat = best_vs_worst(GameOracle(names, np.full((3, 3), 0.5)), ["p"], [names])
    assert flat.pairs == [] and flat.stats.dropped_tie == 1


def test_best_vs_worst_uses_rewards_of_a_reward_model(tiny_tokenizer):
    """With a reward model the pair is (argmax r, argmin r) from K scores per prompt, no pairwise
    comparisons, and win rates mean_k≠i σ(r_i − r_k)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from nashalign.judges.model_judges import RewardModelOracle

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config).eval()
    model.score.weight.data.mul_(50.0)
    oracle = RewardModelOracle(model, tiny_tokenizer, batch_size=4)
    prompts = ["What is the capital of France?", "Explain gradient descent."]
    responses = [["Paris.", "no", "The sea is wide.", "maybe good"], ["It moves downhill.", "yes", "Rock beats scissors.", "bad"]]
    result = best_vs_worst(oracle, prompts, responses)
    assert oracle.counts.comparisons == 0 and oracle.counts.judge_calls == 8 and result.stats.comparisons == 0
    for pair, prompt, group in zip(result.pairs, prompts, responses):
        rewards = oracle.score([prompt] * 4, group)
        assert (pair.chosen_index, pair.rejected_index) == (int(np.argmax(rewards)), int(np.argmin(rewards)))
        expected = [np.mean([1 / (1 + math.exp(rewards[k] - rewards[i])) for k in range(4) if k != i]) for i in range(4)]
        assert (pair.chosen_win_rate, pair.rejected_win_rate) == pytest.approx((expected[pair.chosen_index], expected[pair.rejected_index]))
    assert len(result.pairs) == 2


# --- all pairs --------------------------------------------------------------------------------------


def test_all_pairs_threshold_orients_every_pair_by_preference():
    """A transitive game (higher index better): each of the K(K−1)/2 = 6 pairs per prompt is kept with
    the higher index chosen; win rates of y_i are i/3 (it beats the i lower ones)."""
    names = NAMES[:4]
    P = (np.arange(4)[:, None] > np.arange(4)[None, :]) + 0.5 * np.eye(4)
    result = all_pairs(GameOracle(names, P), ["p", "q"], [names, names[::-1]], decide="threshold")
    assert result.stats.kept == 12 and result.stats.comparisons == 12
    for pair in result.pairs:
        assert NAMES.index(pair.chosen) > NAMES.index(pair.rejected)
        assert pair.chosen_win_rate == pytest.approx(NAMES.index(pair.chosen) / 3)


def test_all_pairs_sample_labels_follow_p():
    """With P(a ≻ b) = 0.7, over 2000 prompts with K = 2 the fraction of pairs with a chosen is
    0.7 ± 0.035 (3.4 standard deviations, sd = √(0.21/2000) ≈ 0.010)."""
    oracle = GameOracle(["a", "b"], [[0.5, 0.7], [0.3, 0.5]])
    result = all_pairs(oracle, ["p"] * 2000, [["a", "b"]] * 2000, rng=np.random.default_rng(11))
    fraction = np.mean([pair.chosen == "a" for pair in result.pairs])
    assert len(result.pairs) == 2000 and abs(fraction - 0.7) < 0.035
    same = all_pairs(oracle, ["p"], [["a", "a", "b"]], rng=np.random.default_rng(0))
    assert same.stats.dropped_identical == 1 and same.stats.kept == 2


def test_make_pairs_dispatches():
    oracle = GameOracle(NAMES[:4], (np.arange(4)[:, None] > np.arange(4)[None, :]) + 0.5 * np.eye(4))
    rng = np.random.default_rng(0)
    assert make_pairs("tournament", oracle, ["p"], [NAMES[:4]], rng=rng).stats.comparisons == 5
    assert make_pairs("best_vs_worst", oracle, ["p"], [NAMES[:4]]).pairs[0].chosen_index == 3
    assert make_pairs("all_pairs", oracle, ["p"], [NAMES[:4]], rng=rng).stats.kept == 6
    stats = make_pairs("tournament", oracle, ["p"], [NAMES[:4]], rng=rng).stats.as_dict()
    assert stats == {"prompts": 1, "kept": 1, "dropped_lost": 0, "dropped_tie": 0, "dropped_identical": 0, "comparisons": 5, "dropped": 0}
