"""The prompts of an online run: which file each iteration answers, and the three forms the loop
uses (rendered for the policy, plain text for the oracle, token ids for scoring).

`prompts.file` gives every iteration the same prompts; `prompts.files` one file per iteration (the
INPO paper answers a fresh third of its prompt set in each). A prompt is a string or a list of
{"role", "content"} messages, rendered through the tokenizer's chat template.
"""

from __future__ import annotations

import dataclasses

from nashalign import NashalignError
from nashalign.config import ConfigFieldError, _field


@dataclasses.dataclass
class PromptsConfig:
    file: str | None = _field(None, "prompts of every iteration: .jsonl / .json / .parquet / datasets dir")
    files: list[str] | None = _field(
        None, "instead of file: one prompts file per iteration, as many as run.iterations"
    )
    field: str = _field("prompt", "the record field holding the prompt (a string or a list of messages)")
    limit: int | None = _field(None, "use only the first this many prompts (of each file)", ge=1)

    def check(self) -> None:
        if self.file is not None and self.files is not None:
            raise ConfigFieldError("files", "set prompts.file or prompts.files, not both")
        if self.files is not None and not self.files:
            raise ConfigFieldError("files", "expected a list of one prompts file per iteration, got []")


def prompt_file(config: PromptsConfig, t: int) -> str:
    """The prompts file of iteration t: `file`, or `files[t]` (the last one for t = T, whose
    samples of the final policy only serve the last summary row)."""
    if config.files is not None:
        return config.files[min(t, len(config.files) - 1)]
    if config.file is None:
        raise NashalignError(
            "prompts.file: required (a .jsonl/.json/.parquet file or a datasets directory), "
            "or prompts.files: one per iteration"
        )
    return config.file


def load_prompts(config: PromptsConfig, t: int = 0) -> list[str | list[dict]]:
    """The prompts of iteration t (see prompt_file), each a string or a list of {"role", "content"}
    messages."""
    from nashalign.data.sources import Problem, read_rows

    file = prompt_file(config, t)
    prompts = []
    for where, row in read_rows(file):
        if isinstance(row, Problem):  # not valid JSON, invalid UTF-8, nested too deep
            raise NashalignError(str(row))
        value = row.get(config.field) if isinstance(row, dict) else None
        ok_messages = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
        if not (isinstance(value, str) and value.strip()) and not ok_messages:
            raise NashalignError(
                f"{where}: field {config.field!r}: expected a non-empty string or a list of "
                f"{{'role', 'content'}} messages, got {type(value).__name__}"
            )
        prompts.append(value)
        if config.limit and len(prompts) >= config.limit:
            break
    if not prompts:
        raise NashalignError(f"{file}: no prompts")
    return prompts


def render_prompt(prompt: str | list[dict], tokenizer) -> str:
    """The text the policy continues: messages through the chat template (with the generation
    prompt); a plain string is used as it is."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise NashalignError("a prompt is a list of messages, but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def judge_text(prompt: str | list[dict]) -> str:
    """What the oracle sees as the prompt: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """One file's prompts in the three forms the loop uses, aligned by prompt index."""

    file: str
    rendered: list[str]  # what the policy continues (chat template applied)
    judge: list[str]  # what the oracle sees
    ids: list[list[int]]  # `rendered` tokenized, without added special tokens


def prompt_set(config: PromptsConfig, t: int, tokenizer) -> PromptSet:
    prompts = load_prompts(config, t)
    rendered = [render_prompt(p, tokenizer) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    return PromptSet(prompt_file(config, t), rendered, [judge_text(p) for p in prompts], ids)
