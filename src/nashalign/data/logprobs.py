"""Token and summed response log-probs of causal LMs, memory-bounded over the vocabulary.

Three layers, each usable alone:

- `selective_log_softmax(logits, index)` and `token_logps(model, input_ids, attention_mask,
  response_mask)`: the chunked log-softmax and the per-token response log-probs, defined in
  nashalign.data.token_logps (see there; nashalign.data.packing scores through them too) and
  importable from here, with `position_ids_from_mask` and `unwrap_model`.
- `pair_logps(model, batch)`: one forward pass over a pair batch (rows 0..B-1 prompt+chosen, rows
  B..2B-1 prompt+rejected), summed per side.
- `sequence_logps(model, rows, pad_id)`: summed log-probs of single (prompt, response) rows, each
  scored once (evaluation, the demo's exact policies).

The shift convention is token_logps': `response_mask[i, t]` marks token t of row i as a response
token, its log-prob read from the logits at position t-1.
"""

from __future__ import annotations

import torch

from nashalign.data.packing import is_packed, packed_pair_logps
from nashalign.data.token_logps import (
    DEFAULT_CHUNK_SIZE,
    position_ids_from_mask,
    selective_log_softmax,
    selective_log_softmax_and_logsumexp,
    token_logps,
    token_logps_and_logz,
    unwrap_model,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "pair_logps",
    "position_ids_from_mask",
    "selective_log_softmax",
    "selective_log_softmax_and_logsumexp",
    "sequence_logps",
    "token_logps",
    "token_logps_and_logz",
    "unwrap_model",
]


def sequence_logps(
    model: torch.nn.Module,
    rows: list[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    batch_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """(N,) float32 summed log π(response | prompt) of each (prompt ids, response ids) row.

    Rows are right-padded into batches of `batch_size`, neighbours in length batched together (one
    batch in the given order when None); each row is computed once. Differentiable unless called in
    inference mode.
    """
    if not rows:
        return torch.zeros(0)
    device = next(model.parameters()).device
    order = list(range(len(rows)))
    if batch_size is not None:
        order.sort(key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    size = batch_size or len(rows)
    parts, placed = [], []
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for r, i in enumerate(chunk):
            prompt, response = rows[i]
            ids[r, : len(prompt) + len(response)] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            attention[r, : len(prompt) + len(response)] = 1
            mask[r, len(prompt) : len(prompt) + len(response)] = True
        values = token_logps(model, ids.to(device), attention.to(device), mask.to(device), chunk_size=chunk_size)
        parts.append(values.sum(-1))
        placed.extend(chunk)
    summed = torch.cat(parts)
    return summed[torch.argsort(torch.tensor(placed))]


def pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[str, torch.Tensor]:
    """Summed and per-token response log-probs of a pair batch, in one forward pass over its 2B rows.

    batch: `input_ids`, `attention_mask` (2B, T) long, `response_mask` (2B, T) bool, rows 0..B-1
    prompt+chosen and rows B..2B-1 prompt+rejected (optional `position_ids` (2B, T)). Returns

        chosen_logps, rejected_logps               (B,)   float32, sum over response tokens
        chosen_token_logps, rejected_token_logps   (B, T) float32, 0 outside the response
        chosen_lengths, rejected_lengths           (B,)   long, response tokens counted (mask sums)
        chosen_logz_squared, rejected_logz_squared (B,)   float32, Σ over response tokens of (log Z)²,
                                                          log Z the logsumexp of the predicting logits
        logz                                       (n,)   float32, detached log Z of every response token

    A packed batch (`nashalign.data.packing.pack_pairs`: prompt shared, no padding between pairs) is
    scored by `nashalign.data.packing.packed_pair_logps`: the same summed log-probs and lengths, with the
    token log-probs in the packed layout under `token_logps` (N, L) instead of the per-side (B, T).
    """
    if is_packed(batch):
        return packed_pair_logps(model, batch, chunk_size=chunk_size)
    for key in ("input_ids", "attention_mask", "response_mask"):
        if key not in batch:
            raise ValueError(f"pair batch has no {key!r}; keys: {sorted(batch)}")
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise ValueError(f"a pair batch has 2B rows (chosen then rejected), got {rows}")
    response_mask = batch["response_mask"].bool()
    logps, logz = token_logps_and_logz(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        response_mask,
        position_ids=batch.get("position_ids"),
        chunk_size=chunk_size,
    )
    half = rows // 2
    summed = logps.sum(-1)
    lengths = response_mask.sum(-1)
    logz_squared = logz.square().sum(-1)
    return {
        "chosen_logz_squared": logz_squared[:half],
        "rejected_logz_squared": logz_squared[half:],
        "logz": logz[response_mask].detach(),
        "chosen_logps": summed[:half],
        "rejected_logps": summed[half:],
        "chosen_token_logps": logps[:half],
        "rejected_token_logps": logps[half:],
        "chosen_lengths": lengths[:half],
        "rejected_lengths": lengths[half:],
    }
