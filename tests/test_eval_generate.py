"""`nashalign eval generate`: answer files read back with AlpacaEval's and Arena-Hard's field names."""

from __future__ import annotations

import json

import pytest
import torch

from nashalign.cli import main
from nashalign.data.artifacts import read_jsonl, write_jsonl
from nashalign.eval.answers import markdown_counts


def _greedy(model_dir, instruction: str, max_new_tokens: int) -> str:
    """The model's greedy answer to `instruction` as one chat user turn, from transformers' generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_alpaca_eval_prompt_set_gives_alpaca_eval_model_outputs(tmp_path, tiny_model_dir, capsys):
    """An AlpacaEval prompt set (a local JSON list with instruction / output / generator / dataset,
    as alpaca_eval.json is) → alpaca_eval.json: one {instruction, output, generator, dataset} per
    instruction, in order, the output the model's greedy answer to the instruction as a chat turn."""
    prompt_set = tmp_path / "alpaca_eval.json"
    rows = [{"instruction": f"Name a color {i}.", "output": "reference", "generator": "gpt4_turbo",
             "dataset": ["helpful_base", "oasst"][i % 2]} for i in range(3)]
    prompt_set.write_text(json.dumps(rows))
    out = tmp_path / "answers"
    assert main(["eval", "generate", "--model", str(tiny_model_dir), "--prompts", str(prompt_set),
                 "--output-dir", str(out), "--name", "tiny-inpo", "--max-new-tokens", "6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompts"] == 3 and printed["generator"] == "tiny-inpo"
    outputs = json.loads((out / "alpaca_eval.json").read_text())
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]
    assert [o["dataset"] for o in outputs] == [r["dataset"] for r in rows]
    assert {o["generator"] for o in outputs} == {"tiny-inpo"}
    assert outputs[0]["output"] == _greedy(tiny_model_dir, rows[0]["instruction"], 6)
    plain = read_jsonl(out / "answers.jsonl")
    assert [p["output"] for p in plain] == [o["output"] for o in outputs]
    assert all(0 < p["tokens"] <= 6 for p in plain)


def test_arena_hard_questions_give_arena_hard_model_answers(tmp_path, tiny_model_dir):
    """Arena-Hard questions (uid, category, prompt) → arena_hard.jsonl rows keyed by uid, the answer at
    messages[-1].content.answer, metadata.token_len = the answer's tokens, and the style counts."""
    questions = tmp_path / "question.jsonl"
    write_jsonl(questions, ({"uid": f"q{i:03d}", "category": "hard_prompt", "subcategory": "x",
                             "prompt": f"Explain item {i}."} for i in range(4)))
    out = tmp_path / "answers"
    assert main(["eval", "generate", "--model", str(tiny_model_dir), "--prompts", str(questions),
                 "--output-dir", str(out), "--max-new-tokens", "5", "--limit", "3"]) == 0
    answers = read_jsonl(out / "arena_hard.jsonl")
    plain = read_jsonl(out / "answers.jsonl")
    assert [a["uid"] for a in answers] == ["q000", "q001", "q002"]
    for answer, row in zip(answers, plain):
        assert answer["model"] == tiny_model_dir.name and isinstance(answer["ans_id"], str)
        assert isinstance(answer["tstamp"], float)
        user, assistant = answer["messages"]
        assert user == {"role": "user", "content": row["prompt"]}
        assert assistant["role"] == "assistant" and assistant["content"]["answer"] == row["output"]
        assert answer["metadata"]["token_len"] == row["tokens"]
        assert set(answer["metadata"]["header_count"]) == {"h1", "h2", "h3", "h4", "h5", "h6"}
        assert set(answer["metadata"]["list_count"]) == {"ordered", "unordered"}
        assert set(answer["metadata"]["bold_count"]) == {"**", "__"}


def test_markdown_counts_by_hand():
    text = "# Title\n## Part\n1. one\n2. two\n- dash\n* star\n**bold** and __also__\n```\n# in code\n- in code\n```\n"
    assert markdown_counts(text) == {
        "header_count": {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0},
        "list_count": {"ordered": 2, "unordered": 2},
        "bold_count": {"**": 1, "__": 1},
    }


def test_a_row_without_a_prompt_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    questions = tmp_path / "question.jsonl"
    write_jsonl(questions, [{"uid": "a", "prompt": "fine"}, {"uid": "b", "question": "no prompt field"}])
    status = main(["eval", "generate", "--model", str(tiny_model_dir), "--prompts", str(questions),
                   "--output-dir", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err
    assert "question.jsonl:2: expected 'instruction' (AlpacaEval) or 'prompt'" in err and "Traceback" not in err


@pytest.mark.parametrize("limit", ["0"])
def test_limit_must_be_positive(tmp_path, tiny_model_dir, capsys, limit):
    questions = tmp_path / "question.jsonl"
    write_jsonl(questions, [{"uid": "a", "prompt": "fine"}])
    assert main(["eval", "generate", "--model", str(tiny_model_dir), "--prompts", str(questions),
                 "--output-dir", str(tmp_path / "out"), "--limit", limit]) == 2
    assert "--limit: expected a positive integer" in capsys.readouterr().err
