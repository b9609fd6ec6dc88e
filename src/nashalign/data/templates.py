"""Conversational records through the tokenizer's chat template: the prompt's ids and each response's.

The prompt is rendered with `apply_chat_template(prompt, add_generation_prompt=True)`; each response
is `ids(prompt + response) - ids(prompt)`, the whole conversation rendered by the same template.

When the prompt's ids are not a prefix of the conversation's ids, the generation prompt ends inside a
token: a template ending it with `assistant: ` and a byte-level BPE, whose trailing space 'Ġ' merges
with the response's first word into one token in the conversation. The response is then the text
that follows the rendered prompt in the rendered conversation, tokenized on its own and appended to
the prompt's ids (as earlier TRL releases did), so the pair is trained on the context the policy is
given when it generates: it continues the prompt's ids, 'Ġ' included. (TRL 1.16 cuts the prompt at
the common token prefix instead, which drops that token from the training context.) A template whose
rendered prompt text is not even the start of the rendered conversation leaves the response nowhere
to be found: a `RecordError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

Messages = list[dict[str, Any]]


class RecordError(Exception):
    """A record that cannot be tokenized: the field at fault (None for the whole record) and why."""

    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field = field_name


def conversation_ids(
    tokenizer: Any, prompt: Messages, responses: Mapping[str, Messages]
) -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, the ids of each response in the order given, whether any was tokenized separately).

    `responses` maps a field name ("chosen", ...) to its messages; errors name that field. The ids
    of a response run to the end of the rendered conversation (EOS handling is the caller's).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise RecordError("prompt", "conversational record, but the tokenizer has no chat template")
    prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, field_name="prompt")
    response_ids, separately = [], False
    for key, messages in responses.items():
        full_ids = _chat_ids(tokenizer, prompt + messages, add_generation_prompt=False, field_name=key)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            response_ids.append(full_ids[len(prompt_ids) :])
        else:
            response_ids.append(_response_after_prompt_text(tokenizer, prompt, prompt + messages, key))
            separately = True
    return prompt_ids, response_ids, separately


def _response_after_prompt_text(tokenizer: Any, prompt: Messages, conversation: Messages, field_name: str) -> list[int]:
    """The ids of the text that follows the rendered prompt in the rendered conversation, tokenized
    on their own."""
    prompt_text = _chat_text(tokenizer, prompt, add_generation_prompt=True, field_name="prompt")
    full_text = _chat_text(tokenizer, conversation, add_generation_prompt=False, field_name=field_name)
    if not full_text.startswith(prompt_text):
        start = len(os.path.commonprefix([prompt_text, full_text]))
        raise RecordError(
            field_name,
            "the chat template renders the prompt (with add_generation_prompt=True) differently from the "
            f"start of prompt + response, so the response cannot be located: after "
            f"{prompt_text[max(0, start - 12) : start]!r} (character {start}) the prompt continues "
            f"{prompt_text[start : start + 24]!r}, the conversation {full_text[start : start + 24]!r}",
        )
    return list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])


def _chat_ids(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool, field_name: str) -> list[int]:
    try:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )
    except Exception as error:  # a template may raise anything (jinja2 errors, raise_exception(...))
        raise RecordError(field_name, f"the chat template failed: {type(error).__name__}: {error}") from None
    return list(encoded["input_ids"])


def _chat_text(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool, field_name: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as error:  # a template may raise anything (jinja2 errors, raise_exception(...))
        raise RecordError(field_name, f"the chat template failed: {type(error).__name__}: {error}") from None
