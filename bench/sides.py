"""The measured runs of the harness; each runs alone in a fresh process (see bench/run.py).

Every function takes the model directory (policy/, ref/, prev/ from workloads.save_models) and the
workload, and returns a JSON-able dict. Timings are per optimizer step (forward + backward over the
step's pairs, clipping, AdamW, schedule); the caller drops the first (warm-up) step.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from bench.workloads import Workload, text_records, token_records, word_tokenizer


def matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    """Median float32 throughput of torch.matmul on two (size, size) matrices, GFLOP/s (2·size³ per product)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - began)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e9


def step_work(workload: Workload) -> list[dict[str, int]]:
    """Per optimizer step (pairs in record order, pairs_per_step at a time), what the step holds:

    user_tokens  prompt + chosen + prompt + rejected (what a user counts; no padding)
    packed       P + C + 1 + R per pair: the real tokens a packed batch runs through the model
    responses    C + R: the positions nashalign projects onto the vocabulary
    padded       2B × longest row: what a padded batch runs (collate_pairs, TRL)
    srpo_packed, srpo_responses   the same two for srpo's three pairs per record (the pair and both
                 responses as revisions of each: nashalign.train.srpo.revision_pairs, the default revision prompt)
    """
    from nashalign.data.packing import packed_length
    from nashalign.data.tokenization import TokenizedPair
    from nashalign.train.srpo import revision_format, revision_pairs

    records = token_records(workload)
    tokenizer = word_tokenizer(workload.vocab_size)
    revised = revision_pairs([TokenizedPair(p, c, r, str(i)) for i, (p, c, r) in enumerate(records)], tokenizer,
                             revision_format(tokenizer))
    steps = []
    for start in range(0, len(records), workload.pairs_per_step):
        chunk = records[start : start + workload.pairs_per_step]
        triples = [revised[block * len(records) + i] for block in range(3)
                   for i in range(start, start + len(chunk))]
        steps.append({
            "srpo_packed": sum(packed_length(pair) for pair in triples),
            "srpo_responses": 3 * sum(len(c) + len(r) for _, c, r in chunk),
            "user_tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in chunk),
            "packed": sum(len(p) + len(c) + 1 + len(r) for p, c, r in chunk),
            "responses": sum(len(c) + len(r) for _, c, r in chunk),
            "padded": 2 * len(chunk) * max(len(p) + max(len(c), len(r)) for p, c, r in chunk),
        })
    return steps


def _nashalign_pairs(directory: Path, workload: Workload):
    """The records tokenized by nashalign (as a user would), checked against the generated ids."""
    from transformers import AutoTokenizer

    from nashalign.data.records import parse_record
    from nashalign.data.tokenization import tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    records = [parse_record(row, f"records[{i}]")[0] for i, row in enumerate(text_records(workload))]
    pairs, report = tokenize_records(
        records, tokenizer, max_length=workload.max_length, max_prompt_length=workload.max_prompt_length
    )
    expected = token_records(workload)
    if [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] != expected:
        raise RuntimeError(f"nashalign's tokenization differs from the generated ids ({report.summary()})")
    return tokenizer, pairs


def nashalign_train(directory: Path, workload: Workload, *, loss: str, packing: bool, health: bool = False,
                    **loss_settings) -> dict:
    """train_pairs as a user runs it: ref (and prev for inpo) scored into the cache first, then only the
    policy trains. The pairs are handed over in the order that makes step k train records
    kB … (k+1)B-1, as TRL's sequential sampler does, so both sides see the same batches.
    health: the z-loss (weight 1e-4) and the largest attention logit probed at every step (the
    default probes every 10th step); without it, neither (log Z statistics are always logged)."""
    from nashalign.config import TrainConfig, from_mapping
    from nashalign.train import loop as train

    tokenizer, pairs = _nashalign_pairs(directory, workload)
    seed = 0
    # train.py draws a permutation per epoch from (optim.seed, epoch); placing record k at position
    # order[k] makes the k-th drawn index point at record k.
    order = train._epoch_order(len(pairs), seed, 0)
    arranged = [None] * len(pairs)
    for k, position in enumerate(order):
        arranged[position] = pairs[k]
    model = {"name_or_path": str(directory / "policy"), "ref_name_or_path": str(directory / "ref")}
    if loss == "inpo":
        model["prev_name_or_path"] = str(directory / "prev")
    config = from_mapping(TrainConfig, {
        "model": model,
        "data": {"max_length": workload.max_length, "max_prompt_length": workload.max_prompt_length,
                 "scoring_batch_size": workload.pairs_per_step, "packing": packing},
        "loss": {"name": loss, "beta": 0.1, "z_loss": 1e-4 if health else 0.0, **loss_settings},
        "optim": {"per_device_batch_size": workload.pairs_per_step, "max_steps": workload.steps, "lr": 1e-6,
                  "schedule": "linear", "warmup_steps": 0, "max_grad_norm": 1.0, "seed": seed},
        "output": {"dir": str(directory / f"run-{loss}-{packing}"), "save_steps": 0, "report_to": "none",
                   "attention_logit_steps": 1 if health else 0},
    })
    durations, losses, scoring = [], [], []
    step, score = train._optimizer_step, train.reference_logps

    def timed_step(*args, **kwargs):
        began = time.perf_counter()
        metrics = step(*args, **kwargs)
        durations.append(time.perf_counter() - began)
        losses.append(float(metrics["loss"]))
        return metrics

    def timed_scoring(*args, **kwargs):
        began = time.perf_counter()
        result = score(*args, **kwargs)
        scoring.append(time.perf_counter() - began)
        return result

    # Wrapped where train_pairs looks them up (module globals of nashalign.train.loop).
    train._optimizer_step, train.reference_logps = timed_step, timed_scoring
    began = time.perf_counter()
    train.train_pairs(str(directory / "policy"), arranged, config, directory / f"run-{loss}-{packing}",
                      tokenizer=tokenizer, resume="never")
    total = time.perf_counter() - began
    return {"step_seconds": durations, "losses": losses, "scoring_seconds": sum(scoring),
            "other_seconds": total - sum(durations) - sum(scoring)}


def trl_train(directory: Path, workload: Workload, *, precompute: bool = True) -> dict:
    """TRL's DPOTrainer, DPO (sigmoid) loss, on the same records, batches (sequential sampler) and
    model, float32, no gradient checkpointing (TRL's defaults are bf16 and checkpointing: both off
    here, as on the nashalign side).

    precompute=True: reference log-probs precomputed (`precompute_ref_log_probs`). Given a ref_model,
    TRL keeps it after precomputing; it is dropped here, so neither side holds a reference model
    while training. precompute=False is TRL's default: the reference model stays in memory and
    scores every batch (no_grad) next to the policy."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    durations, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            durations.append(time.perf_counter() - self.began)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = trl.DPOConfig(
        output_dir=str(directory / "run-trl"),
        per_device_train_batch_size=workload.pairs_per_step,
        gradient_accumulation_steps=1,
        max_length=workload.max_length,
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=workload.steps,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        seed=0,
    )
    began = time.perf_counter()
    trainer = trl.DPOTrainer(
        model=str(directory / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(directory / "ref"),
        args=args,
        train_dataset=Dataset.from_list(text_records(workload)),
        processing_class=AutoTokenizer.from_pretrained(directory / "policy"),
    )
    setup = time.perf_counter() - began
    if precompute:
        trainer.ref_model = None
        gc.collect()
    dataset = trainer.train_dataset
    tokenized = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in dataset]
    if tokenized != token_records(workload):
        raise RuntimeError("TRL's tokenization differs from the generated ids")
    trainer.add_callback(Timer())
    torch.manual_seed(0)
    trainer.train()
    total = time.perf_counter() - began
    return {"step_seconds": durations, "losses": losses, "setup_seconds": setup,
            "other_seconds": total - setup - sum(durations)}


def inpo_in_memory(directory: Path, workload: Workload, *, packing: bool) -> dict:
    """The straightforward INPO step: π, π_ref and π_t all in memory; each step scores the batch under
    π_ref and π_t (no_grad) next to the policy's forward/backward, then clips and steps AdamW (lr 1e-6,
    no schedule). Same batches and batch layout as the nashalign run it is compared with."""
    import torch
    from transformers import AutoModelForCausalLM

    from nashalign.core.losses import make_loss
    from nashalign.data.logprobs import pair_logps
    from nashalign.data.packing import pack_pairs
    from nashalign.data.tokenization import collate_pairs

    tokenizer, pairs = _nashalign_pairs(directory, workload)
    policy, ref, prev = (AutoModelForCausalLM.from_pretrained(directory / name) for name in ("policy", "ref", "prev"))
    for frozen in (ref, prev):
        frozen.eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    loss_fn = make_loss("inpo", eta=0.005, tau=0.005 / 3)
    collate = pack_pairs if packing else collate_pairs
    durations, losses = [], []
    for start in range(0, len(pairs), workload.pairs_per_step):
        began = time.perf_counter()
        batch = collate(pairs[start : start + workload.pairs_per_step], tokenizer.pad_token_id)
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
        durations.append(time.perf_counter() - began)
        losses.append(float(loss))
    return {"step_seconds": durations, "losses": losses}


def generation(directory: Path, workload: Workload, repeats: int = 2) -> dict:
    """Sampled tokens per second, nashalign.sampling.engines.TransformersSampler vs plain `model.generate`, on
    the first `generation_prompts` prompts, `new_tokens` new tokens each (temperature 1, one sample
    per prompt, one batch). Both run `repeats` times, alternating; tokens are counted up to EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nashalign.sampling.engines import TransformersSampler

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    model = AutoModelForCausalLM.from_pretrained(directory / "policy").eval()
    prompts = [row["prompt"] for row in text_records(workload)[: workload.generation_prompts]]
    sampler = TransformersSampler(model, tokenizer, max_new_tokens=workload.new_tokens, temperature=1.0,
                                  batch_size=len(prompts), seed=0)
    eos = tokenizer.eos_token_id

    def run_sampler() -> int:
        results = sampler.generate(prompts, 1, progress=False)
        return sum(len(g.token_ids) + (g.finish_reason == "stop") for samples in results for g in samples)

    def run_generate() -> int:
        tokenizer.padding_side = "left"
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        tokenizer.padding_side = "right"
        with torch.inference_mode():
            output = model.generate(**encoded, do_sample=True, max_new_tokens=workload.new_tokens,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        new = output[:, encoded["input_ids"].shape[1] :]
        # Up to and including the first EOS of each row.
        count = 0
        for row in new.tolist():
            count += row.index(eos) + 1 if eos in row else len(row)
        return count

    measured = {"sampler": [], "generate": []}
    run_generate()  # warm-up
    for _ in range(repeats):
        for name, run in (("generate", run_generate), ("sampler", run_sampler)):
            began = time.perf_counter()
            tokens = run()
            measured[name].append(tokens / (time.perf_counter() - began))
    return {f"{name}_tokens_per_second": values for name, values in measured.items()}
