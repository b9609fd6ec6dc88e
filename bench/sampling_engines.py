"""Sampling speed of the generation engines on one model, and the cost of a weight update.

    .venv/bin/python bench/sampling_engines.py --sides generate sampler            # main environment
    .venv-vllm/bin/python bench/sampling_engines.py --sides generate sampler sampler-bf16 vllm vllm-bf16
    .venv-vllm/bin/python bench/sampling_engines.py                                # generate, sampler, vllm

Workload (the chat60m model of bench/workloads.py: Llama-style, hidden 512, 8 layers, 32k
vocabulary, ~66M parameters, random weights, float32): 16 prompts × K = 8 samples × 64 new tokens
at temperature 1, seeded, once with short prompts (8–24 words) and once with long ones (60–160
words) of the word-level tokenizer (one token per word). Sides, each in a fresh process:

- generate: plain `model.generate(do_sample=True)` over the 128 rows (each prompt repeated K times).
- sampler: nashalign's `TransformersSampler` (each prompt computed once for its K samples, static KV
  cache, eager attention on a CPU), one batch of 128 rows, float32.
- sampler-bf16 (not run by default): the same with its copy of the model in bfloat16
  (`sampling.dtype: bfloat16`).
- vllm: nashalign's `VLLMSampler` (float32, eager mode); its engine start is timed apart, then the
  weight update to another checkpoint, in place (`update_weights`) and by a rebuilt engine
  (`rebuild`).
- vllm-bf16 (not run by default): the same engine in bfloat16.

Tokens/s count the sampled tokens (EOS excluded) over the generation call's wall time. Each side
gets `--threads` cores (vLLM: its worker is bound to cores 0..threads-1 with no core reserved).
Ratios between sides are only meaningful within one run (the machine is shared). Prints each side's
row as JSON as it finishes, then all of them and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import FIRST_WORD_ID, WORKLOADS, word_tokenizer  # noqa: E402

PROMPTS, K, NEW_TOKENS = 16, 8, 64
LENGTHS = {"long": (60, 160), "short": (8, 24)}


def prompts(length: str, vocab_size: int) -> list[str]:
    rng = random.Random(0)
    low, high = LENGTHS[length]
    return [" ".join(f"w{rng.randrange(FIRST_WORD_ID, vocab_size)}" for _ in range(rng.randint(low, high)))
            for _ in range(PROMPTS)]


def save_models(directory: Path) -> None:
    from nashalign.models.tiny import build_model

    workload = WORKLOADS["chat60m"]
    tokenizer = word_tokenizer(workload.vocab_size)
    for seed, name in enumerate(("a", "b")):
        model = build_model(tokenizer, seed=seed, max_position_embeddings=2048, **workload.model_kwargs)
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)


def side_generate(directory: Path, texts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory / "a")
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory / "a", dtype=torch.float32).eval()
    rows = [text for text in texts for _ in range(K)]
    encoded = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**encoded, do_sample=True, max_new_tokens=NEW_TOKENS, top_k=0,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = output[:, encoded["input_ids"].shape[1]:]
    tokens = 0
    for row in new.tolist():
        tokens += row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
    return {"seconds": seconds, "tokens": tokens}


def side_sampler(directory: Path, texts: list[str], dtype: str = "float32") -> dict:
    from nashalign.models.loader import ModelSpec
    from nashalign.sampling.engines import make_sampler

    sampler = make_sampler("transformers", ModelSpec(str(directory / "a"), dtype=dtype), max_new_tokens=NEW_TOKENS,
                           batch_size=PROMPTS * K, seed=0)
    start = time.perf_counter()
    groups = sampler.generate(texts, K, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(g.token_ids) for group in groups for g in group)}


def side_vllm(directory: Path, texts: list[str], threads: int, dtype: str = "float32") -> dict:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from nashalign.sampling.engines import make_sampler

    start = time.perf_counter()
    sampler = make_sampler("vllm", str(directory / "a"), max_new_tokens=NEW_TOKENS, seed=0,
                           llm_kwargs={"dtype": dtype, "enforce_eager": True, "kv_cache_memory_bytes": 3 << 29})
    engine_start = time.perf_counter() - start
    sampler.generate(texts[:2], 1, progress=False)  # the first call pays one-time costs
    start = time.perf_counter()
    groups = sampler.generate(texts, K, progress=False)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "tokens": sum(len(g.token_ids) for group in groups for g in group),
              "engine_start_seconds": engine_start}
    start = time.perf_counter()
    sampler.update_weights(str(directory / "b"))
    result["update_in_place_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    sampler.rebuild(str(directory / "a"))
    result["update_by_rebuild_seconds"] = time.perf_counter() - start
    sampler.close()
    return result


def child(side: str, directory: Path, length: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    texts = prompts(length, WORKLOADS["chat60m"].vocab_size)
    if side == "generate":
        return side_generate(directory, texts)
    if side in ("sampler", "sampler-bf16"):
        return side_sampler(directory, texts, "bfloat16" if side == "sampler-bf16" else "float32")
    return side_vllm(directory, texts, threads, "bfloat16" if side == "vllm-bf16" else "float32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", default=["generate", "sampler", "vllm"],
                        choices=["generate", "sampler", "sampler-bf16", "vllm", "vllm-bf16"])
    parser.add_argument("--lengths", nargs="+", default=list(LENGTHS), choices=list(LENGTHS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "DIR", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, directory, length = args.child
        print(json.dumps(child(side, Path(directory), length, args.threads)))
        return 0

    directory = Path(tempfile.mkdtemp(prefix="nashalign-engines-"))
    save_models(directory)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                                os.environ.get("PYTHONPATH", "")])}
    results: dict[str, dict[str, dict]] = {}
    for length in args.lengths:
        for side in args.sides:
            done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", side,
                                   str(directory), length], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-3000:])
                return done.returncode
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["tokens_per_second"] = row["tokens"] / row["seconds"]
            row["load_average"] = os.getloadavg()[0]
            results.setdefault(length, {})[side] = row
            print(json.dumps({"length": length, "side": side, **row}), flush=True)
    print(json.dumps(results, indent=2))
    for length, sides in results.items():
        base = sides.get("generate", {}).get("tokens_per_second")
        for side, row in sides.items():
            ratio = f" ({row['tokens_per_second'] / base:.2f}× generate)" if base else ""
            print(f"{length:<6} {side:<12} {row['tokens_per_second']:8.0f} tokens/s{ratio}")
        for name in ("vllm", "vllm-bf16"):
            if name not in sides:
                continue
            v = sides[name]
            print(f"{length:<6} {name} engine start {v['engine_start_seconds']:.1f} s, weight update in place "
                  f"{v['update_in_place_seconds']:.2f} s, by rebuild {v['update_by_rebuild_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
