"""Read and validate preference records from JSONL, JSON, Parquet, `datasets` folders and objects.

A record is one preference: a prompt and two responses, `chosen` (preferred) and `rejected`. Three
layouts are accepted, the ones TRL's DPOTrainer reads:

- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]},
                   a message being {"role": str, "content": str}
- implicit prompt: {"chosen": ..., "rejected": ...} only, two full conversations (or strings) sharing a
                   prefix; the prompt is their longest common prefix of messages (of characters for
                   strings, as TRL's `extract_prompt`), the responses are what follows it.

Every other field is kept in `PreferenceRecord.extra` (e.g. `chosen_win_rate` and `rejected_win_rate`
for SPPO, which must be numbers in [0, 1]).

Error policy. Problems that make the whole source unreadable (missing file, unknown extension, a JSON
document that does not parse) raise `NashalignError` at once. Problems of single records are all
collected, each naming the source, the line (JSONL, 1-based) or record index (other sources, 0-based)
and the field; then with `on_error="raise"` (the default) one `NashalignError` lists them (the first
20 and the total count), with `on_error="skip"` the bad records are dropped and the count and reasons
are logged. Identical chosen and rejected is a warning, logged, and the record is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from nashalign import NashalignError
from nashalign.data.sources import Problem, describe_source, read_rows, type_name

logger = logging.getLogger(__name__)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
TEXT_FIELDS = ("prompt", "chosen", "rejected")
UNIT_INTERVAL_FIELDS = ("chosen_win_rate", "rejected_win_rate")
MAX_LISTED_PROBLEMS = 20

Text = str | list[dict[str, Any]]


@dataclass(frozen=True)
class PreferenceRecord:
    """One validated preference pair.

    `prompt`, `chosen` and `rejected` are either all strings or all lists of `{"role", "content"}`
    messages (the responses then start and end with an assistant message). `source` says where the
    record came from: "path:line" for JSONL (1-based), "path[index]" for other files and
    "dataset[index]" for objects (0-based). `extra` holds every other field of the input row.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class RecordReport:
    """Everything `read_records` found: the valid records, the problems and the warnings."""

    records: list[PreferenceRecord]
    problems: list[Problem]
    warnings: list[Problem]


def format_problems(problems: list[Problem], header: str) -> str:
    """One problem: `header` and the problem on one line. More: `header`, then the first
    MAX_LISTED_PROBLEMS problems one per line, then how many were left out."""
    if len(problems) == 1:
        return f"{header} {problems[0]}"
    lines = [header, *(f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS])]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def load_records(source: Any, *, split: str | None = None, on_error: str = "raise") -> list[PreferenceRecord]:
    """Read and validate preference records.

    `source` is a path (str or Path) to a `.jsonl` file, a `.json` file (a list of objects; a `.json`
    file whose first character is `{` is read as JSON Lines, as `Dataset.to_json` writes it), a
    `.parquet` file or a folder written by `datasets`' `save_to_disk` (a DatasetDict needs `split`
    unless it has one split); or a `datasets.Dataset` / `DatasetDict` object; or a list of dicts.
    `on_error`: "raise" raises one NashalignError listing the problems of all bad records; "skip"
    drops them and logs how many and why. Warnings (identical chosen and rejected) are logged.
    """
    if on_error not in ("raise", "skip"):
        raise NashalignError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = read_records(source, split=split)
    name = describe_source(source)
    if report.warnings:
        logger.warning(format_problems(report.warnings, f"{name}: {len(report.warnings)} warning(s):"))
    if report.problems:
        bad = len({p.source for p in report.problems})
        if on_error == "raise":
            raise NashalignError(
                format_problems(
                    report.problems,
                    f"{name}: {bad} invalid record(s), {len(report.problems)} problem(s) "
                    "(fix them, or skip them with on_error='skip'):",
                )
            )
        logger.warning(format_problems(report.problems, f"{name}: skipped {bad} invalid record(s):"))
    if not report.records:
        raise NashalignError(f"{name}: no valid preference records")
    return report.records


def read_records(source: Any, *, split: str | None = None) -> RecordReport:
    """Read `source` (see `load_records`) and validate every row; never raises for a bad record."""
    records: list[PreferenceRecord] = []
    problems: list[Problem] = []
    warnings: list[Problem] = []
    for where, row in read_rows(source, split=split):
        if isinstance(row, Problem):
            problems.append(row)
            continue
        record, row_problems, row_warnings = parse_record(row, where)
        problems.extend(row_problems)
        warnings.extend(row_warnings)
        if record is not None:
            records.append(record)
    return RecordReport(records, problems, warnings)


def parse_record(row: Any, where: str) -> tuple[PreferenceRecord | None, list[Problem], list[Problem]]:
    """Validate one raw row; returns (record or None, problems, warnings)."""
    if not isinstance(row, dict):
        return None, [Problem(where, None, f"expected a JSON object (a record), got {type_name(row)}")], []
    problems: list[Problem] = []
    for key in ("chosen", "rejected"):
        if key not in row:
            problems.append(Problem(where, key, "missing (every record needs 'chosen' and 'rejected')"))
    for key in TEXT_FIELDS:
        if key in row:
            problems.extend(_check_text(row[key], where, key))
    for key in UNIT_INTERVAL_FIELDS:
        if key in row:
            problems.extend(_check_unit_interval(row[key], where, key))
    if problems:
        return None, problems, []

    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = row["prompt"]
        kinds = {key: isinstance(row[key], list) for key in TEXT_FIELDS}
        if len(set(kinds.values())) > 1:
            return None, [_mixed_layout_problem(where, kinds)], []
    else:
        kinds = {key: isinstance(row[key], list) for key in ("chosen", "rejected")}
        if kinds["chosen"] != kinds["rejected"]:
            return None, [_mixed_layout_problem(where, kinds)], []
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not prompt:
            message = "missing, and chosen and rejected share no prefix to use as the prompt"
            return None, [Problem(where, "prompt", message)], []

    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        problems.extend(_check_nonempty(value, where, key, is_response=key != "prompt"))
    if problems:
        return None, problems, []
    if isinstance(prompt, list):
        prompt, chosen, rejected = (_clean_messages(m) for m in (prompt, chosen, rejected))
    warnings = []
    if chosen == rejected:
        message = "identical to chosen (the pair carries no preference signal)"
        warnings.append(Problem(where, "rejected", message))
    extra = {key: value for key, value in row.items() if key not in TEXT_FIELDS}
    return PreferenceRecord(prompt, chosen, rejected, where, extra), [], warnings


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split two full conversations at their longest common prefix: (prompt, chosen rest, rejected rest).

    Lists of messages are split at whole messages. Strings are split at characters, as TRL's
    `extract_prompt` does: when the prefix ends with a space, that space goes to the responses.
    """
    length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        length += 1
    if isinstance(chosen, str) and 0 < length < min(len(chosen), len(rejected)) and chosen[length - 1] == " ":
        length -= 1
    return chosen[:length], chosen[length:], rejected[length:]


def _check_text(value: Any, where: str, key: str) -> list[Problem]:
    if isinstance(value, str):
        return _check_encodable(value, where, key)
    if not isinstance(value, list):
        return [Problem(where, key, f"expected a string or a list of messages, got {type_name(value)}")]
    problems: list[Problem] = []
    for i, message in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(message, dict):
            problems.append(
                Problem(
                    where,
                    name,
                    f"expected a message {{'role': ..., 'content': ...}}, got {type_name(message)}",
                )
            )
            continue
        for part in ("role", "content"):
            if part not in message:
                problems.append(
                    Problem(where, f"{name}.{part}", "missing (a message needs 'role' and 'content')")
                )
            elif not isinstance(message[part], str):
                problems.append(
                    Problem(where, f"{name}.{part}", f"expected a string, got {type_name(message[part])}")
                )
        if isinstance(message.get("role"), str) and message["role"] not in ROLES:
            problems.append(
                Problem(
                    where,
                    f"{name}.role",
                    f"unknown role {message['role']!r}; expected one of {sorted(ROLES)}",
                )
            )
        if isinstance(message.get("content"), str):
            problems.extend(_check_encodable(message["content"], where, f"{name}.content"))
    return problems


def _check_encodable(text: str, where: str, key: str) -> list[Problem]:
    # JSON escapes can produce lone surrogates (\ud800), which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return [Problem(where, key, f"invalid Unicode (lone surrogate) at character {error.start}")]
    return []


def _check_unit_interval(value: Any, where: str, key: str) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [Problem(where, key, f"expected a number in [0, 1], got {type_name(value)}")]
    if not 0.0 <= value <= 1.0:  # also rejects NaN and infinities
        return [Problem(where, key, f"expected a number in [0, 1], got {value}")]
    return []


def _check_nonempty(value: Text, where: str, key: str, *, is_response: bool) -> list[Problem]:
    if isinstance(value, str):
        return [] if value.strip() else [Problem(where, key, "empty (expected non-blank text)")]
    if not value:
        return [Problem(where, key, "empty (expected at least one message)")]
    if not is_response:
        return []
    problems = []
    if value[0]["role"] != "assistant":
        problems.append(
            Problem(
                where,
                f"{key}[0].role",
                f"a response must start with an assistant message, got {value[0]['role']!r}",
            )
        )
    last = f"{key}[{len(value) - 1}]"
    if value[-1]["role"] != "assistant" and (len(value) > 1 or not problems):
        problems.append(
            Problem(
                where,
                f"{last}.role",
                f"a response must end with an assistant message, got {value[-1]['role']!r}",
            )
        )
    elif not value[-1]["content"].strip():
        problems.append(Problem(where, f"{last}.content", "empty response (expected non-blank text)"))
    return problems


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Arrow gives every message every key seen in the column, absent ones as None: drop those.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _mixed_layout_problem(where: str, kinds: dict[str, bool]) -> Problem:
    strings = [k for k, is_list in kinds.items() if not is_list]
    lists = [k for k, is_list in kinds.items() if is_list]
    return Problem(
        where,
        strings[0],
        f"is a string but {' and '.join(lists)} {'is a list' if len(lists) == 1 else 'are lists'} of messages; "
        f"use one layout for all of "
        f"{', '.join(kinds)} (a response as [{{'role': 'assistant', 'content': ...}}])",
    )
