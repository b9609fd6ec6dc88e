"""nashalign vs TRL (and vs the straightforward INPO step, and plain generate) on one workload, one run.

    .venv/bin/python -m bench.run --workload chat60m [--json results.json]

Builds the workload's models (policy, ref, prev) and records once, then runs every side in its own
fresh process, one after the other, with the same torch thread count, and prints a Markdown table:

- DPO training: TRL's DPOTrainer (reference log-probs precomputed), nashalign packed (data.packing)
  and nashalign with padded batches; median seconds per optimizer step after the warm-up step, real
  tokens per second (prompt + chosen + prompt + rejected, no padding), the process's peak resident
  memory (VmHWM), the first step's loss, model FLOPs and utilization of the measured matmul peak.
- INPO: nashalign's step (π_ref and π_t log-probs from the cache) vs the same step with both models
  in memory scored every step; the ratio of the INPO step to the DPO step.
- Generation: TransformersSampler vs plain `model.generate`, sampled tokens per second.
- The limit: float32 torch.matmul throughput of (4096, 4096) products, measured before, between and
  after the training runs; utilization is against the highest of these.

Model FLOPs of a step = 6 × body parameters × real tokens run through the model + 6 × lm_head
parameters × positions projected onto the vocabulary. Body = all parameters but the input embedding
(a lookup, no matmul) and the lm_head. Padding is never counted; attention's own score/value products
(∝ sequence length²) are not counted either (the usual 6N convention), so utilization is a lower bound.

Not a test: nothing is asserted on time. The machine may be shared: the load average is recorded
next to every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.workloads import WORKLOADS, Workload

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("peak", "trl-dpo", "nashalign-dpo", "nashalign-dpo-padded", "nashalign-inpo", "inpo-in-memory",
         "generation", "trl-dpo-ref-in-memory", "nashalign-srpo", "nashalign-sparsepo", "nashalign-sparsepo-learned",
         "nashalign-dpo-health", "nashalign-dpo-padded-health")
DEFAULT_SIDES = SIDES[1:7]
NAMES = {
    "trl-dpo": "TRL DPOTrainer, DPO, ref log-probs precomputed",
    "trl-dpo-ref-in-memory": "TRL DPOTrainer, DPO, ref model in memory (TRL's default)",
    "nashalign-dpo": "nashalign, DPO, packed",
    "nashalign-dpo-padded": "nashalign, DPO, padded batches",
    "nashalign-inpo": "nashalign, INPO, packed",
    "inpo-in-memory": "INPO with π_ref, π_t in memory (packed)",
    "nashalign-srpo": "nashalign, SRPO, packed (six sequences per pair)",
    "nashalign-sparsepo": "nashalign, SparsePO, activation masks, padded",
    "nashalign-sparsepo-learned": "nashalign, SparsePO, learned masks, padded",
    "nashalign-dpo-health": "nashalign, DPO, packed, z-loss + attention-logit probe every step",
    "nashalign-dpo-padded-health": "nashalign, DPO, padded, z-loss + attention-logit probe every step",
}
# Per side: (FLOPs per parameter and token, tokens through the body, positions through the lm_head).
# Forward + backward is 6 per parameter and token; a no_grad forward of another model adds 2.
# TRL (on a CPU) projects every real position onto the vocabulary; nashalign only response positions.
WORK = {
    "trl-dpo": (6, "user_tokens", "user_tokens"),
    "trl-dpo-ref-in-memory": (8, "user_tokens", "user_tokens"),
    "nashalign-dpo": (6, "packed", "responses"),
    "nashalign-dpo-padded": (6, "user_tokens", "responses"),
    "nashalign-inpo": (6, "packed", "responses"),
    "inpo-in-memory": (10, "packed", "responses"),
    "nashalign-srpo": (6, "srpo_packed", "srpo_responses"),
    # the policy's forward + backward and π_ref's forward (kept in memory) on the same padded batch
    "nashalign-sparsepo": (8, "user_tokens", "responses"),
    "nashalign-sparsepo-learned": (8, "user_tokens", "responses"),
    "nashalign-dpo-health": (6, "packed", "responses"),
    "nashalign-dpo-padded-health": (6, "user_tokens", "responses"),
}


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB: its own high-water mark, not its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def child(side: str, directory: Path, workload: Workload, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from bench import sides

    if side != "peak":
        import nashalign.train.loop  # noqa: F401 -- imports every side pays, inside the baseline
    baseline = peak_rss_mib()
    load_before = load_average()
    if side == "peak":
        result = {"gflops": sides.matmul_gflops()}
    elif side == "trl-dpo":
        result = sides.trl_train(directory, workload)
    elif side == "trl-dpo-ref-in-memory":
        result = sides.trl_train(directory, workload, precompute=False)
    elif side == "nashalign-dpo":
        result = sides.nashalign_train(directory, workload, loss="dpo", packing=True)
    elif side == "nashalign-dpo-padded":
        result = sides.nashalign_train(directory, workload, loss="dpo", packing=False)
    elif side in ("nashalign-dpo-health", "nashalign-dpo-padded-health"):
        result = sides.nashalign_train(directory, workload, loss="dpo", packing="padded" not in side, health=True)
    elif side == "nashalign-inpo":
        result = sides.nashalign_train(directory, workload, loss="inpo", packing=True)
    elif side == "nashalign-srpo":
        result = sides.nashalign_train(directory, workload, loss="srpo", packing=True)
    elif side == "nashalign-sparsepo":
        result = sides.nashalign_train(directory, workload, loss="sparsepo", packing=False)
    elif side == "nashalign-sparsepo-learned":
        result = sides.nashalign_train(directory, workload, loss="sparsepo", packing=False, mask="learned")
    elif side == "inpo-in-memory":
        result = sides.inpo_in_memory(directory, workload, packing=True)
    elif side == "generation":
        result = sides.generation(directory, workload)
    else:
        raise ValueError(side)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"side": side, "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": baseline,
            "load_before": load_before, "load_after": load_average(), "user_seconds": usage.ru_utime,
            "system_seconds": usage.ru_stime, "minor_page_faults": usage.ru_minflt, **result}


def run_child(side: str, directory: Path, args) -> dict:
    command = [sys.executable, "-m", "bench.run", "--child", side, "--dir", str(directory),
               "--workload", args.workload, "--threads", str(args.threads), "--steps", str(args.steps)]
    # The checkout's own code is measured, also where another copy of nashalign is installed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{side} failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - began
    print(f"  {side}: done in {result['wall_seconds']:.0f} s (load {result['load_before']:.1f} → "
          f"{result['load_after']:.1f})", flush=True)
    return result


def machine() -> dict:
    import torch
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version, "commit": commit.stdout.strip()}


def combine(runs: list[dict]) -> dict:
    """One result from repeated runs of a side: per step the fastest of the repeats (load on a shared
    machine only ever slows a step down), generation rates the fastest, memory the highest peak;
    every run is kept under "repeats"."""
    if len(runs) == 1:
        return runs[0]
    combined = {**runs[0], "repeats": runs}
    if "step_seconds" in runs[0]:
        combined["step_seconds"] = [min(steps) for steps in zip(*(r["step_seconds"] for r in runs))]
    for key in ("sampler_tokens_per_second", "generate_tokens_per_second"):
        if key in runs[0]:
            combined[key] = [max(rates) for rates in zip(*(r[key] for r in runs))]
    combined["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    combined["load_before"] = min(r["load_before"] for r in runs)
    combined["load_after"] = max(r["load_after"] for r in runs)
    return combined


def summarize(workload: Workload, params: dict, results: dict[str, dict], info: dict) -> dict:
    """Medians over the timed steps (all but the first): seconds, tokens per second, FLOPs; ratios are
    medians of per-step ratios (both sides ran the same records in the same step)."""
    from bench.sides import step_work

    work = step_work(workload)
    peak = max(r["gflops"] for r in results["peak"])
    rows, steps = {}, {}
    for side, (per_token, computed, projected) in WORK.items():
        if side not in results:
            continue
        result = results[side]
        timed = list(zip(result["step_seconds"], work))[1:]
        steps[side] = [t for t, _ in timed]
        flops = [per_token * (params["body"] * w[computed] + params["head"] * w[projected]) for _, w in timed]
        rows[side] = {
            "step_seconds": statistics.median(steps[side]),
            "tokens_per_second": statistics.median(w["user_tokens"] / t for t, w in timed),
            "tflop_per_step": statistics.median(flops) / 1e12,
            "achieved_gflops": statistics.median(f / t / 1e9 for f, (t, _) in zip(flops, timed)),
            "peak_rss_mib": result["peak_rss_mib"],
            "first_loss": result["losses"][0] if result["losses"] else None,
            "load": (result["load_before"], result["load_after"]),
        }
        rows[side]["utilization"] = rows[side]["achieved_gflops"] / peak

    def step_ratio(numerator: str, denominator: str) -> float:
        return statistics.median(a / b for a, b in zip(steps[numerator], steps[denominator]))

    summary = {"workload": workload.__dict__, "params": params, "machine": info, "peak_gflops": peak,
               "peak_samples": [r["gflops"] for r in results["peak"]], "rows": rows, "raw": results}
    if "trl-dpo" in rows and "nashalign-dpo" in rows:
        ours, theirs = rows["nashalign-dpo"], rows["trl-dpo"]
        summary["vs_trl"] = {
            "speed": step_ratio("trl-dpo", "nashalign-dpo"),
            "memory": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
            "first_loss_difference": abs(ours["first_loss"] - theirs["first_loss"]),
        }
    if "nashalign-inpo" in rows and "nashalign-dpo" in rows:
        summary["inpo_over_dpo"] = step_ratio("nashalign-inpo", "nashalign-dpo")
        pairs = workload.num_records
        summary["scoring_seconds_per_pair"] = {
            "dpo (ref)": results["nashalign-dpo"]["scoring_seconds"] / pairs,
            "inpo (ref, prev)": results["nashalign-inpo"]["scoring_seconds"] / pairs,
        }
    if "nashalign-srpo" in rows and "nashalign-dpo" in rows:
        summary["srpo_over_dpo"] = step_ratio("nashalign-srpo", "nashalign-dpo")
    for side in ("nashalign-sparsepo", "nashalign-sparsepo-learned"):
        if side in rows and "nashalign-dpo-padded" in rows:
            summary.setdefault("sparsepo_over_dpo_padded", {})[side] = step_ratio(side, "nashalign-dpo-padded")
    if "inpo-in-memory" in rows and "nashalign-inpo" in rows:
        summary["in_memory_over_cached"] = step_ratio("inpo-in-memory", "nashalign-inpo")
    if "generation" in results:
        g = results["generation"]
        summary["generation"] = {key: statistics.median(g[f"{key}_tokens_per_second"]) for key in ("sampler", "generate")}
    return summary


def table(summary: dict) -> str:
    lines = ["| run | s / step | tokens / s | peak RSS MiB | first-step loss | TFLOP / step | GFLOP/s | utilization | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side, row in summary["rows"].items():
        loss = "" if row["first_loss"] is None else f"{row['first_loss']:.6f}"
        lines.append(f"| {NAMES[side]} | {row['step_seconds']:.1f} | {row['tokens_per_second']:.0f} | "
                     f"{row['peak_rss_mib']:.0f} | {loss} | {row['tflop_per_step']:.2f} | "
                     f"{row['achieved_gflops']:.1f} | {100 * row['utilization']:.0f}% | "
                     f"{row['load'][0]:.1f}–{row['load'][1]:.1f} |")
    out = ["\n".join(lines), ""]
    out.append(f"matmul peak (float32, 4096², {summary['machine']['threads']} threads): "
               + ", ".join(f"{g:.0f}" for g in summary["peak_samples"]) + " GFLOP/s; utilization uses the highest")
    if "vs_trl" in summary:
        v = summary["vs_trl"]
        out.append(f"nashalign packed vs TRL (precomputed ref): {v['speed']:.2f}× tokens/s, {v['memory']:.2f}× peak "
                   f"memory, first-step loss difference {v['first_loss_difference']:.2e}")
    if "inpo_over_dpo" in summary:
        out.append(f"INPO step / DPO step (both from the cache): {summary['inpo_over_dpo']:.2f}; scoring before "
                   "training, seconds per pair: " + ", ".join(
                       f"{k} {v:.2f}" for k, v in summary["scoring_seconds_per_pair"].items()))
    if "srpo_over_dpo" in summary:
        out.append(f"SRPO step / DPO step (both packed, ref from the cache): {summary['srpo_over_dpo']:.2f}")
    for side, ratio in summary.get("sparsepo_over_dpo_padded", {}).items():
        out.append(f"{NAMES[side]} step / padded DPO step: {ratio:.2f}")
    if "in_memory_over_cached" in summary:
        out.append(f"INPO step with models in memory / from the cache: {summary['in_memory_over_cached']:.2f}")
    if "generation" in summary:
        g = summary["generation"]
        out.append(f"generation: TransformersSampler {g['sampler']:.0f} tokens/s, plain generate {g['generate']:.0f} "
                   f"tokens/s ({g['sampler'] / g['generate']:.2f}×)")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="chat60m")
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                        help="comma-separated, in this order by default: " + ", ".join(DEFAULT_SIDES)
                        + "; also available: " + ", ".join(SIDES[7:]))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (first is warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every side this many times, round robin; per step the fastest counts")
    parser.add_argument("--json", help="also write the full results here")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    if args.steps is not None:
        from dataclasses import replace

        workload = replace(workload, steps=args.steps)
    args.steps = workload.steps
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), workload, args.threads)))
        return 0
    chosen = [side for side in args.sides.split(",") if side]
    unknown = set(chosen) - set(SIDES[1:])
    if unknown:
        parser.error(f"unknown sides {sorted(unknown)}; choose from {', '.join(SIDES[1:])}")
    info = {**machine(), "threads": args.threads, "load_at_start": load_average()}
    print(f"{workload.name}: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers "
          f"{info['transformers']}, trl {info['trl']}, load {info['load_at_start']:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nashalign-bench-") as temporary:
        directory = Path(temporary)
        from transformers.utils import logging as transformers_logging

        from bench.workloads import save_models

        transformers_logging.disable_progress_bar()
        params = save_models(workload, directory)
        print(f"  model: {params['total'] / 1e6:.1f}M parameters ({params['body'] / 1e6:.1f}M body, "
              f"{params['head'] / 1e6:.1f}M lm_head, {params['embedding'] / 1e6:.1f}M embedding)", flush=True)
        results: dict = {"peak": [run_child("peak", directory, args)]}
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for number, side in enumerate(chosen):
                runs.setdefault(side, []).append(run_child(side, directory, args))
                if number == len(chosen) // 2:
                    results["peak"].append(run_child("peak", directory, args))
            results["peak"].append(run_child("peak", directory, args))
        results.update({side: combine(side_runs) for side, side_runs in runs.items()})
    if args.json:  # the raw measurements first: they cost minutes, the summary is recomputed from them
        Path(args.json).write_text(json.dumps({"raw": results, "params": params, "machine": info}, indent=2) + "\n")
    summary = summarize(workload, params, results, info)
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
