"""SparsePO's token-level terms: u_t and the full-vocabulary d_t with bounded memory, and the masks.

Per response token t (predicted from position t-1):

    u_t = log π(y_t) − log π_ref(y_t)
    d_t = Σ_v π_ref(v)·(log π(v) − log π_ref(v))        (= −KL(π_ref ‖ π) at that position)

`token_terms` computes log π(y_t) and d_t from the policy's and the reference's logits at the
response positions only, in one hand-written autograd function chunked over rows (as
`nashalign.data.logprobs.selective_log_softmax`): no float32 (n, V) tensor exists beyond one chunk, in
either pass, and the backward pass writes one (n, V) gradient, g_u·(onehot − p) + g_d·(q − p) with
p = softmax(policy), q = softmax(ref). Over DPO this keeps the reference's (n, V) logits (model
dtype) and its forward pass per step; the reference cannot come from the log-prob cache here.

Masks m_u, m_d ≥ 0, one value per response token, computed at the position predicting the token:

- `activation_masks`: forward hooks on π_ref's MLP, attention and decoder-layer (residual stream)
  outputs, each averaged over the hidden dimension, min–max scaled to [0, 1] over the sequence's
  response tokens, then averaged over the hooked modules; detached, one mask for both terms. (The
  authors z-normalize before the min–max scaling; min–max is invariant under that positive affine
  map, so the result is the same.) A response whose values are all equal gets mask 1.
- `MaskNetwork`: learned from π_ref's hidden states of every layer: a shared LayerNorm, per layer
  Linear(h→1) → ReLU, the layers mixed by Linear(L→1, no bias) → ReLU; trained with the policy.
  Initialized so that masks start near 1 (per-layer bias 1, mixer weights 1/L), i.e. near
  DPO plus the divergence term; the authors use PyTorch's default initialization and dropout 0.1.
"""

from __future__ import annotations

import torch
from torch import nn

from nashalign.data.logprobs import DEFAULT_CHUNK_SIZE, position_ids_from_mask, selective_log_softmax


class _TokenTerms(torch.autograd.Function):
    """(n, V) policy logits, (n, V) reference logits (no gradient), (n,) targets ->
    (n,) log π(target), (n,) d = Σ_v q_v (log p_v − log q_v); chunked over rows in both passes."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        compute = torch.promote_types(logits.dtype, torch.float32)
        logps = torch.empty(logits.shape[0], dtype=compute, device=logits.device)
        terms, lse, ref_lse = torch.empty_like(logps), torch.empty_like(logps), torch.empty_like(logps)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            policy = logits[rows].to(compute)
            ref = ref_logits[rows].to(compute)
            lse[rows], ref_lse[rows] = policy.logsumexp(-1), ref.logsumexp(-1)
            policy_log = policy - lse[rows, None]
            ref_log = ref - ref_lse[rows, None]
            logps[rows] = policy_log.gather(-1, targets[rows, None])[:, 0]
            terms[rows] = (ref_log.exp() * (policy_log - ref_log)).sum(-1)
        ctx.save_for_backward(logits, ref_logits, targets, lse, ref_lse)
        ctx.chunk_size = chunk_size
        return logps, terms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: torch.Tensor, grad_terms: torch.Tensor):
        logits, ref_logits, targets, lse, ref_lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g_u = grad_logps[rows, None].to(lse.dtype)
            g_d = grad_terms[rows, None].to(lse.dtype)
            policy = (logits[rows].to(lse.dtype) - lse[rows, None]).exp_()
            ref = (ref_logits[rows].to(lse.dtype) - ref_lse[rows, None]).exp_()
            # d/dz [g_u·log p_y + g_d·Σ q (log p − log q)] = g_u·(onehot − p) + g_d·(q − p)
            chunk = ref.mul_(g_d).sub_(policy.mul_(g_u + g_d))
            grad[rows] = chunk.scatter_add_(-1, targets[rows, None], g_u)
        return grad, None, None, None


def token_terms(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(targets) (n,) and d (n,) from policy logits (n, V) and reference logits (n, V) (see the
    module docstring); float32 (float64 for float64 logits). Gradients flow to `logits` only."""
    if logits.shape != ref_logits.shape or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, ref_logits {tuple(ref_logits.shape)} and targets "
                         f"{tuple(targets.shape)} must be (n, V), (n, V), (n,)")
    return _TokenTerms.apply(logits, ref_logits.detach(), targets, chunk_size)


def forward_at(model, batch: dict[str, torch.Tensor], keep: torch.Tensor, *, hidden_states: bool = False):
    """Logits (n, V) at the `keep` positions of a collated batch (and the model's output), projecting
    only those positions onto the vocabulary when the model can (see nashalign.data.token_logps)."""
    from nashalign.data.token_logps import _projects_only_kept_positions

    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": batch.get("position_ids", position_ids_from_mask(batch["attention_mask"])),
              "use_cache": False, "output_hidden_states": hidden_states}
    if _projects_only_kept_positions(model):
        output = model(**kwargs, logits_to_keep=keep)
        return output.logits, output
    output = model(**kwargs)
    return output.logits[keep], output


def min_max_scaled(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (N, T) scaled to [0, 1] per row over the True positions of mask (N, T); 0 elsewhere.
    A row whose masked values are all equal gets 1 there."""
    values = values.float()
    low = values.masked_fill(~mask, float("inf")).amin(-1, keepdim=True)
    high = values.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, (values - low) / spread.clamp(min=torch.finfo(values.dtype).tiny), 1.0)
    return scaled * mask


ACTIVATION_MODULES = {"mlp": "mlp", "attention": "self_attn", "residual": None}


class ActivationRecorder:
    """Forward hooks on every decoder layer's MLP / attention / layer output of a transformers model,
    recording each output averaged over the hidden dimension, (N, T) per hooked module."""

    def __init__(self, model, kinds: list[str]):
        self.means: list[torch.Tensor] = []
        self.handles = []
        layers = _decoder_layers(model)
        for layer in layers:
            for kind in kinds:
                name = ACTIVATION_MODULES[kind]
                module = layer if name is None else getattr(layer, name, None)
                if module is None:
                    raise ValueError(f"{type(layer).__name__} has no {name!r} module to hook ({kind} masks)")
                self.handles.append(module.register_forward_hook(self._record))

    def _record(self, module, inputs, output) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        self.means.append(tensor.detach().float().mean(-1))

    def take(self) -> list[torch.Tensor]:
        means, self.means = self.means, []
        return means

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _decoder_layers(model) -> nn.ModuleList:
    from nashalign.data.token_logps import unwrap_model

    base = unwrap_model(model)
    inner = getattr(base, "model", None) or getattr(base, "transformer", None)
    layers = getattr(inner, "layers", None) or getattr(inner, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (expected .model.layers)")
    return layers


def activation_masks(means: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The activation mask (n,) at the `keep` positions: each recorded (N, T) mean min–max scaled over
    the row's kept positions, averaged over the recorded modules."""
    scaled = torch.stack([min_max_scaled(values, keep) for values in means]).mean(0)
    return scaled[keep]


class MaskNetwork(nn.Module):
    """Token masks (n, outputs) from the reference's hidden states of every layer (see module docstring)."""

    def __init__(self, hidden_size: int, num_layers: int, outputs: int = 2, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.per_layer = nn.ModuleList(nn.Linear(hidden_size, outputs) for _ in range(num_layers))
        self.mixer = nn.Parameter(torch.full((outputs, num_layers), 1.0 / num_layers))
        for linear in self.per_layer:
            nn.init.constant_(linear.bias, 1.0)

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """hidden_states: one (n, h) tensor per layer -> (n, outputs) masks >= 0."""
        per_layer = torch.stack(
            [torch.relu(linear(self.norm(h))) for linear, h in zip(self.per_layer, hidden_states)], dim=-1
        )  # (n, outputs, L)
        return torch.relu((per_layer * self.mixer).sum(-1))


def scatter_rows(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(n,) values of the response tokens, in row-major order -> (N, T), 0 elsewhere."""
    out = torch.zeros(response_mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(response_mask, values)


def sparsepo_inputs(policy, ref, batch: dict[str, torch.Tensor], *, recorder: ActivationRecorder | None = None,
                    network: MaskNetwork | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """The sparsepo loss inputs of a collated pair batch (2B rows), plus the policy's summed log-probs.

    Runs π_ref (no gradient; hooked by `recorder` for activation masks, or with its hidden states for
    the learned `network`) and the policy on the batch; returns the TOKEN_INPUTS (B, T) and
    policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths (B,).
    """
    response_mask = batch["response_mask"].bool()
    keep = torch.zeros_like(response_mask)
    keep[:, :-1] = response_mask[:, 1:]
    targets = batch["input_ids"][response_mask]
    with torch.no_grad():
        ref_logits, ref_output = forward_at(ref, batch, keep, hidden_states=network is not None)
        ref_logps = selective_log_softmax(ref_logits, targets, chunk_size)
    if network is not None:
        masks = network([h[keep].float() for h in ref_output.hidden_states[1:]])
        reward_mask, kl_mask = masks[:, 0], masks[:, -1]
    else:
        reward_mask = kl_mask = activation_masks(recorder.take(), keep)
    del ref_output
    logits, _ = forward_at(policy, batch, keep)
    policy_logps, terms = token_terms(logits, ref_logits, targets, chunk_size)
    half = response_mask.shape[0] // 2
    columns = {
        "token_log_ratios": scatter_rows(policy_logps - ref_logps.to(policy_logps.dtype), response_mask),
        "token_kl_terms": scatter_rows(terms, response_mask),
        "reward_weights": scatter_rows(reward_mask.to(terms.dtype), response_mask),
        "kl_weights": scatter_rows(kl_mask.to(terms.dtype), response_mask),
    }
    sums = scatter_rows(policy_logps, response_mask).sum(-1)
    lengths = response_mask.sum(-1)
    inputs = {f"{side}_{name}": value[rows] for name, value in columns.items()
              for side, rows in (("chosen", slice(None, half)), ("rejected", slice(half, None)))}
    return {**inputs, "policy_chosen_logps": sums[:half], "policy_rejected_logps": sums[half:],
            "chosen_lengths": lengths[:half], "rejected_lengths": lengths[half:]}
