"""One optimization phase over preference pairs, on accelerate.

    pairs ──► score once under π_ref (and π_t for inpo) into the log-prob cache, in inference mode
          ──► free those models: from here on only the policy is in memory
          ──► for each optimizer step: micro-batches ──► pair_logps(policy) ──► loss ──► backward
              ──► clip ──► AdamW ──► schedule ──► metrics.jsonl / progress bar / trackers
              ──► checkpoint every output.save_steps and at the end ──► <run_dir>/final

Run directory: `config.yaml` (resolved config), `metrics.jsonl` (one JSON object per optimizer step),
`checkpoints/step_<N>/` (see nashalign.train.checkpoint), `final/` (the trained model in Hugging Face format,
LoRA merged, tokenizer included), `logp_cache/` (unless data.cache_dir says otherwise).

Data order is a permutation per epoch drawn from (`optim.seed`, epoch); a global batch of
per_device_batch_size × gradient_accumulation_steps × processes pairs makes one optimizer step and the
loss is the mean of the per-pair losses over that global batch (also for a smaller last batch), so
batch 4 equals batch 1 with 4 accumulation steps. A checkpoint stores the data position, so a
resumed run replays exactly the batches (and RNG draws) of an uninterrupted one.

`train(config)` reads `data.train_file`; `train_pairs(...)` takes tokenized pairs and, optionally,
precomputed reference / previous-iterate log-probs (the online loop's entry point).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nashalign import NashalignError
from nashalign.config import LossConfig, TrainConfig, dump_config, to_dict, validated
from nashalign.core.losses import (
    loss_hyperparameters,
    loss_inputs,
    make_loss,
    preference_metrics,
    sft,
    z_loss,
)
from nashalign.data.artifacts import atomic_write_text
from nashalign.data.logprobs import pair_logps
from nashalign.data.tokenization import TokenizedPair, TruncationReport, load_records, tokenize_records
from nashalign.progress import rate_line
from nashalign.train import checkpoint, engine_checkpoint, trackers
from nashalign.train.health import AttentionLogitProbe
from nashalign.train.objectives import make_objective
from nashalign.train.scoring import load_model, load_tokenizer, reference_logps, reference_sources

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a training phase produced: the final model and the metrics of its last optimizer step."""

    run_dir: Path
    final_dir: Path
    metrics_file: Path
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    tokenization: TruncationReport | None = None  # what tokenizing data.train_file did (`train` only)


# --------------------------------------------------------------------------- losses and the policy


def build_loss(loss_config: LossConfig):
    """The bound per-example loss of the config: only the chosen loss's hyperparameters are passed."""
    values = to_dict(loss_config)
    return make_loss(loss_config.name, **{key: values[key] for key in loss_hyperparameters(loss_config.name)})


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


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _prepare_policy(model, config: TrainConfig, resume_from: Path | None):
    """Gradient checkpointing, dropout off, LoRA adapters (fresh or from the checkpoint)."""
    model.config.use_cache = False
    if config.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.model.disable_dropout:  # before LoRA, whose own dropout is model.lora.dropout
        _disable_dropout(model)
    lora = config.model.lora
    if lora is not None:
        import peft

        if resume_from is not None:
            model = peft.PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
        else:
            peft_config = peft.LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            )
            model = peft.get_peft_model(model, peft_config)
    return model.train()


# --------------------------------------------------------------------------- the loop


def _epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_pairs, generator=generator).tolist()


def _data_fingerprint(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.content_hash().encode("ascii"))
    return digest.hexdigest()


def _make_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized

    # A library function may run several phases in one process (the online loop, a test session) with
    # different precision; accelerate keeps one process-wide state and refuses a second Accelerator
    # with another mixed_precision. It has no public reset: `_reset_state` (the process group is
    # kept) is what its own test utilities call. tests/test_train.py fails, naming it, if it goes.
    if is_initialized():
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=config.model.mixed_precision,
        log_with=trackers.tracker_names(config.output.report_to) or None,
        project_dir=str(run_dir),
    )


def _schedule(optimizer, config: TrainConfig, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    optim = config.optim
    warmup = optim.warmup_steps if optim.warmup_steps is not None else math.ceil(optim.warmup_ratio * total_steps)
    if optim.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    make = get_cosine_schedule_with_warmup if optim.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup, total_steps)


def _rewrite_metrics(path: Path, up_to_step: int) -> None:
    """Keep only the metrics of steps <= up_to_step (a killed run may have logged past its checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= up_to_step]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def train(config: TrainConfig, *, resume: str = "auto", callback: StepCallback | None = None) -> TrainResult:
    """Train `config.model.name_or_path` on the pairs of `config.data.train_file` (see train_pairs)."""
    config = validated(config)
    if config.data.train_file is None:
        raise NashalignError("data.train_file: required to train from a config (set it or use --set)")
    tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path, config.model)
    pairs, report = training_pairs(config, tokenizer)
    result = train_pairs(config.model.name_or_path, pairs, config, tokenizer=tokenizer, resume=resume, callback=callback)
    result.tokenization = report
    return result


def training_pairs(config: TrainConfig, tokenizer) -> tuple[list[TokenizedPair], TruncationReport]:
    """The tokenized pairs of `data.train_file`; responses end with an EOS id the policy stops on
    (its generation config's, else the tokenizer's)."""
    from nashalign.sampling.engines import stop_token_ids

    records = load_records(config.data.train_file)
    pairs, report = tokenize_records(
        records, tokenizer, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
        stop_token_ids=stop_token_ids(config.model.spec(), tokenizer),
    )
    if not pairs:
        raise NashalignError(f"{config.data.train_file}: no pair fits data.max_length={config.data.max_length}")
    return pairs, report


def train_pairs(
    policy,
    pairs: list[TokenizedPair],
    config: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    tokenizer=None,
    ref_logps: dict[str, torch.Tensor] | None = None,
    prev_logps: dict[str, torch.Tensor] | None = None,
    aux_logps: dict[str, torch.Tensor] | None = None,
    resume: str = "auto",
    callback: StepCallback | None = None,
) -> TrainResult:
    """Minimize the configured loss over `pairs`; return the final model's path and last metrics.

    policy: a path / hub name or a loaded causal LM (trained in place). pairs: tokenized pairs.
    ref_logps / prev_logps / aux_logps: optional precomputed {"chosen": (N,), "rejected": (N,)} summed log-probs
    aligned with `pairs`; missing ones are scored through the log-prob cache (see reference_logps).
    run_dir: defaults to config.output.dir. resume: "auto" continues from the newest complete
    checkpoint in run_dir, "never" starts over. callback(step, metrics) runs after every optimizer step.
    Seeds python, numpy and torch from optim.seed (a run owns the process's RNGs).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if resume not in ("auto", "never"):
        raise NashalignError(f"--resume: expected 'auto' or 'never', got {resume!r}")
    config = validated(config)
    if not pairs:
        raise NashalignError("no preference pairs to train on")
    run_dir = Path(run_dir if run_dir is not None else config.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints_dir, metrics_file, final_dir = run_dir / "checkpoints", run_dir / "metrics.jsonl", run_dir / "final"
    resume_from = checkpoint.latest_checkpoint(checkpoints_dir) if resume == "auto" else None
    accelerator = _make_accelerator(config, run_dir)
    if accelerator.is_main_process:
        if resume == "never":  # start over: nothing of an earlier run in this directory may be resumed later
            shutil.rmtree(checkpoints_dir, ignore_errors=True)
        if resume_from is None:  # starting from step 0: metrics of an earlier, unfinished start are stale
            metrics_file.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    # FSDP and DeepSpeed shard the parameters over the processes; a LoRA adapter's optimizer is not
    # wired through their state dicts here (see nashalign.train.engine_checkpoint for full fine-tuning).
    sharded = engine_checkpoint.engine(accelerator) != "replicated"
    if sharded and config.model.lora is not None:
        raise NashalignError(
            f"model.lora: not supported under {accelerator.distributed_type.value}; use the DDP config"
        )
    set_seed(config.optim.seed)
    if accelerator.is_main_process:
        dump_config(config, run_dir / "config.yaml")
    given = {"ref": ref_logps, "prev": prev_logps, "aux": aux_logps}
    policy_source = policy if isinstance(policy, (str, Path)) else None
    if policy_source is not None:
        if tokenizer is None:
            tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or policy_source, config.model)
        # The initial weights are loaded now only if they score a role; else after scoring (lower peak).
        needs_initial = None in reference_sources(config, given).values()
        policy = load_model(policy_source, config.model) if needs_initial else None
    if tokenizer is None:
        raise NashalignError("train_pairs: pass the tokenizer when the policy is a model object")

    # 1. Log-probs of every pair under π_ref (and π_t), then only the policy stays in memory
    # (sparsepo, whose terms need π_ref's full distributions, keeps π_ref too: see nashalign.train.objectives).
    objective = make_objective(config, pairs, tokenizer)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / "logp_cache"
    references = reference_logps(
        policy, objective.scored_pairs, config, cache_dir, tokenizer.pad_token_id, accelerator.device, given,
        accelerator,
    )
    reference_columns = objective.reference_columns(references)
    del references
    objective.attach(policy, accelerator.device, resume_from, accelerator.num_processes)
    full_resume = resume_from is not None and config.model.lora is None
    if policy is None or full_resume:
        del policy
        gc.collect()
        policy = load_model(resume_from if full_resume else policy_source, config.model)

    # 2. Policy, optimizer, schedule.
    policy = _prepare_policy(policy, config, resume_from)
    optim = config.optim
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in policy.parameters() if p.requires_grad]}, *objective.param_groups()],
        lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
    )
    global_batch = optim.per_device_batch_size * optim.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = math.ceil(len(pairs) / global_batch)
    total_steps = optim.max_steps or optim.epochs * steps_per_epoch
    scheduler = _schedule(optimizer, config, total_steps)
    if accelerator.state.deepspeed_plugin is not None:  # accelerate reads it from a dataloader; there is none
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = optim.per_device_batch_size
    policy, optimizer = accelerator.prepare(policy, optimizer)
    loss_fn = build_loss(config.loss)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "tokens": 0,
             "total_steps": total_steps, "global_batch": global_batch, "data": _data_fingerprint(pairs)}
    if resume_from is not None:
        saved = checkpoint.load_trainer_state(resume_from)
        for key in ("total_steps", "global_batch", "data"):
            if saved[key] != state[key]:
                raise NashalignError(
                    f"{resume_from}: cannot resume, {key} differs from this run's "
                    f"({saved[key]!r} vs {state[key]!r}); use --resume never or another output.dir"
                )
        state.update(saved)
        engine_checkpoint.load_training_checkpoint(accelerator, policy, optimizer, scheduler, resume_from)
        if accelerator.is_main_process:
            _rewrite_metrics(metrics_file, state["global_step"])
        logger.info("resuming from %s (step %d)", resume_from, state["global_step"])

    if accelerator.log_with:
        run_name, flat = f"{run_dir.parent.name}/{run_dir.name}", trackers.flatten(to_dict(config))  # e.g. iter_0/train
        names = trackers.tracker_names(config.output.report_to)
        accelerator.init_trackers(trackers.PROJECT, init_kwargs=trackers.init_kwargs(names, run_dir, run_name, flat))
        trackers.store_config(accelerator.trackers, flat)
    unwrapped = accelerator.unwrap_model(policy)

    def save_model(directory: Path, state_dict=None) -> None:
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)

    def save(step: int) -> Path:
        return engine_checkpoint.save_training_checkpoint(
            accelerator, policy, optimizer, scheduler, directory=checkpoints_dir, step=step, trainer_state=state,
            save_model=save_model, keep_last=config.output.save_total_limit,
        )

    # 3. The loop: one iteration = one optimizer step over one global batch.
    progress = tqdm(total=total_steps, initial=state["global_step"], desc="training", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    began, first_step, first_tokens = time.perf_counter(), state["global_step"], state["tokens"]
    metrics: dict[str, float] = {}
    last_checkpoint = resume_from
    metrics_out = open(metrics_file, "a", encoding="utf-8") if accelerator.is_main_process else None
    try:
        while state["global_step"] < total_steps:
            order = _epoch_order(len(pairs), optim.seed, state["epoch"])
            while state["step_in_epoch"] < steps_per_epoch and state["global_step"] < total_steps:
                start = state["step_in_epoch"] * global_batch
                attention_steps = config.output.attention_logit_steps
                metrics = _optimizer_step(
                    order[start : start + global_batch], objective, reference_columns, policy, optimizer,
                    scheduler, loss_fn, config, accelerator, tokenizer.pad_token_id,
                    probe_attention=bool(attention_steps) and (state["global_step"] + 1) % attention_steps == 0,
                )
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                state["tokens"] += int(metrics.pop("_tokens"))
                epoch_done = state["step_in_epoch"] == steps_per_epoch
                if epoch_done:  # the data position is saved as (next epoch, 0)
                    state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
                step = state["global_step"]
                metrics = {"step": step, "epoch": step / steps_per_epoch, "tokens": state["tokens"], **metrics}
                if metrics_out is not None:
                    metrics_out.write(json.dumps(metrics) + "\n")
                    metrics_out.flush()
                if step % config.output.logging_steps == 0 or step == total_steps:
                    accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
                    progress.set_postfix(loss=f"{metrics['loss']:.4g}", acc=f"{metrics['rewards/accuracy']:.2f}",
                                         tok_s=f"{metrics['tokens_per_second']:.0f}")
                progress.update(1)
                if config.output.save_steps and step % config.output.save_steps == 0 and step < total_steps:
                    last_checkpoint = save(step)
                if callback is not None:
                    callback(step, metrics)
                if epoch_done:
                    break  # a new permutation for the next epoch
        if last_checkpoint is None or checkpoint.load_trainer_state(last_checkpoint)["global_step"] < total_steps:
            last_checkpoint = save(state["global_step"])
    finally:
        progress.close()
        if metrics_out is not None:
            metrics_out.close()
    if accelerator.is_main_process and state["global_step"] > first_step:
        seconds, tokens = time.perf_counter() - began, state["tokens"] - first_tokens
        logger.info("%s", rate_line("training", state["global_step"] - first_step, "step", seconds,
                                    f"{tokens} tokens ({tokens / max(seconds, 1e-9):.3g} tokens/s), "
                                    f"last loss {metrics.get('loss', math.nan):.4g}"))

    # 4. The final model in Hugging Face format (LoRA merged into the base weights).
    accelerator.wait_for_everyone()
    # Collective under FSDP / ZeRO-3: every process sends its shards, the main process gets the full weights.
    state_dict = engine_checkpoint.full_model_state(accelerator, policy)
    if accelerator.is_main_process:
        final_model = unwrapped.merge_and_unload() if config.model.lora is not None else unwrapped
        with checkpoint.atomic_directory(final_dir, marker=None) as directory:
            final_model.save_pretrained(directory, state_dict=state_dict)
            tokenizer.save_pretrained(directory)
            objective.save(directory)
    accelerator.wait_for_everyone()  # no process returns before final/ exists
    # Finish the trackers only: Accelerator.end_training() would also destroy the process group, which
    # a caller running several phases in one launch (the online loop) still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    if not metrics and metrics_file.exists():
        lines = metrics_file.read_text().splitlines()
        metrics = json.loads(lines[-1]) if lines else {}
    return TrainResult(run_dir, final_dir, metrics_file, state["global_step"], metrics, last_checkpoint)


def _optimizer_step(indices, objective, reference_columns, policy, optimizer, scheduler, loss_fn, config,
                    accelerator, pad_id, probe_attention: bool = False) -> dict[str, float]:
    """Forward/backward over the micro-batches of one global batch, clip, step; return its metrics.

    The loss is sum(per-pair losses) / (pairs in the global batch), accumulated over micro-batches
    (hand-written instead of accelerator.accumulate, which divides by a fixed step count and so
    weights a smaller last batch wrongly). With several processes DDP averages the gradients, hence
    the factor num_processes; process p takes pairs p, p + num_processes, ... of the global batch.
    Health signals (nashalign.train.health): log Z over the response tokens, and with `probe_attention`
    the largest attention logit over the step's micro-batches.
    """
    began = time.perf_counter()
    local = indices[accelerator.process_index :: accelerator.num_processes]
    size = config.optim.per_device_batch_size
    micro_batches = [local[i : i + size] for i in range(0, len(local), size)]
    # Every process runs as many forward/backward passes as process 0 (which holds the most pairs), as
    # the collectives of DDP, FSDP and DeepSpeed must match; a pass without pairs (empty micro-batch)
    # runs the batch's first pair with weight 0.
    micro_batches += [[]] * (math.ceil(len(indices[:: accelerator.num_processes]) / size) - len(micro_batches))
    scale = accelerator.num_processes / len(indices)
    collected: dict[str, list[torch.Tensor]] = {}
    logz_parts: list[torch.Tensor] = []
    probe = AttentionLogitProbe(policy) if probe_attention else None
    tokens = 0
    for number, micro in enumerate(micro_batches):
        rows = micro or indices[:1]
        batch = objective.collate(rows, pad_id)
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        selected = torch.tensor(rows)
        references = {key: column[selected].to(accelerator.device) for key, column in reference_columns.items()}
        probing = probe.active(batch.get("attention_mask")) if probe is not None else nullcontext()
        with _accumulating(accelerator, policy, last=number == len(micro_batches) - 1):
            with accelerator.autocast(), probing:
                if objective.batch_losses is not None:  # srpo / sparsepo: their own sequences and terms
                    losses, policy_logps = objective.batch_losses(policy, batch, loss_fn, references)
                else:
                    losses, policy_logps = batch_losses(policy, batch, loss_fn, references, config.loss.z_loss)
            accelerator.backward(losses.sum() * (scale if micro else 0.0))
        # prompt + chosen + prompt + rejected tokens, however the batch lays them out
        tokens += int(2 * batch["prompt_lengths"].sum() + batch["chosen_lengths"].sum()
                      + batch["rejected_lengths"].sum()) if micro else 0
        for key, value in {
            "losses": losses, "policy_chosen_logps": policy_logps["chosen_logps"],
            "policy_rejected_logps": policy_logps["rejected_logps"], "chosen_lengths": policy_logps["chosen_lengths"],
            **{key: references[key] for key in ("ref_chosen_logps", "ref_rejected_logps")},
            **({"z_loss": _z_loss(policy_logps)} if config.loss.z_loss else {}),
        }.items():
            collected.setdefault(key, []).append(value.detach().float()[: len(micro)])
        if micro and "logz" in policy_logps:
            logz_parts.append(policy_logps["logz"].float())
    max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm is not None else math.inf
    grad_norm = accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    values = {key: torch.cat(parts) for key, parts in collected.items()}
    means = {
        "loss": values["losses"].mean(),
        **preference_metrics(
            policy_chosen_logps=values["policy_chosen_logps"],
            policy_rejected_logps=values["policy_rejected_logps"],
            ref_chosen_logps=values["ref_chosen_logps"],
            ref_rejected_logps=values["ref_rejected_logps"],
            beta=config.loss.beta,
        ),
    }
    if config.loss.sft_weight:
        means["sft"] = sft(policy_chosen_logps=values["policy_chosen_logps"],
                           chosen_lengths=values["chosen_lengths"]).mean()
    if config.loss.z_loss:
        means["z_loss"] = values["z_loss"].mean()
    # Means over this process's pairs -> sums -> summed over processes -> means over the global batch
    # (a process without pairs has NaN means over nothing and adds zeros).
    count = torch.tensor(float(len(local)), device=accelerator.device)
    sums = [value.to(accelerator.device) * count if local else torch.zeros((), device=accelerator.device)
            for value in means.values()]
    stacked = torch.stack([*sums, count])
    stacked = accelerator.reduce(stacked, reduction="sum")
    tokens_total = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), reduction="sum"))
    metrics = {key: float(total / stacked[-1]) for key, total in zip(means, stacked[:-1])}
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed may not report one
    metrics.update(grad_norm=grad_norm, lr=learning_rate, _tokens=tokens_total,
                   tokens_per_second=tokens_total / max(time.perf_counter() - began, 1e-9))
    metrics.update(_health_metrics(logz_parts, probe, accelerator))
    return metrics


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
