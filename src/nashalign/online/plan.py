"""`nashalign online --dry-run`: the stages of every iteration and what they cost, without loading a
model (only the prompt files are read, to count the prompts).

For iteration t with N prompts, K samples per prompt and M = sampling.max_new_tokens:

    sample    N·K samples from π_t, at most N·K·M new tokens; nash-md: N·K opponents more, from the
              mixture of π_t and π_ref (at most N·K·M new tokens)
    judge     comparisons by pair method: tournament 3K/2 − 1 per prompt (+ up to 2(K − 1) per kept
              pair when sppo estimates win rates), all_pairs and best_vs_worst K(K − 1)/2 (best_vs_worst
              with a reward model scores the N·K responses instead); at most 1 pair per prompt
              (tournament, best_vs_worst) or K(K − 1)/2 (all_pairs); nash-md ("mixture"): K per
              prompt, each sample against its opponent, N·K rows
    score     the pairs under the reference (+ π_t for inpo and inpo-optimistic, + π̂_{t−1} for
              inpo-optimistic at t ≥ 1)
    train     the algorithm's loss (inpo-optimistic at t ≥ 1: a second phase trains π̂_t)
    summary   the win rate of π_{t+1} over π_t (`summary.win_rate`): N·K comparisons, and N·K more
              samples unless iteration t+1 answers the same prompts (it then reuses them)

Judge calls per comparison: 2 for a judge asked both orders (python, pair_model, http_judge with
`both_orders: true`, the default), 1 otherwise; a reward model scores each response once (at most 2
rows per comparison). They are upper bounds: identical responses are never sent to a judge, and
cached answers (http_judge) cost nothing. Comparisons and samples are exact where marked so. The
counts are those of a run from scratch: a resumed or extended run skips what is done.
"""

from __future__ import annotations

from typing import Any

import yaml

from nashalign.config import to_dict, validated
from nashalign.online.config import (
    ALGORITHMS,
    OnlineConfig,
    aux_policy_path,
    has_aux_phase,
    pair_method,
    phase_config,
    policy_path,
    run_directory,
)
from nashalign.online.prompts import load_prompts, prompt_file

__all__ = ["format_plan", "judge_orders", "plan_online"]

SYMMETRIZED = ("python", "pair_model", "http_judge")  # position-biased judges, asked both orders by default


def judge_orders(spec: dict | None) -> tuple[int | None, str]:
    """(judge calls per comparison, at most; how the oracle handles the two orders) of an oracle spec."""
    if spec is None:
        return None, "no oracle section (an oracle object is passed from Python): judge calls unknown"
    kind = spec.get("type")
    if kind in SYMMETRIZED:
        if spec.get("both_orders", True):
            return 2, f"{kind} asked both orders (both_orders: true): 2 judge calls per comparison"
        return 1, f"{kind} asked once, in a canonical order (both_orders: false): 1 judge call per comparison"
    if kind == "reward_model":
        return 2, "reward_model: one reward per response, at most 2 rows per comparison"
    return 1, f"{kind}: 1 judge call per comparison"


def _judge_stage(method: str, n: int, k: int, win_rates: bool, scores: bool, orders: int | None) -> dict[str, Any]:
    if method == "mixture":  # nash-md: each of the N·K samples against its own opponent
        calls = None if orders is None else orders * n * k
        return {"method": method, "comparisons_per_prompt": k, "comparisons": n * k, "comparisons_max": n * k,
                "judge_calls_max": calls, "pairs_max": n * k}
    if method == "tournament":
        per_prompt, extra = 3 * k // 2 - 1, 2 * (k - 1) if win_rates else 0
        pairs = n
    else:
        per_prompt, extra = (0 if method == "best_vs_worst" and scores else k * (k - 1) // 2), 0
        pairs = n if method == "best_vs_worst" else n * k * (k - 1) // 2
    comparisons_max = n * (per_prompt + extra)
    calls = None if orders is None else orders * comparisons_max
    if scores and calls is not None:  # each response is scored once
        calls = min(calls, n * k) if per_prompt else n * k
    return {
        "method": method,
        "comparisons_per_prompt": per_prompt,
        "comparisons": None if extra else n * per_prompt,
        "comparisons_max": comparisons_max,
        "judge_calls_max": calls,
        "pairs_max": pairs,
    }


def plan_online(config: OnlineConfig) -> dict[str, Any]:
    """The run's plan as plain data: the resolved config, per iteration its stages and counts, totals."""
    config = validated(config)
    k, max_new = config.sampling.samples_per_prompt, config.sampling.max_new_tokens
    loss_name, _, _ = ALGORITHMS[config.run.algorithm]
    method = pair_method(config)
    orders, order_text = judge_orders(config.oracle)
    scores = (config.oracle or {}).get("type") == "reward_model"
    counts: dict[str, int] = {}
    iterations = []
    for t in range(config.run.iterations):
        file = prompt_file(config.prompts, t)
        if file not in counts:
            counts[file] = len(load_prompts(config.prompts, t))
        n = counts[file]
        phase = phase_config(config, t)
        judge = _judge_stage(method, n, k, loss_name == "sppo", scores, orders)
        reused = t + 1 < config.run.iterations and prompt_file(config.prompts, t + 1) == file
        extra = 0 if reused or not config.summary.win_rate else n * k
        summary_comparisons = n * k if config.summary.win_rate else 0
        summary_calls = None if orders is None else orders * summary_comparisons
        if scores and summary_calls is not None:
            summary_calls = min(summary_calls, 2 * n * k)
        roles = {"ref": phase.model.ref_name_or_path}
        for role, path in (("prev", phase.model.prev_name_or_path), ("aux", phase.model.aux_name_or_path)):
            if path is not None:
                roles[role] = path
        samples = n * k * (2 if method == "mixture" else 1)
        aux = phase_config(config, t, aux=True) if has_aux_phase(config, t) else None
        iterations.append({
            "iteration": t,
            "prompts_file": file,
            "prompts": n,
            "sample": {"policy": phase.model.name_or_path, "samples": samples, "new_tokens_max": samples * max_new,
                       "opponents": n * k if method == "mixture" else 0,
                       "mixture_coef": config.sampling.mixture_coef if method == "mixture" else None},
            "judge": judge,
            "score": {"models": roles},
            "train": {"loss": phase.loss.name, "epochs": config.optim.epochs, "max_steps": config.optim.max_steps,
                      "final": policy_path(config, t + 1)},
            "train_aux": None if aux is None else {"loss": aux.loss.name, "policy": aux.model.name_or_path,
                                                   "final": aux_policy_path(config, t)},
            "summary": {"win_rate": config.summary.win_rate, "samples": extra, "new_tokens_max": extra * max_new,
                        "samples_reused": bool(config.summary.win_rate and reused),
                        "comparisons": summary_comparisons, "judge_calls_max": summary_calls},
        })
    total = {
        "samples": sum(it["sample"]["samples"] + it["summary"]["samples"] for it in iterations),
        "new_tokens_max": sum(it["sample"]["new_tokens_max"] + it["summary"]["new_tokens_max"] for it in iterations),
        "comparisons_max": sum(it["judge"]["comparisons_max"] + it["summary"]["comparisons"] for it in iterations),
        "judge_calls_max": None if orders is None else sum(
            it["judge"]["judge_calls_max"] + it["summary"]["judge_calls_max"] for it in iterations),
    }
    return {
        "config": to_dict(config),
        "run_dir": str(run_directory(config)),
        "algorithm": config.run.algorithm,
        "samples_per_prompt": k,
        "pair_method": method,
        "judge_orders": order_text,
        "iterations": iterations,
        "total": total,
    }


def _n(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text for a person: the resolved config, then one block per iteration."""
    lines = ["resolved config:"]
    lines += ["  " + line for line in yaml.safe_dump(plan["config"], sort_keys=False).splitlines()]
    k = plan["samples_per_prompt"]
    lines += [
        "",
        f"plan: {len(plan['iterations'])} iteration(s) of {plan['algorithm']} in {plan['run_dir']}, "
        f"K = {k} samples per prompt, pairs by {plan['pair_method']}",
        f"oracle: {plan['judge_orders']}",
        "counts for a run from scratch; new tokens and judge calls are upper bounds (identical responses "
        "and cached answers cost no judge call)",
    ]
    for it in plan["iterations"]:
        t, sample, judge, summary = it["iteration"], it["sample"], it["judge"], it["summary"]
        comparisons = (f"{_n(judge['comparisons'])} comparisons" if judge["comparisons"] is not None
                       else f"≤ {_n(judge['comparisons_max'])} comparisons")
        models = ", ".join(f"{role} = {path}" for role, path in it["score"]["models"].items())
        length = f"{it['train']['max_steps']} steps" if it["train"]["max_steps"] else f"{it['train']['epochs']} epoch(s)"
        opponents = (f" (of which {_n(sample['opponents'])} opponents from the mixture π_{t}^(1−β)·π_ref^β, "
                     f"β = {sample['mixture_coef']})" if sample["opponents"] else "")
        lines += [
            "",
            f"iteration {t}: {it['prompts']:,} prompts from {it['prompts_file']}",
            f"  sample   π_{t} = {sample['policy']}: {_n(sample['samples'])} samples{opponents}, "
            f"≤ {_n(sample['new_tokens_max'])} new tokens",
            f"  judge    {judge['method']} ({judge['comparisons_per_prompt']} comparisons per prompt): {comparisons}, "
            f"≤ {_n(judge['judge_calls_max'])} judge calls → ≤ {_n(judge['pairs_max'])} pairs",
            f"  score    the pairs' log-probs under {models}",
            f"  train    loss {it['train']['loss']}, {length} → π_{t + 1} = {it['train']['final']}",
        ]
        if it["train_aux"] is not None:
            aux = it["train_aux"]
            lines.append(f"  train    loss {aux['loss']} from π̂_{t - 1} = {aux['policy']}, {length} → "
                         f"π̂_{t} = {aux['final']}")
        if not summary["win_rate"]:
            lines.append("  summary  win rate off (summary.win_rate: false): no extra samples or comparisons")
        else:
            samples = ("reuses iteration " f"{t + 1}'s samples" if summary["samples_reused"] else
                       f"π_{t + 1} samples {_n(summary['samples'])} more (≤ {_n(summary['new_tokens_max'])} new tokens)")
            lines.append(f"  summary  win rate of π_{t + 1} over π_{t}: {samples}, {_n(summary['comparisons'])} "
                         f"comparisons, ≤ {_n(summary['judge_calls_max'])} judge calls")
    total = plan["total"]
    lines += ["", f"total: {_n(total['samples'])} samples, ≤ {_n(total['new_tokens_max'])} new tokens, "
                  f"≤ {_n(total['comparisons_max'])} comparisons, ≤ {_n(total['judge_calls_max'])} judge calls"]
    return "\n".join(lines)
