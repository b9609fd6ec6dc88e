"""First-step DPO and IPO losses of nashalign's trainer equal those of TRL's DPOTrainer.

A reference nobody here wrote: the same string records, the same tiny policy and a different tiny
reference model (so the loss is not the trivial log 2), both saved to disk; TRL tokenizes the records
itself (prompt ids, then prompt + response + EOS text, split at the common prefix) and computes the
loss of its first batch with `compute_loss`; nashalign runs one optimizer step of `train_pairs` whose
global batch is the whole dataset and logs the loss of that step before the update. With one batch
holding every record, the batch order of either side does not matter.
"""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl (the dev extra) is not installed: no independent reference to compare")

from nashalign.config import TrainConfig, from_mapping  # noqa: E402
from nashalign.data.records import parse_record  # noqa: E402
from nashalign.data.tokenization import tokenize_records  # noqa: E402
from nashalign.train.loop import train_pairs  # noqa: E402

RECORDS = [
    {"prompt": "Count up from 3:", "chosen": " 3 4 5 6", "rejected": " 9 1"},
    {"prompt": "What is the capital of France?", "chosen": " Paris is the capital of France.", "rejected": " London"},
    {"prompt": "Say yes or no:", "chosen": " yes</s>", "rejected": " no no no maybe"},  # EOS already there
    {"prompt": "Explain gradient descent.", "chosen": " It moves against the gradient.", "rejected": " Rock beats paper."},
]
BETA = 0.5
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from nashalign.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("parity")
    return save_tiny(root / "policy", seed=0), save_tiny(root / "ref", seed=1)


def trl_first_batch(models, loss_type: str, tmp_path):
    """TRL's tokenized dataset and the loss of its first (only) batch, before any update."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir, ref_dir = models
    args = trl.DPOConfig(
        output_dir=str(tmp_path / f"trl-{loss_type}"),
        per_device_train_batch_size=len(RECORDS),
        max_length=MAX_LENGTH,
        beta=BETA,
        loss_type=[loss_type],
        disable_dropout=True,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=1,
        seed=0,
    )
    trainer = trl.DPOTrainer(
        model=str(policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return trainer.train_dataset, float(loss)


def nashalign_first_step(models, loss_name: str, tmp_path):
    from transformers import AutoTokenizer

    policy_dir, ref_dir = models
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    records = [parse_record(row, f"records[{i}]")[0] for i, row in enumerate(RECORDS)]
    pairs, _ = tokenize_records(records, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH - 1)
    run_dir = tmp_path / f"nashalign-{loss_name}"
    config = from_mapping(TrainConfig, {
        "model": {"name_or_path": str(policy_dir), "ref_name_or_path": str(ref_dir)},
        "data": {"max_length": MAX_LENGTH, "max_prompt_length": MAX_LENGTH - 1},
        "loss": {"name": loss_name, "beta": BETA, "average_log_probs": True},
        "optim": {"per_device_batch_size": len(RECORDS), "max_steps": 1},
        "output": {"dir": str(run_dir), "save_steps": 0, "report_to": "none"},
    })
    train_pairs(str(policy_dir), pairs, config, run_dir, tokenizer=tokenizer)
    (first,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return pairs, first["loss"]


@pytest.mark.parametrize(("trl_loss", "ours"), [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_first_step_loss_matches_trl(models, tmp_path, trl_loss, ours):
    """Same token ids as TRL for every record (one EOS per response, the prompt/response split at
    the common prefix), and the first-step loss equal to 1e-5: DPO −log σ(β·Δ) and IPO with
    per-token averaged log-ratios, (Δ_avg − 1/(2β))², β = 0.5."""
    trl_dataset, trl_loss_value = trl_first_batch(models, trl_loss, tmp_path)
    pairs, loss = nashalign_first_step(models, ours, tmp_path)
    for row, pair in zip(trl_dataset, pairs):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
        ), row["prompt"]
    assert abs(trl_loss_value - 0.693147) > 1e-3 or ours != "dpo", "the reference must differ from the policy"
    assert loss == pytest.approx(trl_loss_value, abs=1e-5, rel=1e-5)
