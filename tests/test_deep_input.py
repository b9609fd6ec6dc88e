"""Deep input: a JSON value nested thousands of levels deep (json.loads raises RecursionError) or merely
deeper than nashalign.data.json_input.MAX_DEPTH (100) is one NashalignError naming the file and the line,
in every reader: preference records (JSONL, JSON, Parquet, datasets folders, lists), prompts, the
labels file, game files and the loop's JSON artifacts (which eval also reads for baseline responses).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nashalign import NashalignError
from nashalign.data.json_input import MAX_DEPTH, RECURSION, TOO_DEEP, load_json, nested_too_deep

GOOD = '{"prompt": "Hi", "chosen": " yes", "rejected": " no"}'


def nested_text(depth: int, inner: str = '"x"') -> str:
    return "[" * depth + inner + "]" * depth


def nested_value(depth: int):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


def deep_record(depth: int) -> str:
    return '{"prompt": "Hi", "chosen": " yes", "rejected": " no", "meta": ' + nested_text(depth) + "}"


@pytest.mark.parametrize("depth", [MAX_DEPTH, 3000])
def test_load_json_names_the_line_where_nesting_passes_the_limit(depth):
    """Line 3 of the text opens the nesting; the text starts at line 10 of its file, so the error is
    at line 12. 3000 levels make json.loads itself raise RecursionError; 100 list levels inside the
    object (101 in all) parse and are refused by the depth check; exactly MAX_DEPTH levels are read."""
    text = '{\n"a": 1,\n"b": ' + nested_text(depth) + "\n}"
    with pytest.raises(NashalignError) as error:
        load_json(text, "data.json", 10)
    assert str(error.value) == f"data.json:12: {TOO_DEEP}"
    assert load_json('{"b": ' + nested_text(MAX_DEPTH - 1) + "}", "data.json")["b"] == nested_value(MAX_DEPTH - 1)


def test_brackets_inside_strings_do_not_count():
    """The line search skips strings: "[[[" in a string on line 1 does not open anything."""
    text = '{"s": "' + "[" * 200 + '",\n"b": ' + nested_text(3000) + "}"
    with pytest.raises(NashalignError, match=r"^f:2: "):
        load_json(text, "f")


@given(st.integers(0, 250), st.integers(0, 250))
def test_nested_too_deep_counts_the_deepest_branch(shallow, deep):
    """A dict holding a shallow and a deep branch nests 1 + max(depth) levels."""
    value = {"a": nested_value(shallow), "b": [nested_value(deep)]}
    levels = 1 + max(shallow, deep + 1)
    assert nested_too_deep(value, levels - 1) and not nested_too_deep(value, levels)


# --------------------------------------------------------------------------- preference records


@pytest.mark.parametrize("depth", [150, 3000])
def test_jsonl_record_too_deep_is_a_problem_of_its_line(depth, tmp_path, caplog):
    from nashalign.data.tokenization import load_records

    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{GOOD}\n{deep_record(depth)}\n{GOOD}\n")
    with pytest.raises(NashalignError) as error:
        load_records(path)
    assert str(error.value) == (
        f"{path}: 1 invalid record(s), 1 problem(s) (fix them, or skip them with on_error='skip'): "
        f"{path}:2: {TOO_DEEP}"
    )
    assert [r.source for r in load_records(path, on_error="skip")] == [f"{path}:1", f"{path}:3"]


def test_json_file_too_deep_for_the_parser_names_the_line(tmp_path):
    from nashalign.data.tokenization import load_records

    path = tmp_path / "pairs.json"
    path.write_text(f"[\n{GOOD},\n{deep_record(3000)}\n]\n")
    with pytest.raises(NashalignError, match=rf"^{path}:3: lists/objects nested more than 100 levels deep"):
        load_records(path)


def test_json_list_with_one_record_too_deep_names_the_record(tmp_path):
    """Parsed (150 levels), then refused record by record: the other records still load with skip."""
    from nashalign.data.tokenization import load_records

    path = tmp_path / "pairs.json"
    path.write_text(f"[{GOOD},\n{deep_record(150)}]")
    with pytest.raises(NashalignError, match=rf"{path}\[1\]: lists/objects nested more than 100"):
        load_records(path)
    assert len(load_records(path, on_error="skip")) == 1


def test_list_of_dicts_too_deep_is_a_problem():
    from nashalign.data.tokenization import load_records

    rows = [json.loads(GOOD), {**json.loads(GOOD), "meta": nested_value(5000)}]
    with pytest.raises(NashalignError, match=r"records\[1\]: lists/objects nested more than 100"):
        load_records(rows)


def test_parquet_too_deep_is_one_error_naming_the_file(tmp_path):
    """pyarrow writes a 200-level list column but refuses to read a schema that deep: one error."""
    import pyarrow
    import pyarrow.parquet

    from nashalign.data.tokenization import load_records

    path = tmp_path / "pairs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{**json.loads(GOOD), "meta": nested_value(200)}]), path)
    with pytest.raises(NashalignError, match=rf"^{path}: not a readable Parquet file: .*too deeply nested"):
        load_records(path)


def _in_shallow_stack(function, limit: int):
    """Run `function` in a fresh thread under a lowered recursion limit: a stand-in for input deeper
    than this machine's stack (arrow and datasets refuse to write the real thing)."""
    result = {}

    def target():
        saved = sys.getrecursionlimit()
        sys.setrecursionlimit(limit)
        try:
            result["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            result["error"] = error
        finally:
            sys.setrecursionlimit(saved)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return result


def test_datasets_folder_whose_reading_recurses_too_far_is_one_error(tmp_path):
    """A datasets folder with a 40-level column: read in a stack of 150 frames, loading it recurses
    too far, which is one error naming the folder; with the normal limit it loads."""
    import datasets

    from nashalign.data.tokenization import read_records

    folder = tmp_path / "pairs"
    datasets.Dataset.from_list([{**json.loads(GOOD), "meta": nested_value(40)}]).save_to_disk(str(folder))
    outcome = _in_shallow_stack(lambda: read_records(folder), 150)
    assert isinstance(outcome.get("error"), NashalignError), outcome
    assert str(outcome["error"]) == f"{folder}: cannot load the datasets folder: {RECURSION}"
    assert len(read_records(folder).records) == 1


# --------------------------------------------------------------------------- the other readers


def test_prompts_file_too_deep_names_the_line(tmp_path):
    from nashalign.online.prompts import PromptsConfig, load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hi"}\n{"prompt": "Hi", "meta": ' + nested_text(3000) + "}\n")
    with pytest.raises(NashalignError, match=rf"^{path}:2: lists/objects nested more than 100"):
        load_prompts(PromptsConfig(file=str(path)))


def test_prompts_file_with_invalid_json_names_the_line(tmp_path):
    """Not nesting, but the same path through read_rows: an undecodable line is named as such (it
    used to be reported as a missing 'prompt' field)."""
    from nashalign.online.prompts import PromptsConfig, load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hi"}\n{"prompt": \n')
    with pytest.raises(NashalignError, match=rf"^{path}:2: not valid JSON"):
        load_prompts(PromptsConfig(file=str(path)))


def test_labels_file_too_deep_names_the_line(tmp_path):
    from nashalign.judges.oracles import read_labels

    path = tmp_path / "labels.jsonl"
    row = {"prompt": "p", "first": "a", "second": "b", "label": "first"}
    deep = '{"prompt": "p", "first": "a", "second": "b", "label": ' + nested_text(3000, "0.5") + "}"
    path.write_text(json.dumps(row) + "\n" + deep + "\n")
    with pytest.raises(NashalignError, match=rf"^{path}:2: lists/objects nested more than 100"):
        read_labels(path)


def test_game_file_too_deep_names_the_line(tmp_path):
    from nashalign.core.games import load_game

    path = tmp_path / "game.json"
    path.write_text('{\n"names": ["a", "b"],\n"P": ' + nested_text(3000, "0.5") + "\n}")
    with pytest.raises(NashalignError, match=rf"^{path}:3: lists/objects nested more than 100"):
        load_game(path)


def test_jsonl_and_json_artifacts_too_deep_name_the_line(tmp_path):
    from nashalign.data.artifacts import read_json, read_jsonl

    lines = tmp_path / "responses.jsonl"
    lines.write_text('{"response": "a"}\n{"response": ' + nested_text(3000) + "}\n")
    with pytest.raises(NashalignError, match=rf"^{lines}:2: lists/objects nested more than 100"):
        read_jsonl(lines)
    document = tmp_path / "summary.json"
    document.write_text('{\n"a": ' + nested_text(3000) + "}")
    with pytest.raises(NashalignError, match=rf"^{document}:2: lists/objects nested more than 100"):
        read_json(document)


def test_the_cli_prints_one_line_for_a_deep_records_file(tmp_path, tiny_model_dir, capsys):
    """`nashalign train` on a records file with a 3000-level record: exit status 2 and one line on
    stderr naming the file and the line, no traceback."""
    from nashalign import cli

    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{GOOD}\n{deep_record(3000)}\n")
    config = Path(__file__).resolve().parents[1] / "configs" / "train-tiny.yaml"
    status = cli.main(["train", "--config", str(config), "--set", f"model.name_or_path={tiny_model_dir}",
                       "--set", f"data.train_file={path}", "--set", f"output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("nashalign train: error:")]
    assert line.endswith(f"{path}:2: {TOO_DEEP}")


def test_config_yaml_too_deep_for_the_parser_is_one_error(tmp_path):
    """YAML configs: the composer recurses once per level too; a 3000-level value in the file or in a
    --set override is one error naming where it came from."""
    from nashalign.config import TrainConfig, load_config

    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  name_or_path: {nested_text(3000, 'x')}\n")
    with pytest.raises(NashalignError, match=rf"^{path}: invalid YAML: lists/objects nested too deeply"):
        load_config(TrainConfig, path)
    with pytest.raises(NashalignError, match=r"^--set loss.beta=\[+x\]+: invalid YAML: lists/objects nested too"):
        load_config(TrainConfig, None, [f"loss.beta={nested_text(3000, 'x')}"])


def test_eval_oracle_yaml_too_deep_is_one_line(tmp_path, capsys):
    """`nashalign eval winrate --oracle deep.yaml`: the oracle file is read first; a 3000-level value
    is one line on stderr naming the file, exit status 2."""
    from nashalign import cli

    oracle = tmp_path / "oracle.yaml"
    oracle.write_text(f"type: {nested_text(3000, 'x')}\n")
    status = cli.main(["eval", "winrate", "--policy", "p", "--baseline", "b", "--prompts", "q.jsonl",
                       "--oracle", str(oracle)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip() == f"nashalign eval: error: {oracle}: cannot read the oracle config: {RECURSION}"
