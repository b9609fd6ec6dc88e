"""Prefix sharing and padding-free packing of preference pairs: the same log-probs for less compute.

A collated pair batch (`nashalign.data.tokenization.collate_pairs`) computes every prompt twice (once before the
chosen, once before the rejected response) and pads every row to the longest one. Here a pair is
laid out once, with its prompt shared:

    tokens     p_0 … p_{P-2} p_{P-1} | c_0 … c_{C-1} | p_{P-1}   r_0 … r_{R-1}
    positions  0   …   P-2     P-1   | P  …  P+C-1   | P-1       P  …  P+R-1
    segment    PROMPT    PROMPT_LAST | CHOSEN        | REJECTED  REJECTED

and several pairs share a row, back to back, with padding only at the end of a row. Attention (see
below) lets a token see the earlier tokens of its own pair only, and keeps the two responses apart: a REJECTED token sees p_0 … p_{P-2}, the copy of p_{P-1}
and the rejected tokens before it, never the chosen response nor the original p_{P-1}. So every
token sees exactly the keys (and positions) it sees in its own unpacked row prompt + response, and
its log-prob is the same up to float rounding.

Why the copy of p_{P-1}: r_0 is predicted by the logits at p_{P-1}, as is c_0. With the copy, every
response token is predicted by the token just before it in the packed row, so the shift-by-one
scoring of `nashalign.data.token_logps.token_logps` applies unchanged; it costs one token per pair.

Costs per pair: P + C + 1 + R tokens instead of 2P + C + R plus padding, and by default all pairs
of a batch share one row, so nothing is computed on padding.

Attention. For transformers models that take their attention function from transformers'
AttentionInterface (`_supports_attention_backend`: Llama, Qwen, Mistral, GPT-2, ...),
`packed_pair_logps` switches the model to `packed_attention` for the forward pass: torch's
scaled-dot-product attention run once per pair, on that pair's span of the row, with the pair's
small (l, l) mask, so attention costs Σ l² (not L² for a row of L tokens) and no (L, L) mask exists.
Other models, and models under activation checkpointing, get a dense (N, 1, L, L) mask
(`packed_attention_mask`) that their attention adds or applies; that costs L² per row, so use
`row_tokens` to cap the rows there.

`pack_pairs` builds the batch (a drop-in for `collate_pairs`); `nashalign.data.logprobs.pair_logps` sees
its `segment` key and scores it with `packed_pair_logps`.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from nashalign import NashalignError
from nashalign.data.token_logps import token_logps_and_logz, unwrap_model

PAD, PROMPT, PROMPT_LAST, CHOSEN, REJECTED = -1, 0, 1, 2, 3

# Attention implementations whose kernels take a custom dense 4D mask from transformers unchanged.
MASKED_ATTENTION = ("sdpa", "eager")
# The name `packed_attention` is registered under in transformers' AttentionInterface (on first use).
PACKED_ATTENTION = "nashalign_packed"


def packed_length(pair: Any) -> int:
    """Tokens of one pair in the packed layout: P + C + 1 + R."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + 1 + len(pair.rejected_ids)


def assign_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows whose lengths sum to <= capacity.

    Items longer than `capacity` get a row of their own. Rows are returned in creation order and each
    lists its items in placement order (longest first). Deterministic: ties keep index order.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, room in enumerate(free):
            if lengths[index] <= room:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return rows


def pack_pairs(pairs: Sequence[Any], pad_token_id: int, *, row_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Pack B pairs (prompt shared, several pairs per row) into N rows of L tokens.

    `pairs` are `nashalign.data.tokenization.TokenizedPair`s (non-empty prompt and responses). By default all pairs
    share one row (N = 1, no padding); with `row_tokens` a row holds pairs whose packed lengths
    (`packed_length`) sum to at most max(`row_tokens`, longest pair). Returns

        input_ids       (N, L) long      tokens, `pad_token_id` after the last pair of a row
        position_ids    (N, L) long      positions within each pair (see the module docstring), 0 on padding
        segment         (N, L) long      PROMPT, PROMPT_LAST, CHOSEN, REJECTED, or PAD
        pair_index      (N, L) long      which pair (0..B-1) a token belongs to, -1 on padding
        response_mask   (N, L) bool      the chosen and rejected tokens whose log-probs count
        prompt_lengths, chosen_lengths, rejected_lengths   (B,) long, in the order of `pairs`

    plus, as `collate_pairs` does, a (B,) float32 tensor for every key of `extra` that holds a number
    on all pairs. There is no `attention_mask`: how attention is kept within pairs depends on the
    model and is decided when the batch is scored (`packed_pair_logps`).
    """
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    if pad_token_id is None:
        raise ValueError("pack_pairs needs a pad_token_id (any id: padding is masked)")
    for pair in pairs:
        if not (pair.prompt_ids and pair.chosen_ids and pair.rejected_ids):
            raise ValueError(f"pair {getattr(pair, 'source', '?')}: prompt and both responses must be non-empty")
    lengths = [packed_length(pair) for pair in pairs]
    rows = assign_rows(lengths, max(row_tokens or sum(lengths), max(lengths)))
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, PAD, dtype=torch.long)
    pair_index = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            prompt, chosen, rejected = pairs[i].prompt_ids, pairs[i].chosen_ids, pairs[i].rejected_ids
            p, c = len(prompt), len(chosen)
            span = slice(start, start + lengths[i])
            input_ids[r, span] = torch.tensor(prompt + chosen + prompt[-1:] + rejected)
            position_ids[r, span] = torch.cat(
                [torch.arange(p + c), torch.arange(p - 1, p + len(rejected))]
            )
            segment[r, span] = torch.tensor(
                [PROMPT] * (p - 1) + [PROMPT_LAST] + [CHOSEN] * c + [REJECTED] * (1 + len(rejected))
            )
            pair_index[r, span] = i
            start += lengths[i]
    # The copy of p_{P-1} that opens the rejected segment is not a response token.
    opens_rejected = torch.zeros(shape, dtype=torch.bool)
    opens_rejected[:, 1:] = (segment[:, 1:] == REJECTED) & (segment[:, :-1] != REJECTED)
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment": segment,
        "pair_index": pair_index,
        "response_mask": (segment == CHOSEN) | ((segment == REJECTED) & ~opens_rejected),
        "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs], dtype=torch.long),
        "chosen_lengths": torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        "rejected_lengths": torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long),
    }
    for key in getattr(pairs[0], "extra", {}):
        values = [p.extra.get(key) for p in pairs]
        if key not in batch and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.float32)
    return batch


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether `batch` comes from `pack_pairs` (rather than `collate_pairs`)."""
    return "segment" in batch and "pair_index" in batch


def allowed_attention(segment: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """(N, L, L) bool, [n, q, k] True when token q of row n may attend to token k.

    k <= q in the same pair, except that REJECTED queries see neither CHOSEN keys nor PROMPT_LAST
    (they see its copy); padding attends to itself only (a query with no key would give NaN).
    """
    width = segment.shape[1]
    positions = torch.arange(width, device=segment.device)
    causal = positions[:, None] >= positions[None, :]
    same_pair = (pair_index[:, :, None] == pair_index[:, None, :]) & (pair_index[:, :, None] >= 0)
    query, key = segment[:, :, None], segment[:, None, :]
    apart = (query == REJECTED) & ((key == CHOSEN) | (key == PROMPT_LAST))
    return (causal & same_pair & ~apart) | torch.eye(width, dtype=torch.bool, device=segment.device)


def packed_attention_mask(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (N, 1, L, L) mask of a packed batch in the form `model`'s attention takes.

    transformers passes a 4D `attention_mask` to the attention function unchanged: `sdpa` takes a
    bool mask (True = attend), `eager` adds it to the scores, so it gets 0 / the dtype's minimum.
    Other implementations (flash-attention varlen, flex) do not take a dense mask: NashalignError.
    Sliding-window layers would need the window in the mask too: refused when a row is longer.
    """
    config = getattr(unwrap_model(model), "config", None)
    implementation = attention_implementation(config) or "eager"
    if implementation not in MASKED_ATTENTION:
        raise NashalignError(
            f"data.packing needs the model's attention implementation to be one of {list(MASKED_ATTENTION)} "
            f"(a dense 4D mask); this model uses {implementation!r}: load it with attn_implementation='sdpa' "
            "or turn packing off"
        )
    window = getattr(config, "sliding_window", None)
    width = batch["segment"].shape[1]
    if isinstance(window, int) and window < width:
        raise NashalignError(
            f"data.packing: the model attends within a sliding window of {window} tokens, shorter than a "
            f"packed row ({width} tokens); turn packing off for this model"
        )
    allowed = allowed_attention(batch["segment"], batch["pair_index"])[:, None]
    if implementation == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def pair_spans(segment: torch.Tensor, pair_index: torch.Tensor) -> list[list[tuple[int, int, torch.Tensor]]]:
    """Per row, (start, end, mask) of each pair's span of tokens, mask (1, 1, l, l) bool its attention."""
    spans = []
    for row in range(pair_index.shape[0]):
        indices = pair_index[row]
        starts = [0] + (torch.nonzero(indices[1:] != indices[:-1])[:, 0] + 1).tolist()
        ends = starts[1:] + [indices.shape[0]]
        spans.append([
            (start, end, allowed_attention(segment[row : row + 1, start:end], indices[None, start:end])[:, None])
            for start, end in zip(starts, ends)
            if int(indices[start]) >= 0
        ])
    return spans


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, nashalign_spans=None,
                     **kwargs):
    """An AttentionInterface function: scaled-dot-product attention within each pair's span only.

    query (N, H, L, D), key and value (N, H_kv, L, D); `nashalign_spans` from `pair_spans` (passed as
    a forward keyword argument, which transformers hands on to the attention function). Returns
    (N, L, H, D) and no weights, as transformers' own functions do; padding gets zeros. Features
    this does not implement (logit softcapping, attention sinks, position biases, a sliding window
    shorter than a pair) raise instead of being silently ignored.
    """
    if nashalign_spans is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention called without nashalign_spans")
    for feature in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(feature) is not None:
            raise NashalignError(f"data.packing: this model's attention uses {feature}, which packing does not support")
    window = kwargs.get("sliding_window")
    longest = max((end - start for spans in nashalign_spans for start, end, _ in spans), default=0)
    if isinstance(window, int) and window < longest:
        raise NashalignError(
            f"data.packing: the model attends within a sliding window of {window} tokens, shorter than a "
            f"pair ({longest} tokens); turn packing off for this model"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    rows = []
    for row, spans in enumerate(nashalign_spans):
        pieces = [
            torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1, :, start:end], key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end], attn_mask=mask, dropout_p=dropout, scale=scaling,
            )
            for start, end, mask in spans
        ]
        used = spans[-1][1] if spans else 0
        if used < query.shape[2]:
            pieces.append(query.new_zeros(1, query.shape[1], query.shape[2] - used, query.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def uses_attention_interface(model: torch.nn.Module) -> bool:
    """Whether `model` (unwrapped) is a transformers model whose attention goes through AttentionInterface."""
    from transformers import PreTrainedModel

    base = unwrap_model(model)
    return isinstance(base, PreTrainedModel) and bool(getattr(base, "_supports_attention_backend", False))


def recomputes_forward(model: torch.nn.Module) -> bool:
    """Whether the backward pass will re-run layers (activation checkpointing, gradients on).

    The switch to `packed_attention` lasts for the forward pass only; a layer re-run in the backward
    pass would attend over the whole row. Such models take the dense-mask path, whose mask is an
    argument of every layer and so is there again when the layer is re-run.
    """
    return torch.is_grad_enabled() and any(
        getattr(module, "gradient_checkpointing", False) for module in unwrap_model(model).modules()
    )


def attention_implementation(config) -> str | None:
    """The attention implementation a loaded model's config resolved to ("sdpa", "eager", ...).

    transformers has no public reader for it: `config._attn_implementation` is the property its own
    models dispatch on (tests/test_packing.py fails, naming it, if it disappears)."""
    return getattr(config, "_attn_implementation", None)


@contextmanager
def _attention_implementation(model: torch.nn.Module, name: str):
    """The model (and its sub-models) switched to attention implementation `name`, restored on exit;
    yields whether the switch took (transformers declines, with a warning, for model classes it
    cannot switch; the caller then takes the dense-mask path).

    The first use registers `packed_attention` under `name` in transformers' AttentionInterface (a
    process-wide registry; the entry is new and changes no other implementation)."""
    from transformers import AttentionInterface

    if name not in AttentionInterface():
        AttentionInterface.register(name, packed_attention)
    base = unwrap_model(model)
    previous = attention_implementation(base.config)
    base.set_attn_implementation(name)
    try:
        yield attention_implementation(base.config) == name
    finally:
        base.set_attn_implementation(previous)


def packed_pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int) -> dict[str, torch.Tensor]:
    """Summed response log-probs of a `pack_pairs` batch: one forward pass over its N packed rows.

    Returns chosen_logps, rejected_logps (B,) float32 (sums over each response's tokens, in the order
    of the packed pairs), chosen_lengths, rejected_lengths (B,) long, chosen_logz_squared,
    rejected_logz_squared (B,) and logz (n,) as in `pair_logps`, and token_logps (N, L) float32
    (0 outside the responses) in the packed layout. Attention: `packed_attention` when the model
    uses transformers' AttentionInterface, else (and under activation checkpointing) the dense
    `packed_attention_mask`.
    """
    segment, pair_index, response_mask = batch["segment"], batch["pair_index"], batch["response_mask"].bool()
    score = functools.partial(
        token_logps_and_logz, model, batch["input_ids"], response_mask=response_mask, position_ids=batch["position_ids"],
        chunk_size=chunk_size,
    )
    logps = None
    if uses_attention_interface(model) and not recomputes_forward(model):
        with _attention_implementation(model, PACKED_ATTENTION) as switched:
            if switched:
                logps, logz = score(None, model_kwargs={"nashalign_spans": pair_spans(segment, pair_index)})
    if logps is None:
        logps, logz = score(packed_attention_mask(model, batch))
    count = batch["chosen_lengths"].shape[0]
    sums = {}
    for side, code in (("chosen", CHOSEN), ("rejected", REJECTED)):
        tokens = response_mask & (segment == code)
        sums[f"{side}_logps"] = logps.new_zeros(count).index_add(0, pair_index[tokens], logps[tokens])
        sums[f"{side}_lengths"] = torch.bincount(pair_index[tokens], minlength=count)
        sums[f"{side}_logz_squared"] = logz.new_zeros(count).index_add(0, pair_index[tokens], logz[tokens].square())
    return {**sums, "token_logps": logps, "logz": logz[response_mask].detach()}
