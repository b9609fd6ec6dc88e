"""Peak memory of INPO training with the log-prob cache versus with the reference models in memory.

    python bench/memory_cache.py [--seq 512] [--pairs 4] [--steps 2] [--threads 2]

Builds three ~60M-parameter Llama models with a 32k vocabulary (nashalign.models.tiny.build_model with
hidden 512, 8 layers, 8 heads): the policy, a reference and a previous iterate, saved to a temporary
directory. Then runs each mode in its own fresh process and reports that process's peak resident set
size (VmHWM), so neither mode sees the other's allocations:

- cached:    nashalign.train.loop.train_pairs with loss inpo: π_ref and π_t are loaded one at a time,
             score the pairs into the log-prob cache in inference mode and are deleted; then the
             policy trains alone. Reported: the peak up to the last optimizer step (scoring and
             training) and the peak of the whole process (plus the end-of-run checkpoint and final/).
- in-memory: the policy, π_ref and π_t are all loaded; every step computes the reference and
             previous-iterate log-probs under no_grad next to the policy's forward/backward (what a
             trainer without a cache does). Same pairs, batch, optimizer and number of steps.

Each pair is a prompt of seq/2 random tokens and two responses of seq/2 tokens (rows of `seq` tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"vocab_size": 32000, "hidden_size": 512, "num_layers": 8, "num_heads": 8}


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    VmHWM from /proc (Linux): the high-water mark of this process's own memory map. ru_maxrss is the
    fallback, but on Linux it survives exec, so a child started by a big parent would report at least
    the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_pairs(seq: int, count: int):
    import torch

    from nashalign.data.tokenization import TokenizedPair

    generator = torch.Generator().manual_seed(0)
    half = seq // 2

    def ids(n: int) -> list[int]:
        return torch.randint(5, MODEL["vocab_size"], (n,), generator=generator).tolist()

    return [TokenizedPair(ids(half), ids(half - 1) + [2], ids(half - 1) + [2], f"pair[{i}]") for i in range(count)]


def build(directory: Path) -> None:
    from nashalign.models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    for seed, name in enumerate(("policy", "ref", "prev")):
        model = build_model(seed=seed, **MODEL)
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
        if name == "policy":
            print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M", flush=True)


def run_cached(directory: Path, args) -> dict:
    from transformers import AutoTokenizer

    from nashalign.config import TrainConfig, from_mapping
    from nashalign.train.loop import train_pairs

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    config = from_mapping(TrainConfig, {
        "model": {"name_or_path": str(directory / "policy"), "ref_name_or_path": str(directory / "ref"),
                  "prev_name_or_path": str(directory / "prev")},
        "data": {"max_length": args.seq + 1, "max_prompt_length": args.seq, "scoring_batch_size": 1},
        "loss": {"name": "inpo"},
        "optim": {"per_device_batch_size": args.pairs, "max_steps": args.steps, "lr": 1e-6},
        "output": {"dir": str(directory / "run"), "save_steps": 0, "report_to": "none"},
    })
    at_steps = []
    began = time.perf_counter()
    train_pairs(str(directory / "policy"), make_pairs(args.seq, args.pairs), config, directory / "run",
                tokenizer=tokenizer, resume="never", callback=lambda step, metrics: at_steps.append(peak_rss_mib()))
    return {"peak_rss_training_mib": at_steps[-1], "seconds": time.perf_counter() - began}


def run_in_memory(directory: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nashalign.core.losses import make_loss
    from nashalign.data.logprobs import pair_logps
    from nashalign.data.tokenization import collate_pairs

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    policy, ref, prev = (AutoModelForCausalLM.from_pretrained(directory / name) for name in ("policy", "ref", "prev"))
    ref.eval().requires_grad_(False)
    prev.eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    loss_fn = make_loss("inpo", eta=0.005, tau=0.005 / 3)
    batch = collate_pairs(make_pairs(args.seq, args.pairs), tokenizer.pad_token_id)
    began = time.perf_counter()
    for _ in range(args.steps):
        with torch.no_grad():
            ref_out, prev_out = pair_logps(ref, batch), pair_logps(prev, batch)
        out = pair_logps(policy, batch)
        loss = loss_fn(
            policy_chosen_logps=out["chosen_logps"], policy_rejected_logps=out["rejected_logps"],
            ref_chosen_logps=ref_out["chosen_logps"], ref_rejected_logps=ref_out["rejected_logps"],
            prev_chosen_logps=prev_out["chosen_logps"], prev_rejected_logps=prev_out["rejected_logps"],
        ).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_rss_training_mib": peak_rss_mib(), "seconds": time.perf_counter() - began}


def child(mode: str, directory: Path, args) -> None:
    import torch

    import nashalign.train.loop  # noqa: F401 -- the imports both modes pay, in the baseline

    torch.set_num_threads(args.threads)
    baseline = peak_rss_mib()
    result = (run_cached if mode == "cached" else run_in_memory)(directory, args)
    print(json.dumps({"mode": mode, "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": baseline, **result}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (prompt + response)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("cached", "in-memory"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args.child, Path(args.dir), args)
        return 0
    with tempfile.TemporaryDirectory(prefix="nashalign-bench-") as temporary:
        directory = Path(temporary)
        build(directory)
        results = []
        for mode in ("cached", "in-memory"):
            command = [sys.executable, __file__, "--child", mode, "--dir", str(directory), "--seq", str(args.seq),
                       "--pairs", str(args.pairs), "--steps", str(args.steps), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    cached, in_memory = results
    saved = in_memory["peak_rss_training_mib"] - cached["peak_rss_training_mib"]
    print(f"peak RSS through the last training step: cached {cached['peak_rss_training_mib']:.0f} MiB, "
          f"in-memory {in_memory['peak_rss_training_mib']:.0f} MiB ({saved:.0f} MiB saved); whole process: "
          f"cached {cached['peak_rss_mib']:.0f} MiB (incl. end-of-run checkpoint and final/ save), in-memory "
          f"{in_memory['peak_rss_mib']:.0f} MiB; seq {args.seq}, {args.pairs} pairs per step, {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
