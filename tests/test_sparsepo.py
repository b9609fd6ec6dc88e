"""SparsePO's token terms and masks: the chunked d_t against the naive full-vocabulary computation,
its memory bound, the masks' properties, and the loss inputs of a real batch against scoring alone."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from nashalign.data.tokenization import collate_pairs
from nashalign.train.sparsepo import (
    ActivationRecorder,
    MaskNetwork,
    activation_masks,
    min_max_scaled,
    sparsepo_inputs,
    token_terms,
)
from test_logprobs import Float32Allocations
from test_train import model_dirs, tokenizer  # noqa: F401 (fixtures)


def naive_terms(logits, ref_logits, targets):
    """log π(target) and Σ_v q_v (log p_v − log q_v) from full float64 log-softmaxes."""
    policy = logits.double().log_softmax(-1)
    ref = ref_logits.double().log_softmax(-1)
    return policy.gather(-1, targets[:, None])[:, 0], (ref.exp() * (policy - ref)).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 128])
def test_token_terms_equal_the_naive_computation_with_gradients(chunk_size):
    """Values and gradients (for random upstream gradients on both outputs) equal autograd through the
    naive full log-softmax; d ≤ 0 (it is −KL(π_ref ‖ π)) and 0 where the two distributions agree."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 50, generator=g, dtype=torch.float64)).requires_grad_()
    ref_logits = 3 * torch.randn(7, 50, generator=g, dtype=torch.float64)
    ref_logits[2] = logits[2].detach() + 4.0  # same distribution at row 2
    targets = torch.randint(0, 50, (7,), generator=g)
    upstream = torch.randn(2, 7, generator=g, dtype=torch.float64)
    logps, terms = token_terms(logits, ref_logits, targets, chunk_size)
    (logps * upstream[0] + terms * upstream[1]).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    expected_logps, expected_terms = naive_terms(logits, ref_logits, targets)
    (expected_logps * upstream[0] + expected_terms * upstream[1]).sum().backward()
    assert_close(logps, expected_logps)
    assert_close(terms, expected_terms)
    assert_close(ours, logits.grad)
    assert (terms <= 1e-12).all() and abs(float(terms[2].detach())) < 1e-12


def test_token_terms_never_allocate_a_float32_rows_by_vocabulary_tensor():
    """bfloat16 logits (64, 1000), chunks of 8 rows: no op of the forward or backward pass returns a
    float32 tensor larger than one chunk, the naive computation does (so the check can fail), and
    the bfloat16 result equals the float32 computation on the same values."""
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(64, 1000, generator=g)).bfloat16().requires_grad_()
    ref_logits = (4 * torch.randn(64, 1000, generator=g)).bfloat16()
    targets = torch.randint(0, 1000, (64,), generator=g)
    with Float32Allocations() as ours:
        logps, terms = token_terms(logits, ref_logits, targets, 8)
        (logps + terms).sum().backward()
    assert 0 < ours.largest <= 8 * 1000
    assert logits.grad.dtype == torch.bfloat16
    expected = naive_terms(logits.detach().float(), ref_logits.float(), targets)
    assert_close(logps, expected[0].float(), atol=1e-4, rtol=1e-5)
    assert_close(terms, expected[1].float(), atol=1e-4, rtol=1e-5)
    with Float32Allocations() as naive:
        p, d = naive_terms(logits.float(), ref_logits.float(), targets)
    assert naive.largest >= 64 * 1000


def test_min_max_scaling_per_row_over_the_response():
    """Row 0: response values 2, 4, 6 → 0, ½, 1 (the prompt's 100 is ignored); row 1: all equal → 1;
    z-normalizing first gives the same mask (min–max is invariant under a positive affine map)."""
    values = torch.tensor([[100.0, 2.0, 4.0, 6.0], [0.0, 3.0, 3.0, -5.0]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    expected = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.0]])
    assert_close(min_max_scaled(values, mask), expected)
    assert_close(min_max_scaled(3.7 * values - 11.0, mask), expected)


def test_activation_masks_hook_every_layer_and_average_modules(tiny_model, tiny_tokenizer):
    """Three kinds × 2 layers = 6 recorded (N, T) means; the mask is the mean of their per-row
    min–max scalings at the kept positions, in [0, 1]; removing the hooks stops the recording."""
    recorder = ActivationRecorder(tiny_model, ["mlp", "attention", "residual"])
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    with torch.no_grad():
        tiny_model(input_ids=ids)
    means = recorder.take()
    assert len(means) == 6 and all(m.shape == (2, 5) for m in means)
    keep = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    mask = activation_masks(means, keep)
    expected = torch.stack([min_max_scaled(m, keep) for m in means]).mean(0)[keep]
    assert_close(mask, expected)
    assert mask.shape == (5,) and (mask >= 0).all() and (mask <= 1).all()
    recorder.remove()
    with torch.no_grad():
        tiny_model(input_ids=ids)
    assert recorder.take() == []


def test_mask_network_starts_near_one_and_is_nonnegative():
    """At initialization every per-layer output is relu(w·LN(h) + 1) and the mixer averages them, so
    masks are ≥ 0 and centred near 1; after pushing the mixer negative they are exactly 0 (ReLU)."""
    torch.manual_seed(0)
    network = MaskNetwork(hidden_size=16, num_layers=3, outputs=2)
    hidden = [torch.randn(40, 16) for _ in range(3)]
    masks = network(hidden)
    assert masks.shape == (40, 2) and (masks >= 0).all()
    assert 0.5 < float(masks.detach().mean()) < 1.5
    with torch.no_grad():
        network.mixer.fill_(-1.0)
    assert float(network(hidden).detach().abs().max()) == 0.0


def test_sparsepo_inputs_of_a_batch_equal_scoring_alone(tiny_tokenizer):
    """On a padded batch of two pairs of different lengths: u_t = log π(y_t) − log π_ref(y_t) and
    d_t = Σ_v π_ref(v)(log π(v) − log π_ref(v)) at every response token equal the values computed
    from each sequence's own full logits, alone; 0 outside the responses; the policy's summed
    log-probs are the sums of its token log-probs. The policy gets gradients, π_ref none."""
    from nashalign.data.tokenization import TokenizedPair
    from nashalign.models.tiny import build_model

    policy, ref = build_model(tiny_tokenizer, seed=0), build_model(tiny_tokenizer, seed=1)
    ref.requires_grad_(False)
    pairs = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], "a"), TokenizedPair([11, 12], [13, 14, 15, 16, 2], [17, 2], "b")]
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    recorder = ActivationRecorder(ref, ["mlp"])
    inputs = sparsepo_inputs(policy, ref, batch, recorder=recorder)
    for row, (pair, side) in enumerate([(p, "chosen") for p in pairs] + [(p, "rejected") for p in pairs]):
        index = row % 2
        response = getattr(pair, f"{side}_ids")
        ids = torch.tensor([pair.prompt_ids + response])
        with torch.no_grad():
            policy_logits = policy(input_ids=ids).logits[0, len(pair.prompt_ids) - 1 : -1]
            ref_logits = ref(input_ids=ids).logits[0, len(pair.prompt_ids) - 1 : -1]
        targets = torch.tensor(response)
        logps, terms = naive_terms(policy_logits, ref_logits, targets)
        ref_logps, _ = naive_terms(ref_logits, ref_logits, targets)
        start = len(pair.prompt_ids)
        positions = slice(start, start + len(response))
        u, d = inputs[f"{side}_token_log_ratios"][index], inputs[f"{side}_token_kl_terms"][index]
        assert_close(u[positions].double(), logps - ref_logps, atol=1e-5, rtol=1e-5)
        assert_close(d[positions].double(), terms, atol=1e-5, rtol=1e-5)
        outside = torch.ones_like(u, dtype=torch.bool)
        outside[positions] = False
        assert (u[outside] == 0).all() and (d[outside] == 0).all()
        assert (inputs[f"{side}_reward_weights"][index][outside] == 0).all()
        assert_close(inputs[f"policy_{side}_logps"][index].double(), logps.sum(), atol=1e-5, rtol=1e-5)
    (inputs["chosen_token_kl_terms"].sum() + inputs["chosen_token_log_ratios"].sum()).backward()
    assert all(p.grad is None for p in ref.parameters())
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------- in the trainer


def test_sparsepo_trains_against_a_frozen_copy_of_the_initial_policy(model_dirs, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """Reference unset: π_ref is a copy of the initial weights, kept frozen. At step 1 policy = π_ref,
    so u = d = 0 and with λ = 0 the loss is log 2 exactly; after 3 steps the copy still equals the
    initial weights while the policy moved."""
    import math

    from nashalign.train import objectives
    from nashalign.train.loop import train_pairs
    from test_train import final_state_of, make_config, make_pairs, read_metrics

    captured = {}
    real_attach = objectives.SparsePOObjective.attach

    def spy(self, *args):
        real_attach(self, *args)
        captured["ref"] = self.ref

    monkeypatch.setattr(objectives.SparsePOObjective, "attach", spy)
    config = make_config(model_dirs, tmp_path, loss={"name": "sparsepo", "lambda_u": 0.0, "lambda_d": 0.0},
                         optim={"per_device_batch_size": 4, "max_steps": 3})
    train_pairs(str(model_dirs["policy"]), make_pairs(tokenizer, 4, seed=2), config, tmp_path, tokenizer=tokenizer)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] != pytest.approx(math.log(2), abs=1e-4)
    initial = final_state_of(model_dirs["policy"])
    for key, value in captured["ref"].state_dict().items():
        assert torch.equal(value.cpu(), initial[key]), key
    trained = final_state_of(tmp_path / "final")
    assert any(not torch.equal(trained[key], initial[key]) for key in initial)


def test_learned_masks_train_with_their_own_weight_decay_and_are_saved(model_dirs, tokenizer, tmp_path):  # noqa: F811
    """loss.mask: learned — the mask network is an optimizer group with loss.mask_weight_decay, its
    weights move and final/sparsepo_masks.safetensors holds them; resuming such a run is refused
    with the reason; packing is refused for sparsepo."""
    from safetensors.torch import load_file

    from nashalign import NashalignError
    from nashalign.train.loop import train_pairs
    from nashalign.train.objectives import MASK_FILE
    from test_train import make_config, make_pairs

    pairs = make_pairs(tokenizer, 4, seed=3)
    config = make_config(model_dirs, tmp_path, loss={"name": "sparsepo", "mask": "learned", "mask_weight_decay": 0.5},
                         optim={"per_device_batch_size": 4, "max_steps": 2, "weight_decay": 0.0})
    train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer)
    saved = load_file(str(tmp_path / "final" / MASK_FILE))
    fresh = MaskNetwork(hidden_size=32, num_layers=2, outputs=2).state_dict()
    assert set(saved) == set(fresh)
    assert not torch.equal(saved["mixer"], fresh["mixer"])
    with pytest.raises(NashalignError, match="learned sparsepo masks .* cannot resume"):
        train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer)
    packed = make_config(model_dirs, tmp_path / "packed", loss={"name": "sparsepo"}, data={"packing": True})
    with pytest.raises(NashalignError, match="data.packing: loss 'sparsepo' needs padded batches"):
        train_pairs(str(model_dirs["policy"]), pairs, packed, tmp_path / "packed", tokenizer=tokenizer)


def test_mask_weight_decay_reaches_the_optimizer(model_dirs, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    from nashalign.train.loop import train_pairs
    from test_train import make_config, make_pairs

    groups = []
    real_adamw = torch.optim.AdamW

    def spy(params, **kwargs):
        optimizer = real_adamw(params, **kwargs)
        groups.extend((len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups)
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    config = make_config(model_dirs, tmp_path, loss={"name": "sparsepo", "mask": "learned", "shared_mask": True,
                                                     "mask_weight_decay": 0.25},
                         optim={"per_device_batch_size": 4, "max_steps": 1, "weight_decay": 0.01})
    train_pairs(str(model_dirs["policy"]), make_pairs(tokenizer, 4, seed=3), config, tmp_path, tokenizer=tokenizer)
    network_parameters = len(list(MaskNetwork(32, 2, outputs=1).parameters()))
    assert groups[0][1] == 0.01 and groups[1] == (network_parameters, 0.25)
