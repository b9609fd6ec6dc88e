"""Preference data: read and validate records, tokenize them into pairs, collate pairs into batches.

Reading and validation live in `nashalign.data.records` and are re-exported here, so the whole data API is
`nashalign.data.tokenization`: `load_records` -> `tokenize_records` -> `collate_pairs`.

Tokenization follows TRL's DPOTrainer (1.16), so losses on the same records agree with it:

- String records: `prompt_ids = tokenizer(prompt)` and `tokenizer(prompt + response + eos)`, both with
  the tokenizer's default special tokens (a BOS is added exactly when the tokenizer adds one by
  itself; the tiny tokenizer adds none). The response is what follows the longest common prefix of
  the prompt ids with both prompt+response ids; when a token merges across the prompt/response
  boundary that prefix is shorter than the prompt, the prompt's last token(s) are replaced by the
  merged one, and the record is counted in `TruncationReport.boundary_merges` (TRL warns the same).
  A response that already ends with the EOS text gets no second one.
- Conversational records: through the chat template, see `nashalign.data.templates`; the prompt is the
  template's generation prompt, exactly what the policy continues when it generates. Records whose
  generation prompt ends inside a token are counted in `TruncationReport.separately_tokenized`.

One end-of-sequence token ends each response. An EOS token is the tokenizer's or any of
`stop_token_ids`, the ids generation stops on (a model's `generation_config.eos_token_id` may list
several: Llama 3 stops on <|end_of_text|> and on <|eot_id|>, which ends its chat turns). What "ends"
means for templates that write text after the EOS of a turn (the tiny template writes "</s>\\n"): the
response stops at its last EOS token; the template's tokens after it (the "\\n") are never generated
(generation stops at EOS), so they are dropped and the log-prob of the EOS itself is the last one
counted. `keep_after_eos=True` keeps them, which is what TRL does. A response without any EOS gets the
tokenizer's appended; a trailing run of EOS tokens is cut after its first, where generation stops. A
response cut by `max_length` ends where it is cut, without EOS.

Truncation: the prompt keeps its END (left-truncated to `max_prompt_length`, keeping a leading BOS);
each response keeps its START so that prompt + response <= `max_length`. A record whose prompt alone
fills `max_length` cannot fit and is dropped; every truncation and drop is counted in the returned
`TruncationReport` and a summary is logged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nashalign import NashalignError
from nashalign.data.records import (
    PreferenceRecord,
    Problem,
    RecordReport,
    format_problems,
    load_records,
    read_records,
    split_implicit_prompt,
)
from nashalign.data.templates import RecordError, conversation_ids

__all__ = [
    "PreferenceRecord",
    "Problem",
    "RecordReport",
    "TokenizedPair",
    "TruncationReport",
    "collate_pairs",
    "load_records",
    "pair_loader",
    "read_records",
    "split_implicit_prompt",
    "tokenize_records",
    "truncate_pairs",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair: the shared prompt and the two responses (each ends with EOS)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def content_hash(self) -> str:
        """sha256 hex digest of the three id lists (not of `source` or `extra`): the log-prob cache key.

        Stable across runs and machines: it hashes a canonical JSON text of the ids.
        """
        payload = json.dumps([self.prompt_ids, self.chosen_ids, self.rejected_ids], separators=(",", ":"))
        return hashlib.sha256(b"nashalign-pair-v1:" + payload.encode("ascii")).hexdigest()


@dataclass
class TruncationReport:
    """What `tokenize_records` did to fit `max_length` / `max_prompt_length`.

    `truncated_prompts` counts prompts cut from the left; `truncated_chosen` / `truncated_rejected`
    count responses cut from the right; `dropped` lists the sources of records that could not fit;
    `boundary_merges` counts string records whose last prompt token merged with the response;
    `separately_tokenized` counts conversational records whose prompt and responses were tokenized
    separately because the template's generation prompt ends inside a token.
    """

    total: int = 0
    truncated_prompts: int = 0
    truncated_chosen: int = 0
    truncated_rejected: int = 0
    boundary_merges: int = 0
    separately_tokenized: int = 0
    dropped: list[str] = field(default_factory=list)

    @property
    def truncated_responses(self) -> int:
        return self.truncated_chosen + self.truncated_rejected

    @property
    def kept(self) -> int:
        return self.total - len(self.dropped)

    def summary(self) -> str:
        text = (
            f"{self.kept}/{self.total} records kept; truncated: {self.truncated_prompts} prompts, "
            f"{self.truncated_chosen} chosen, {self.truncated_rejected} rejected responses; "
            f"{len(self.dropped)} dropped (prompt fills max_length)"
        )
        if self.dropped:
            shown = ", ".join(self.dropped[:5]) + (", ..." if len(self.dropped) > 5 else "")
            text += f": {shown}"
        if self.boundary_merges:
            text += f"; {self.boundary_merges} string prompts merge their last token into the response"
        if self.separately_tokenized:
            text += (
                f"; {self.separately_tokenized} conversational records tokenized as prompt and response "
                "separately (the generation prompt ends inside a token)"
            )
        return text


def tokenize_records(
    records: Iterable[PreferenceRecord],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    keep_after_eos: bool = False,
    stop_token_ids: Sequence[int] = (),
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenize records into pairs (see the module docstring for the conventions) and truncate them.

    `stop_token_ids`: the ids the model stops generating on besides the tokenizer's EOS
    (`nashalign.sampling.engines.stop_token_ids` reads them from a model's generation config).

    Raises NashalignError listing every record that cannot be tokenized (conversational record without
    a chat template, template whose prompt is not a prefix of the conversation, empty prompt ids).
    """
    _check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise NashalignError("the tokenizer has no eos_token; responses must end with one")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_token_ids):
        raise NashalignError(f"stop_token_ids must be token ids (integers), got {list(stop_token_ids)!r}")
    stops = frozenset(stop_token_ids) | {tokenizer.eos_token_id}
    pairs: list[TokenizedPair] = []
    problems: list[Problem] = []
    report = TruncationReport()
    for record in records:
        report.total += 1
        try:
            prompt_ids, chosen_ids, rejected_ids, merged, split = _tokenize_record(record, tokenizer, keep_after_eos, stops)
        except RecordError as error:
            problems.append(Problem(record.source, error.field, str(error)))
            continue
        report.boundary_merges += merged
        report.separately_tokenized += split
        pair = _truncate(
            TokenizedPair(prompt_ids, chosen_ids, rejected_ids, record.source, dict(record.extra)),
            max_length,
            max_prompt_length,
            tokenizer.bos_token_id,
            report,
        )
        if pair is not None:
            pairs.append(pair)
    if problems:
        raise NashalignError(format_problems(problems, f"{len(problems)} record(s) cannot be tokenized:"))
    if report.boundary_merges:
        logger.warning(
            "%d string record(s): the prompt's last token merges with the response's first; the merged "
            "token is counted in the response (as TRL does). End prompts on a token boundary (a space or "
            "newline) to avoid it.",
            report.boundary_merges,
        )
    if report.separately_tokenized:
        logger.warning(
            "%d conversational record(s): the chat template's generation prompt ends inside a token of "
            "prompt + response (e.g. a trailing space that merges with the response's first word); their "
            "prompt and responses are tokenized separately and concatenated, the context the policy "
            "generates from.",
            report.separately_tokenized,
        )
    if report.truncated_prompts or report.truncated_responses or report.dropped:
        logger.warning("truncation: %s", report.summary())
    return pairs, report


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise NashalignError(f"{name} must be a positive integer or None, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise NashalignError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}), "
            "to leave room for the responses"
        )


def _tokenize_record(record: PreferenceRecord, tokenizer: Any, keep_after_eos: bool, stops: frozenset[int]):
    """(prompt ids, chosen ids, rejected ids, boundary merged: 0/1, tokenized separately: 0/1)."""
    eos_id = tokenizer.eos_token_id
    merged = split = 0
    if record.is_conversational:
        prompt_ids, response_ids, separately = conversation_ids(
            tokenizer, record.prompt, {key: getattr(record, key) for key in ("chosen", "rejected")}
        )
        responses = [_end_with_one_eos(ids, stops, eos_id, keep_after_eos) for ids in response_ids]
        split = int(separately)
    else:
        eos_text = tokenizer.eos_token
        prompt_ids = _text_ids(tokenizer, record.prompt)
        full = [
            _text_ids(tokenizer, record.prompt + _strip_suffix(getattr(record, key), eos_text) + eos_text)
            for key in ("chosen", "rejected")
        ]
        prompt_len = min(_common_prefix_length(prompt_ids, ids) for ids in full)
        merged = int(prompt_len < len(prompt_ids))
        prompt_ids = prompt_ids[:prompt_len]
        responses = [_end_with_one_eos(ids[prompt_len:], stops, eos_id, keep_after_eos) for ids in full]
    if not prompt_ids:
        raise RecordError("prompt", "tokenizes to no tokens, so the first response token has no context")
    return prompt_ids, responses[0], responses[1], merged, split


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _strip_suffix(text: str, suffix: str) -> str:
    while suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    return text


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _end_with_one_eos(ids: list[int], stops: frozenset[int], eos_id: int, keep_after_eos: bool) -> list[int]:
    """`ids` cut after its last stop token (unless `keep_after_eos`), a trailing run of stop tokens cut
    after its first, with `eos_id` appended if there is no stop token."""
    positions = [i for i, token in enumerate(ids) if token in stops]
    if not positions:
        return ids + [eos_id]
    head, tail = ids[: positions[-1] + 1], ids[positions[-1] + 1 :]
    while len(head) >= 2 and head[-2] in stops:
        head = head[:-1]
    return head + tail if keep_after_eos else head


def _truncate(
    pair: TokenizedPair,
    max_length: int | None,
    max_prompt_length: int | None,
    bos_id: int | None,
    report: TruncationReport,
) -> TokenizedPair | None:
    prompt_ids = pair.prompt_ids
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        report.truncated_prompts += 1
        if bos_id is not None and prompt_ids[0] == bos_id and max_prompt_length > 1:
            prompt_ids = [bos_id] + prompt_ids[len(prompt_ids) - max_prompt_length + 1 :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    chosen_ids, rejected_ids = pair.chosen_ids, pair.rejected_ids
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            report.dropped.append(pair.source)
            return None
        if len(chosen_ids) > room:
            report.truncated_chosen += 1
            chosen_ids = chosen_ids[:room]
        if len(rejected_ids) > room:
            report.truncated_rejected += 1
            rejected_ids = rejected_ids[:room]
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair.source, pair.extra)


def truncate_pairs(
    pairs: Iterable[TokenizedPair], *, max_length: int | None, max_prompt_length: int | None, bos_id: int | None
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Fit pairs that are already token ids (the online loop's samples) to the limits exactly as
    `tokenize_records` fits records; the report counts what was cut or dropped."""
    _check_lengths(max_length, max_prompt_length)
    report, kept = TruncationReport(), []
    for pair in pairs:
        report.total += 1
        fitted = _truncate(pair, max_length, max_prompt_length, bos_id, report)
        if fitted is not None:
            kept.append(fitted)
    return kept, report


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack B pairs into one right-padded batch of 2B rows.

    Returns `input_ids` (2B, T) long, `attention_mask` (2B, T) long (1 = real token) and
    `response_mask` (2B, T) bool: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, T the
    longest row. `response_mask[i, t]` is True when token t of row i is a response token, whose
    log-prob (predicted by the logits at t-1) counts; it is never True at t=0 since prompts are
    non-empty. Also `prompt_lengths`, `chosen_lengths`, `rejected_lengths` (B,) long token counts,
    and, for every key of `extra` holding a number on all pairs (e.g. `chosen_win_rate`), a (B,)
    float32 tensor under that key.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    if pad_token_id is None:
        raise ValueError(
            "collate_pairs needs a pad_token_id (the tokenizer's pad token, or its EOS if it has none)"
        )
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lengths = [len(p.prompt_ids) for p in pairs] * 2
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        response_mask[i, start : len(row)] = True
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs], dtype=torch.long),
        "chosen_lengths": torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        "rejected_lengths": torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long),
    }
    for key in pairs[0].extra:
        values = [p.extra.get(key) for p in pairs]
        if key not in batch and all(_is_number(v) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.float32)
    return batch


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _collate_list(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    return collate_pairs(pairs, pad_token_id)


class PairDataset(torch.utils.data.Dataset):
    """A list of TokenizedPair as a map-style torch Dataset (item i is pair i)."""

    def __init__(self, pairs: Sequence[TokenizedPair]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.pairs[index]


def pair_loader(
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `pairs` yielding `collate_pairs` batches of `batch_size` pairs (2*batch_size rows)."""
    return torch.utils.data.DataLoader(
        PairDataset(pairs),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        collate_fn=functools.partial(_collate_list, pad_token_id=pad_token_id),
    )
