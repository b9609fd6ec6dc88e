"""What a person reads while a run works: one progress bar per long stage and a one-line summary.

    with stage("judging", total=704, unit="comparison") as current:
        with work(352):                      # 352 units of it, done by code that reports
            ...                              # report(done, total) in its own units
        current.note = "1408 judge calls"    # added to the summary line
    # logged at INFO:  judging: 704 comparisons in 12.3 s (57.2 comparisons/s), 1408 judge calls

Under `accelerate launch` (or torchrun) the bar shows on each machine's first process and the summary
line comes from the main process only; both are read from the environment variables those launchers
set (LOCAL_RANK, RANK), so nothing here needs a process group. TQDM_DISABLE=1 hides every bar.

A stage's work is often done by code that does not know the stage: an oracle asked about 352
comparisons in one call scores them in batches. `work(size)` hands such code `size` units of the
stage, and inside it `report(done, total)` (in the code's own units: rows, requests) moves the bar by
the matching share, so the judging bar moves batch by batch. Outside a stage both are no-ops.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "Stage", "current_stage", "grow", "is_local_main_process", "is_main_process", "rate_line", "report",
    "stage", "work",
]


def is_main_process() -> bool:
    """Whether this is process 0 of a launch (or no launch at all)."""
    return os.environ.get("RANK", "0") == "0"


def is_local_main_process() -> bool:
    """Whether this is the first process on this machine (or no launch at all)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


@dataclass
class Stage:
    """A running stage: units done (`done`, counted also when the bar is hidden), its bar, start time and
    what its summary line adds (`note`)."""

    name: str
    unit: str
    bar: Any
    done: int = 0
    began: float = field(default_factory=time.perf_counter)
    note: str = ""
    _span: tuple[int, int] | None = None  # (position at the start of a work span, its size)

    def move_to(self, position: int) -> None:
        self.bar.update(position - self.done)
        self.done = position

    def summary(self) -> str:
        return rate_line(self.name, self.done, self.unit, time.perf_counter() - self.began, self.note)


def rate_line(name: str, count: int, unit: str, seconds: float, note: str = "") -> str:
    """'name: <count> <unit>s in <seconds> s (<rate> <unit>s/s)[, note]', the form of every summary line."""
    line = f"{name}: {count} {unit}s in {seconds:.1f} s ({count / max(seconds, 1e-9):.3g} {unit}s/s)"
    return f"{line}, {note}" if note else line


_current: contextvars.ContextVar[Stage | None] = contextvars.ContextVar("nashalign_stage", default=None)


@contextmanager
def stage(name: str, total: float | None, unit: str, *, show: bool = True):
    """A progress bar for one stage (on the local main process) and its summary line (main process)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=name, unit=unit, disable=not (show and is_local_main_process()), dynamic_ncols=True)
    current = Stage(name, unit, bar)
    token = _current.set(current)
    try:
        yield current
    finally:
        _current.reset(token)
        bar.close()
    if is_main_process():
        logger.info("%s", current.summary())


def current_stage() -> Stage | None:
    """The stage this code runs in, or None."""
    return _current.get()


def grow(amount: int) -> None:
    """Add `amount` units to the current stage's total (work that turned out to be needed)."""
    current = _current.get()
    if current is not None and current.bar.total is not None:
        current.bar.total += amount
        current.bar.refresh()


@contextmanager
def work(size: int):
    """`size` units of the current stage, done by code that reports its own progress (`report`);
    when the block ends the bar stands exactly `size` units further."""
    current = _current.get()
    if current is None or current._span is not None:  # no stage, or nested: the outer span reports
        yield
        return
    start = current.done
    current._span = (start, size)
    try:
        yield
    finally:
        current._span = None
        current.move_to(start + size)


def report(done: float, total: float) -> None:
    """Inside `work`: `done` of `total` of the handed work is finished (in the caller's own units)."""
    current = _current.get()
    if current is None or current._span is None or total <= 0:
        return
    start, size = current._span
    current.move_to(start + round(size * min(done / total, 1.0)))
