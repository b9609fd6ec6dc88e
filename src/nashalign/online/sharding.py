"""The online loop's stages split over the processes of `accelerate launch`.

Every process runs the same loop; accelerate's `PartialState` says which process this is, and its
collectives (`gather_object`, `broadcast_object_list`, `wait_for_everyone`) move the little data the
processes exchange. No process group of nashalign's own: one process, or none launched, is the
degenerate case of the same code (the collectives return their input).

    decisions       the main process looks at the run directory and broadcasts what it sees, so every
                    process skips the same stages (`from_main`)
    sampling        process r samples prompts r, r + N, ... into its own shard file; the main process
                    merges the shards (online.py)
    judging         each oracle call is split into N contiguous row ranges answered in parallel and
                    gathered in row order (`SplitOracle`); pair construction, with its seeded draws,
                    then runs identically on every process
    scoring         nashalign.train.loop's scoring, split over the processes, main-only cache writes
    training        nashalign.train.loop.train_pairs, data parallel
    writing         the main process alone writes shared artifacts; the others wait at a barrier
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from nashalign import NashalignError
from nashalign.judges.oracles import OracleCounts

T = TypeVar("T")

# Oracles that write files every process would share (the HTTP judge's cache, the labels oracle's
# annotation export) are asked by the main process alone: one writer per file.
MAIN_PROCESS_ORACLES = frozenset({"http_judge", "labels"})


def process_state():
    """accelerate's PartialState of this process (initialized on first use: the process group of
    `accelerate launch`, or a single process). `ACCELERATE_USE_CPU=true` selects gloo on CPUs, as
    it does for an Accelerator."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def from_main(state, compute: Callable[[], T]) -> T:
    """`compute()` on the main process, its value on every process (one broadcast)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([compute() if state.is_main_process else None])[0]


def row_range(size: int, rank: int, processes: int) -> range:
    """The contiguous rows of `size` that process `rank` of `processes` answers: the first
    size mod processes processes take one row more."""
    base, extra = divmod(size, processes)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class SplitOracle:
    """A preference oracle whose calls are split over the processes.

    Every process calls `prob` (and `score`, when the oracle has it) with the same arguments, as the
    loop does; each gets the same (B,) answers. With `split`, process r answers the contiguous rows
    `row_range(B, r, N)` (a model judge batches neighbouring rows as one process would) and the
    answers are gathered in row order; without it the main process answers all rows and broadcasts
    them (`oracle` may then be None on the other processes). `counts` holds the comparisons asked
    and the judge calls of all processes together, so the loop's counts equal a one-process run's.
    A NashalignError raised by the oracle on any process is raised on every process.
    """

    def __init__(self, oracle, state, *, split: bool) -> None:
        self.oracle = oracle
        self.state = state
        self.split = split
        self.name = from_main(state, lambda: getattr(oracle, "name", type(oracle).__name__))
        self.counts = OracleCounts()
        if from_main(state, lambda: callable(getattr(oracle, "score", None))):
            self.score = functools.partial(self._ask, "score")

    def release(self) -> None:
        """Free this process's judge model (if the oracle holds one); see Oracle.release."""
        release = getattr(self.oracle, "release", None)
        if callable(release):
            release()

    def prob(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """(B,) float64: P(first[i] ≻ second[i] | prompts[i]), answered across the processes."""
        return self._ask("prob", prompts, first, second)

    def _ask(self, method: str, *columns: Sequence[str]) -> np.ndarray:
        from accelerate.utils import broadcast_object_list, gather_object

        size = len(columns[0])
        if self.split:
            rows = row_range(size, self.state.process_index, self.state.num_processes)
            mine = _answer(self.oracle, method, [list(column[rows.start : rows.stop]) for column in columns])
            parts = sorted(gather_object([(self.state.process_index, *mine)]), key=lambda part: part[0])
            errors = [error for _, _, _, error in parts if error is not None]
            answers = np.concatenate([values for _, values, _, _ in parts]) if not errors else None
            calls = sum(calls for _, _, calls, _ in parts)
        else:
            mine = _answer(self.oracle, method, columns) if self.state.is_main_process else None
            answers, calls, error = broadcast_object_list([mine])[0]
            errors = [error] if error is not None else []
        if errors:
            raise NashalignError(errors[0])
        self.counts.comparisons += size
        self.counts.judge_calls += calls
        return answers


def _answer(oracle, method: str, columns: Sequence[Sequence[str]]) -> tuple[np.ndarray, int, str | None]:
    """(answers, judge calls made, None) from `oracle.method(*columns)`, or (empty, calls, the
    message) when it raised a NashalignError; an empty range is answered without asking."""
    if not columns[0]:
        return np.empty(0, dtype=np.float64), 0, None
    before = oracle.counts.judge_calls
    try:
        answers = np.asarray(getattr(oracle, method)(*columns), dtype=np.float64)
    except NashalignError as error:
        return np.empty(0, dtype=np.float64), oracle.counts.judge_calls - before, str(error)
    return answers, oracle.counts.judge_calls - before, None


def split_oracle(oracle: Any, spec: dict | None, state) -> SplitOracle:
    """The loop's oracle: `oracle` (an object, on every process) or one built from the config
    mapping `spec`, split over the processes unless it writes shared files (then built and asked on
    the main process only)."""
    from nashalign.judges.registry import build_oracle

    if oracle is not None:
        return SplitOracle(oracle, state, split=getattr(oracle, "name", None) not in MAIN_PROCESS_ORACLES)
    if spec is None:
        raise NashalignError("oracle: required (a mapping with a 'type' key), or pass an oracle object")
    if spec.get("type") not in MAIN_PROCESS_ORACLES:
        return SplitOracle(build_oracle(spec, where="oracle"), state, split=True)
    built, problem = None, None
    if state.is_main_process:
        try:
            built = build_oracle(spec, where="oracle")
        except NashalignError as error:
            problem = str(error)
    problem = from_main(state, lambda: problem)
    if problem is not None:
        raise NashalignError(problem)
    return SplitOracle(built, state, split=False)
