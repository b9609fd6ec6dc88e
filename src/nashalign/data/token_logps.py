"""Per-token log-probs of causal LMs, memory-bounded over the vocabulary (the layer under
nashalign.data.logprobs and nashalign.data.packing, which both score through it).

- `selective_log_softmax(logits, index)`: `log_softmax(logits)[index]` computed in float32 over chunks
  of rows, so no full float32 (N, V) tensor ever exists, neither in the forward nor in the backward pass.
- `token_logps(model, input_ids, attention_mask, response_mask)`: per-token log-probs (N, T) of the
  response tokens. The vocabulary projection runs only at the positions that predict a response
  token: transformers models take a boolean `logits_to_keep` mask and apply their own head (and any
  logit scaling or softcapping) to those positions only, which for chat data with long prompts skips
  most of the (N, T, V) logits. Models that cannot do that get the full logits (still chunked after).
- `position_ids_from_mask(attention_mask)`, `unwrap_model(model)`: the positions of a padded batch and
  the transformers model inside the wrappers (DDP, torch.compile, peft).

Shift convention: `response_mask[i, t]` marks token t of row i as a response token; its log-prob is
read from the logits at position t-1, so `response_mask[:, 0]` must be False.
"""

from __future__ import annotations

import inspect

import torch

from nashalign import NashalignError

# Rows per chunk of the vocabulary-wide float32 computation: the largest float32 temporary is
# (DEFAULT_CHUNK_SIZE, V), 16 MiB for a 32k vocabulary.
DEFAULT_CHUNK_SIZE = 128


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Log-softmax over the last axis, gathered at `index`, memory-bounded over the vocabulary.

    logits (..., V) of any floating dtype; index (...) long, values in [0, V). Returns (...) in
    float32 (float64 for float64 logits):

        out[r] = logits[r, index[r]] - logsumexp_v logits[r, v]

    equal to `torch.gather(logits.float().log_softmax(-1), -1, index[..., None])[..., 0]`. Rows are
    processed `chunk_size` at a time, each chunk upcast to float32 on its own (so bfloat16 logits get
    a float32 logsumexp, unlike a bfloat16 `log_softmax`). The backward pass writes
    d out[r] / d logits[r, v] = [v = index[r]] - softmax(logits[r])[v] chunk by chunk into one
    gradient tensor of the dtype of `logits`. The largest float32 temporary is (chunk_size, V) in
    both passes; nothing but `logits` itself and the (N,) logsumexp is kept for the backward pass.

    `logits` should be contiguous in its leading dimensions (a non-contiguous view is copied once in
    its own dtype by the reshape to (N, V)).
    """
    return selective_log_softmax_and_logsumexp(logits, index, chunk_size)[0]


def selective_log_softmax_and_logsumexp(
    logits: torch.Tensor, index: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`selective_log_softmax` and the log-normalizer log Z = logsumexp_v logits[..., v], both (...).

    The logsumexp is the one the log-softmax computes anyway (no extra pass over the vocabulary) and
    is differentiable: its gradient softmax(logits) is folded into the same chunked backward pass,
    which is what the z-loss (a penalty on (log Z)²) needs.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal the leading shape of logits {tuple(logits.shape)}"
        )
    rows = logits.reshape(-1, logits.shape[-1])
    out, logsumexp = _SelectiveLogSoftmax.apply(rows, index.reshape(-1), chunk_size)
    return out.view(index.shape), logsumexp.view(index.shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """(N, V) logits, (N,) targets -> (N,) log-probs and (N,) logsumexp, chunked over rows in both passes.

    Hand-written because the autograd of a chunked loop (torch.split + per-chunk ops, with or without
    torch.utils.checkpoint) keeps every chunk's gradient alive until it concatenates them, doubling
    the (N, V) gradient memory, and saves each chunk's float32 upcast unless recomputed.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        compute = _compute_dtype(logits.dtype)
        out = torch.empty(logits.shape[0], dtype=compute, device=logits.device)
        logsumexp = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = logits[rows].to(compute)
            logsumexp[rows] = chunk.logsumexp(-1)
            out[rows] = chunk.gather(-1, targets[rows, None])[:, 0] - logsumexp[rows]
        ctx.save_for_backward(logits, targets, logsumexp)
        ctx.chunk_size = chunk_size
        return out, logsumexp.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor, grad_logsumexp: torch.Tensor):
        # d out / d logits = onehot - softmax and d logsumexp / d logits = softmax, so
        # grad = softmax · (grad_logsumexp - grad_out) + onehot · grad_out, chunk by chunk.
        logits, targets, logsumexp = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g = grad_out[rows, None].to(logsumexp.dtype)
            weight = grad_logsumexp[rows, None].to(logsumexp.dtype) - g
            chunk = (logits[rows].to(logsumexp.dtype) - logsumexp[rows, None]).exp_().mul_(weight)
            grad[rows] = chunk.scatter_add_(-1, targets[rows, None], g)
        return grad, None, None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (N, T) of a 2D padding mask: 0, 1, 2, ... over the real tokens of each row.

    Right or left padding alike; padded positions get 0 (their outputs are never read).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    **options,
) -> torch.Tensor:
    """Per-token log-probs (N, T) float32 of the response tokens under `model`, 0 elsewhere.

    input_ids (N, T) long; attention_mask (N, T) (1 = real token) or None for no padding, or a 4D
    mask (N, 1, T, T) already in the form of the model's attention (packed rows, see nashalign.data.packing);
    response_mask (N, T) bool, True where token t counts, predicted from position t-1:

        out[i, t] = log p(input_ids[i, t] | input_ids[i, :t])   if response_mask[i, t] else 0

    `position_ids` default to `position_ids_from_mask(attention_mask)` (correct with right or left
    padding); pass them explicitly for packed sequences. `model_kwargs` go to the model's forward as
    they are (packed attention passes its spans this way). `model` is a transformers causal LM, a peft
    model wrapping one, or any module whose output has `.logits` (N, T, V); see the module docstring
    for which positions are projected onto the vocabulary.

    The keyword `options` (position_ids, chunk_size, model_kwargs) are those of `token_logps_and_logz`,
    which this is the first output of.
    """
    return token_logps_and_logz(model, input_ids, attention_mask, response_mask, **options)[0]


def token_logps_and_logz(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    model_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` and the output logits' log-normalizer, both (N, T) float32, 0 outside the response:

        logz[i, t] = logsumexp_v logits[i, t-1, v]   (the position that predicts token t)

    from the same chunked pass (see selective_log_softmax_and_logsumexp); differentiable (z-loss).
    """
    if input_ids.ndim != 2 or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and response_mask {tuple(response_mask.shape)} "
            "must both be (N, T)"
        )
    response_mask = response_mask.bool()
    if response_mask[:, 0].any():
        raise ValueError("response_mask[:, 0] must be False: the first token of a row has no prediction")
    if position_ids is None and attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError("a 4D attention_mask (packed rows) needs explicit position_ids")
        position_ids = position_ids_from_mask(attention_mask)
    # keep[i, t]: the logits at position t predict a response token at t+1.
    keep = torch.zeros_like(response_mask)
    keep[:, :-1] = response_mask[:, 1:]
    logits = _logits_at(model, input_ids, attention_mask, position_ids, keep, model_kwargs or {})
    values, logz = selective_log_softmax_and_logsumexp(logits, input_ids[response_mask], chunk_size)
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=values.device)
    return out.masked_scatter(response_mask, values.float()), out.masked_scatter(response_mask, logz.float())


def _logits_at(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    keep: torch.Tensor,
    model_kwargs: dict,
) -> torch.Tensor:
    """Logits (n, V) at the positions where `keep` (N, T) is True, n = keep.sum(), row-major order."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **model_kwargs}
    if _projects_only_kept_positions(model):
        logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits
        if logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
            return logits
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a boolean "
            f"logits_to_keep with {int(keep.sum())} positions; expected ({int(keep.sum())}, V)"
        )
    logits = model(**kwargs).logits
    return logits[keep]


def _projects_only_kept_positions(model: torch.nn.Module) -> bool:
    """Whether `model(..., logits_to_keep=<bool (N, T) mask>)` returns logits (n, V) of those positions.

    True for causal LMs defined inside transformers (they slice their hidden states with
    `transformers.modeling_utils.slice_logits_to_keep`, which takes boolean masks) when called
    directly, through peft's adapter wrappers, DistributedDataParallel or torch.compile, all of which
    pass keyword arguments through. Models from remote code or other libraries get the full logits.
    """
    base = unwrap_model(model)
    from transformers import PreTrainedModel, modeling_utils

    if not isinstance(base, PreTrainedModel) or not hasattr(modeling_utils, "slice_logits_to_keep"):
        return False
    if not type(base).__module__.startswith("transformers."):
        return False
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def unwrap_model(model: torch.nn.Module, *, adapters: bool = True) -> torch.nn.Module:
    """The transformers model inside DistributedDataParallel, torch.compile and (unless `adapters` is
    False: the peft model itself is returned) peft adapter wrappers.

    With `adapters`, raises NashalignError for peft prompt-learning methods (prompt, prefix,
    p-tuning): they add virtual tokens, so positions no longer line up with `input_ids`.
    """
    while True:
        config = getattr(model, "active_peft_config", None)
        if adapters and config is not None and getattr(config, "is_prompt_learning", False):
            raise NashalignError(
                f"peft method {config.peft_type} adds virtual tokens and is not supported for "
                "log-prob scoring; use an adapter method such as LoRA"
            )
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif adapters and hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            return model
