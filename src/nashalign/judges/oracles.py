"""Preference oracles: one protocol, `prob(prompts, first, second) -> (B,)` float64 = P(first ≻ second).

Every oracle satisfies P(a ≻ b) + P(b ≻ a) = 1 and P(a ≻ a) = ½. Judges that look at both responses at
once (a pairwise model, an LLM behind an HTTP API, a Python plugin) are position-biased, so they are
asked both orders and averaged,

    P(a ≻ b) = ½ · [q(a, b) + 1 − q(b, a)],        q(x, y) = the judge's P(first ≻ second) for (x, y),

or, with `both_orders: false`, asked once in a canonical order (the two texts sorted), which keeps the
identity at half the cost but leaves the bias in. Identical texts are never sent to a judge: P = ½.

Oracles are built from a plain mapping whose `type` key picks the implementation
(`nashalign.judges.registry.build_oracle`):

    game          a preference matrix over a finite set of response strings (demo, tests)
    python        a `module:function` plugin with the `prob` signature
    labels        human labels: pairs are exported to JSONL for annotation and read back
    reward_model  a sequence-classification reward model: P = σ(r_a − r_b)     (model_judges.py)
    pair_model    a causal-LM pairwise judge, two label tokens                 (model_judges.py)
    http_judge    an OpenAI-compatible chat-completions server, cached on disk  (http_judge.py)

Each oracle counts its work in `counts` (an `OracleCounts`): `comparisons` is the number of
(prompt, first, second) triples asked for, `judge_calls` the judge evaluations actually paid for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from nashalign import NashalignError, progress
from nashalign.config import ConfigFieldError, from_mapping
from nashalign.core.games import validate_game
from nashalign.data.artifacts import iter_jsonl


@dataclasses.dataclass
class OracleCounts:
    """What an oracle has done since it was built (for the loop's summary row).

    comparisons: (prompt, first, second) triples passed to `prob`, identical texts included.
    judge_calls: judge evaluations paid for (model rows scored, HTTP answers received, plugin rows),
        so a judge asked both orders costs two per comparison; cache hits are not paid for.
    cache_hits, retries, unparsed: used by the HTTP judge.
    """

    comparisons: int = 0
    judge_calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    unparsed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@runtime_checkable
class PreferenceOracle(Protocol):
    """P(first ≻ second) for a batch; P(a ≻ b) + P(b ≻ a) = 1."""

    counts: OracleCounts

    def prob(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """(B,) float64 in [0, 1]."""
        ...


@runtime_checkable
class ScoringOracle(PreferenceOracle, Protocol):
    """An oracle with a scalar score per response (a reward model): P(a ≻ b) = σ(r_a − r_b)."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(B,) float64 rewards."""
        ...


def check_batch(prompts, first, second, where: str) -> tuple[list[str], list[str], list[str]]:
    """Three equally long lists of strings, or a NashalignError naming the oracle."""
    columns = [list(prompts), list(first), list(second)]
    if len({len(column) for column in columns}) != 1:
        lengths = ", ".join(str(len(column)) for column in columns)
        raise NashalignError(f"{where}: prompts, first and second must have equal lengths, got {lengths}")
    for name, column in zip(("prompts", "first", "second"), columns):
        for i, value in enumerate(column):
            if not isinstance(value, str):
                raise NashalignError(f"{where}: {name}[{i}] must be a string, got {type(value).__name__}")
    return columns[0], columns[1], columns[2]


def check_probabilities(values, size: int, where: str) -> np.ndarray:
    """`values` as a (size,) float64 array of finite numbers in [0, 1], or a NashalignError."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise NashalignError(f"{where}: returned values that are not numbers ({error})") from None
    if array.shape != (size,):
        raise NashalignError(f"{where}: returned shape {array.shape}, expected ({size},)")
    valid = np.isfinite(array) & (array >= 0.0) & (array <= 1.0)
    if not valid.all():
        raise NashalignError(f"{where}: returned {float(array[~valid][0])!r}; probabilities must lie in [0, 1]")
    return array


def symmetrized(
    judge: Callable[[list[str], list[str], list[str]], np.ndarray],
    prompts: list[str],
    first: list[str],
    second: list[str],
    both_orders: bool = True,
) -> np.ndarray:
    """P(first ≻ second) from a position-biased `judge` q(prompts, x, y) -> (B,), one judge call.

    both_orders: P = ½ · [q(a, b) + 1 − q(b, a)], the 2B queries sent as one batch.
    otherwise:   P = q(lo, hi) if a = lo else 1 − q(lo, hi), where (lo, hi) = sorted((a, b)).
    Either way P(a ≻ b) + P(b ≻ a) = 1 exactly (up to float rounding).
    """
    size = len(first)
    if both_orders:
        q = judge(prompts + prompts, first + second, second + first)
        return 0.5 * (q[:size] + 1.0 - q[size:])
    swap = np.array([a > b for a, b in zip(first, second)], dtype=bool)
    lo = [b if s else a for a, b, s in zip(first, second, swap)]
    hi = [a if s else b for a, b, s in zip(first, second, swap)]
    q = judge(prompts, lo, hi)
    return np.where(swap, 1.0 - q, q)


class Oracle:
    """Base class: input checks, the P(a ≻ a) = ½ shortcut, output checks, the comparison count.

    Subclasses implement `_prob(prompts, first, second)` for texts that differ, returning (B,).
    Slow judges (`slow = True`: models, HTTP) report their progress (nashalign.progress); called
    outside a stage, such a judge shows its own bar and summary line.
    """

    name = "oracle"
    slow = False

    def __init__(self) -> None:
        self.counts = OracleCounts()

    def prob(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """(B,) float64: P(first[i] ≻ second[i] | prompts[i])."""
        prompts, first, second = check_batch(prompts, first, second, self.name)
        out = np.full(len(first), 0.5, dtype=np.float64)
        differ = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
        if differ:
            own_stage = self.slow and progress.current_stage() is None
            with (progress.stage(f"judging ({self.name})", len(differ), "comparison") if own_stage
                  else contextlib.nullcontext()), progress.work(len(differ)):
                values = self._prob([prompts[i] for i in differ], [first[i] for i in differ], [second[i] for i in differ])
            out[differ] = check_probabilities(values, len(differ), self.name)
        self.counts.comparisons += len(first)
        return out

    def _prob(self, prompts: list[str], first: list[str], second: list[str]) -> np.ndarray:
        raise NotImplementedError

    def release(self) -> None:
        """Free the memory of models held for judging (they load again on the next call); the online
        loop calls this when a judging stage ends. Nothing to free for most oracles."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --- game: a preference matrix over a finite set of response strings --------------------------------


@dataclasses.dataclass(frozen=True)
class GameConfig:
    """Either `responses` (n strings) and `P` (n, n), P[i][j] = P(responses[i] ≻ responses[j]), or
    `path`: a game file (see games.load_game) whose "names" are the responses.

    invalid: what a response outside the set does. "error" raises; "worst" makes it lose to every
        response of the set with probability 1 and tie (½) with any other invalid response, which
        keeps P(a ≻ b) + P(b ≻ a) = 1.
    strip: compare texts after stripping surrounding whitespace.
    """

    responses: list[str] | None = None
    P: list[list[float]] | None = None
    path: str | None = None
    invalid: Literal["error", "worst"] = "error"
    strip: bool = True

    def check(self) -> None:
        if self.path is not None and (self.responses is not None or self.P is not None):
            raise ConfigFieldError("path", "give either path or responses and P, not both")
        if self.path is None and (self.responses is None or self.P is None):
            raise ConfigFieldError("responses", "a game oracle needs responses and P, or path")


class GameOracle(Oracle):
    """P(a ≻ b) = P[index(a), index(b)] over a finite set of responses; the prompt is ignored."""

    name = "game"

    def __init__(self, responses: Sequence[str], P, *, invalid: str = "error", strip: bool = True) -> None:
        super().__init__()
        if invalid not in ("error", "worst"):
            raise NashalignError(f"game: invalid: expected 'error' or 'worst', got {invalid!r}")
        self.strip = strip
        self.invalid = invalid
        self.responses = [self._normal(text) for text in responses]
        if len(set(self.responses)) != len(self.responses):
            raise NashalignError("game: responses: responses must be distinct")
        self.P, _ = validate_game(P, source="game")
        if len(self.P) != len(self.responses):
            raise NashalignError(f"game: P is {len(self.P)} × {len(self.P)}, expected one row per response ({len(self.responses)})")
        self._index = {text: i for i, text in enumerate(self.responses)}

    def _normal(self, text: str) -> str:
        return text.strip() if self.strip else text

    def indices(self, texts: Sequence[str]) -> np.ndarray:
        """(B,) int64 index of each text in `responses`; -1 for texts outside the set (policy "worst")."""
        out = np.array([self._index.get(self._normal(text), -1) for text in texts], dtype=np.int64)
        if self.invalid == "error" and (out < 0).any():
            text = texts[int(np.argmax(out < 0))]
            raise NashalignError(f"game: response {text[:80]!r} is not one of the game's {len(self.responses)} responses")
        return out

    def _prob(self, prompts, first, second):
        i, j = self.indices(first), self.indices(second)
        p = self.P[np.maximum(i, 0), np.maximum(j, 0)]
        p = np.where(i < 0, 0.0, np.where(j < 0, 1.0, p))
        self.counts.judge_calls += len(first)
        return np.where((i < 0) & (j < 0), 0.5, p)


# --- python: a module:function plugin ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PythonConfig:
    """function: "package.module:function" with the signature prob(prompts, first, second) -> (B,).

    kwargs: extra keyword arguments bound to the function. both_orders: see the module docstring.
    """

    function: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    both_orders: bool = True


def load_function(reference: str, where: str) -> Callable:
    """Import `module:function` (dots allowed in the attribute path)."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise NashalignError(f"{where}: expected 'module:function', got {reference!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise NashalignError(f"{where}: cannot import module {module_name!r}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise NashalignError(f"{where}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise NashalignError(f"{where}: {reference!r} is not callable")
    return target


class PythonOracle(Oracle):
    """A user function q(prompts, first, second) -> (B,), checked and symmetrized."""

    name = "python"

    def __init__(self, function: Callable, *, both_orders: bool = True, label: str = "python") -> None:
        super().__init__()
        self.function = function
        self.both_orders = both_orders
        self.name = label

    def _judge(self, prompts, first, second):
        values = check_probabilities(self.function(prompts, first, second), len(first), self.name)
        self.counts.judge_calls += len(first)
        return values

    def _prob(self, prompts, first, second):
        return symmetrized(self._judge, prompts, first, second, self.both_orders)


# --- labels: human annotation through JSONL ---------------------------------------------------------

LABEL_VALUES = {"first": 1.0, "second": 0.0, "tie": 0.5}


def pair_id(prompt: str, first: str, second: str) -> str:
    """A content hash naming the ordered pair (16 hex digits)."""
    return hashlib.sha256(json.dumps([prompt, first, second]).encode()).hexdigest()[:16]


def _parse_label(value, path: Path, line: int) -> float | None:
    """'first' → 1, 'second' → 0, 'tie' → ½, a number in [0, 1] → itself, '' or null → None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lower() in LABEL_VALUES:
        return LABEL_VALUES[value.strip().lower()]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    raise NashalignError(
        f"{path}:{line}: label: expected 'first', 'second', 'tie' or a probability in [0, 1], got {value!r}"
    )


def read_labels(path: str | Path) -> dict[str, list[tuple[int, float | None]]]:
    """{pair_id(prompt, first, second): [(line, P(first ≻ second) or None if unlabeled), ...]}."""
    path = Path(path)
    table: dict[str, list[tuple[int, float | None]]] = {}
    if not path.exists():
        return table
    for line, record in iter_jsonl(path):
        for key in ("prompt", "first", "second", "label"):
            if key not in record:
                raise NashalignError(f"{path}:{line}: missing field {key!r}")
            if key != "label" and not isinstance(record[key], str):
                raise NashalignError(f"{path}:{line}: field {key!r} must be a string")
        key = pair_id(record["prompt"], record["first"], record["second"])
        table.setdefault(key, []).append((line, _parse_label(record["label"], path, line)))
    return table


def _append_jsonl(path: Path, records: list[dict]) -> None:
    """Append records, one JSON object per line, flushed and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def export_for_annotation(path: str | Path, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> int:
    """Append pairs not yet in `path` (in either order) as {id, prompt, first, second, label: ""}.

    Returns the number of rows written. Annotators fill `label` with "first", "second", "tie" or
    P(first ≻ second) in [0, 1].
    """
    path = Path(path)
    prompts, first, second = check_batch(prompts, first, second, f"labels {path}")
    known = set(read_labels(path))
    rows = []
    for prompt, a, b in zip(prompts, first, second):
        key = pair_id(prompt, a, b)
        if key in known or pair_id(prompt, b, a) in known or a == b:
            continue
        known.add(key)
        rows.append({"id": key, "prompt": prompt, "first": a, "second": b, "label": ""})
    if rows:
        _append_jsonl(path, rows)
    return len(rows)


@dataclasses.dataclass(frozen=True)
class LabelsConfig:
    """path: the annotation JSONL file (created with the pairs that need labels)."""

    path: str


class LabelsOracle(Oracle):
    """Human labels read from JSONL; pairs without a label are exported and the call stops.

    Several labels for one pair (in either order) are averaged: P(a ≻ b) = mean of the labels of
    (a, b) and of 1 − the labels of (b, a). The file is re-read on every call, so annotation can
    proceed while a run waits.
    """

    name = "labels"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def _prob(self, prompts, first, second):
        table = read_labels(self.path)
        out = np.empty(len(first))
        missing: list[int] = []
        unlabeled_lines: list[int] = []
        for i, (prompt, a, b) in enumerate(zip(prompts, first, second)):
            forward = table.get(pair_id(prompt, a, b), [])
            backward = table.get(pair_id(prompt, b, a), [])
            values = [p for _, p in forward if p is not None] + [1.0 - p for _, p in backward if p is not None]
            if values:
                out[i] = float(np.mean(values))
            else:
                missing.append(i)
                unlabeled_lines += [line for line, _ in forward + backward]
        if missing:
            written = export_for_annotation(
                self.path, [prompts[i] for i in missing], [first[i] for i in missing], [second[i] for i in missing]
            )
            where = f"{self.path}:{min(unlabeled_lines)}" if unlabeled_lines else str(self.path)
            raise NashalignError(
                f"{where}: {len(missing)} of {len(first)} pairs have no label ({written} rows added); "
                "write 'first', 'second', 'tie' or a probability in the 'label' field and rerun"
            )
        self.counts.judge_calls += len(first)
        return out


# --- configuration ----------------------------------------------------------------------------------


def parse_config(config_type, spec, where: str):
    """The dataclass `config_type` from a mapping, with the project's strict config loading
    (nashalign.config): unknown keys, missing keys, wrong types and out-of-range values raise
    NashalignError naming `where: key`."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        spec = dataclasses.asdict(spec)
    return from_mapping(config_type, spec, source=where)


def template_problem(template: str, fields: set[str]) -> str | None:
    """Why `template` is not a str.format template using exactly the named `fields`, or None."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        return f"not a valid template ({error})"
    if used != fields:
        expected = ", ".join("{" + name + "}" for name in sorted(fields))
        return f"the template must use exactly {expected}; it uses {sorted(used)}"
    return None


def check_template(template: str, fields: set[str], where: str) -> str:
    """`template` if it uses exactly the named `fields`, else a NashalignError prefixed by `where`."""
    problem = template_problem(template, fields)
    if problem:
        raise NashalignError(f"{where}: {problem}")
    return template
