"""Wall time per stage of one online INPO iteration (sample, judge, score, train) on this machine.

    .venv/bin/python bench/online_stages.py --size tiny
    .venv/bin/python bench/online_stages.py --size 60m
    .venv-vllm/bin/python bench/online_stages.py --size 60m --backend vllm
    .venv/bin/python bench/online_stages.py --size 60m --batch-size 128 --sampling-dtype bfloat16 --mixed-precision bf16

Builds the model locally (nashalign.models.tiny; the 60m size has a 32k vocabulary: the tiny tokenizer padded
with extra tokens), writes chat prompts, and runs `run_online` for one iteration with K = 8 samples per
prompt and the paper's tournament pairs. The oracle is a cheap Python preference (shorter response
wins, ties broken by text), so judging time here is the loop's own overhead; a model judge adds its
forward passes (see the oracle measurements in the issue notes). Each stage function of
nashalign.online.loop is wrapped with a timer; the table goes to stdout. With `--backend vllm` the
sampling stage includes the engine's start (float32, eager mode; its worker bound to `--threads`
cores) and the in-place weight update to π_1. `--batch-size` is the transformers sampler's rows per
call (32 by default, as the first measurements used; a sample does not depend on it);
`--sampling-dtype` and `--mixed-precision` set `sampling.dtype` and `model.mixed_precision`
(bfloat16 sampling; bfloat16 autocast of the training phase's forward passes, the reference scoring stays
float32): the numerics change, the work does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {
    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "vocab_size": None},
    "60m": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "vocab_size": 32000},
}


def shorter_wins(prompts, first, second):
    return np.array([0.5 if len(a) == len(b) else float(len(a) < len(b)) * 0.8 + 0.1 for a, b in zip(first, second)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sampling-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    from nashalign.config import from_mapping
    from nashalign.data.artifacts import write_jsonl
    from nashalign.judges.oracles import PythonOracle
    from nashalign.models.tiny import build_model, build_tokenizer
    from nashalign.online import loop as online

    size = dict(SIZES[args.size])
    workdir = Path(tempfile.mkdtemp(prefix="nashalign-bench-"))
    tokenizer = build_tokenizer()
    if size["vocab_size"]:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(size["vocab_size"] - len(tokenizer))])
    size["vocab_size"] = len(tokenizer)
    model = build_model(tokenizer, **size)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    del model
    write_jsonl(workdir / "prompts.jsonl", (
        {"prompt": [{"role": "user", "content": f"Question {i}: explain preference number {i} in a few words."}]}
        for i in range(args.prompts)))
    config = from_mapping(online.OnlineConfig, {
        "model": {"name_or_path": str(workdir / "model"), "mixed_precision": args.mixed_precision},
        "run": {"name": "bench", "dir": str(workdir / "runs"), "iterations": 1},
        "prompts": {"file": str(workdir / "prompts.jsonl")},
        "sampling": {"backend": args.backend, "samples_per_prompt": args.samples, "dtype": args.sampling_dtype,
                     "max_new_tokens": args.max_new_tokens,
                     # the online config refuses the keys the chosen backend does not read
                     **({"engine_args": {"enforce_eager": True, "kv_cache_memory_bytes": 3 << 29}}
                        if args.backend == "vllm" else {"batch_size": args.batch_size})},
        "data": {"max_length": 256, "max_prompt_length": 128, "scoring_batch_size": 8},
        "loss": {"eta": 0.005},
        "optim": {"lr": 5e-7, "epochs": 2, "per_device_batch_size": 4, "warmup_ratio": 0.03},
        "output": {"save_steps": 0, "report_to": "none"},
    })
    times: dict[str, float] = {}
    stages = {"_generate": "sample (π_0, then π_1)", "_judge": "judge", "_score": "score (π_ref, π_t)", "_train": "train"}
    for attribute, label in stages.items():
        original = getattr(online, attribute)

        def timed(*a, _original=original, _label=label, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                times[_label] = times.get(_label, 0.0) + time.perf_counter() - start

        setattr(online, attribute, timed)
    start = time.perf_counter()
    result = online.run_online(config, oracle=PythonOracle(shorter_wins), progress=False)
    total = time.perf_counter() - start
    summary = result.summaries[0]
    report = {
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
        "load_average": os.getloadavg(), "model_parameters": params, "size": args.size, "backend": args.backend,
        "batch_size": args.batch_size, "sampling_dtype": args.sampling_dtype, "mixed_precision": args.mixed_precision,
        "prompts": args.prompts, "samples_per_prompt": args.samples, "pairs": summary["pairs_kept"],
        "mean_response_tokens": summary["mean_response_length"], "stage_seconds": times, "total_seconds": total,
    }
    print(json.dumps(report, indent=2))
    print(f"\n{'stage':<22}{'seconds':>10}{'share':>8}")
    for label, seconds in times.items():
        print(f"{label:<22}{seconds:>10.1f}{seconds / total:>8.0%}")
    print(f"{'total (with loading)':<22}{total:>10.1f}")


if __name__ == "__main__":
    main()
