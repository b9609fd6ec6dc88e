"""Atomic artifact files: a file either exists whole or not at all.

Every stage of a run writes its artifact to a temporary sibling, fsyncs it, and renames it into place
(`os.replace` is atomic on POSIX), so a process killed at any moment leaves either the complete
artifact or none: the presence of the file is the stage's completion marker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from nashalign import NashalignError
from nashalign.data.json_input import load_json


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary sibling, fsync, rename, fsync the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file, read as it goes; a malformed line
    is an error naming the file and the line."""
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = load_json(line, path, number)
            except json.JSONDecodeError as error:
                raise NashalignError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise NashalignError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL artifact; a malformed line is an error naming the file and the line."""
    return [row for _, row in iter_jsonl(path)]


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return load_json(path.read_text(encoding="utf-8"), path)
    except json.JSONDecodeError as error:
        raise NashalignError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
