"""JSON from users' files, read without a traceback however deeply it nests.

Python's json module recurses once per nesting level, so a value nested about a thousand levels deep
raises RecursionError inside `json.loads`; a shallower one still makes later steps recurse (list
comparisons, chat templates, Arrow). No input of nashalign needs more than `MAX_DEPTH` levels (a
conversational record nests three), so deeper input is refused with a `NashalignError` naming the file
and the line where the nesting passes the limit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nashalign import NashalignError

MAX_DEPTH = 100
TOO_DEEP = f"lists/objects nested more than {MAX_DEPTH} levels deep (the most nashalign reads)"
RECURSION = "lists/objects nested too deeply to read (reading them recursed past Python's recursion limit)"


class NestingError(NashalignError):
    """Input nested too deeply; `reason` is the message without its "file:line: " prefix."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


# A JSON string (skipped whole, so brackets inside it do not count), a bracket or a newline.
_STRUCTURE = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}\n]')


def nested_too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and dicts nest more than `limit` levels in `value` (a scalar is level 0).
    Iterative, so it is safe at any depth."""
    if not isinstance(value, (list, dict)):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


def load_json(text: str, path: str | Path, first_line: int = 1, *, max_depth: int | None = MAX_DEPTH) -> Any:
    """`json.loads(text)`, where `text` starts at line `first_line` of the file `path`.

    Raises NestingError (a NashalignError) "`path`:`line`: lists/objects nested ..." when the value nests more than
    `max_depth` levels (None: no limit of ours) or the parser recurses past Python's recursion limit,
    `line` being where the nesting passes the limit (or, failing that, is deepest). Invalid JSON
    raises json.JSONDecodeError, as json.loads does.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        pass
    else:
        if max_depth is None or not nested_too_deep(value, max_depth):
            return value
    line, deeper = _deepest_line(text, MAX_DEPTH if max_depth is None else max_depth)
    raise NestingError(f"{path}:{first_line - 1 + line}", TOO_DEEP if deeper else RECURSION)


def _deepest_line(text: str, limit: int) -> tuple[int, bool]:
    """(1-based line where the nesting first passes `limit`, True), else (line of its deepest point, False)."""
    line, depth, deepest, deepest_line = 1, 0, 0, 1
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            depth += 1
            if depth > limit:
                return line, True
            if depth > deepest:
                deepest, deepest_line = depth, line
        elif token in "]}":
            depth -= 1
    return deepest_line, False
