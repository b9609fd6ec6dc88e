"""One optimization phase over preference pairs, on accelerate.

    pairs ──► score once under π_ref (and π_t for inpo) into the log-prob cache, in inference mode
          ──► free those models: from here on only the policy is in memory
          ──► for each optimizer step (nashalign.train.step): micro-batches ──► pair_logps(policy) ──► loss
              ──► backward ──► clip ──► AdamW ──► schedule ──► metrics.jsonl / progress bar / trackers
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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from nashalign import NashalignError
from nashalign.config import LossConfig, OptimConfig, TrainConfig, dump_config, to_dict, validated
from nashalign.core.losses import loss_hyperparameters, make_loss
from nashalign.data.artifacts import atomic_write_text
from nashalign.data.tokenization import TokenizedPair, TruncationReport, load_records, tokenize_records
from nashalign.progress import rate_line
from nashalign.train import checkpoint, engine_checkpoint, trackers
from nashalign.train.objectives import Objective, make_objective
from nashalign.train.scoring import load_model, load_tokenizer, reference_logps, reference_sources
from nashalign.train.step import batch_losses  # noqa: F401 -- part of this module's interface (tests, docs)
from nashalign.train.step import optimizer_step as _optimizer_step  # looked up here: bench/sides.py times it

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]

CHECKPOINTS, METRICS = "checkpoints", "metrics.jsonl"  # in the run directory


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
    if resume not in ("auto", "never"):
        raise NashalignError(f"--resume: expected 'auto' or 'never', got {resume!r}")
    config = validated(config)
    if not pairs:
        raise NashalignError("no preference pairs to train on")
    run_dir = Path(run_dir if run_dir is not None else config.output.dir)
    accelerator, resume_from = _start(config, run_dir, resume)

    # 1. Log-probs of every pair under π_ref (and π_t), then only the policy stays in memory
    # (sparsepo, whose terms need π_ref's full distributions, keeps π_ref too: see nashalign.train.objectives).
    given = {"ref": ref_logps, "prev": prev_logps, "aux": aux_logps}
    policy_source = policy if isinstance(policy, (str, Path)) else None
    policy, tokenizer = _initial_policy(policy, tokenizer, config, given)
    objective = make_objective(config, pairs, tokenizer)
    reference_columns = _reference_columns(policy, objective, config, run_dir, tokenizer, given, accelerator)
    objective.attach(policy, accelerator.device, resume_from, accelerator.num_processes)
    full_resume = resume_from is not None and config.model.lora is None
    if policy is None or full_resume:  # load the initial weights (unless they scored) or the checkpoint's
        del policy  # here, not in a helper: this frame's reference goes, so the old weights are freed first
        gc.collect()
        policy = load_model(resume_from if full_resume else policy_source, config.model)

    # 2. Policy, optimizer, schedule; the data position and optimizer state of the checkpoint resumed.
    plan = _Plan.of(config.optim, len(pairs), accelerator.num_processes)
    policy, optimizer, scheduler = _optimization(policy, config, objective, accelerator, plan, resume_from)
    phase = _Phase(config, accelerator, run_dir, tokenizer, objective, reference_columns, policy, optimizer,
                   scheduler, build_loss(config.loss), plan, _trainer_state(plan, pairs))
    _resume(phase, resume_from)
    _init_trackers(accelerator, config, run_dir)

    # 3. The loop: one iteration = one optimizer step over one global batch.
    metrics, last_checkpoint = _run_steps(phase, resume_from, callback)

    # 4. The final model in Hugging Face format (LoRA merged into the base weights).
    _save_final(phase)
    # Finish the trackers only: Accelerator.end_training() would also destroy the process group, which
    # a caller running several phases in one launch (the online loop) still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    metrics = metrics or _last_logged(phase.metrics_file)
    return TrainResult(run_dir, phase.final_dir, phase.metrics_file, phase.state["global_step"], metrics,
                       last_checkpoint)


# --------------------------------------------------------------------------- setting up a phase


def _start(config: TrainConfig, run_dir: Path, resume: str):
    """The run directory, the accelerator, the checkpoint to resume from (None: step 0), the seeds
    and config.yaml."""
    from accelerate.utils import set_seed

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints_dir, metrics_file = run_dir / CHECKPOINTS, run_dir / METRICS
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
    return accelerator, resume_from


def _initial_policy(policy, tokenizer, config: TrainConfig, given: dict):
    """The initial policy as a model (None: loaded from its path after scoring) and the tokenizer."""
    if isinstance(policy, (str, Path)):
        if tokenizer is None:
            tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or policy, config.model)
        # The initial weights are loaded now only if they score a role; else after scoring (lower peak).
        needs_initial = None in reference_sources(config, given).values()
        policy = load_model(policy, config.model) if needs_initial else None
    if tokenizer is None:
        raise NashalignError("train_pairs: pass the tokenizer when the policy is a model object")
    return policy, tokenizer


def _reference_columns(policy, objective: Objective, config: TrainConfig, run_dir: Path, tokenizer, given: dict,
                       accelerator) -> dict[str, torch.Tensor]:
    """The objective's reference columns from the log-probs of its pairs under π_ref (and π_t),
    scored through the log-prob cache unless given."""
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / "logp_cache"
    references = reference_logps(
        policy, objective.scored_pairs, config, cache_dir, tokenizer.pad_token_id, accelerator.device, given,
        accelerator,
    )
    return objective.reference_columns(references)


@dataclass(frozen=True)
class _Plan:
    """How the pairs fill the phase's optimizer steps."""

    num_pairs: int
    global_batch: int  # pairs per optimizer step, over all processes
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, optim: OptimConfig, num_pairs: int, num_processes: int) -> _Plan:
        global_batch = optim.per_device_batch_size * optim.gradient_accumulation_steps * num_processes
        steps_per_epoch = math.ceil(num_pairs / global_batch)
        return cls(num_pairs, global_batch, steps_per_epoch, optim.max_steps or optim.epochs * steps_per_epoch)


def _optimization(policy, config: TrainConfig, objective: Objective, accelerator, plan: _Plan,
                  resume_from: Path | None):
    """The policy made trainable, AdamW over it (and the objective's parameters) and the learning-rate
    schedule; the policy and optimizer as accelerator.prepare returns them."""
    policy = _prepare_policy(policy, config, resume_from)
    optim = config.optim
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in policy.parameters() if p.requires_grad]}, *objective.param_groups()],
        lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
    )
    scheduler = _schedule(optimizer, config, plan.total_steps)
    if accelerator.state.deepspeed_plugin is not None:  # accelerate reads it from a dataloader; there is none
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = optim.per_device_batch_size
    policy, optimizer = accelerator.prepare(policy, optimizer)
    return policy, optimizer, scheduler


def _trainer_state(plan: _Plan, pairs: list[TokenizedPair]) -> dict[str, Any]:
    """The trainer state of step 0 (a checkpoint's trainer_state.json): the data position, the tokens
    trained on, and what a resumed run must match."""
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "tokens": 0,
            "total_steps": plan.total_steps, "global_batch": plan.global_batch, "data": _data_fingerprint(pairs)}


@dataclass
class _Phase:
    """A set-up training phase: what its steps, checkpoints and final save use."""

    config: TrainConfig
    accelerator: Any
    run_dir: Path
    tokenizer: Any
    objective: Objective
    reference_columns: dict[str, torch.Tensor]
    policy: Any  # as accelerator.prepare returned it, like optimizer
    optimizer: Any
    scheduler: Any
    loss_fn: Callable
    plan: _Plan
    state: dict[str, Any]  # the trainer state (see _trainer_state), saved in every checkpoint

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / METRICS

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"

    @cached_property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    def save_model(self, directory: Path, state_dict=None) -> None:
        self.unwrapped.save_pretrained(directory, state_dict=state_dict)
        self.tokenizer.save_pretrained(directory)


def _resume(phase: _Phase, resume_from: Path | None) -> None:
    """Continue from checkpoint `resume_from` (if any): its trainer state (the run must match it), its
    optimizer and schedule state, and metrics.jsonl cut back to its step."""
    if resume_from is None:
        return
    state = phase.state
    saved = checkpoint.load_trainer_state(resume_from)
    for key in ("total_steps", "global_batch", "data"):
        if saved[key] != state[key]:
            raise NashalignError(
                f"{resume_from}: cannot resume, {key} differs from this run's "
                f"({saved[key]!r} vs {state[key]!r}); use --resume never or another output.dir"
            )
    state.update(saved)
    engine_checkpoint.load_training_checkpoint(phase.accelerator, phase.policy, phase.optimizer, phase.scheduler,
                                               resume_from)
    if phase.accelerator.is_main_process:
        _rewrite_metrics(phase.metrics_file, state["global_step"])
    logger.info("resuming from %s (step %d)", resume_from, state["global_step"])


def _init_trackers(accelerator, config: TrainConfig, run_dir: Path) -> None:
    if accelerator.log_with:
        run_name, flat = f"{run_dir.parent.name}/{run_dir.name}", trackers.flatten(to_dict(config))  # e.g. iter_0/train
        names = trackers.tracker_names(config.output.report_to)
        accelerator.init_trackers(trackers.PROJECT, init_kwargs=trackers.init_kwargs(names, run_dir, run_name, flat))
        trackers.store_config(accelerator.trackers, flat)


# --------------------------------------------------------------------------- the steps


def _run_steps(phase: _Phase, resume_from: Path | None, callback: StepCallback | None):
    """The optimizer steps left, each logged (metrics.jsonl, progress bar, trackers), a checkpoint every
    output.save_steps and at the end; the last step's metrics and the last checkpoint."""
    from tqdm.auto import tqdm

    state, plan, accelerator = phase.state, phase.plan, phase.accelerator
    progress = tqdm(total=plan.total_steps, initial=state["global_step"], desc="training", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    began, first_step, first_tokens = time.perf_counter(), state["global_step"], state["tokens"]
    metrics: dict[str, float] = {}
    last_checkpoint = resume_from
    metrics_out = open(phase.metrics_file, "a", encoding="utf-8") if accelerator.is_main_process else None
    try:
        while state["global_step"] < plan.total_steps:
            order = _epoch_order(plan.num_pairs, phase.config.optim.seed, state["epoch"])
            while state["step_in_epoch"] < plan.steps_per_epoch and state["global_step"] < plan.total_steps:
                metrics, epoch_done = _step(phase, order)
                step = state["global_step"]
                _log_step(phase, metrics, metrics_out, progress)
                save_steps = phase.config.output.save_steps
                if save_steps and step % save_steps == 0 and step < plan.total_steps:
                    last_checkpoint = _save_checkpoint(phase, step)
                if callback is not None:
                    callback(step, metrics)
                if epoch_done:
                    break  # a new permutation for the next epoch
        if last_checkpoint is None or checkpoint.load_trainer_state(last_checkpoint)["global_step"] < plan.total_steps:
            last_checkpoint = _save_checkpoint(phase, state["global_step"])
    finally:
        progress.close()
        if metrics_out is not None:
            metrics_out.close()
    if accelerator.is_main_process and state["global_step"] > first_step:
        seconds, tokens = time.perf_counter() - began, state["tokens"] - first_tokens
        logger.info("%s", rate_line("training", state["global_step"] - first_step, "step", seconds,
                                    f"{tokens} tokens ({tokens / max(seconds, 1e-9):.3g} tokens/s), "
                                    f"last loss {metrics.get('loss', math.nan):.4g}"))
    return metrics, last_checkpoint


def _step(phase: _Phase, order: list[int]) -> tuple[dict[str, float], bool]:
    """The next optimizer step, over the next global batch of the epoch's `order`, and the data
    position moved past it; its metrics row and whether it ended the epoch."""
    state, plan, config = phase.state, phase.plan, phase.config
    start = state["step_in_epoch"] * plan.global_batch
    attention_steps = config.output.attention_logit_steps
    metrics = _optimizer_step(
        order[start : start + plan.global_batch], phase.objective, phase.reference_columns, phase.policy,
        phase.optimizer, phase.scheduler, phase.loss_fn, config, phase.accelerator, phase.tokenizer.pad_token_id,
        probe_attention=bool(attention_steps) and (state["global_step"] + 1) % attention_steps == 0,
    )
    state["step_in_epoch"] += 1
    state["global_step"] += 1
    state["tokens"] += int(metrics.pop("_tokens"))
    epoch_done = state["step_in_epoch"] == plan.steps_per_epoch
    if epoch_done:  # the data position is saved as (next epoch, 0)
        state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
    step = state["global_step"]
    return {"step": step, "epoch": step / plan.steps_per_epoch, "tokens": state["tokens"], **metrics}, epoch_done


def _log_step(phase: _Phase, metrics: dict[str, float], metrics_out, progress) -> None:
    """A step's row in metrics.jsonl (main process); every output.logging_steps steps and at the last
    step, to the trackers and the progress bar."""
    step = metrics["step"]
    if metrics_out is not None:
        metrics_out.write(json.dumps(metrics) + "\n")
        metrics_out.flush()
    if step % phase.config.output.logging_steps == 0 or step == phase.plan.total_steps:
        phase.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        progress.set_postfix(loss=f"{metrics['loss']:.4g}", acc=f"{metrics['rewards/accuracy']:.2f}",
                             tok_s=f"{metrics['tokens_per_second']:.0f}")
    progress.update(1)


def _save_checkpoint(phase: _Phase, step: int) -> Path:
    return engine_checkpoint.save_training_checkpoint(
        phase.accelerator, phase.policy, phase.optimizer, phase.scheduler, directory=phase.checkpoints_dir,
        step=step, trainer_state=phase.state, save_model=phase.save_model,
        keep_last=phase.config.output.save_total_limit,
    )


# --------------------------------------------------------------------------- the end of a phase


def _save_final(phase: _Phase) -> None:
    """<run_dir>/final: the trained model (LoRA merged), the tokenizer and the objective's files."""
    accelerator = phase.accelerator
    accelerator.wait_for_everyone()
    # Collective under FSDP / ZeRO-3: every process sends its shards, the main process gets the full weights.
    state_dict = engine_checkpoint.full_model_state(accelerator, phase.policy)
    if accelerator.is_main_process:
        unwrapped = phase.unwrapped
        final_model = unwrapped.merge_and_unload() if phase.config.model.lora is not None else unwrapped
        with checkpoint.atomic_directory(phase.final_dir, marker=None) as directory:
            final_model.save_pretrained(directory, state_dict=state_dict)
            phase.tokenizer.save_pretrained(directory)
            phase.objective.save(directory)
    accelerator.wait_for_everyone()  # no process returns before final/ exists


def _last_logged(metrics_file: Path) -> dict[str, float]:
    """The last row of metrics.jsonl (a phase resumed after its last step ran none), else {}."""
    if not metrics_file.exists():
        return {}
    lines = metrics_file.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}
