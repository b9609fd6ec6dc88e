"""Training-health signals: the z-loss, log Z statistics and the largest attention logit (nashalign.train.health)."""

from __future__ import annotations

import math

import pytest
import torch

from nashalign.config import TrainConfig, from_mapping
from nashalign.core.losses import z_loss
from nashalign.data.logprobs import selective_log_softmax_and_logsumexp
from nashalign.data.records import parse_record
from nashalign.data.tokenization import collate_pairs, tokenize_records
from nashalign.train.health import AttentionLogitProbe
from nashalign.train.loop import batch_losses, build_loss, train_pairs


def test_logsumexp_and_z_loss_by_hand():
    """logits [0, 0] → log Z = log 2; [log 3, 0] → log Z = log 4. With chosen = the first row and
    rejected = the second (one token each): z-loss = ((log 2)² + (log 4)²) / 2 = 2.5 (log 2)²."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    logps, logz = selective_log_softmax_and_logsumexp(logits, torch.tensor([0, 0]))
    torch.testing.assert_close(logz, torch.tensor([math.log(2.0), math.log(4.0)], dtype=torch.float64))
    torch.testing.assert_close(logps, torch.tensor([math.log(0.5), math.log(0.75)], dtype=torch.float64))
    value = z_loss(chosen_logz_squared=logz[:1].square(), rejected_logz_squared=logz[1:].square(),
                   chosen_lengths=torch.tensor([1]), rejected_lengths=torch.tensor([1]))
    torch.testing.assert_close(value, torch.tensor([2.5 * math.log(2.0) ** 2], dtype=torch.float64))
    # two tokens on one side: the mean is over all of the pair's response tokens
    value = z_loss(chosen_logz_squared=torch.tensor([2.0]), rejected_logz_squared=torch.tensor([4.0]),
                   chosen_lengths=torch.tensor([1]), rejected_lengths=torch.tensor([2]))
    torch.testing.assert_close(value, torch.tensor([2.0]))


def test_logsumexp_gradient_matches_autograd_of_the_naive_form():
    """The chunked backward of (log-prob, log Z) against torch's own autograd of log_softmax and
    logsumexp, for a loss that uses both outputs, chunk size 3 over 7 rows (float64)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64, generator=generator, requires_grad=True)
    index = torch.randint(0, 11, (7,), generator=generator)
    weights = torch.randn(7, dtype=torch.float64, generator=generator)
    logps, logz = selective_log_softmax_and_logsumexp(logits, index, chunk_size=3)
    (grad,) = torch.autograd.grad((weights * logps).sum() + 0.3 * logz.square().sum(), logits)
    naive_logz = logits.logsumexp(-1)
    naive_logps = logits.log_softmax(-1).gather(-1, index[:, None])[:, 0]
    (expected,) = torch.autograd.grad((weights * naive_logps).sum() + 0.3 * naive_logz.square().sum(), logits)
    torch.testing.assert_close(grad, expected)


@pytest.fixture()
def pair_batch(tiny_tokenizer):
    records = [parse_record({"prompt": f"Question {i}:", "chosen": " yes" * (i + 1), "rejected": " no"}, f"r{i}")[0]
               for i in range(3)]
    pairs, _ = tokenize_records(records, tiny_tokenizer, max_length=32, max_prompt_length=16)
    return collate_pairs(pairs, tiny_tokenizer.pad_token_id)


def _config(**loss):
    return from_mapping(TrainConfig, {"model": {"name_or_path": "unused"}, "loss": {"name": "dpo", **loss}})


def test_z_loss_adds_weight_times_mean_squared_log_normalizer(tiny_model, pair_batch):
    """batch_losses with loss.z_loss = w equals the pairwise loss + w · mean over each pair's response
    tokens of (logsumexp of the full logits at the predicting position)², computed naively here;
    with w = 0 the loss is exactly the pairwise loss."""
    references = {"ref_chosen_logps": torch.zeros(3), "ref_rejected_logps": torch.zeros(3)}
    loss_fn = build_loss(_config().loss)
    with torch.no_grad():
        plain, _ = batch_losses(tiny_model, pair_batch, loss_fn, references)
        zero, _ = batch_losses(tiny_model, pair_batch, loss_fn, references, 0.0)
        weighted, _ = batch_losses(tiny_model, pair_batch, loss_fn, references, 0.25)
        logits = tiny_model(input_ids=pair_batch["input_ids"], attention_mask=pair_batch["attention_mask"]).logits
    assert torch.equal(zero, plain)
    logz = torch.zeros(pair_batch["input_ids"].shape)
    logz[:, 1:] = logits[:, :-1].logsumexp(-1)
    mask = pair_batch["response_mask"].bool()
    squares, counts = (logz.square() * mask).sum(-1), mask.sum(-1)
    expected = (squares[:3] + squares[3:]) / (counts[:3] + counts[3:])
    torch.testing.assert_close(weighted, plain + 0.25 * expected)


def test_attention_probe_equals_the_logits_the_attention_function_sees(tiny_model, pair_batch):
    """A reference attention function registered with transformers' AttentionInterface records
    max(q·k·scaling) over causal, unpadded query/key positions from the q and k the model itself
    computes; the probe, recomputing them from a forward hook, finds the same maximum."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []
    mask2d = pair_batch["attention_mask"].bool()

    def recording(module, query, key, value, attention_mask, **kwargs):
        groups = query.shape[1] // key.shape[1]
        logits = query @ key.repeat_interleave(groups, 1).transpose(-1, -2) * kwargs["scaling"]
        length = query.shape[2]
        allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask2d[:, None, :] & mask2d[:, :, None]
        seen.append(logits.masked_fill(~allowed[:, None], float("-inf")).max())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("nashalign_test_recording", recording)
    tiny_model.set_attn_implementation("nashalign_test_recording")
    probe = AttentionLogitProbe(tiny_model)
    assert len(probe.modules) == tiny_model.config.num_hidden_layers
    with torch.no_grad(), probe.active(pair_batch["attention_mask"]):
        tiny_model(input_ids=pair_batch["input_ids"], attention_mask=pair_batch["attention_mask"])
    assert len(seen) == tiny_model.config.num_hidden_layers
    assert probe.max_logit == pytest.approx(float(max(seen)), rel=1e-5, abs=1e-6)
    # outside `active` nothing is recorded
    before = probe.max_logit
    with torch.no_grad():
        tiny_model(input_ids=pair_batch["input_ids"] + 1, attention_mask=pair_batch["attention_mask"])
    assert probe.max_logit == before


def test_metrics_carry_the_health_signals(tmp_path, tiny_tokenizer):
    """metrics.jsonl has logz/mean and logz/max_abs on every step, attention/max_logit on the steps
    that are multiples of output.attention_logit_steps, z_loss when its weight is set; training with
    a z-loss weight lowers |log Z| compared with the same run without it."""
    import json

    from nashalign.models.tiny import save_tiny

    model_dir = save_tiny(tmp_path / "model")
    records = [parse_record({"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no no"}, f"r{i}")[0] for i in range(8)]
    pairs, _ = tokenize_records(records, tiny_tokenizer, max_length=32, max_prompt_length=16)
    runs = {}
    for name, weight in (("plain", 0.0), ("z", 1.0)):
        config = from_mapping(TrainConfig, {
            "model": {"name_or_path": str(model_dir)},
            "loss": {"name": "dpo", "z_loss": weight},
            "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant", "epochs": 3, "per_device_batch_size": 4},
            "output": {"dir": str(tmp_path / name), "save_steps": 0, "report_to": "none", "attention_logit_steps": 2},
        })
        train_pairs(str(model_dir), pairs, config, tokenizer=tiny_tokenizer)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for name, rows in runs.items():
        assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
        for row in rows:
            assert math.isfinite(row["logz/mean"]) and row["logz/max_abs"] >= abs(row["logz/mean"])
            assert ("attention/max_logit" in row) == (row["step"] % 2 == 0)
            assert ("z_loss" in row) == (name == "z")
    assert runs["z"][-1]["logz/max_abs"] < runs["plain"][-1]["logz/max_abs"]
