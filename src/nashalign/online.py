"""The online loop: T iterations of sample → judge → pairs → score → train, resumable at any moment.

    iter_<t>/generations.jsonl   K responses per prompt sampled from π_t (token ids + finish reason)
    iter_<t>/next_generations.jsonl  with prompts.files only: π_{t+1}'s samples of iteration t's
                                 prompts (for the summary's win rate; otherwise iter_<t+1>'s are used)
    iter_<t>/judgments.jsonl     every oracle comparison made while building pairs
    iter_<t>/pair_stats.json     pairs kept / dropped, comparisons, judge calls
    iter_<t>/pairs.jsonl         (y_w, y_l) pairs; written last, so it marks the judging stage complete
    iter_<t>/logps.safetensors   summed log-probs of every pair under π_ref and π_t
    iter_<t>/train/              the training phase (its own checkpoints/, metrics.jsonl, final/)
    iter_<t>/summary.json        the iteration's summary row, written once π_{t+1} has been sampled
    iter_<T>/generations.jsonl   samples of the final policy on the last iteration's prompts (for the
                                 last summary row's win rate)

Each artifact is written atomically (nashalign.artifacts), and a stage whose artifact exists is
skipped on restart; training resumes from its newest complete checkpoint. Every random draw is seeded
from (run.seed, t), so a killed and rerun loop reaches the same weights as an uninterrupted one.

Under `accelerate launch` every process runs this loop and the stages are split over the processes
(nashalign.sharding): sampling by prompt, into one shard file per process that the main process
merges; each oracle call by rows; scoring by pair; training data parallel. Only the main process
writes shared artifacts, the others wait at barriers, and every process takes the main process's
view of which stages are complete, so the artifacts equal a one-process run's with the same seed.

Prompts: `prompts.file` for every iteration, or `prompts.files`, one file per iteration (the paper
answers a fresh third of its prompts in each).

Algorithms (run.algorithm) differ in the loss, the reference and the default pair construction:
    inpo            loss inpo; π_ref fixed, π_t the previous iterate; tournament pairs (the paper)
    iterative-dpo   loss dpo with reference = π_t (Dong et al. 2024); best-versus-worst pairs
    sppo            loss sppo with reference = π_t and estimated win rates (Wu et al. 2024); all pairs
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nashalign import NashalignError
from nashalign.artifacts import read_json, read_jsonl, write_json, write_jsonl
from nashalign.config import (
    ConfigFieldError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    TrainConfig,
    _field,
    dump_config,
    to_dict,
    validated,
)
from nashalign.data import TokenizedPair
from nashalign.prompts import (
    PromptsConfig,
    PromptSet,
    judge_text,
    load_prompts,
    prompt_file,
    prompt_set,
    render_prompt,
)
from nashalign.sampling import SamplerPool
from nashalign.sharding import from_main, process_state, split_oracle

__all__ = [  # the prompt helpers live in nashalign.prompts; re-exported for the loop's users
    "ALGORITHMS", "OnlineConfig", "OnlineResult", "PairSettings", "PromptsConfig", "RunSettings",
    "SamplingSettings", "format_summary_table", "judge_text", "load_prompts", "prompt_file", "render_prompt",
    "run_online", "tokenized_pairs",
]

logger = logging.getLogger(__name__)

ALGORITHMS = {
    # algorithm: (loss name, reference is the current iterate, default pair construction)
    "inpo": ("inpo", False, "tournament"),
    "iterative-dpo": ("dpo", True, "best_vs_worst"),
    "sppo": ("sppo", True, "all_pairs"),
}


@dataclasses.dataclass
class RunSettings:
    name: str = _field("online", "run name: artifacts go to <dir>/<name>/")
    dir: str = _field("runs", "parent directory of runs")
    algorithm: Literal["inpo", "iterative-dpo", "sppo"] = _field("inpo", "which online algorithm")
    iterations: int = _field(3, "T: online iterations (the paper uses 3)", ge=1)
    seed: int = _field(0, "seed of sampling, pair decisions and training", ge=0)


@dataclasses.dataclass
class SamplingSettings:
    backend: Literal["transformers", "vllm", "auto"] = _field("auto", "generation engine")
    samples_per_prompt: int = _field(8, "K: responses sampled per prompt", ge=2)
    max_new_tokens: int = _field(256, "response length limit in tokens", ge=1)
    temperature: float = _field(1.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = _field(1.0, "nucleus sampling mass", gt=0, le=1)
    batch_size: int = _field(16, "rows per generate call (transformers backend)", ge=1)
    tensor_parallel_size: int = _field(1, "GPUs per vLLM engine", ge=1)
    gpu_memory_utilization: float = _field(
        0.5, "vLLM on a GPU: share of its memory the engine takes (weights + KV cache)", gt=0, le=1
    )
    engine_args: dict[str, Any] = _field(
        help="further vllm.LLM arguments (dtype, max_model_len, enforce_eager, enable_sleep_mode, ...)",
        factory=dict,
    )


@dataclasses.dataclass
class PairSettings:
    method: Literal["auto", "tournament", "best_vs_worst", "all_pairs"] = _field(
        "auto", "pair construction; auto: the algorithm's default"
    )
    decide: Literal["sample", "threshold"] = _field(
        "sample", "a comparison's outcome: a Bernoulli(P) draw, or P > 1/2"
    )
    score: Literal["borda", "copeland"] = _field("borda", "best_vs_worst ranking with a pairwise oracle")


@dataclasses.dataclass
class OnlineConfig:
    model: ModelConfig = _field(help="the initial policy π_0 (and π_ref unless ref_name_or_path is set)")
    oracle: dict[str, Any] | None = _field(None, "the preference oracle: a mapping with a 'type' key")
    run: RunSettings = _field(help="name, algorithm, iterations, seed", factory=RunSettings)
    prompts: PromptsConfig = _field(help="the prompts the policy answers", factory=PromptsConfig)
    sampling: SamplingSettings = _field(help="how responses are sampled", factory=SamplingSettings)
    pairs: PairSettings = _field(help="how pairs are built from judgments", factory=PairSettings)
    data: DataConfig = _field(help="token limits and scoring batch size", factory=DataConfig)
    loss: LossConfig = _field(help="hyperparameters of the algorithm's loss", factory=LossConfig)
    optim: OptimConfig = _field(help="the optimizer of each iteration's training phase", factory=OptimConfig)
    output: OutputConfig = _field(help="checkpointing and logging of each training phase", factory=OutputConfig)

    def check(self) -> None:
        files = self.prompts.files
        if files is not None and len(files) != self.run.iterations:
            raise ConfigFieldError(
                "prompts",
                f"files: expected one file per iteration, {self.run.iterations} (run.iterations), got {len(files)}",
            )


@dataclasses.dataclass
class OnlineResult:
    run_dir: Path
    final_model: Path
    summaries: list[dict[str, Any]]


# --------------------------------------------------------------------------- stages


def _generate(path: Path, policy_path: str, tokenizer, rendered: list[str], config: OnlineConfig, seed: int,
              state, progress: bool, pool) -> list[list[dict]]:
    """Stage 1: K samples per prompt from the policy → `path` (one row per sample), in prompt order.

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
                           progress, pool) if mine else []
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
            state, progress: bool, pool) -> list[dict]:
    """K samples of each prompt (keyed by its index in the file, which seeds its samples) as rows."""
    from nashalign.sampling import TransformersSampler

    s = config.sampling
    work = len(prompts) * s.samples_per_prompt * s.max_new_tokens * (config.run.iterations + 1)
    sampler = pool.sampler(
        s.backend, policy_path, tokenizer, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
        top_p=s.top_p, batch_size=s.batch_size, seed=seed, tensor_parallel_size=s.tensor_parallel_size,
        fallback_to_transformers=s.backend == "auto", work_tokens=work,
        llm_kwargs={"gpu_memory_utilization": s.gpu_memory_utilization, **s.engine_args},
    )
    if isinstance(sampler, TransformersSampler):
        sampler.model.to(state.device)  # this process's device (its own GPU under accelerate launch)
    groups = sampler.generate(prompts, s.samples_per_prompt, prompt_indices=indices,
                              progress=progress and state.is_local_main_process)
    pool.release(sampler)
    del sampler
    gc.collect()
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
        from nashalign.pairs import make_pairs

        loss_name, _, default_method = ALGORITHMS[config.run.algorithm]
        method = default_method if config.pairs.method == "auto" else config.pairs.method
        calls_before = oracle.counts.judge_calls
        result = make_pairs(
            method, oracle, judge_prompts, [[g["text"] for g in group] for group in groups],
            decide=config.pairs.decide, rng=np.random.default_rng(_seed(config.run.seed, t, 1)),
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


def tokenized_pairs(pairs: list[dict], groups, prompt_ids: list[list[int]], eos_id: int) -> list[TokenizedPair]:
    """Pairs as token ids exactly as sampled (no re-tokenization): a response that stopped ends with
    one EOS, a response cut by max_new_tokens ends where it was cut."""

    def response(sample: dict) -> list[int]:
        return list(sample["token_ids"]) + ([eos_id] if sample["finish_reason"] == "stop" else [])

    out = []
    for pair in pairs:
        p = pair["prompt_index"]
        chosen, rejected = groups[p][pair["chosen_index"]], groups[p][pair["rejected_index"]]
        extra = {
            key: pair[key] for key in ("chosen_win_rate", "rejected_win_rate") if pair.get(key) is not None
        }
        out.append(TokenizedPair(list(prompt_ids[p]), response(chosen), response(rejected), f"prompt[{p}]", extra))
    return out


def _score(it: Path, pairs: list[TokenizedPair], policy_path: str, ref_path: str, config: OnlineConfig, tokenizer,
           state):
    """Stage 3: summed log-probs of every pair under π_ref and π_t → logps.safetensors.

    Through nashalign.train.reference_logps and the run's log-prob cache: with several processes
    each scores every N-th pair and the main process writes the cache (accelerate's PartialState
    carries what that needs of an Accelerator: process index and count, barriers)."""
    from safetensors.torch import load_file, save

    path = it / "logps.safetensors"
    if not from_main(state, path.exists):
        from nashalign.artifacts import atomic_write_bytes
        from nashalign.train import reference_logps

        _, ref_is_current, _ = ALGORITHMS[config.run.algorithm]
        scoring = TrainConfig(  # the roles reference_logps scores for inpo: ref and prev (one model if equal)
            model=dataclasses.replace(config.model, ref_name_or_path=policy_path if ref_is_current else ref_path,
                                      prev_name_or_path=policy_path),
            data=config.data, loss=dataclasses.replace(config.loss, name="inpo"),
        )
        scored = reference_logps(None, pairs, scoring, Path(config.run.dir) / config.run.name / "logp_cache",
                                 tokenizer.pad_token_id, state.device, accelerator=state)
        roles = ("prev",) if ref_is_current else ("ref", "prev")
        # clone: ref and prev are one tensor when one model scored both, and safetensors stores no shared memory
        tensors = {f"{role}_{side}": scored[role][side].float().clone().contiguous()
                   for role in roles for side in ("chosen", "rejected")}
        if state.is_main_process:
            atomic_write_bytes(path, save(tensors))
        state.wait_for_everyone()
    return load_file(path)


def _train(it: Path, pairs, logps, policy_path: str, config: OnlineConfig, tokenizer, t: int, state) -> Path:
    """Stage 4: one training phase from π_t on the pairs → π_{t+1} at iter_<t>/train/final."""
    from nashalign.train import train_pairs

    final = it / "train" / "final"
    if from_main(state, final.exists):
        return final
    loss_name, ref_is_current, _ = ALGORITHMS[config.run.algorithm]
    train_config = TrainConfig(
        model=dataclasses.replace(config.model, name_or_path=policy_path, ref_name_or_path=None, prev_name_or_path=None),
        data=config.data,
        loss=dataclasses.replace(config.loss, name=loss_name),
        optim=dataclasses.replace(config.optim, seed=_seed(config.run.seed, t, 2) % 2**31),
        output=dataclasses.replace(config.output, dir=str(it / "train")),
    )
    prev = {"chosen": logps["prev_chosen"], "rejected": logps["prev_rejected"]}
    if ref_is_current:
        ref, prev_arg = prev, None
    else:
        ref, prev_arg = {"chosen": logps["ref_chosen"], "rejected": logps["ref_rejected"]}, prev
    result = train_pairs(
        policy_path, pairs, train_config, it / "train", tokenizer=tokenizer, ref_logps=ref, prev_logps=prev_arg,
    )
    return result.final_dir


def _summary(it: Path, t: int, groups, next_groups, oracle, judge_prompts, stats, state) -> dict[str, Any]:
    """The iteration's summary row; the win rate of π_{t+1} over π_t pairs sample j of each prompt
    under π_{t+1} with sample j under π_t, judged by the oracle (P, not a draw)."""
    path = it / "summary.json"
    if from_main(state, path.exists):
        return read_json(path)
    first = [g["text"] for group in next_groups for g in group]
    second = [g["text"] for group in groups for g in group]
    prompts = [judge_prompts[p] for p, group in enumerate(groups) for _ in group]
    calls_before = oracle.counts.judge_calls
    probs = oracle.prob(prompts, first, second)
    metrics_file = it / "train" / "metrics.jsonl"
    last = read_jsonl(metrics_file)[-1] if metrics_file.exists() else {}
    lengths = [len(g["token_ids"]) for group in groups for g in group]
    row = {
        "iteration": t,
        "prompts": len(groups),
        "pairs_kept": stats["kept"],
        "ties_dropped": stats.get("dropped_tie", 0),
        "pairs_dropped": stats["dropped"],
        "mean_response_length": float(np.mean(lengths)),
        "judge_calls": stats["judge_calls"] + oracle.counts.judge_calls - calls_before,
        "loss": last.get("loss"),
        "win_rate_next_vs_current": float(np.mean(probs)),
    }
    if state.is_main_process:
        write_json(path, row)
    return row


def _seed(seed: int, t: int, stage: int) -> int:
    return int(np.random.SeedSequence([seed, t, stage]).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------- the loop


def _run_dir_problem(run_dir: Path, config: OnlineConfig) -> str | None:
    """A run directory belongs to one config: resuming with another would mix artifacts. Saves the
    config in a new run directory."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        dump_config(config, saved)
        return None
    import yaml

    if yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False)):
        return (f"{saved}: this run directory was made with a different config; use another run.name "
                "(or delete the directory to start over)")
    return None


def run_online(
    config: OnlineConfig, *, oracle=None, on_iteration=None, progress: bool = True
) -> OnlineResult:
    """Run (or resume) the online loop. `oracle` overrides `config.oracle` (a Python object);
    `on_iteration(t, summary_row, policy_path)` is called as each iteration's summary completes
    (on every process).

    Under `accelerate launch` every process calls this with the same config (and an equal `oracle`
    object, if any) and gets the same result; the process group stays initialized for the caller
    (the CLI destroys it). `progress`: progress bars, on the local main process only.
    """
    from nashalign.train import load_tokenizer

    config = validated(config)
    state = process_state()
    if config.run.algorithm not in ALGORITHMS:
        raise NashalignError(f"run.algorithm: expected one of {', '.join(ALGORITHMS)}, got {config.run.algorithm!r}")
    oracle = split_oracle(oracle, config.oracle, state)
    run_dir = Path(config.run.dir) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    problem = from_main(state, lambda: _run_dir_problem(run_dir, config))
    if problem is not None:
        raise NashalignError(problem)

    tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path, config.model)
    prompt_sets: dict[str, PromptSet] = {}

    def prompts_of(t: int) -> PromptSet:
        file = prompt_file(config.prompts, t)
        if file not in prompt_sets:
            prompt_sets[file] = prompt_set(config.prompts, t, tokenizer)
        return prompt_sets[file]

    ref_path = config.model.ref_name_or_path or config.model.name_or_path
    policy_path = config.model.name_or_path
    summaries: list[dict[str, Any]] = []
    previous = None  # (iteration dir, prompts, groups, pair stats) of t − 1, whose summary needs π_t's samples
    pool = SamplerPool()  # keeps a vLLM engine across iterations (new weights in place); closed at the end

    for t in range(config.run.iterations + 1):
        it = run_dir / f"iter_{t}"
        it.mkdir(exist_ok=True)
        current = prompts_of(t)
        groups = _generate(it / "generations.jsonl", str(policy_path), tokenizer, current.rendered, config,
                           _seed(config.run.seed, t, 0), state, progress, pool)
        if previous is not None:
            before, before_prompts, before_groups, before_stats = previous
            next_groups = groups if before_prompts.file == current.file else _generate(
                before / "next_generations.jsonl", str(policy_path), tokenizer, before_prompts.rendered, config,
                _seed(config.run.seed, t - 1, 3), state, progress, pool,
            )
            row = _summary(before, t - 1, before_groups, next_groups, oracle, before_prompts.judge, before_stats, state)
            summaries.append(row)
            if state.is_main_process:
                _log_summary(row)
            if on_iteration is not None:
                on_iteration(t - 1, row, policy_path)
        if t == config.run.iterations:
            break
        pairs, stats = _judge(it, oracle, current.judge, groups, config, t, state)
        if not pairs:
            raise NashalignError(f"{it}: the oracle's judgments kept no pair; nothing to train on")
        tokenized = tokenized_pairs(pairs, groups, current.ids, tokenizer.eos_token_id)
        logps = _score(it, tokenized, str(policy_path), str(ref_path), config, tokenizer, state)
        policy_path = _train(it, tokenized, logps, str(policy_path), config, tokenizer, t, state)
        previous = (it, current, groups, stats)
    pool.close()
    state.wait_for_everyone()  # no process returns before the main process has written everything
    return OnlineResult(run_dir, Path(policy_path), summaries)


def _log_summary(row: dict[str, Any]) -> None:
    loss = row["loss"]
    logger.info(
        "iteration %d: %d prompts, %d pairs kept (%d ties dropped), mean length %.1f, %d judge calls, "
        "loss %s, win rate of π_{t+1} over π_t %.3f",
        row["iteration"], row["prompts"], row["pairs_kept"], row["ties_dropped"], row["mean_response_length"],
        row["judge_calls"], "n/a" if loss is None else f"{loss:.4g}", row["win_rate_next_vs_current"],
    )


def format_summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-iteration summary rows as a fixed-width text table."""
    columns = ["iteration", "prompts", "pairs_kept", "ties_dropped", "mean_response_length", "judge_calls",
               "loss", "win_rate_next_vs_current"]
    header = ["iter", "prompts", "pairs", "ties", "mean len", "judge calls", "loss", "win(t+1 vs t)"]
    cells = [[("-" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r[c]))
              for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
