"""Preference pairs (y_w, y_l) from K sampled responses per prompt, judged by a preference oracle.

tournament     the INPO paper's construction (K a power of two; the paper uses K = 8). Round one
               pairs samples (0,1), (2,3), ...; the winners play a single-elimination bracket whose
               champion is y_w; the first-round losers play a bracket in which the loser advances,
               giving y_l, the loser of losers; a final compares y_w with y_l and the pair is kept
               only if y_w wins. Comparisons per prompt: K/2 + (K/2 − 1) + (K/2 − 1) + 1 = 3K/2 − 1,
               11 for K = 8. The two brackets run side by side, so each round of all prompts is one
               oracle call (log2 K + 1 calls in all).
best_vs_worst  y_w = the best, y_l = the worst sample: by reward when the oracle scores responses
               (a reward model), else by the Borda score Σ_j P(y_i ≻ y_j) or the Copeland score
               #{j: P(y_i ≻ y_j) > ½} + ½·#{j ≠ i: P = ½} from all K(K−1)/2 pairwise probabilities.
all_pairs      every pair i < j, oriented by a label drawn from P.

A comparison is decided (`decide`) by a Bernoulli(P) draw from a seeded numpy Generator ("sample",
the default: the oracle's preference is a probability), or by P > ½ ("threshold"), where P = ½
exactly is a tie: inside a bracket the lower sample index goes through as the winner; a tied final
or tied all-pairs label drops the pair. Pairs whose two texts are identical are always dropped.

Every comparison is returned as a `Judgment` (the loop's judgments.jsonl). Win rates for SPPO,
P(y ≻ others) = mean over the K − 1 other samples of P(y ≻ y_k), come free with best_vs_worst and
all_pairs; the tournament computes them on request with 2(K − 1) more comparisons per kept pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nashalign import NashalignError, progress
from nashalign.judges.oracles import PreferenceOracle

DECISIONS = ("sample", "threshold")
SCORES = ("borda", "copeland")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One training pair; indices are positions among the prompt's K samples."""

    prompt_index: int
    chosen: str
    rejected: str
    chosen_index: int
    rejected_index: int
    chosen_win_rate: float | None = None
    rejected_win_rate: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Judgment:
    """One oracle comparison: prob = P(first ≻ second); winner_index is the sample that won, or None
    for a tie or when no decision was drawn (best_vs_worst, win-rate estimates)."""

    prompt_index: int
    first_index: int
    second_index: int
    prob: float
    winner_index: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PairStats:
    """prompts seen, pairs kept, pairs dropped (by cause) and oracle comparisons made."""

    prompts: int = 0
    kept: int = 0
    dropped_lost: int = 0
    dropped_tie: int = 0
    dropped_identical: int = 0
    comparisons: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_lost + self.dropped_tie + self.dropped_identical

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "dropped": self.dropped}


@dataclasses.dataclass
class PairResult:
    pairs: list[Pair]
    judgments: list[Judgment]
    stats: PairStats


def _check_inputs(prompts, responses, minimum: int = 2) -> tuple[list[str], list[list[str]], int]:
    """Prompts (B,) and responses (B, K) with the same K ≥ `minimum` for every prompt."""
    prompts, responses = list(prompts), [list(group) for group in responses]
    if len(prompts) != len(responses):
        raise NashalignError(f"pairs: {len(prompts)} prompts but {len(responses)} groups of responses")
    if not prompts:
        return prompts, responses, 0
    k = len(responses[0])
    for b, group in enumerate(responses):
        if len(group) != k:
            raise NashalignError(f"pairs: prompt {b} has {len(group)} responses, prompt 0 has {k}; K must be equal")
        if any(not isinstance(text, str) for text in group):
            raise NashalignError(f"pairs: prompt {b}: every response must be a string")
    responses = [[str(text) for text in group] for group in responses]
    if k < minimum:
        raise NashalignError(f"pairs: need at least {minimum} responses per prompt, got {k}")
    return prompts, responses, k


def _check_decide(decide: str, rng) -> None:
    if decide not in DECISIONS:
        raise NashalignError(f"pairs.decide: expected one of {', '.join(DECISIONS)}, got {decide!r}")
    if decide == "sample" and not isinstance(rng, np.random.Generator):
        raise NashalignError("pairs: decide='sample' needs a seeded numpy Generator as rng")


def _judge(oracle, prompts, responses, matches, stats, judgments, decide=None, rng=None) -> list[int | None]:
    """Ask the oracle about every (prompt index, i, j) in one call; record and return the winners."""
    if not matches:
        return []
    with progress.work(len(matches)):
        probs = oracle.prob(
            [prompts[b] for b, _, _ in matches],
            [responses[b][i] for b, i, _ in matches],
            [responses[b][j] for b, _, j in matches],
        )
    stats.comparisons += len(matches)
    if decide == "sample":
        first_wins = rng.random(len(matches)) < probs
        winners = [i if won else j for (_, i, j), won in zip(matches, first_wins)]
    elif decide == "threshold":
        winners = [i if p > 0.5 else j if p < 0.5 else None for (_, i, j), p in zip(matches, probs)]
    else:
        winners = [None] * len(matches)
    judgments += [Judgment(b, i, j, float(p), w) for (b, i, j), p, w in zip(matches, probs, winners)]
    return winners


def _win_rates(matrix: np.ndarray) -> np.ndarray:
    """(B, K) mean over k ≠ i of P(y_i ≻ y_k) from (B, K, K) matrices with ½ on the diagonal."""
    k = matrix.shape[-1]
    return (matrix.sum(-1) - 0.5) / (k - 1)


def _all_pairs_matrix(oracle, prompts, responses, k, stats, judgments, decide=None, rng=None):
    """(B, K, K) matrix of P(y_i ≻ y_j) from one call over all i < j, and the drawn winners."""
    upper = [(i, j) for i in range(k) for j in range(i + 1, k)]
    matches = [(b, i, j) for b in range(len(prompts)) for i, j in upper]
    winners = _judge(oracle, prompts, responses, matches, stats, judgments, decide, rng)
    matrix = np.full((len(prompts), k, k), 0.5)
    for judgment in judgments[-len(matches) :]:
        matrix[judgment.prompt_index, judgment.first_index, judgment.second_index] = judgment.prob
        matrix[judgment.prompt_index, judgment.second_index, judgment.first_index] = 1.0 - judgment.prob
    return matrix, list(zip(matches, winners))


def tournament(
    oracle: PreferenceOracle,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    decide: str = "sample",
    rng: np.random.Generator | None = None,
    win_rates: bool = False,
) -> PairResult:
    """At most one pair per prompt: (champion of the winners' bracket, loser of the losers' bracket).

    responses: (B, K), K a power of two ≥ 2. Comparisons: B·(3K/2 − 1), plus 2(K − 1) per kept pair
    when `win_rates`.
    """
    prompts, responses, k = _check_inputs(prompts, responses)
    _check_decide(decide, rng)
    if k and k & (k - 1):
        raise NashalignError(f"pairs.tournament: K must be a power of two, got {k} responses per prompt")
    stats, judgments, pairs = PairStats(prompts=len(prompts)), [], []
    if not prompts:
        return PairResult(pairs, judgments, stats)
    batch = range(len(prompts))

    first_round = [(b, m, m + 1) for b in batch for m in range(0, k, 2)]
    outcome = _judge(oracle, prompts, responses, first_round, stats, judgments, decide, rng)
    # a tie (threshold mode) goes to the lower index: the first of the match
    winners_of = [(w if w is not None else i) for (_, i, _), w in zip(first_round, outcome)]
    losers_of = [j if w == i else i for (_, i, j), w in zip(first_round, winners_of)]
    winners = [winners_of[b * k // 2 : (b + 1) * k // 2] for b in batch]
    losers = [losers_of[b * k // 2 : (b + 1) * k // 2] for b in batch]

    while len(winners[0]) > 1:
        upper = [(b, w[m], w[m + 1]) for b, w in zip(batch, winners) for m in range(0, len(w), 2)]
        lower = [(b, lo[m], lo[m + 1]) for b, lo in zip(batch, losers) for m in range(0, len(lo), 2)]
        outcome = _judge(oracle, prompts, responses, upper + lower, stats, judgments, decide, rng)
        advancing = [
            (i if w in (i, None) else j) if n < len(upper) else (j if w in (i, None) else i)
            for n, ((_, i, j), w) in enumerate(zip(upper + lower, outcome))
        ]
        half = len(winners[0]) // 2
        winners = [advancing[b * half : (b + 1) * half] for b in batch]
        losers = [advancing[len(upper) + b * half : len(upper) + (b + 1) * half] for b in batch]

    finals = [(b, winners[b][0], losers[b][0]) for b in batch]
    outcome = _judge(oracle, prompts, responses, finals, stats, judgments, decide, rng)
    for (b, best, worst), winner in zip(finals, outcome):
        if responses[b][best] == responses[b][worst]:
            stats.dropped_identical += 1
        elif winner is None:
            stats.dropped_tie += 1
        elif winner != best:
            stats.dropped_lost += 1
        else:
            pairs.append(Pair(b, responses[b][best], responses[b][worst], best, worst))
    if win_rates and pairs:
        pairs = _with_tournament_win_rates(oracle, prompts, responses, k, pairs, stats, judgments)
    stats.kept = len(pairs)
    return PairResult(pairs, judgments, stats)


def _with_tournament_win_rates(oracle, prompts, responses, k, pairs, stats, judgments) -> list[Pair]:
    """Pairs with win rates estimated from 2(K − 1) extra comparisons each, in one oracle call."""
    matches = [
        (pair.prompt_index, side, other)
        for pair in pairs
        for side in (pair.chosen_index, pair.rejected_index)
        for other in range(k)
        if other != side
    ]
    progress.grow(len(matches))
    _judge(oracle, prompts, responses, matches, stats, judgments)
    probs = np.array([j.prob for j in judgments[-len(matches) :]]).reshape(len(pairs), 2, k - 1)
    rates = probs.mean(-1)
    return [
        dataclasses.replace(pair, chosen_win_rate=float(rates[n, 0]), rejected_win_rate=float(rates[n, 1]))
        for n, pair in enumerate(pairs)
    ]


def best_vs_worst(
    oracle: PreferenceOracle,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    score: str = "borda",
    use_rewards: bool | None = None,
) -> PairResult:
    """(best, worst) per prompt; a prompt whose best and worst score equally is dropped as a tie.

    use_rewards: rank by `oracle.score` (None: whenever the oracle has one); win rates are then
    mean σ(r_i − r_k). Otherwise all K(K−1)/2 pairs are judged in one call and ranked by `score`
    ("borda" or "copeland"); ties in the ranking go to the lower sample index.
    """
    prompts, responses, k = _check_inputs(prompts, responses)
    if score not in SCORES:
        raise NashalignError(f"pairs.score: expected one of {', '.join(SCORES)}, got {score!r}")
    has_scores = callable(getattr(oracle, "score", None))
    if use_rewards and not has_scores:
        raise NashalignError("pairs.best_vs_worst: use_rewards needs an oracle that scores responses (reward_model)")
    stats, judgments, pairs = PairStats(prompts=len(prompts)), [], []
    if not prompts:
        return PairResult(pairs, judgments, stats)
    if has_scores if use_rewards is None else use_rewards:
        flat_prompts = [prompt for prompt in prompts for _ in range(k)]
        with progress.work(len(flat_prompts)):
            ranking = np.asarray(oracle.score(flat_prompts, [text for group in responses for text in group]))
        ranking = ranking.reshape(len(prompts), k)
        matrix = 1.0 / (1.0 + np.exp(ranking[:, None, :] - ranking[:, :, None]))
    else:
        matrix, _ = _all_pairs_matrix(oracle, prompts, responses, k, stats, judgments)
        if score == "borda":
            ranking = matrix.sum(-1)
        else:
            ranking = (matrix > 0.5).sum(-1) + 0.5 * ((matrix == 0.5).sum(-1) - 1)
    rates = _win_rates(matrix)
    for b in range(len(prompts)):
        best, worst = int(np.argmax(ranking[b])), int(np.argmin(ranking[b]))
        if ranking[b, best] == ranking[b, worst]:
            stats.dropped_tie += 1
        elif responses[b][best] == responses[b][worst]:
            stats.dropped_identical += 1
        else:
            pairs.append(
                Pair(b, responses[b][best], responses[b][worst], best, worst, float(rates[b, best]), float(rates[b, worst]))
            )
    stats.kept = len(pairs)
    return PairResult(pairs, judgments, stats)


def all_pairs(
    oracle: PreferenceOracle,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    decide: str = "sample",
    rng: np.random.Generator | None = None,
) -> PairResult:
    """Every pair i < j of each prompt, chosen = the decided winner; K(K−1)/2 comparisons per prompt."""
    prompts, responses, k = _check_inputs(prompts, responses)
    _check_decide(decide, rng)
    stats, judgments, pairs = PairStats(prompts=len(prompts)), [], []
    if not prompts:
        return PairResult(pairs, judgments, stats)
    matrix, decided = _all_pairs_matrix(oracle, prompts, responses, k, stats, judgments, decide, rng)
    rates = _win_rates(matrix)
    for (b, i, j), winner in decided:
        if responses[b][i] == responses[b][j]:
            stats.dropped_identical += 1
        elif winner is None:
            stats.dropped_tie += 1
        else:
            loser = j if winner == i else i
            pairs.append(
                Pair(b, responses[b][winner], responses[b][loser], winner, loser, float(rates[b, winner]), float(rates[b, loser]))
            )
    stats.kept = len(pairs)
    return PairResult(pairs, judgments, stats)


METHODS = ("tournament", "best_vs_worst", "all_pairs")


def make_pairs(
    method: str,
    oracle: PreferenceOracle,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    decide: str = "sample",
    rng: np.random.Generator | None = None,
    score: str = "borda",
    win_rates: bool = False,
) -> PairResult:
    """Dispatch on `method` (a config value), passing each construction the options it uses.

    Shows one progress bar over the comparisons the construction makes (responses scored, for
    best_vs_worst with a reward model) and logs a summary line with the judge calls paid."""
    if method not in METHODS:
        raise NashalignError(f"pairs.method: expected one of {', '.join(METHODS)}, got {method!r}")
    b = len(prompts)
    k = len(responses[0]) if b else 0
    scored = method == "best_vs_worst" and callable(getattr(oracle, "score", None))
    total = b * k if scored else b * (3 * k // 2 - 1) if method == "tournament" else b * k * (k - 1) // 2
    calls_before = oracle.counts.judge_calls
    with progress.stage("judging", total, "response" if scored else "comparison") as current:
        if method == "tournament":
            result = tournament(oracle, prompts, responses, decide=decide, rng=rng, win_rates=win_rates)
        elif method == "best_vs_worst":
            result = best_vs_worst(oracle, prompts, responses, score=score)
        else:
            result = all_pairs(oracle, prompts, responses, decide=decide, rng=rng)
        current.note = (f"{method}, {oracle.counts.judge_calls - calls_before} judge calls, "
                        f"{result.stats.kept} pairs kept from {b} prompts")
    return result
