"""One optimizer step of a training phase over one global batch of pairs (nashalign.train.loop runs them).

    global batch ──► this process's micro-batches ──► collate ──► per-pair losses ──► backward
                     (gradients synchronized on the last micro-batch only)
                 ──► clip ──► AdamW ──► schedule ──► metrics averaged over the global batch (all processes)

The loss is sum(per-pair losses) / (pairs in the global batch), accumulated over micro-batches
(hand-written instead of accelerator.accumulate, which divides by a fixed step count and so weights a
smaller last batch wrongly). With several processes DDP averages the gradients, hence the factor
num_processes; process p takes pairs p, p + num_processes, ... of the global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from nashalign.config import LossConfig, TrainConfig
from nashalign.core.losses import loss_inputs, preference_metrics, sft, z_loss
from nashalign.data.logprobs import pair_logps
from nashalign.train.health import AttentionLogitProbe
from nashalign.train.objectives import Objective


def batch_losses(model, batch: dict[str, torch.Tensor], loss_fn, references: dict[str, torch.Tensor],
                 z_loss_weight: float = 0.0):
    """Per-pair losses (B,) of a collated batch under `model`, and the policy's log-probs.

    `references` holds (B,) tensors ref_chosen_logps, ref_rejected_logps (+ prev_* for inpo, + aux_*
    for optimistic INPO) aligned with the batch. Win rates (sppo) come from the batch when the records
    carry them, else hard labels 1 (chosen) and 0 (rejected). A single-response loss (nash-md) reads
    the chosen response as its sample (policy_logps, ref_logps) and the batch's `mixture_win_rate`.
    A nonzero `z_loss_weight` adds that times `losses.z_loss` per pair.
    """
    policy = pair_logps(model, batch)
    available = {
        "policy_chosen_logps": policy["chosen_logps"],
        "policy_rejected_logps": policy["rejected_logps"],
        "chosen_lengths": policy["chosen_lengths"],
        "rejected_lengths": policy["rejected_lengths"],
        "chosen_win_rate": batch.get("chosen_win_rate", torch.ones_like(policy["chosen_logps"])),
        "rejected_win_rate": batch.get("rejected_win_rate", torch.zeros_like(policy["rejected_logps"])),
        **references,
        "policy_logps": policy["chosen_logps"],
        "ref_logps": references.get("ref_chosen_logps"),
        "mixture_win_rate": batch.get("mixture_win_rate"),
    }
    losses = loss_fn(**{name: available[name] for name in loss_inputs(loss_fn)})
    if z_loss_weight:
        losses = losses + z_loss_weight * _z_loss(policy)
    return losses, policy


def _z_loss(policy: dict[str, torch.Tensor]) -> torch.Tensor:
    keys = ("chosen_logz_squared", "rejected_logz_squared", "chosen_lengths", "rejected_lengths")
    return z_loss(**{key: policy[key] for key in keys})


def optimizer_step(indices, objective, reference_columns, policy, optimizer, scheduler, loss_fn, config,
                   accelerator, pad_id, probe_attention: bool = False) -> dict[str, float]:
    """Forward/backward over the micro-batches of one global batch (`indices` into the pairs), clip,
    step; return its metrics (with `_tokens`, the step's tokens over all processes, for the caller).

    Health signals (nashalign.train.health): log Z over the response tokens, and with `probe_attention`
    the largest attention logit over the step's micro-batches.
    """
    began = time.perf_counter()
    local, micro_batches = _micro_batches(indices, accelerator, config.optim.per_device_batch_size)
    scale = accelerator.num_processes / len(indices)
    probe = AttentionLogitProbe(policy) if probe_attention else None
    passes = _Passes(objective, reference_columns, policy, loss_fn, config, accelerator, pad_id, probe)
    for number, micro in enumerate(micro_batches):
        # a pass without pairs runs the batch's first pair with weight 0
        passes.run(micro or indices[:1], pairs=len(micro), weight=scale if micro else 0.0,
                   last=number == len(micro_batches) - 1)
    grad_norm, learning_rate = _apply_gradients(optimizer, scheduler, accelerator, config.optim.max_grad_norm)

    metrics = _global_means(_local_means(passes.collected, config.loss), len(local), accelerator)
    tokens_total = int(accelerator.reduce(torch.tensor(passes.tokens, device=accelerator.device), reduction="sum"))
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed may not report one
    metrics.update(grad_norm=grad_norm, lr=learning_rate, _tokens=tokens_total,
                   tokens_per_second=tokens_total / max(time.perf_counter() - began, 1e-9))
    metrics.update(_health_metrics(passes.logz_parts, probe, accelerator))
    return metrics


def _micro_batches(indices: list[int], accelerator, size: int) -> tuple[list[int], list[list[int]]]:
    """This process's pairs of the global batch and its micro-batches of them.

    Every process runs as many forward/backward passes as process 0 (which holds the most pairs), as
    the collectives of DDP, FSDP and DeepSpeed must match: a process with fewer pairs gets empty
    micro-batches at the end."""
    local = indices[accelerator.process_index :: accelerator.num_processes]
    micro_batches = [local[i : i + size] for i in range(0, len(local), size)]
    micro_batches += [[]] * (math.ceil(len(indices[:: accelerator.num_processes]) / size) - len(micro_batches))
    return local, micro_batches


@dataclass
class _Passes:
    """The forward/backward passes of one optimizer step and what they give its metrics."""

    objective: Objective
    reference_columns: dict[str, torch.Tensor]
    policy: Any
    loss_fn: Callable
    config: TrainConfig
    accelerator: Any
    pad_id: int
    probe: AttentionLogitProbe | None
    collected: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per-pair values of the pairs
    logz_parts: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0

    def run(self, rows: list[int], *, pairs: int, weight: float, last: bool) -> None:
        """Forward `rows`, backward the sum of their losses × `weight`, keep the values of the first
        `pairs` rows (0: a pass that only keeps the collectives in step)."""
        accelerator = self.accelerator
        batch = self.objective.collate(rows, self.pad_id)
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        selected = torch.tensor(rows)
        references = {key: column[selected].to(accelerator.device) for key, column in self.reference_columns.items()}
        probing = self.probe.active(batch.get("attention_mask")) if self.probe is not None else nullcontext()
        with _accumulating(accelerator, self.policy, last=last):
            with accelerator.autocast(), probing:
                losses, policy_logps = self._losses(batch, references)
            accelerator.backward(losses.sum() * weight)
        # prompt + chosen + prompt + rejected tokens, however the batch lays them out
        self.tokens += int(2 * batch["prompt_lengths"].sum() + batch["chosen_lengths"].sum()
                           + batch["rejected_lengths"].sum()) if pairs else 0
        self._keep(losses, policy_logps, references, pairs)

    def _losses(self, batch, references):
        if self.objective.batch_losses is not None:  # srpo / sparsepo: their own sequences and terms
            return self.objective.batch_losses(self.policy, batch, self.loss_fn, references)
        return batch_losses(self.policy, batch, self.loss_fn, references, self.config.loss.z_loss)

    def _keep(self, losses, policy_logps, references, pairs: int) -> None:
        for key, value in {
            "losses": losses, "policy_chosen_logps": policy_logps["chosen_logps"],
            "policy_rejected_logps": policy_logps["rejected_logps"], "chosen_lengths": policy_logps["chosen_lengths"],
            **{key: references[key] for key in ("ref_chosen_logps", "ref_rejected_logps")},
            **({"z_loss": _z_loss(policy_logps)} if self.config.loss.z_loss else {}),
        }.items():
            self.collected.setdefault(key, []).append(value.detach().float()[:pairs])
        if pairs and "logz" in policy_logps:
            self.logz_parts.append(policy_logps["logz"].float())


def _apply_gradients(optimizer, scheduler, accelerator, max_grad_norm: float | None):
    """Clip, step the optimizer and the schedule; the gradient norm before clipping (a tensor, or None
    where DeepSpeed reports none) and the learning rate the step used."""
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, learning_rate


def _local_means(collected: dict[str, list[torch.Tensor]], loss: LossConfig) -> dict[str, torch.Tensor]:
    """The loss and preference metrics, means over this process's pairs of the step."""
    values = {key: torch.cat(parts) for key, parts in collected.items()}
    means = {
        "loss": values["losses"].mean(),
        **preference_metrics(
            policy_chosen_logps=values["policy_chosen_logps"],
            policy_rejected_logps=values["policy_rejected_logps"],
            ref_chosen_logps=values["ref_chosen_logps"],
            ref_rejected_logps=values["ref_rejected_logps"],
            beta=loss.beta,
        ),
    }
    if loss.sft_weight:
        means["sft"] = sft(policy_chosen_logps=values["policy_chosen_logps"],
                           chosen_lengths=values["chosen_lengths"]).mean()
    if loss.z_loss:
        means["z_loss"] = values["z_loss"].mean()
    return means


def _global_means(means: dict[str, torch.Tensor], pairs: int, accelerator) -> dict[str, float]:
    """Means over this process's `pairs` pairs -> sums -> summed over processes -> means over the
    global batch (a process without pairs has NaN means over nothing and adds zeros)."""
    count = torch.tensor(float(pairs), device=accelerator.device)
    sums = [value.to(accelerator.device) * count if pairs else torch.zeros((), device=accelerator.device)
            for value in means.values()]
    stacked = accelerator.reduce(torch.stack([*sums, count]), reduction="sum")
    return {key: float(total / stacked[-1]) for key, total in zip(means, stacked[:-1])}


def _health_metrics(logz_parts: list[torch.Tensor], probe, accelerator) -> dict[str, float]:
    """logz/mean and logz/max_abs over the global batch's response tokens; attention/max_logit when
    probed (the maximum over processes)."""
    device = accelerator.device
    logz = torch.cat(logz_parts).to(device) if logz_parts else torch.zeros(0, device=device)
    total = accelerator.reduce(torch.stack([logz.sum(), torch.tensor(float(logz.numel()), device=device)]),
                               reduction="sum")
    peaks = torch.tensor([logz.abs().max() if logz.numel() else -math.inf,
                          -math.inf if probe is None or probe.max_logit is None else probe.max_logit], device=device)
    peaks = accelerator.gather(peaks[None]).amax(0)
    out = {"logz/mean": float(total[0] / total[1].clamp(min=1)), "logz/max_abs": float(peaks[0])}
    if probe is not None and math.isfinite(float(peaks[1])):
        out["attention/max_logit"] = float(peaks[1])
    return out


@contextmanager
def _accumulating(accelerator, model, last: bool):
    """Gradients are synchronized on the last micro-batch of a step only: DDP and FSDP skip their
    reduction (no_sync) before it, and DeepSpeed, whose backward also steps, is told through
    accelerate's public `Accelerator.sync_gradients` flag that it is not at an accumulation boundary.
    (accelerator.accumulate sets that flag from a fixed micro-batch count, which a smaller last batch
    does not have.)"""
    if last:
        yield
        return
    accelerator.sync_gradients = False
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True
