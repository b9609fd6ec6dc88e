"""The online loop: T iterations of sample → judge → pairs → score → train, resumable at any moment.

    iter_<t>/generations.jsonl   K responses per prompt sampled from π_t (token ids + finish reason)
    iter_<t>/next_generations.jsonl  with prompts.files only: π_{t+1}'s samples of iteration t's
                                 prompts (for the summary's win rate; otherwise iter_<t+1>'s are used)
    iter_<t>/judgments.jsonl     every oracle comparison made while building pairs
    iter_<t>/pair_stats.json     pairs kept / dropped, comparisons, judge calls
    iter_<t>/opponents.jsonl     nash-md: one opponent per sample, from the mixture of π_t and π_ref
    iter_<t>/pairs.jsonl         (y_w, y_l) pairs; written last, so it marks the judging stage complete
                                 (nash-md: (sample, opponent) rows with mixture_win_rate = P(y ≻ y′))
    iter_<t>/logps.safetensors   summed log-probs of every pair under the reference (+ π_t for inpo and
                                 inpo-optimistic, + π̂_{t−1} for inpo-optimistic at t ≥ 1)
    iter_<t>/train/              the training phase (its own checkpoints/, metrics.jsonl, final/)
    iter_<t>/aux/                inpo-optimistic, t ≥ 1: the auxiliary policy's training phase, π̂_t
    iter_<t>/summary.json        the iteration's summary row, written at the end of the iteration
                                 (after π_{t+1} has sampled for the win rate, unless summary.win_rate
                                 is false)
    iter_<T>/generations.jsonl   samples of the final policy on the last iteration's prompts (for the
                                 last summary row's win rate)

Pairs are cut to data.max_length / data.max_prompt_length as offline training cuts them (counted in
the summary row). Each phase's training config is derived from the online config by
`online_config.phase_config(config, t)`, used by scoring and training alike.

Each artifact is written atomically (nashalign.data.artifacts), and a stage whose artifact exists is
skipped on restart; training resumes from its newest complete checkpoint. Every random draw is seeded
from (run.seed, t), so a killed and rerun loop reaches the same weights as an uninterrupted one. A
rerun with a larger run.iterations continues after the last finished iteration; any other change
of the config is refused (online_config.config_change).

Under `accelerate launch` every process runs this loop and the stages are split over the processes
(nashalign.online.sharding): sampling by prompt, into one shard file per process that the main process
merges; each oracle call by rows; scoring by pair; training data parallel. Only the main process
writes shared artifacts, the others wait at barriers, and every process takes the main process's
view of which stages are complete, so the artifacts equal a one-process run's with the same seed.

Prompts: `prompts.file` for every iteration, or `prompts.files`, one file per iteration (the paper
answers a fresh third of its prompts in each).

Algorithms (run.algorithm) differ in the loss, the reference and the default pair construction:
    inpo            loss inpo; π_ref fixed, π_t the previous iterate; tournament pairs (the paper)
    inpo-optimistic optimistic INPO (ONPO's Algorithm 1): π_1 by inpo, then π_{t+1} from π_t with loss
                    inpo-optimistic and π̂_t from π̂_{t−1} with inpo-optimistic-aux, on the same pairs
                    scored under π_ref, π_t and π̂_{t−1} (π̂_0 = π_0); tournament pairs
    online-ipo      loss online-ipo (Calandriello et al. 2024); pairs from π_t, π_ref fixed; tournament
    nash-md         loss nash-md (Munos et al. 2023): every sample y of π_t is judged against one
                    opponent y′ sampled token by token from π_t^(1−β)·π_ref^β (β = sampling.mixture_coef)
    iterative-dpo   loss dpo with reference = π_t (Dong et al. 2024); best-versus-worst pairs
    sppo            loss sppo with reference = π_t and estimated win rates (Wu et al. 2024); all pairs

`run.ref_update_every: M` refreshes the fixed reference: after iteration t with (t + 1) % M == 0,
π_ref ← π_{t+1} (`online_config.reference_path`); the log-prob cache is keyed by the model's
fingerprint, so the new reference's scores are new entries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nashalign import NashalignError
from nashalign.config import TrainConfig, dump_config, to_dict, validated
from nashalign.data.artifacts import read_json, read_jsonl, write_json, write_jsonl
from nashalign.data.tokenization import TokenizedPair, TruncationReport, truncate_pairs
from nashalign.models.loader import load_tokenizer, release
from nashalign.online.config import (
    ALGORITHMS,
    OnlineConfig,
    PairSettings,
    RunSettings,
    SamplingSettings,
    SummarySettings,
    config_change,
    has_aux_phase,
    pair_method,
    phase_config,
    policy_path,
    reference_path,
    run_directory,
    sampling_spec,
    stage_seed,
)
from nashalign.online.nash_md import judge_opponents_stage
from nashalign.online.prompts import (
    PromptsConfig,
    PromptSet,
    judge_text,
    load_prompts,
    prompt_file,
    prompt_set,
    render_prompt,
)
from nashalign.online.sharding import from_main, process_state, split_oracle
from nashalign.progress import rate_line
from nashalign.sampling.engines import Generation, SamplerPool
from nashalign.train.trackers import IterationTrackers

__all__ = [  # the config lives in nashalign.online.config, the prompt helpers in nashalign.online.prompts
    "ALGORITHMS", "OnlineConfig", "OnlineResult", "PairSettings", "PromptsConfig", "RunSettings",
    "SamplingSettings", "SummarySettings", "format_summary_table", "judge_text", "load_prompts", "phase_config",
    "prompt_file", "render_prompt", "run_online", "tokenized_pairs",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class OnlineResult:
    run_dir: Path
    final_model: Path
    summaries: list[dict[str, Any]]


# --------------------------------------------------------------------------- stages


def _generate(path: Path, policy_path: str, tokenizer, rendered: list[str], config: OnlineConfig, seed: int,
              state, progress: bool, pool, ref_path: str | None = None) -> list[list[dict]]:
    """Stage 1: K samples per prompt from the policy → `path` (one row per sample), in prompt order;
    with `ref_path`, from the geometric mixture of the policy and that reference (nash-md's opponents).

    Process r of N samples prompts r, r + N, ... into `<stem>.shard-r-of-N.jsonl` (kept if an
    interrupted run finished it: a sample depends only on the seed and its prompt index), then the
    main process merges the shards into `path` and deletes them (and any left by earlier runs).
    """
    k = config.sampling.samples_per_prompt
    if not from_main(state, path.exists):
        rank, processes = state.process_index, state.num_processes
        shard = path.with_name(f"{path.stem}.shard-{rank}-of-{processes}.jsonl")
        if not shard.exists():
            mine = list(range(rank, len(rendered), processes))
            rows = _sample(policy_path, tokenizer, [rendered[p] for p in mine], mine, config, seed, state,
                           progress, pool, ref_path) if mine else []
            write_jsonl(shard, rows)
        state.wait_for_everyone()
        if state.is_main_process:
            shards = [path.with_name(f"{path.stem}.shard-{r}-of-{processes}.jsonl") for r in range(processes)]
            rows = sorted((row for part in shards for row in read_jsonl(part)),
                          key=lambda row: (row["prompt_index"], row["sample_index"]))
            write_jsonl(path, rows)
        state.wait_for_everyone()
    if state.is_main_process:  # also shards of another process count, or left by a kill after the merge
        for leftover in path.parent.glob(f"{path.stem}.shard-*.jsonl"):
            leftover.unlink()
    return _read_generations(path, len(rendered), k)


def _sample(policy_path: str, tokenizer, prompts: list[str], indices: list[int], config: OnlineConfig, seed: int,
            state, progress: bool, pool, ref_path: str | None = None) -> list[dict]:
    """K samples of each prompt (keyed by its index in the file, which seeds its samples) as rows."""
    from nashalign.sampling.engines import TransformersSampler

    s = config.sampling
    if ref_path is not None:
        from nashalign.online.nash_md import sample_opponents

        return sample_opponents(policy_path, ref_path, tokenizer, prompts, indices, config, seed, state, progress)
    work = len(prompts) * s.samples_per_prompt * s.max_new_tokens * (config.run.iterations + 1)
    sampler = pool.sampler(
        s.backend, sampling_spec(config, policy_path), tokenizer, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size, seed=seed,
        tensor_parallel_size=s.tensor_parallel_size, fallback_to_transformers=s.backend == "auto", work_tokens=work,
        llm_kwargs={"gpu_memory_utilization": s.gpu_memory_utilization, **s.engine_args},
    )
    if isinstance(sampler, TransformersSampler):
        sampler.model.to(state.device)  # this process's device (its own GPU under accelerate launch)
    began = time.perf_counter()
    groups = sampler.generate(prompts, s.samples_per_prompt, prompt_indices=indices,
                              progress=progress and state.is_local_main_process)
    if state.is_main_process:
        tokens = sum(len(g.token_ids) for group in groups for g in group)
        logger.info("%s", rate_line("sampling", len(prompts) * s.samples_per_prompt, "sample",
                                    time.perf_counter() - began, f"{tokens} tokens from {len(prompts)} prompts"
                                    + (" on this process" if state.num_processes > 1 else "")))
    pool.release(sampler)  # a vLLM engine sleeps (its GPU memory freed) until the next sampling
    del sampler
    release()
    return [dataclasses.asdict(g) for group in groups for g in group]


def _read_generations(path: Path, num_prompts: int, k: int) -> list[list[dict]]:
    groups: list[list[dict]] = [[None] * k for _ in range(num_prompts)]  # type: ignore[list-item]
    for row in read_jsonl(path):
        groups[row["prompt_index"]][row["sample_index"]] = row
    if any(g is None for group in groups for g in group):
        raise NashalignError(f"{path}: incomplete (expected {k} samples for each of {num_prompts} prompts)")
    return groups


def _judge(it: Path, oracle, judge_prompts: list[str], groups, config: OnlineConfig, t: int, state):
    """Stage 2: build pairs with the oracle → judgments.jsonl, pair_stats.json, pairs.jsonl (last).

    Every process builds the same pairs (same answers, same seeded draws); the oracle's calls are
    split over the processes (SplitOracle) and the main process writes."""
    pairs_path = it / "pairs.jsonl"
    if not from_main(state, pairs_path.exists):
        from nashalign.judges.pairs import make_pairs

        loss_name, _, _ = ALGORITHMS[config.run.algorithm]
        method = pair_method(config)
        calls_before = oracle.counts.judge_calls
        result = make_pairs(
            method, oracle, judge_prompts, [[g["text"] for g in group] for group in groups],
            decide=config.pairs.decide, rng=np.random.default_rng(stage_seed(config.run.seed, t, 1)),
            score=config.pairs.score, win_rates=loss_name == "sppo",
        )
        stats = {**result.stats.as_dict(), "method": method,
                 "judge_calls": oracle.counts.judge_calls - calls_before}
        if state.is_main_process:
            write_jsonl(it / "judgments.jsonl", (j.to_dict() for j in result.judgments))
            write_json(it / "pair_stats.json", stats)
            write_jsonl(pairs_path, (p.to_dict() for p in result.pairs))
        state.wait_for_everyone()
    return read_jsonl(pairs_path), read_json(it / "pair_stats.json")


def tokenized_pairs(pairs: list[dict], groups, prompt_ids: list[list[int]], eos_id: int,
                    rejected_groups=None) -> list[TokenizedPair]:
    """Pairs as token ids exactly as sampled (no re-tokenization): a response that stopped ends with
    the EOS id that stopped it (`eos_id` only for generations recorded without one), a response cut
    by max_new_tokens ends where it was cut. `rejected_groups` (nash-md's opponents): the rejected
    responses' samples, if not `groups`."""

    def response(sample: dict) -> list[int]:
        return Generation.from_row(sample, eos_id).response_ids

    out = []
    for pair in pairs:
        p = pair["prompt_index"]
        chosen, rejected = groups[p][pair["chosen_index"]], (rejected_groups or groups)[p][pair["rejected_index"]]
        extra = {
            key: pair[key] for key in ("chosen_win_rate", "rejected_win_rate", "mixture_win_rate")
            if pair.get(key) is not None
        }
        out.append(TokenizedPair(list(prompt_ids[p]), response(chosen), response(rejected), f"prompt[{p}]", extra))
    return out


def _score(it: Path, pairs: list[TokenizedPair], phase: TrainConfig, tokenizer, state):
    """Stage 3: summed log-probs of every pair under the phase's reference (+ π_t for inpo*, + π̂_{t−1}
    for inpo-optimistic) → logps.safetensors, keys ref_chosen, ref_rejected (+ prev_*, aux_*).

    Through nashalign.train.loop.reference_logps and the run's log-prob cache: with several processes
    each scores every N-th pair and the main process writes the cache (accelerate's PartialState
    carries what that needs of an Accelerator: process index and count, barriers)."""
    from safetensors.torch import load_file, save

    path = it / "logps.safetensors"
    if not from_main(state, path.exists):
        from nashalign.data.artifacts import atomic_write_bytes
        from nashalign.train.loop import reference_logps

        scored = reference_logps(None, pairs, phase, Path(phase.data.cache_dir), tokenizer.pad_token_id, state.device,
                                 accelerator=state)
        # clone: ref and prev are one tensor when one model scored both, and safetensors stores no shared memory
        tensors = {f"{role}_{side}": logps[side].float().clone().contiguous()
                   for role, logps in sorted(scored.items()) for side in ("chosen", "rejected")}
        if state.is_main_process:
            atomic_write_bytes(path, save(tensors))
        state.wait_for_everyone()
    return load_file(path)


def _train(pairs, logps, phase: TrainConfig, tokenizer, state) -> Path:
    """Stage 4: one training phase on the pairs into phase.output.dir: π_{t+1} from π_t at
    iter_<t>/train/final (or, the auxiliary phase of inpo-optimistic, π̂_t from π̂_{t−1} at iter_<t>/aux/final)."""
    from nashalign.train.loop import train_pairs

    final = Path(phase.output.dir) / "final"
    if from_main(state, final.exists):
        return final
    scored = {role: {"chosen": logps[f"{role}_chosen"], "rejected": logps[f"{role}_rejected"]}
              if f"{role}_chosen" in logps else None for role in ("ref", "prev", "aux")}
    result = train_pairs(phase.model.name_or_path, pairs, phase, phase.output.dir, tokenizer=tokenizer,
                         ref_logps=scored["ref"], prev_logps=scored["prev"], aux_logps=scored["aux"])
    return result.final_dir


def _win_rate(run: _Run, t: int, current: PromptSet, groups) -> tuple[float, int]:
    """The win rate of π_{t+1} over π_t and the comparisons it took: sample j of each prompt under
    π_{t+1} against sample j under π_t, judged by the oracle (P, not a draw), averaged.

    π_{t+1}'s samples are iteration t+1's (iter_<t+1>/generations.jsonl, which that iteration
    then uses) when it answers the same prompts, else iter_<t>/next_generations.jsonl."""
    config = run.config
    following = run.run_dir / f"iter_{t + 1}"
    if prompt_file(config.prompts, t + 1) == current.file:
        following.mkdir(exist_ok=True)
        path, seed = following / "generations.jsonl", stage_seed(config.run.seed, t + 1, 0)
    else:
        path, seed = run.run_dir / f"iter_{t}" / "next_generations.jsonl", stage_seed(config.run.seed, t, 3)
    next_groups = _generate(path, policy_path(config, t + 1), run.tokenizer, current.rendered, config, seed,
                            run.state, run.progress, run.pool)
    first = [g["text"] for group in next_groups for g in group]
    second = [g["text"] for group in groups for g in group]
    prompts = [current.judge[p] for p, group in enumerate(groups) for _ in group]
    return float(np.mean(run.oracle.prob(prompts, first, second))), len(first)


def _summary_row(it: Path, t: int, groups, stats: dict, truncation: TruncationReport, win_rate: float | None,
                 win_rate_comparisons: int, win_rate_calls: int) -> dict[str, Any]:
    metrics_file = it / "train" / "metrics.jsonl"
    last = read_jsonl(metrics_file)[-1] if metrics_file.exists() else {}
    lengths = [len(g["token_ids"]) for group in groups for g in group]
    return {
        "iteration": t,
        "prompts": len(groups),
        "pairs_kept": stats["kept"],
        "ties_dropped": stats.get("dropped_tie", 0),
        "pairs_dropped": stats["dropped"],
        "truncated_prompts": truncation.truncated_prompts,
        "truncated_responses": truncation.truncated_responses,
        "mean_response_length": float(np.mean(lengths)),
        "comparisons": stats["comparisons"] + win_rate_comparisons,
        "judge_calls": stats["judge_calls"] + win_rate_calls,
        "loss": last.get("loss"),
        "win_rate_next_vs_current": win_rate,
        "win_rate_comparisons": win_rate_comparisons,
    }


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Run:
    """What the stages of one run share: the config, this process's state (accelerate's PartialState),
    the oracle (split over the processes), the run directory, the tokenizer, the sampler pool (it
    keeps a vLLM engine across iterations, new weights loaded in place; closed at the end), whether
    to show progress bars, and the prompt sets read so far (one per prompts file)."""

    config: OnlineConfig
    state: Any
    oracle: Any
    run_dir: Path
    tokenizer: Any
    pool: SamplerPool
    progress: bool
    prompt_sets: dict[str, PromptSet] = dataclasses.field(default_factory=dict)

    def prompts(self, t: int) -> PromptSet:
        """Iteration t's prompts (each file read once)."""
        file = prompt_file(self.config.prompts, t)
        if file not in self.prompt_sets:
            self.prompt_sets[file] = prompt_set(self.config.prompts, t, self.tokenizer)
        return self.prompt_sets[file]


def run_online(
    config: OnlineConfig, *, oracle=None, on_iteration=None, progress: bool = True
) -> OnlineResult:
    """Run, resume or extend the online loop. `oracle` overrides `config.oracle` (a Python object);
    `on_iteration(t, summary_row, policy_path)` is called as each iteration's summary completes
    (on every process), with the path of π_{t+1}.

    Under `accelerate launch` every process calls this with the same config (and an equal `oracle`
    object, if any) and gets the same result; the process group stays initialized for the caller
    (the CLI destroys it). `progress`: progress bars, on the local main process only.
    """
    config = validated(config)
    state = process_state()
    oracle = split_oracle(oracle, config.oracle, state)
    run_dir = _prepare_run_dir(config, state)
    tokenizer = load_tokenizer(config.model.tokenizer_spec(), where="model")
    trackers = IterationTrackers(config.output.report_to, run_dir, to_dict(config)) if state.is_main_process else None
    run = _Run(config, state, oracle, run_dir, tokenizer, SamplerPool(), progress)
    summaries: list[dict[str, Any]] = []
    try:
        for t in range(config.run.iterations):
            row, final = _iteration(run, t)
            summaries.append(row)
            if state.is_main_process:
                _log_summary(row)
                trackers.log_iteration(row, run_dir / f"iter_{t}" / "train" / "metrics.jsonl")
            if on_iteration is not None:
                on_iteration(t, row, final)
    finally:
        run.pool.close()
    if trackers is not None:
        trackers.finish()
    state.wait_for_everyone()  # no process returns before the main process has written everything
    return OnlineResult(run_dir, Path(policy_path(config, config.run.iterations)), summaries)


def _prepare_run_dir(config: OnlineConfig, state) -> Path:
    """The run directory, made if new and checked against the config by the main process (a rerun
    resumes it, a larger run.iterations extends it, another config is refused on every process)."""
    run_dir = run_directory(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    problem = from_main(state, lambda: _open_run_dir(run_dir, config))
    if problem is not None:
        raise NashalignError(problem)
    return run_dir


def _open_run_dir(run_dir: Path, config: OnlineConfig) -> str | None:
    """A run directory belongs to one config: continuing it with another would mix artifacts. A new
    run directory gets the config saved; a larger run.iterations extends a run (the saved config is
    updated). Returns the problem, or None."""
    import yaml

    saved = run_dir / "config.yaml"
    if saved.exists():
        previous = yaml.safe_load(saved.read_text())
        change = config_change(previous, config)
        if change is not None:
            return (f"{saved}: this run directory was made with a different config ({change}); use another "
                    "run.name (or delete the directory to start over)")
        finished = previous["run"]["iterations"]
        if finished == config.run.iterations:
            return None
        # iter_<T>/generations.jsonl holds π_T's samples of the last prompts file, for the last summary
        # row; with prompts.files, iteration T of the extended run answers the next file instead.
        if prompt_file(config.prompts, finished - 1) != prompt_file(config.prompts, finished):
            stale = run_dir / f"iter_{finished}"
            for path in [stale / "generations.jsonl", *stale.glob("generations.shard-*.jsonl")]:
                path.unlink(missing_ok=True)
    dump_config(config, saved)
    return None


def _iteration(run: _Run, t: int) -> tuple[dict[str, Any], Path]:
    """Iteration t, every stage skipped whose artifact exists: sample π_t and judge, cut the pairs,
    score and train π_{t+1}, summarize. Returns the summary row and the path of π_{t+1}."""
    it = run.run_dir / f"iter_{t}"
    it.mkdir(exist_ok=True)
    phase = phase_config(run.config, t)
    current = run.prompts(t)
    groups, opponents, pairs, stats = _sample_and_judge(run, it, t, phase.model.name_or_path, current)
    tokenized, truncation = _training_pairs(run, t, pairs, groups, opponents, current)
    final = _score_and_train(run, it, t, phase, tokenized)
    return _summary(run, it, t, current, groups, stats, truncation), final


def _sample_and_judge(run: _Run, it: Path, t: int, policy: str, current: PromptSet):
    """Stages 1 and 2: K samples of each prompt from π_t at `policy`, and the pairs the oracle makes
    of them (nash-md: each sample judged against its opponent from the mixture of π_t and π_ref).
    The judge's memory is released after. Returns (groups, opponents or None, pairs, pair stats)."""
    config, state = run.config, run.state
    groups = _generate(it / "generations.jsonl", policy, run.tokenizer, current.rendered, config,
                       stage_seed(config.run.seed, t, 0), state, run.progress, run.pool)
    opponents = None
    if config.run.algorithm == "nash-md":
        opponents = _generate(it / "opponents.jsonl", policy, run.tokenizer, current.rendered, config,
                              stage_seed(config.run.seed, t, 4), state, run.progress, run.pool,
                              ref_path=reference_path(config, t))
        pairs, stats = judge_opponents_stage(it, run.oracle, current.judge, groups, opponents, state)
    else:
        pairs, stats = _judge(it, run.oracle, current.judge, groups, config, t, state)
    release(run.oracle)  # judging is over: the judge's model leaves memory before scoring and training
    if not pairs:
        raise NashalignError(f"{it}: the oracle's judgments kept no pair; nothing to train on")
    return groups, opponents, pairs, stats


def _training_pairs(run: _Run, t: int, pairs: list[dict], groups, opponents,
                    current: PromptSet) -> tuple[list[TokenizedPair], TruncationReport]:
    """The pairs as token ids, cut to data.max_length / data.max_prompt_length (with a warning when
    anything was cut)."""
    config, tokenizer = run.config, run.tokenizer
    tokenized, truncation = truncate_pairs(
        tokenized_pairs(pairs, groups, current.ids, tokenizer.eos_token_id, opponents),
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length, bos_id=tokenizer.bos_token_id,
    )
    if truncation.truncated_prompts or truncation.truncated_responses or truncation.dropped:
        logger.warning("iteration %d: data.max_length / data.max_prompt_length: %s", t, truncation.summary())
    return tokenized, truncation


def _score_and_train(run: _Run, it: Path, t: int, phase: TrainConfig, tokenized: list[TokenizedPair]) -> Path:
    """Stages 3 and 4: the pairs' log-probs, then π_{t+1} (and for inpo-optimistic at t ≥ 1, π̂_t from
    π̂_{t−1} on the same pairs and log-probs), each model's memory released after its training.
    Returns the path of π_{t+1}."""
    logps = _score(it, tokenized, phase, run.tokenizer, run.state)
    final = _train(tokenized, logps, phase, run.tokenizer, run.state)
    release()
    if has_aux_phase(run.config, t):
        _train(tokenized, logps, phase_config(run.config, t, aux=True), run.tokenizer, run.state)
        release()  # the trained policy is on disk; its memory returns before the next sampling
    return final


def _summary(run: _Run, it: Path, t: int, current: PromptSet, groups, stats: dict,
             truncation: TruncationReport) -> dict[str, Any]:
    """Iteration t's summary row: read back from summary.json if the iteration finished, else made
    (with the win rate of π_{t+1} over π_t unless summary.win_rate is false) and written."""
    if from_main(run.state, (it / "summary.json").exists):
        return read_json(it / "summary.json")
    calls_before = run.oracle.counts.judge_calls
    win_rate, comparisons = None, 0
    if run.config.summary.win_rate:
        win_rate, comparisons = _win_rate(run, t, current, groups)
        release(run.oracle)  # the judge's model is not kept through the next iteration's sampling
    row = _summary_row(it, t, groups, stats, truncation, win_rate, comparisons,
                       run.oracle.counts.judge_calls - calls_before)
    if run.state.is_main_process:
        write_json(it / "summary.json", row)
    return row


def _log_summary(row: dict[str, Any]) -> None:
    loss, win_rate = row["loss"], row["win_rate_next_vs_current"]
    logger.info(
        "iteration %d: %d prompts, %d pairs kept (%d ties dropped), mean length %.1f, %d comparisons, "
        "%d judge calls, loss %s, %s",
        row["iteration"], row["prompts"], row["pairs_kept"], row["ties_dropped"], row["mean_response_length"],
        row["comparisons"], row["judge_calls"], "n/a" if loss is None else f"{loss:.4g}",
        "win rate not measured (summary.win_rate: false)" if win_rate is None
        else f"win rate of π_{{t+1}} over π_t {win_rate:.3f}",
    )


def format_summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-iteration summary rows as a fixed-width text table ("off": win rate not measured)."""
    columns = ["iteration", "prompts", "pairs_kept", "ties_dropped", "mean_response_length", "judge_calls",
               "loss", "win_rate_next_vs_current"]
    header = ["iter", "prompts", "pairs", "ties", "mean len", "judge calls", "loss", "win(t+1 vs t)"]

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if value is None:
            return "off" if column == "win_rate_next_vs_current" and row.get("win_rate_comparisons") == 0 else "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
