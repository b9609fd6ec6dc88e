"""A model's answers on a prompt set, in the files benchmarks read (`nashalign eval generate`).

Prompt sets (one row per prompt; .jsonl / .json / .parquet / datasets dir, read locally):

    AlpacaEval       rows with `instruction` (and `dataset`), e.g. a local copy of alpaca_eval.json
    Arena-Hard       rows with `uid` and `prompt` (a string), e.g. a local copy of question.jsonl
    nashalign        rows with `prompt`: a string or a list of {"role", "content"} messages

Answer files written:

    answers.jsonl     {"index", "prompt", "output", "generator", "finish_reason", "tokens"} per prompt
    alpaca_eval.json  a JSON list of {"instruction", "output", "generator", "dataset"}: AlpacaEval's
                      model_outputs (`alpaca_eval --model_outputs alpaca_eval.json`)
    arena_hard.jsonl  Arena-Hard's model_answer rows: {"uid", "ans_id", "model", "messages": [user,
                      {"role": "assistant", "content": {"answer": ...}}], "tstamp", "metadata"},
                      metadata = token_len (this model's tokens, not Arena-Hard's tiktoken count) and
                      the markdown counts its style control reads (headers h1–h6, ordered / unordered
                      list items, ** and __ bold spans; code blocks left out)

A string prompt is sent through the tokenizer's chat template as one user message when the tokenizer
has one (instruction benchmarks expect a chat model), else as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path
from typing import Any

from nashalign import NashalignError


@dataclasses.dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt: `prompt` as the model gets it (string or messages), `text` the user's request,
    `uid` (Arena-Hard's, else the row index) and `dataset` (AlpacaEval's subset, else the file stem)."""

    prompt: str | list[dict]
    text: str
    uid: str
    dataset: str


def read_prompt_set(path: str | Path, limit: int | None = None) -> list[BenchmarkPrompt]:
    """The prompts of an AlpacaEval, Arena-Hard or nashalign prompt file (see the module docstring)."""
    from nashalign.data.records import read_rows
    from nashalign.online.prompts import judge_text

    stem = Path(path).stem
    prompts: list[BenchmarkPrompt] = []
    for index, (where, row) in enumerate(read_rows(str(path))):
        if not isinstance(row, dict):
            raise NashalignError(f"{where}: expected a JSON object")
        value = row.get("instruction", row.get("prompt"))
        is_messages = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
        if not (isinstance(value, str) and value.strip()) and not is_messages:
            raise NashalignError(
                f"{where}: expected 'instruction' (AlpacaEval) or 'prompt' (Arena-Hard, nashalign): a non-empty "
                "string or a list of {'role', 'content'} messages"
            )
        uid = row.get("uid", row.get("question_id", index))
        dataset = row.get("dataset", stem)
        prompts.append(BenchmarkPrompt(value, judge_text(value), str(uid), str(dataset)))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise NashalignError(f"{path}: no prompts")
    return prompts


def chat_form(prompt: str | list[dict], tokenizer) -> str | list[dict]:
    """A string as one user message when the tokenizer has a chat template; messages as they are."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


def markdown_counts(answer: str) -> dict[str, dict[str, int]]:
    """Arena-Hard's style features of an answer, counted outside ``` code blocks."""
    text = re.sub(r"```[^`]*```", "", answer)
    return {
        "header_count": {f"h{n}": len(re.findall(rf"^#{{{n}}}\s", text, re.MULTILINE)) for n in range(1, 7)},
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE)),
        },
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)), "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def answer_rows(prompts: list[BenchmarkPrompt], outputs: list[Any], generator: str) -> dict[str, Any]:
    """{"answers.jsonl": rows, "alpaca_eval.json": list, "arena_hard.jsonl": rows} for `outputs`,
    the sampler's Generation per prompt (`text`, `token_ids`, `finish_reason`)."""
    stamp = time.time()
    plain, alpaca, arena = [], [], []
    for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        plain.append({"index": index, "prompt": prompt.prompt, "output": output.text, "generator": generator,
                      "finish_reason": output.finish_reason, "tokens": len(output.token_ids)})
        alpaca.append({"instruction": prompt.text, "output": output.text, "generator": generator,
                       "dataset": prompt.dataset})
        answer_id = hashlib.sha256(f"{generator}\0{prompt.uid}\0{output.text}".encode()).hexdigest()[:22]
        arena.append({
            "uid": prompt.uid,
            "ans_id": answer_id,
            "model": generator,
            "messages": [{"role": "user", "content": prompt.text},
                         {"role": "assistant", "content": {"answer": output.text}}],
            "tstamp": stamp,
            "metadata": {"token_len": len(output.token_ids), **markdown_counts(output.text)},
        })
    return {"answers.jsonl": plain, "alpaca_eval.json": alpaca, "arena_hard.jsonl": arena}
