"""Raw rows of a source of preference records or prompts, in order, each named for messages.

Sources: a `.jsonl` file (rows "path:line", 1-based), a `.json` file holding a list (or JSON Lines,
when its first character is `{`), a `.parquet` file, a folder written by `datasets`' `save_to_disk`,
a `datasets.Dataset` / `DatasetDict` (rows "path[index]" or "name[split][index]", 0-based) or a list
of dicts ("records[index]"). A whole source that cannot be read raises NashalignError; a row that
cannot be decoded (invalid UTF-8 or JSON, nested too deep) comes back as a `Problem` in its place, so
callers can report every bad row at once. Validation of the rows is `nashalign.data.records`' job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nashalign import NashalignError
from nashalign.data.json_input import RECURSION, TOO_DEEP, NestingError, load_json, nested_too_deep


@dataclass(frozen=True)
class Problem:
    """A problem found in one record: where (`source`, `field`, None for the whole row) and what."""

    source: str
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.source if self.field is None else f"{self.source}: field '{self.field}'"
        return f"{where}: {self.message}"


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return type(source).__name__


def read_rows(source: Any, *, split: str | None = None) -> list[tuple[str, Any]]:
    """Raw rows `(where, row)` of `source` in order; a row that cannot be decoded, or that nests
    more than MAX_DEPTH levels (nashalign.data.json_input), is a `Problem`."""
    return [
        (where, Problem(where, None, TOO_DEEP) if not isinstance(row, Problem) and nested_too_deep(row) else row)
        for where, row in _read_rows(source, split)
    ]


def _read_rows(source: Any, split: str | None) -> list[tuple[str, Any]]:
    if isinstance(source, list):
        return [(f"records[{i}]", row) for i, row in enumerate(source)]
    if not isinstance(source, (str, Path)):
        return _dataset_rows(source, split, "dataset")
    path = Path(source)
    if not path.exists():
        raise NashalignError(f"{path}: no such file or directory")
    if path.is_dir():
        return _dataset_rows(_load_from_disk(path), split, str(path))
    if split is not None:
        raise NashalignError(f"{path}: split={split!r} applies only to datasets folders, not to files")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path, path.read_bytes())
    if suffix == ".json":
        data = path.read_bytes()
        if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
            return _jsonl_rows(path, data)
        return _json_rows(path, data)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise NashalignError(
        f"{path}: unknown file type {suffix!r}; expected .jsonl, .json, .parquet or a datasets folder"
    )


def _jsonl_rows(path: Path, data: bytes) -> list[tuple[str, Any]]:
    # Decode line by line (not the whole file at once), so invalid UTF-8 is reported on its own line.
    rows: list[tuple[str, Any]] = []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            message = f"invalid UTF-8: byte 0x{raw[error.start]:02x} at column {error.start + 1}"
            rows.append((where, Problem(where, None, message)))
            continue
        if not line.strip():
            continue
        try:
            rows.append((where, load_json(line, path, number, max_depth=None)))
        except json.JSONDecodeError as error:
            rows.append((where, Problem(where, None, f"not valid JSON: {error.msg} at column {error.colno}")))
        except NestingError as error:
            rows.append((where, Problem(where, None, error.reason)))
    return rows


def _json_rows(path: Path, data: bytes) -> list[tuple[str, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise NashalignError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[error.start]:02x})") from None
    try:
        document = load_json(text, path, max_depth=None)  # rows nested too deep are problems of their own
    except json.JSONDecodeError as error:
        raise NashalignError(
            f"{path}:{error.lineno}: not valid JSON: {error.msg} at column {error.colno}"
        ) from None
    if not isinstance(document, list):
        raise NashalignError(
            f"{path}: expected a JSON list of records (or one JSON object per line), got {type_name(document)}"
        )
    return [(f"{path}[{i}]", row) for i, row in enumerate(document)]


def _parquet_rows(path: Path) -> list[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise NashalignError(f"{path}: not a readable Parquet file: {error}") from None
    return [(f"{path}[{i}]", row) for i, row in enumerate(_to_list(table.to_pylist, str(path)))]


def _to_list(convert, name: str) -> list[Any]:
    """Arrow rows as Python objects; conversion recurses once per nesting level."""
    try:
        return convert()
    except RecursionError:
        raise NashalignError(f"{name}: {RECURSION}") from None


def _load_from_disk(path: Path) -> Any:
    import datasets

    if not any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        raise NashalignError(f"{path}: a folder, but not one written by datasets' save_to_disk")
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise NashalignError(f"{path}: cannot load the datasets folder: {error}") from None
    except RecursionError:  # its features (the column types) nest too deep
        raise NashalignError(f"{path}: cannot load the datasets folder: {RECURSION}") from None


def _dataset_rows(dataset: Any, split: str | None, name: str) -> list[tuple[str, Any]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        splits = sorted(dataset)
        if split is None:
            if len(splits) != 1:
                raise NashalignError(f"{name}: holds splits {splits}; choose one with split=")
            split = splits[0]
        if split not in dataset:
            raise NashalignError(f"{name}: no split {split!r}; available: {splits}")
        rows = _to_list(dataset[split].to_list, f"{name}[{split}]")
        return [(f"{name}[{split}][{i}]", row) for i, row in enumerate(rows)]
    if isinstance(dataset, datasets.Dataset):
        if split is not None:
            raise NashalignError(
                f"{name}: split={split!r} given but it holds a single Dataset, not a DatasetDict"
            )
        return [(f"{name}[{i}]", row) for i, row in enumerate(_to_list(dataset.to_list, name))]
    raise NashalignError(
        f"cannot read records from a {type(dataset).__name__}; expected a path, a datasets.Dataset, "
        "a DatasetDict or a list of dicts"
    )


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)
