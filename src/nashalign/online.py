"""The online loop: T iterations of sample → judge → pairs → score → train, resumable at any moment.

    iter_<t>/generations.jsonl   K responses per prompt sampled from π_t (token ids + finish reason)
    iter_<t>/judgments.jsonl     every oracle comparison made while building pairs
    iter_<t>/pair_stats.json     pairs kept / dropped, comparisons, judge calls
    iter_<t>/pairs.jsonl         (y_w, y_l) pairs; written last, so it marks the judging stage complete
    iter_<t>/logps.safetensors   summed log-probs of every pair under π_ref and π_t
    iter_<t>/train/              the training phase (its own checkpoints/, metrics.jsonl, final/)
    iter_<t>/summary.json        the iteration's summary row, written once π_{t+1} has been sampled
    iter_<T>/generations.jsonl   samples of the final policy (for the last summary row's win rate)

Each artifact is written atomically (nashalign.artifacts), and a stage whose artifact exists is
skipped on restart; training resumes from its newest complete checkpoint. Every random draw is seeded
from (run.seed, t), so a killed and rerun loop reaches the same weights as an uninterrupted one.

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
class PromptsConfig:
    file: str | None = _field(None, "prompts: .jsonl / .json / .parquet / datasets dir (required)")
    field: str = _field("prompt", "the record field holding the prompt (a string or a list of messages)")
    limit: int | None = _field(None, "use only the first this many prompts", ge=1)


@dataclasses.dataclass
class SamplingSettings:
    backend: Literal["transformers", "vllm", "auto"] = _field("auto", "generation engine")
    samples_per_prompt: int = _field(8, "K: responses sampled per prompt", ge=2)
    max_new_tokens: int = _field(256, "response length limit in tokens", ge=1)
    temperature: float = _field(1.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = _field(1.0, "nucleus sampling mass", gt=0, le=1)
    batch_size: int = _field(16, "rows per generate call (transformers backend)", ge=1)
    tensor_parallel_size: int = _field(1, "GPUs per vLLM engine", ge=1)


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


@dataclasses.dataclass
class OnlineResult:
    run_dir: Path
    final_model: Path
    summaries: list[dict[str, Any]]


# --------------------------------------------------------------------------- prompts


def load_prompts(config: PromptsConfig) -> list[str | list[dict]]:
    """The prompts of `config.file`, each a string or a list of {"role", "content"} messages."""
    from nashalign.records import read_rows

    if config.file is None:
        raise NashalignError("prompts.file: required (a .jsonl/.json/.parquet file or a datasets directory)")
    prompts = []
    for where, row in read_rows(config.file):
        value = row.get(config.field) if isinstance(row, dict) else None
        ok_messages = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
        if not (isinstance(value, str) and value.strip()) and not ok_messages:
            raise NashalignError(
                f"{where}: field {config.field!r}: expected a non-empty string or a list of "
                f"{{'role', 'content'}} messages, got {type(value).__name__}"
            )
        prompts.append(value)
        if config.limit and len(prompts) >= config.limit:
            break
    if not prompts:
        raise NashalignError(f"{config.file}: no prompts")
    return prompts


def render_prompt(prompt: str | list[dict], tokenizer) -> str:
    """The text the policy continues: messages through the chat template (with the generation
    prompt); a plain string is used as it is."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise NashalignError("a prompt is a list of messages, but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def judge_text(prompt: str | list[dict]) -> str:
    """What the oracle sees as the prompt: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


# --------------------------------------------------------------------------- stages


def _generate(path: Path, policy_path: str, tokenizer, rendered: list[str], config: OnlineConfig, t: int):
    """Stage 1: K samples per prompt from π_t → generations.jsonl (one row per sample)."""
    if path.exists():
        return _read_generations(path, len(rendered), config.sampling.samples_per_prompt)
    from nashalign.sampling import make_sampler

    s = config.sampling
    sampler = make_sampler(
        s.backend, policy_path, tokenizer, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
        top_p=s.top_p, batch_size=s.batch_size, seed=_seed(config.run.seed, t, 0),
        tensor_parallel_size=s.tensor_parallel_size, fallback_to_transformers=s.backend == "auto",
    )
    groups = sampler.generate(rendered, s.samples_per_prompt)
    if hasattr(sampler, "close"):
        sampler.close()
    del sampler
    gc.collect()
    rows = [dataclasses.asdict(g) for group in groups for g in group]
    write_jsonl(path, rows)
    return _read_generations(path, len(rendered), s.samples_per_prompt)


def _read_generations(path: Path, num_prompts: int, k: int) -> list[list[dict]]:
    groups: list[list[dict]] = [[None] * k for _ in range(num_prompts)]  # type: ignore[list-item]
    for row in read_jsonl(path):
        groups[row["prompt_index"]][row["sample_index"]] = row
    if any(g is None for group in groups for g in group):
        raise NashalignError(f"{path}: incomplete (expected {k} samples for each of {num_prompts} prompts)")
    return groups


def _judge(it: Path, oracle, judge_prompts: list[str], groups, config: OnlineConfig, t: int):
    """Stage 2: build pairs with the oracle → judgments.jsonl, pair_stats.json, pairs.jsonl (last)."""
    pairs_path = it / "pairs.jsonl"
    if pairs_path.exists():
        return read_jsonl(pairs_path), read_json(it / "pair_stats.json")
    from nashalign.pairs import make_pairs

    loss_name, _, default_method = ALGORITHMS[config.run.algorithm]
    method = default_method if config.pairs.method == "auto" else config.pairs.method
    calls_before = oracle.counts.judge_calls
    result = make_pairs(
        method, oracle, judge_prompts, [[g["text"] for g in group] for group in groups],
        decide=config.pairs.decide, rng=np.random.default_rng(_seed(config.run.seed, t, 1)),
        score=config.pairs.score, win_rates=loss_name == "sppo",
    )
    stats = {**result.stats.as_dict(), "method": method, "judge_calls": oracle.counts.judge_calls - calls_before}
    write_jsonl(it / "judgments.jsonl", (j.to_dict() for j in result.judgments))
    write_json(it / "pair_stats.json", stats)
    write_jsonl(pairs_path, (p.to_dict() for p in result.pairs))
    return read_jsonl(pairs_path), stats


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


def _score(it: Path, pairs: list[TokenizedPair], policy_path: str, ref_path: str, config: OnlineConfig, tokenizer):
    """Stage 3: summed log-probs of every pair under π_ref and π_t → logps.safetensors."""
    from safetensors.torch import load_file, save

    path = it / "logps.safetensors"
    if path.exists():
        return load_file(path)
    from nashalign.artifacts import atomic_write_bytes
    from nashalign.cache import LogpCache, score_pairs
    from nashalign.data import collate_pairs
    from nashalign.train import load_model

    _, ref_is_current, _ = ALGORITHMS[config.run.algorithm]
    cache = LogpCache(Path(config.run.dir) / config.run.name / "logp_cache")
    roles = {"prev": policy_path} if ref_is_current else {"ref": ref_path, "prev": policy_path}
    tensors = {}
    for role, source in roles.items():
        model = load_model(source, config.model)
        scored = score_pairs(
            model, pairs, batch_size=config.data.scoring_batch_size, cache=cache,
            collate_fn=lambda batch: collate_pairs(batch, tokenizer.pad_token_id),
        )
        tensors[f"{role}_chosen"] = scored["chosen_logps"].float().contiguous()
        tensors[f"{role}_rejected"] = scored["rejected_logps"].float().contiguous()
        del model
        gc.collect()
    atomic_write_bytes(path, save(tensors))
    return load_file(path)


def _train(it: Path, pairs, logps, policy_path: str, config: OnlineConfig, tokenizer, t: int) -> Path:
    """Stage 4: one training phase from π_t on the pairs → π_{t+1} at iter_<t>/train/final."""
    from nashalign.train import train_pairs

    final = it / "train" / "final"
    if final.exists():
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


def _summary(it: Path, t: int, groups, next_groups, oracle, judge_prompts, stats) -> dict[str, Any]:
    """The iteration's summary row; the win rate of π_{t+1} over π_t pairs sample j of each prompt
    under π_{t+1} with sample j under π_t, judged by the oracle (P, not a draw)."""
    path = it / "summary.json"
    if path.exists():
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
    write_json(path, row)
    return row


def _seed(seed: int, t: int, stage: int) -> int:
    return int(np.random.SeedSequence([seed, t, stage]).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------- the loop


def _check_run_dir(run_dir: Path, config: OnlineConfig) -> None:
    """A run directory belongs to one config: resuming with another would mix artifacts."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        import yaml

        if yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False)):
            raise NashalignError(
                f"{saved}: this run directory was made with a different config; use another run.name "
                "(or delete the directory to start over)"
            )
    else:
        dump_config(config, saved)


def run_online(
    config: OnlineConfig, *, oracle=None, on_iteration=None, progress: bool = True
) -> OnlineResult:
    """Run (or resume) the online loop. `oracle` overrides `config.oracle` (a Python object);
    `on_iteration(t, summary_row, policy_path)` is called as each iteration's summary completes."""
    from nashalign.oracles import build_oracle
    from nashalign.train import load_tokenizer

    config = validated(config)
    if config.run.algorithm not in ALGORITHMS:
        raise NashalignError(f"run.algorithm: expected one of {', '.join(ALGORITHMS)}, got {config.run.algorithm!r}")
    if oracle is None:
        if config.oracle is None:
            raise NashalignError("oracle: required (a mapping with a 'type' key), or pass an oracle object")
        oracle = build_oracle(config.oracle, where="oracle")
    run_dir = Path(config.run.dir) / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_dir(run_dir, config)

    tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path, config.model)
    prompts = load_prompts(config.prompts)
    rendered = [render_prompt(p, tokenizer) for p in prompts]
    judge_prompts = [judge_text(p) for p in prompts]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    ref_path = config.model.ref_name_or_path or config.model.name_or_path
    policy_path = config.model.name_or_path
    summaries: list[dict[str, Any]] = []
    previous = None  # (iteration dir, groups, pair stats) of t − 1, whose summary needs π_t's samples

    for t in range(config.run.iterations + 1):
        it = run_dir / f"iter_{t}"
        it.mkdir(exist_ok=True)
        groups = _generate(it / "generations.jsonl", str(policy_path), tokenizer, rendered, config, t)
        if previous is not None:
            row = _summary(previous[0], t - 1, previous[1], groups, oracle, judge_prompts, previous[2])
            summaries.append(row)
            _log_summary(row)
            if on_iteration is not None:
                on_iteration(t - 1, row, policy_path)
        if t == config.run.iterations:
            break
        pairs, stats = _judge(it, oracle, judge_prompts, groups, config, t)
        if not pairs:
            raise NashalignError(f"{it}: the oracle's judgments kept no pair; nothing to train on")
        tokenized = tokenized_pairs(pairs, groups, prompt_ids, tokenizer.eos_token_id)
        logps = _score(it, tokenized, str(policy_path), str(ref_path), config, tokenizer)
        policy_path = _train(it, tokenized, logps, str(policy_path), config, tokenizer, t)
        previous = (it, groups, stats)
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
