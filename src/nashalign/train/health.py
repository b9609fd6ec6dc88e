"""Training-health signals that show a diverging run before its loss does (Wortsman et al., "Small-scale
proxies for large-scale Transformer training instabilities", 2023).

- The output logits' log-normalizer log Z = logsumexp_v logits_v at every response position: its drift
  away from 0 is the output-logit divergence the z-loss (`loss.z_loss`, weight · mean (log Z)²) holds
  back (nashalign.core.losses.z_loss). Comes free from the log-prob pass (nashalign.data.logprobs); logged as
  `logz/mean` and `logz/max_abs` over the step's response tokens.
- The largest attention logit max q·k/√d (`attention/max_logit`): its growth is the attention-logit
  instability. Attention kernels (sdpa, flash) never materialize the logits, so `AttentionLogitProbe`
  recomputes them: a forward hook on each attention module of a transformers decoder (one with
  `q_proj`, `k_proj`, `head_dim`, `scaling`, called with `hidden_states` and the rotary
  `position_embeddings`) projects the layer's input again, applies the module's own q/k norms and
  rotary embedding, and takes the maximum of q·k·scaling over the causal triangle of the real (not
  padding) tokens, one head at a time (largest temporary (N, T, T) float32). Models of
  another shape get no value. In a packed batch (no padding mask) the triangle spans the whole packed
  row, so logits between pairs, which the model masks, are included.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

__all__ = ["AttentionLogitProbe"]


def _probeable(module: torch.nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "head_dim", "scaling"))


class AttentionLogitProbe:
    """While active (`with probe.active(key_mask):`, any number of times), record the largest attention
    logit of the forward passes through the model's attention modules in `probe.max_logit` (a float,
    or None if no module could be probed)."""

    def __init__(self, model: torch.nn.Module):
        self.modules = [module for module in model.modules() if _probeable(module)]
        self.max_logit: float | None = None
        self._key_mask: torch.Tensor | None = None

    @contextmanager
    def active(self, key_mask: torch.Tensor | None = None):
        """key_mask: (N, T) 1 for real tokens (the batch's 2D attention mask), or None (no padding)."""
        self._key_mask = key_mask
        handles = [module.register_forward_hook(self._hook, with_kwargs=True) for module in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._key_mask = None

    def _hook(self, module, args, kwargs, output) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rotary = kwargs.get("position_embeddings")
        if hidden is None or rotary is None:
            return
        with torch.no_grad():
            value = _max_attention_logit(module, hidden.detach(), rotary, self._key_mask)
        if value is not None:
            self.max_logit = value if self.max_logit is None else max(self.max_logit, value)


def _max_attention_logit(module, hidden: torch.Tensor, rotary, key_mask: torch.Tensor | None) -> float | None:
    batch, length = hidden.shape[:2]
    shape = (batch, length, -1, module.head_dim)
    query = module.q_proj(hidden).view(shape)
    key = module.k_proj(hidden).view(shape)
    if hasattr(module, "q_norm") and hasattr(module, "k_norm"):  # Qwen3-style per-head norms
        query, key = module.q_norm(query), module.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    apply_rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if apply_rotary is None:
        return None
    query, key = apply_rotary(query, key, *rotary)
    query, key = query.float(), key.float()
    groups = query.shape[1] // key.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None]
    if key_mask is not None and key_mask.shape == (batch, length):  # real queries and keys only
        real = key_mask.bool().to(hidden.device)
        allowed = allowed & real[:, None, :] & real[:, :, None]
    best = None
    for head in range(query.shape[1]):
        logits = query[:, head] @ key[:, head // groups].transpose(-1, -2) * module.scaling
        value = logits.masked_fill(~allowed, float("-inf")).max()
        best = value if best is None else torch.maximum(best, value)
    return None if best is None else float(best)
