"""Data pipeline: reading and validating records, tokenizing them into pairs, collating batches.

Token ids of the tiny tokenizer are not written by hand; expectations are stated in terms of the
tokenizer's own output on the pieces (and the token strings are asserted where a reader needs them).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nashalign import NashalignError
from nashalign.data.tokenization import (
    PreferenceRecord,
    TokenizedPair,
    collate_pairs,
    load_records,
    pair_loader,
    read_records,
    tokenize_records,
)

DATA = Path(__file__).parent / "data"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Two rows per layout; the expected (prompt, chosen, rejected) after loading is given for each.
LAYOUTS = {
    "standard": (
        [
            {"prompt": "What is the capital of France?", "chosen": " Paris", "rejected": " London"},
            {
                "prompt": "Explain gradient descent.",
                "chosen": " It moves against the gradient.",
                "rejected": " No.",
            },
        ],
        [
            ("What is the capital of France?", " Paris", " London"),
            ("Explain gradient descent.", " It moves against the gradient.", " No."),
        ],
    ),
    "conversational": (
        [
            {"prompt": [user("Hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
            {
                "prompt": [{"role": "system", "content": "Be brief."}, user("Sea?")],
                "chosen": [assistant("blue")],
                "rejected": [assistant("red")],
            },
        ],
        [
            ([user("Hi")], [assistant("yes")], [assistant("no")]),
            (
                [{"role": "system", "content": "Be brief."}, user("Sea?")],
                [assistant("blue")],
                [assistant("red")],
            ),
        ],
    ),
    "implicit": (
        [
            {"chosen": [user("Hi"), assistant("yes")], "rejected": [user("Hi"), assistant("no")]},
            {
                "chosen": [user("A"), assistant("b"), user("C"), assistant("d")],
                "rejected": [user("A"), assistant("b"), user("C"), assistant("e")],
            },
        ],
        [
            ([user("Hi")], [assistant("yes")], [assistant("no")]),
            ([user("A"), assistant("b"), user("C")], [assistant("d")], [assistant("e")]),
        ],
    ),
}


def _write(rows, kind, tmp_path):
    """Write `rows` as `kind`; returns (source to load, split, expected source of record 1)."""
    import datasets

    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        return path, None, f"{path}:2"
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return path, None, f"{path}[1]"
    if kind == "json_lines":  # what Dataset.to_json writes: one object per line, .json suffix
        path = tmp_path / "d.json"
        datasets.Dataset.from_list(rows).to_json(path)
        return path, None, f"{path}:2"
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(path)
        return path, None, f"{path}[1]"
    if kind == "disk":
        path = tmp_path / "d_disk"
        datasets.Dataset.from_list(rows).save_to_disk(path)
        return path, None, f"{path}[1]"
    if kind == "disk_dict":
        path = tmp_path / "d_dict"
        ds = datasets.Dataset.from_list(rows)
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(path)
        return path, "train", f"{path}[train][1]"
    if kind == "object":
        return datasets.Dataset.from_list(rows), None, "dataset[1]"
    assert kind == "list"
    return rows, None, "records[1]"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    "kind", ["jsonl", "json", "json_lines", "parquet", "disk", "disk_dict", "object", "list"]
)
def test_every_layout_loads_from_every_source(layout, kind, tmp_path):
    """Each TRL layout read from each source gives the same records; extra fields are kept in `extra`."""
    rows, expected = LAYOUTS[layout]
    rows = [{**row, "chosen_win_rate": 0.75, "rejected_win_rate": 0.25} for row in rows]
    source, split, second_source = _write(rows, kind, tmp_path)
    records = load_records(source, split=split)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == expected
    assert records[1].source == second_source
    assert all(r.extra == {"chosen_win_rate": 0.75, "rejected_win_rate": 0.25} for r in records)
    assert all(r.is_conversational == (layout != "standard") for r in records)


def test_implicit_string_prompt_splits_like_trl():
    """Strings split at the longest common character prefix; a trailing space goes to the responses."""
    (record,) = load_records([{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    assert (record.prompt, record.chosen, record.rejected) == ("The sky is", " blue.", " green.")


def test_arrow_padding_keys_of_messages_are_dropped():
    """Arrow gives every message every key of its column; keys that are None were absent and are dropped."""
    import datasets

    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi", "name": "ann"}],
            "chosen": [assistant("a")],
            "rejected": [assistant("b")],
        },
    ]
    (record,) = load_records(datasets.Dataset.from_list(rows))
    assert record.prompt == [{"role": "user", "content": "Hi", "name": "ann"}]
    assert record.chosen == [assistant("a")]


def test_datasetdict_split_selection(tmp_path):
    import datasets

    rows = LAYOUTS["standard"][0]
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(path)
    assert len(load_records(path, split="test")) == 1
    with pytest.raises(NashalignError, match=r"holds splits \['test', 'train'\]; choose one with split="):
        load_records(path)
    with pytest.raises(NashalignError, match=r"no split 'dev'"):
        load_records(path, split="dev")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.jsonl", None, "no such file"),
        ("d.csv", b"a,b\n", "unknown file type '.csv'"),
        ("d.json", b'{"a": 1}', None),  # read as JSON Lines: a record without chosen/rejected
        ("d.json", b'[{"prompt": "x",\n "chosen": }]', r"d\.json:2: not valid JSON"),
        ("d.json", b'[{"prompt": "x"},\n "\xff"]', r"d\.json:2: invalid UTF-8"),
        ("d.json", b'"just text"', "expected a JSON list of records"),
        ("d.parquet", b"not parquet", "not a readable Parquet file"),
        ("folder", None, "not one written by datasets' save_to_disk"),
    ],
)
def test_unreadable_sources_raise_one_clear_error(name, content, match, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    elif name == "folder":
        path.mkdir()
    with pytest.raises(NashalignError, match=match or r"d\.json:1: field 'chosen': missing"):
        load_records(path)


# (line, field) of every problem in tests/data/malformed.jsonl; field None means the whole line.
MALFORMED_EXPECTED = [
    (2, "chosen"),  # missing key
    (3, "chosen"),  # number instead of string
    (4, "chosen"),  # blank response
    (5, None),  # invalid UTF-8 byte
    (6, None),  # bad JSON
    (7, None),  # a list, not an object
    (8, "prompt[0].role"),  # message without role
    (9, "prompt[0].role"),  # unknown role
    (10, "prompt[0]"),  # list of non-dicts
    (11, "prompt"),  # null
    (12, "prompt[0].content"),  # number content
    (13, "prompt"),  # implicit prompt, no shared prefix
    (15, "chosen"),  # string response with conversational prompt
    (16, "chosen[0].role"),  # response starts with a user turn
    (17, "rejected"),  # empty message list
    (18, "chosen_win_rate"),  # out of [0, 1]
    (19, "rejected_win_rate"),  # string instead of number
    (20, "prompt"),  # lone surrogate escape
    (21, "chosen[0].content"),  # empty assistant content
    (23, "chosen"),  # boolean
    (24, "prompt"),  # implicit strings, no shared prefix
    (25, "chosen"),  # implicit: chosen is a prefix of rejected, nothing left
    (26, "prompt"),  # object instead of string
    (27, "chosen[0].content"),  # null content
    (28, "prompt[0].role"),  # number role
    (30, "chosen_win_rate"),  # NaN
    (31, None),  # a string, not an object
    (32, "chosen"),  # empty object
    (32, "rejected"),
    (33, "chosen[1].role"),  # response ends with a user turn
]
MALFORMED_VALID_LINES = [1, 14, 29]


def _location(line, field):
    where = f"malformed.jsonl:{line}"
    return f"{where}: " if field is None else f"{where}: field '{field}': "


def test_malformed_file_names_line_and_field_of_every_problem():
    """Every expected (line, field) is reported; only the valid lines (and the warned one) load."""
    report = read_records(DATA / "malformed.jsonl")
    messages = [str(p) for p in report.problems]
    assert len({line for line, _ in MALFORMED_EXPECTED}) >= 15
    for line, field in MALFORMED_EXPECTED:
        assert any(_location(line, field) in m for m in messages), (line, field, messages)
    reported = {(int(p.source.rsplit(":", 1)[1]), p.field) for p in report.problems}
    assert reported >= set(MALFORMED_EXPECTED)
    assert {int(p.source.rsplit(":", 1)[1]) for p in report.problems}.isdisjoint(MALFORMED_VALID_LINES)
    assert [int(r.source.rsplit(":", 1)[1]) for r in report.records] == MALFORMED_VALID_LINES
    assert [str(w) for w in report.warnings] == [
        f"{DATA / 'malformed.jsonl'}:14: field 'rejected': identical to chosen (the pair carries no preference signal)"
    ]


def test_malformed_file_raises_one_error_listing_the_first_problems():
    """on_error='raise': one NashalignError, the first 20 problems in file order and the count left out."""
    problems = read_records(DATA / "malformed.jsonl").problems
    bad_lines = {p.source for p in problems}
    with pytest.raises(NashalignError) as caught:
        load_records(DATA / "malformed.jsonl")
    message = str(caught.value)
    assert f"{len(bad_lines)} invalid record(s), {len(problems)} problem(s)" in message.splitlines()[0]
    for problem in problems[:20]:
        assert str(problem) in message
    assert str(problems[20]) not in message
    assert message.splitlines()[-1] == f"  ... and {len(problems) - 20} more"


def test_malformed_file_skip_mode_counts_and_logs(caplog):
    """on_error='skip': the valid records load; the skip count, each reason and the warning are logged."""
    with caplog.at_level(logging.WARNING, logger="nashalign.data.records"):
        records = load_records(DATA / "malformed.jsonl", on_error="skip")
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "14", "29"]
    bad = len({line for line, _ in MALFORMED_EXPECTED})
    assert f"skipped {bad} invalid record(s)" in caplog.text
    assert "malformed.jsonl:14: field 'rejected': identical to chosen" in caplog.text
    assert "malformed.jsonl:2: field 'chosen': missing" in caplog.text


def test_each_malformed_line_alone_raises_only_nashalign_error(tmp_path):
    """Each line of the file, alone in a file, either loads (the valid and warned lines) or raises
    NashalignError naming that file's line 1 (and the field, when the problem is in one)."""
    lines = (DATA / "malformed.jsonl").read_bytes().split(b"\n")
    fields = {}
    for line, field in MALFORMED_EXPECTED:
        fields.setdefault(line, []).append(field)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        path = tmp_path / f"line{number}.jsonl"
        path.write_bytes(raw)
        if number in MALFORMED_VALID_LINES:
            assert len(load_records(path)) == 1
            continue
        with pytest.raises(NashalignError) as caught:
            load_records(path)
        for field in fields[number]:
            assert _location(1, field).replace("malformed", f"line{number}") in str(caught.value)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
MESSAGE_LIKE = st.lists(
    st.fixed_dictionaries(
        {}, optional={"role": st.sampled_from(["user", "assistant", "bot", 3]), "content": JSON_VALUES}
    ),
    max_size=3,
)
ROW_LIKE = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "chosen_win_rate", "other"]),
    JSON_VALUES | MESSAGE_LIKE | st.text(max_size=4),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(ROW_LIKE | JSON_VALUES, min_size=1, max_size=4))
def test_arbitrary_rows_raise_nothing_but_nashalign_error(rows):
    """Property: any JSON-like rows either load or raise NashalignError; read_records never raises."""
    report = read_records(rows)
    assert len(report.records) + len({p.source for p in report.problems}) == len(rows)
    try:
        load_records(rows)
    except NashalignError as error:
        assert "records[" in str(error) or "no valid preference records" in str(error)


# ---------------------------------------------------------------- tokenization


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_string_records_get_exactly_one_eos(tiny_tokenizer):
    """prompt_ids = ids(prompt); response = ids(prompt + response + "</s>") after the prompt; a response
    already ending with the EOS text (once or twice) still ends with exactly one EOS. No BOS is added:
    the tiny tokenizer adds none by itself."""
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    prompt = "What is the capital of France?"
    records = load_records(
        [
            {"prompt": prompt, "chosen": " Paris", "rejected": " London"},
            {"prompt": prompt, "chosen": " Paris</s>", "rejected": " London</s></s>"},
        ]
    )
    pairs, report = tokenize_records(records, tok)
    assert tok.convert_ids_to_tokens(pairs[0].prompt_ids) == [
        "What",
        "Ġis",
        "Ġthe",
        "Ġcapital",
        "Ġof",
        "ĠFrance",
        "?",
    ]
    for pair in pairs:
        assert pair.prompt_ids == _ids(tok, prompt)
        assert pair.chosen_ids == _ids(tok, " Paris") + [eos]
        assert pair.rejected_ids == _ids(tok, " London") + [eos]
    assert report.boundary_merges == 0 and report.kept == 2


def test_bos_comes_from_the_tokenizer_once(tiny_tokenizer):
    """A tokenizer whose post-processor adds BOS ("<s> $A"): the prompt starts with exactly one BOS and
    the responses contain none (they are cut from the BOS-prefixed prompt + response ids)."""
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    bos = tok.bos_token_id
    (pair,), _ = tokenize_records(
        load_records([{"prompt": "Hi there", "chosen": " yes", "rejected": " no"}]), tok
    )
    assert pair.prompt_ids == [bos] + _ids(tiny_tokenizer, "Hi there")
    assert pair.chosen_ids == _ids(tiny_tokenizer, " yes") + [tok.eos_token_id]
    assert bos not in pair.chosen_ids + pair.rejected_ids


def test_boundary_merge_is_counted_and_matches_trl_convention(tiny_tokenizer):
    """Prompt "...France? " ends with the token 'Ġ', which merges with "Paris" into 'ĠParis': the prompt
    is cut to the common prefix (without 'Ġ') and the response starts with 'ĠParis'."""
    tok = tiny_tokenizer
    records = load_records(
        [{"prompt": "What is the capital of France? ", "chosen": "Paris", "rejected": "London"}]
    )
    (pair,), report = tokenize_records(records, tok)
    assert tok.convert_ids_to_tokens(_ids(tok, "What is the capital of France? "))[-1] == "Ġ"
    assert pair.prompt_ids == _ids(tok, "What is the capital of France?")
    assert tok.convert_ids_to_tokens(pair.chosen_ids) == ["ĠParis", "</s>"]
    assert report.boundary_merges == 1


def test_conversational_rendering_matches_chat_template(tiny_tokenizer):
    """The prompt is the template's render with the generation prompt; prompt + response is the render of
    the whole conversation up to and including the response's EOS; the template's newline after that EOS
    is not part of the response (kept with keep_after_eos=True, as TRL does)."""
    tok = tiny_tokenizer
    prompt = [{"role": "system", "content": "Be brief."}, user("What is the capital of France?")]
    records = load_records(
        [{"prompt": prompt, "chosen": [assistant("Paris")], "rejected": [assistant("London")]}]
    )
    (pair,), _ = tokenize_records(records, tok)
    expected_prompt = tok.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert pair.prompt_ids == expected_prompt["input_ids"]
    for response, ids in (("Paris", pair.chosen_ids), ("London", pair.rejected_ids)):
        full = tok.apply_chat_template(prompt + [assistant(response)], tokenize=True, return_dict=True)[
            "input_ids"
        ]
        assert tok.convert_ids_to_tokens(full[-2:]) == ["</s>", "Ċ"]
        assert pair.prompt_ids + ids == full[:-1]
        assert tok.decode(ids) == f"{response}</s>"
        assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    (kept,), _ = tokenize_records(records, tok, keep_after_eos=True)
    assert kept.chosen_ids == pair.chosen_ids + _ids(tok, "\n")


def test_multi_turn_response_ends_with_one_eos(tiny_tokenizer):
    """An implicit-prompt response of several turns keeps the EOS that ends each inner turn and ends
    with exactly one EOS."""
    tok = tiny_tokenizer
    records = load_records(
        [
            {
                "chosen": [user("Hi"), assistant("yes"), user("sure?"), assistant("yes")],
                "rejected": [user("Hi"), assistant("no")],
            }
        ]
    )
    (pair,), _ = tokenize_records(records, tok)
    assert tok.decode(pair.chosen_ids) == "yes</s>\n<|user|>\nsure?</s>\n<|assistant|>\nyes</s>"
    assert pair.chosen_ids[-1] == tok.eos_token_id and pair.chosen_ids[-2] != tok.eos_token_id


def test_template_without_eos_gets_one_appended(tiny_tokenizer):
    """A chat template that ends turns with a plain newline: the response gets one EOS appended."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("eos_token + ", "")
    records = load_records(
        [{"prompt": [user("Hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}]
    )
    (pair,), _ = tokenize_records(records, tok)
    assert tok.decode(pair.chosen_ids) == "yes\n</s>"


def test_stop_token_ids_end_responses_where_generation_stops(two_eos_model_dir):
    """Llama-3-style stop tokens: the template ends turns with "<|eot|>\\n" while the tokenizer's
    eos_token is "</s>". Given the model's stop ids ["</s>", "<|eot|>"], a response ends with the
    "<|eot|>" its turn ends with, as generation stops there; with the tokenizer's EOS alone it would
    run on through "\\n" and get a "</s>" appended that the model never produces after "<|eot|>".
    String responses likewise; a trailing run "<|eot|></s>" is cut after its first token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(two_eos_model_dir)
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot|>")
    records = load_records(
        [
            {"prompt": [user("Hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
            {"prompt": "Hi", "chosen": " yes<|eot|>", "rejected": " no<|eot|></s>"},
        ]
    )
    (chat, text), _ = tokenize_records(records, tok, stop_token_ids=[eos, eot])
    assert chat.chosen_ids == _ids(tok, "yes") + [eot] and chat.rejected_ids == _ids(tok, "no") + [eot]
    assert text.chosen_ids == _ids(tok, " yes") + [eot] and text.rejected_ids == _ids(tok, " no") + [eot]
    (chat_eos_only, _), _ = tokenize_records(records, tok)
    assert chat_eos_only.chosen_ids == _ids(tok, "yes") + [eot] + _ids(tok, "\n") + [eos]
    with pytest.raises(NashalignError, match="stop_token_ids must be token ids"):
        tokenize_records(records, tok, stop_token_ids=["<|eot|>"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    response=st.lists(
        st.sampled_from(["a", " b", "</s>", "\n", " sea", "<s>", "?"]), min_size=1, max_size=6
    ).map("".join)
)
def test_every_response_ends_with_exactly_one_eos(tiny_tokenizer, response):
    """Property: whatever the response text (including EOS text inside or at its end), both the string
    and the conversational rendering end with one EOS, not two, and the EOS log-prob is counted."""
    if not response.replace("</s>", "").strip():
        return
    eos = tiny_tokenizer.eos_token_id
    records = load_records(
        [
            {"prompt": "Hi.", "chosen": response, "rejected": "no"},
            {"prompt": [user("Hi.")], "chosen": [assistant(response)], "rejected": [assistant("no")]},
        ]
    )
    pairs, _ = tokenize_records(records, tiny_tokenizer)
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    for i, pair in enumerate(pairs):
        assert pair.chosen_ids[-1] == eos
        assert len(pair.chosen_ids) == 1 or pair.chosen_ids[-2] != eos
        last = len(pair.prompt_ids) + len(pair.chosen_ids) - 1
        assert batch["input_ids"][i, last] == eos and batch["response_mask"][i, last]


def test_conversational_without_template_and_non_prefix_template_raise(tiny_tokenizer):
    records = load_records(
        [{"prompt": [user("Hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}]
    )
    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    with pytest.raises(NashalignError, match=r"records\[0\]: field 'prompt': .*no chat template"):
        tokenize_records(records, no_template)
    # The generation prompt says "<|assistant|>\n" but the rendered assistant turn starts "<|bot|>".
    odd = copy.deepcopy(tiny_tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{{ ('<|bot|>' if m['role'] == 'assistant' else '<|' + m['role'] + '|>') + '\n' "
        "+ m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    with pytest.raises(
        NashalignError,
        match=r"records\[0\]: field 'chosen': the chat template renders the prompt .* cannot be located: "
        r"after 'r\|>\\nHi</s><\|' \(character 17\) the prompt continues 'assistant\|>\\n', the "
        r"conversation 'bot\|>\\nyes</s>'",
    ):
        tokenize_records(records, odd)


# A chat template whose generation prompt ends with a space: with the byte-level BPE tokenizer the
# prompt ends with the token 'Ġ', while in the conversation that space merges into 'ĠParis'.
SPACE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def space_tokenizer():
    """The tiny byte-level BPE (trained here with `tokenizers`) with SPACE_TEMPLATE."""
    from nashalign.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = SPACE_TEMPLATE
    return tokenizer


def test_generation_prompt_ending_inside_a_token_is_tokenized_separately(space_tokenizer, caplog):
    """prompt "user: What is the capital of France?</s>\nassistant: " ends with 'Ġ'; the conversation
    continues "assistant: Paris</s>", tokenized 'ĠParis', so the prompt's ids are not a prefix of the
    conversation's. The response is then the text after the rendered prompt, "Paris</s>\n" (EOS-cut:
    "Paris</s>"), tokenized alone and appended to the template's prompt ids, which are what the policy
    continues when it generates. A response starting with a space (" London": 'Ġ', 'ĠLondon') keeps
    the prompt's ids as a prefix and is not counted."""
    tok = space_tokenizer
    prompt = [user("What is the capital of France?")]
    records = load_records(
        [
            {"prompt": prompt, "chosen": [assistant("Paris")], "rejected": [assistant("London")]},
            {"prompt": prompt, "chosen": [assistant(" Paris")], "rejected": [assistant(" London")]},
        ]
    )
    template_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tok.apply_chat_template(prompt + [assistant("Paris")], tokenize=True, return_dict=True)["input_ids"]
    assert tok.convert_ids_to_tokens(template_prompt["input_ids"])[-2:] == [":", "Ġ"]
    assert full[: len(template_prompt["input_ids"])] != template_prompt["input_ids"]

    with caplog.at_level(logging.WARNING):
        (split, spaced), report = tokenize_records(records, tok)
    assert split.prompt_ids == spaced.prompt_ids == template_prompt["input_ids"]
    assert tok.convert_ids_to_tokens(split.chosen_ids) == ["P", "aris", "</s>"]  # no 'Paris' without 'Ġ'
    assert split.chosen_ids == tok("Paris</s>", add_special_tokens=False)["input_ids"]
    assert split.rejected_ids == tok("London</s>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(spaced.chosen_ids) == ["ĠParis", "</s>"]
    assert report.separately_tokenized == 1 and report.kept == 2
    assert "1 conversational records tokenized as prompt and response separately" in report.summary()
    assert "tokenized separately and concatenated" in caplog.text


def test_separately_tokenized_pairs_train_on_the_context_the_policy_generates_from(space_tokenizer):
    """The point of tokenizing separately: a pair's prompt ids are exactly the ids the online loop and
    the sampler feed the policy (nashalign.online.prompts: the rendered prompt tokenized without added
    special tokens), trailing 'Ġ' included, and prompt + response decode to the rendered
    conversation (up to the response's EOS). (TRL 1.16 instead cuts the prompt at the common token
    prefix, dropping that 'Ġ' from the training context, and warns that it differs from inference.)"""
    from nashalign.online.prompts import render_prompt

    tok = space_tokenizer
    rows = [
        {"prompt": [user("Hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
        {"prompt": [user("Sea?")], "chosen": [assistant("blue")], "rejected": [assistant(" wide")]},
    ]
    pairs, report = tokenize_records(load_records(rows), tok)
    assert report.separately_tokenized == 2
    for row, pair in zip(rows, pairs):
        assert pair.prompt_ids == tok(render_prompt(row["prompt"], tok), add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(pair.prompt_ids)[-1] == "Ġ"
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            rendered = tok.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            assert tok.decode(pair.prompt_ids + ids) == rendered[: rendered.rindex("</s>") + len("</s>")]


def test_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer):
    """Untruncated: prompt P = [What, Ġis, Ġthe, Ġcapital, Ġof, ĠFrance, ?] (7), chosen C = [ĠParis, </s>] (2),
    rejected R = [Ġ, L, o, n, d, o, n, </s>] (8). With max_prompt_length=3, max_length=6:
    prompt -> P[-3:] = [Ġof, ĠFrance, ?]; room 6 - 3 = 3; C fits; R -> R[:3] = [Ġ, L, o].
    Counts: 1 truncated prompt, 0 truncated chosen, 1 truncated rejected, nothing dropped."""
    tok = tiny_tokenizer
    records = load_records(
        [{"prompt": "What is the capital of France?", "chosen": " Paris", "rejected": " London"}]
    )
    (full,), _ = tokenize_records(records, tok)
    (pair,), report = tokenize_records(records, tok, max_length=6, max_prompt_length=3)
    assert tok.convert_ids_to_tokens(full.rejected_ids) == ["Ġ", "L", "o", "n", "d", "o", "n", "</s>"]
    assert tok.convert_ids_to_tokens(pair.prompt_ids) == ["Ġof", "ĠFrance", "?"]
    assert pair.prompt_ids == full.prompt_ids[-3:]
    assert pair.chosen_ids == full.chosen_ids
    assert pair.rejected_ids == full.rejected_ids[:3]
    assert (report.truncated_prompts, report.truncated_chosen, report.truncated_rejected) == (1, 0, 1)
    assert report.truncated_responses == 1 and report.dropped == [] and report.kept == 1


def test_left_truncation_keeps_a_leading_bos(tiny_tokenizer):
    """Prompt "<s>What is ... France?" is [<s>, What, ..., ĠFrance, ?]; cut to 3 it keeps <s> and the
    last two tokens: [<s>, ĠFrance, ?]."""
    tok = tiny_tokenizer
    records = load_records(
        [{"prompt": "<s>What is the capital of France?", "chosen": " Paris", "rejected": " no"}]
    )
    (pair,), _ = tokenize_records(records, tok, max_prompt_length=3)
    assert tok.convert_ids_to_tokens(pair.prompt_ids) == ["<s>", "ĠFrance", "?"]


def test_records_that_cannot_fit_are_dropped_counted_and_logged(tiny_tokenizer, caplog):
    """max_length=7: the 7-token prompt leaves no room (dropped); the 4-token prompt "Explain gradient
    descent." leaves 3 tokens, so the 2-token chosen fits and the 8-token rejected is cut to 3."""
    tok = tiny_tokenizer
    rows = [
        {"prompt": "What is the capital of France?", "chosen": " Paris", "rejected": " London"},
        {"prompt": "Explain gradient descent.", "chosen": " Paris", "rejected": " London"},
    ]
    with caplog.at_level(logging.WARNING, logger="nashalign.data.tokenization"):
        pairs, report = tokenize_records(load_records(rows), tok, max_length=7)
    assert [p.source for p in pairs] == ["records[1]"]
    assert report.dropped == ["records[0]"] and report.total == 2 and report.kept == 1
    assert (report.truncated_prompts, report.truncated_chosen, report.truncated_rejected) == (0, 0, 1)
    assert len(pairs[0].prompt_ids) + len(pairs[0].rejected_ids) == 7
    assert "1/2 records kept" in caplog.text and "records[0]" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"max_prompt_length": 2.5}, "max_prompt_length must be a positive integer"),
        (
            {"max_length": 4, "max_prompt_length": 4},
            r"max_prompt_length \(4\) must be smaller than max_length \(4\)",
        ),
    ],
)
def test_bad_length_arguments(tiny_tokenizer, kwargs, match):
    with pytest.raises(NashalignError, match=match):
        tokenize_records([], tiny_tokenizer, **kwargs)


def test_tokenization_and_truncation_match_trl(tiny_tokenizer):
    """Against a reference no one here wrote: TRL's DPOTrainer dataset preparation gives the same
    prompt/chosen/rejected ids (standard, boundary merge, EOS already present, conversational with
    keep_after_eos=True, implicit prompt); with max_length only, TRL's drop of prompts that fill
    max_length plus its collator's keep_start truncation give the same batch as ours."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    import datasets
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    standard = [
        {"prompt": "What is the capital of France?", "chosen": " Paris", "rejected": " London</s>"},
        {"prompt": "What is the capital of France? ", "chosen": "Paris", "rejected": "London"},
        {"prompt": "Explain gradient descent.", "chosen": " It moves downhill.", "rejected": " No"},
        {"prompt": "Numbers:", "chosen": " 1 2 3 4 5 6 7", "rejected": " no"},
    ]
    conversational = [
        {"prompt": [user("Hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
        {"prompt": [user("Sea?")], "chosen": [assistant("blue")], "rejected": [assistant("wide and blue")]},
    ]
    implicit = [{"chosen": [user("Hi"), assistant("yes")], "rejected": [user("Hi"), assistant("no")]}]

    def trl_examples(rows, max_length):
        args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
        this = SimpleNamespace(_tokenizer=tiny_tokenizer)
        return list(
            DPOTrainer._prepare_dataset(this, datasets.Dataset.from_list(rows), tiny_tokenizer, args, "t")
        )

    for rows, keep in ((standard, False), (conversational, True), (implicit, True)):
        pairs, _ = tokenize_records(load_records(rows), tiny_tokenizer, keep_after_eos=keep)
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == [
            (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trl_examples(rows, None)
        ]

    max_length = 7  # drops records 0 and 1 (7-token prompts), truncates responses of the others
    pairs, report = tokenize_records(load_records(standard), tiny_tokenizer, max_length=max_length)
    reference = trl_examples(standard, max_length)
    # records 2 and 3 have 4- and 2-token prompts: both chosen are cut, and the rejected of record 2
    # ([Ġ, N, o, </s>], 4 > 7 - 4) too; record 3's rejected ([Ġno, </s>]) fits.
    assert len(reference) == len(pairs) == 2 and report.dropped == ["records[0]", "records[1]"]
    assert (report.truncated_chosen, report.truncated_rejected) == (2, 1)
    assert tiny_tokenizer.convert_ids_to_tokens(pairs[1].rejected_ids) == ["Ġno", "</s>"]
    pad = tiny_tokenizer.pad_token_id
    trl_batch = DataCollatorForPreference(pad_token_id=pad, max_length=max_length)(reference)
    ours = collate_pairs(pairs, pad)
    assert torch.equal(ours["input_ids"], trl_batch["input_ids"])
    assert torch.equal(ours["attention_mask"], trl_batch["attention_mask"])
    assert torch.equal(ours["response_mask"], trl_batch["completion_mask"].bool())


# ---------------------------------------------------------------- collation and hashing


def _two_pairs():
    return [
        TokenizedPair(
            [5, 6], [7, 2], [8, 9, 2], "a", {"chosen_win_rate": 0.75, "rejected_win_rate": 0.25, "tag": "x"}
        ),
        TokenizedPair(
            [10], [11, 2], [2], "b", {"chosen_win_rate": 1, "rejected_win_rate": 0.0, "flag": True}
        ),
    ]


def test_collate_two_pairs_by_hand():
    """Rows (pad 0, T = 5): a+chosen [5,6,7,2,0], b+chosen [10,11,2,0,0], a+rejected [5,6,8,9,2],
    b+rejected [10,2,0,0,0]; response tokens start after each prompt (2, 1, 2, 1 tokens)."""
    batch = collate_pairs(_two_pairs(), pad_token_id=0)
    assert torch.equal(
        batch["input_ids"],
        torch.tensor([[5, 6, 7, 2, 0], [10, 11, 2, 0, 0], [5, 6, 8, 9, 2], [10, 2, 0, 0, 0]]),
    )
    assert torch.equal(
        batch["attention_mask"],
        torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
    )
    assert torch.equal(
        batch["response_mask"],
        torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool),
    )
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert torch.equal(batch["chosen_lengths"], torch.tensor([2, 2]))
    assert torch.equal(batch["rejected_lengths"], torch.tensor([3, 1]))
    assert torch.equal(batch["prompt_lengths"], torch.tensor([2, 1]))
    assert batch["chosen_win_rate"].dtype == torch.float32
    torch.testing.assert_close(batch["chosen_win_rate"], torch.tensor([0.75, 1.0]))
    torch.testing.assert_close(batch["rejected_win_rate"], torch.tensor([0.25, 0.0]))
    assert "tag" not in batch and "flag" not in batch
    assert torch.equal(batch["response_mask"].sum(1), torch.tensor([2, 2, 3, 1]))


def test_pair_loader_batches_in_order():
    pairs = _two_pairs() * 2
    batches = list(pair_loader(pairs, 0, batch_size=2))
    assert len(batches) == 2
    for batch in batches:
        assert torch.equal(batch["input_ids"], collate_pairs(_two_pairs(), 0)["input_ids"])


def test_content_hash_is_stable_and_sensitive():
    """The hash is sha256 of "nashalign-pair-v1:" + the compact JSON of [prompt, chosen, rejected] ids,
    so it is fixed across runs; source and extra do not enter it; any one-token change, or moving the
    prompt/response boundary, changes it."""
    pair = TokenizedPair([1, 2], [3, 2], [4, 2], "x", {"a": 1})
    expected = hashlib.sha256(b"nashalign-pair-v1:[[1,2],[3,2],[4,2]]").hexdigest()
    assert pair.content_hash() == expected
    assert TokenizedPair([1, 2], [3, 2], [4, 2], "elsewhere", {}).content_hash() == expected
    variants = [
        ([9, 2], [3, 2], [4, 2]),
        ([1, 2], [3, 9], [4, 2]),
        ([1, 2], [3, 2], [4, 9]),
        ([1], [2, 3, 2], [4, 2]),
        ([1, 2], [4, 2], [3, 2]),
    ]
    hashes = {TokenizedPair(*v, "x").content_hash() for v in variants}
    assert len(hashes) == len(variants) and expected not in hashes


def test_records_are_frozen():
    record = PreferenceRecord("p", "c", "r", "s")
    with pytest.raises(AttributeError):
        record.prompt = "q"
