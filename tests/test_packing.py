"""nashalign.data.packing: prefix-shared, padding-free pair batches score exactly like the naive batches."""

from __future__ import annotations

import functools
import json
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from nashalign import NashalignError
from nashalign.data import packing
from nashalign.data.logprobs import pair_logps
from nashalign.data.packing import (
    CHOSEN,
    PAD,
    PROMPT,
    PROMPT_LAST,
    REJECTED,
    allowed_attention,
    assign_rows,
    pack_pairs,
    packed_attention,
    packed_attention_mask,
    packed_length,
    pair_spans,
    uses_attention_interface,
)
from nashalign.data.tokenization import TokenizedPair, collate_pairs

PATHS = ("spans", "dense")


def attention_path(path):
    """Force the dense-mask path (as for a model outside transformers' AttentionInterface), or not."""
    return mock.patch.object(packing, "uses_attention_interface", lambda model: False) if path == "dense" else nullcontext()


def random_pairs(seed, count, vocab=512):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedPair(ids(1, 12), ids(1, 9), ids(1, 9), f"pair[{i}]") for i in range(count)]


def test_layout_of_one_pair_by_hand():
    """prompt [5, 6, 7], chosen [8, 9], rejected [10]: tokens 5 6 7 8 9 7 10 (the last prompt token is
    copied to open the rejected segment), positions 0 1 2 3 4 2 3, response tokens 8 9 and 10 (not
    the copy). Attention (1 = q may see k), rows q, columns k:
        5: 1 . . . . . .    8: 1 1 1 1 . . .    7': 1 1 . . . 1 .
        6: 1 1 . . . . .    9: 1 1 1 1 1 . .    10: 1 1 . . . 1 1
        7: 1 1 1 . . . .
    so the rejected segment sees p_0, p_1 and itself: the same keys at the same positions as the
    unpacked row 5 6 7 10."""
    batch = pack_pairs([TokenizedPair([5, 6, 7], [8, 9], [10], "p")], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert batch["segment"].tolist() == [[PROMPT, PROMPT, PROMPT_LAST, CHOSEN, CHOSEN, REJECTED, REJECTED]]
    assert batch["response_mask"].tolist() == [[False, False, False, True, True, False, True]]
    assert batch["pair_index"].tolist() == [[0] * 7]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed_attention(batch["segment"], batch["pair_index"])[0], expected)
    assert (batch["prompt_lengths"].tolist(), batch["chosen_lengths"].tolist(), batch["rejected_lengths"].tolist()) == (
        [3], [2], [1]
    )


def test_two_pairs_share_a_row_and_padding_sees_only_itself():
    """Three pairs of packed length 5 (P + C + 1 + R) and row_tokens 10: the first two fill one row,
    the third opens a second row padded by 5 tokens. No token attends across pairs; padding attends
    to itself only; pair_index and the (B,) lengths keep the input order."""
    pairs = [TokenizedPair([1, 2], [3], [4], "a"), TokenizedPair([5], [6, 7], [8], "b"), TokenizedPair([9], [10], [11, 12], "c")]
    assert [packed_length(p) for p in pairs] == [5, 5, 5]
    batch = pack_pairs(pairs, pad_token_id=99, row_tokens=10)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 2, 4, 5, 6, 7, 5, 8], [9, 10, 9, 11, 12, 99, 99, 99, 99, 99]]
    assert batch["pair_index"].tolist() == [[0] * 5 + [1] * 5, [2] * 5 + [-1] * 5]
    assert batch["segment"][1, 5:].tolist() == [PAD] * 5
    allowed = allowed_attention(batch["segment"], batch["pair_index"])
    across = batch["pair_index"][:, :, None] != batch["pair_index"][:, None, :]
    assert not (allowed & across).any()
    assert torch.equal(allowed[1, 5:, :], torch.eye(10, dtype=torch.bool)[5:])
    assert batch["chosen_lengths"].tolist() == [1, 2, 1] and batch["rejected_lengths"].tolist() == [1, 1, 2]


def test_assign_rows_first_fit_decreasing_by_hand():
    """Lengths 5 4 3 3 2, capacity 8: 5 opens row A (room 3), 4 opens row B (room 4), 3 joins A
    (room 0), 3 joins B (room 1), 2 opens row C."""
    assert assign_rows([5, 4, 3, 3, 2], 8) == [[0, 2], [1, 3], [4]]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=25), capacity=st.integers(1, 60))
def test_assign_rows_places_every_item_once_within_capacity(lengths, capacity):
    rows = assign_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert len(row) == 1 or sum(lengths[i] for i in row) <= capacity
    # First fit decreasing: an item opens a new row only if it fits in no earlier row at that time,
    # so the free room of all earlier rows is then smaller than it; in particular every row but the
    # last opened has less room left than the last row's first item.
    first_of_last = rows[-1][0]
    for row in rows[:-1]:
        assert capacity - sum(lengths[i] for i in row) < lengths[first_of_last]


# The model fixture is only read, never changed, so sharing it across examples is safe.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), count=st.integers(1, 6), row_tokens=st.sampled_from([None, 1, 24, 40, 400]),
       pad_id=st.integers(0, 511), path=st.sampled_from(PATHS))
def test_packed_log_probs_equal_the_naive_batch(tiny_model, seed, count, row_tokens, pad_id, path):
    """Any pairs, any row capacity (one pair per row up to all pairs in one row), any pad token, per-pair
    attention spans or the dense mask: the summed log-probs and lengths equal the padded 2B-row
    batch's (1e-5), and every response token's log-prob equals its naive value (1e-5)."""
    pairs = random_pairs(seed, count)
    naive_batch, packed_batch = collate_pairs(pairs, 0), pack_pairs(pairs, pad_id, row_tokens=row_tokens)
    with torch.no_grad(), attention_path(path):
        naive, packed = pair_logps(tiny_model, naive_batch), pair_logps(tiny_model, packed_batch)
    for side in ("chosen", "rejected"):
        assert_close(packed[f"{side}_logps"], naive[f"{side}_logps"], atol=1e-5, rtol=0)
        assert torch.equal(packed[f"{side}_lengths"], naive[f"{side}_lengths"])
        code = CHOSEN if side == "chosen" else REJECTED
        tokens = packed_batch["response_mask"] & (packed_batch["segment"] == code)
        for i in range(count):
            ours = packed["token_logps"][tokens & (packed_batch["pair_index"] == i)]
            theirs = naive[f"{side}_token_logps"][i][naive_batch["response_mask"][i if side == "chosen" else count + i]]
            assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_gradients_equal_the_naive_batch(tiny_model, path):
    """d(Σ_pairs w_i·chosen_i + v_i·rejected_i)/dθ with random weights: the packed batch gives the
    naive batch's gradient for every parameter (1e-5), and it is not zero."""
    pairs = random_pairs(11, 5)
    g = torch.Generator().manual_seed(0)
    w, v = torch.randn(5, generator=g), torch.randn(5, generator=g)

    def gradients(batch):
        tiny_model.zero_grad()
        out = pair_logps(tiny_model, batch)
        (out["chosen_logps"] @ w + out["rejected_logps"] @ v).backward()
        return {name: p.grad.clone() for name, p in tiny_model.named_parameters()}

    naive = gradients(collate_pairs(pairs, 0))
    with attention_path(path):
        packed = gradients(pack_pairs(pairs, 0, row_tokens=30 if path == "dense" else None))
    for name, grad in naive.items():
        assert_close(packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert packed["lm_head.weight"].abs().sum() > 0 and packed["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_span_attention_never_builds_a_row_mask_and_restores_the_model(tiny_model):
    """A Llama model takes the span path: its attention runs once per pair and layer on that pair's
    tokens only (masks of l × l), the dense mask is never built, and the model's attention
    implementation is back to sdpa afterwards, also after an error."""
    pairs = random_pairs(12, 4)
    batch = pack_pairs(pairs, 0)
    assert uses_attention_interface(tiny_model) and batch["input_ids"].shape[0] == 1
    from transformers import AttentionInterface

    calls = []

    def recording(module, query, *args, nashalign_spans=None, **kwargs):
        calls.append([mask.shape for _, _, mask in nashalign_spans[0]])
        return packed_attention(module, query, *args, nashalign_spans=nashalign_spans, **kwargs)

    AttentionInterface.register(packing.PACKED_ATTENTION, recording)
    try:
        with mock.patch.object(packing, "packed_attention_mask", side_effect=AssertionError("dense mask built")):
            with torch.no_grad():
                pair_logps(tiny_model, batch)
    finally:
        AttentionInterface.register(packing.PACKED_ATTENTION, packed_attention)
    lengths = [packed_length(p) for p in sorted(pairs, key=packed_length, reverse=True)]
    assert calls == [[(1, 1, n, n) for n in lengths]] * tiny_model.config.num_hidden_layers
    assert packing.attention_implementation(tiny_model.config) == "sdpa"
    with pytest.raises(RuntimeError, match="without nashalign_spans"):
        with mock.patch.object(packing, "pair_spans", return_value=None):
            pair_logps(tiny_model, batch)
    assert packing.attention_implementation(tiny_model.config) == "sdpa"


def test_activation_checkpointing_takes_the_dense_path(tiny_model):
    """With activation checkpointing, layers are re-run in the backward pass, after the switch to
    per-pair attention is undone: the packed batch then takes the dense-mask path, and its gradients
    equal the naive batch's (1e-5). Forced onto the span path, the re-run layers take plain sdpa
    over the whole row, which torch's checkpointing notices (different saved tensors) and refuses."""
    pairs = random_pairs(14, 4)
    tiny_model.train()
    tiny_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert packing.recomputes_forward(tiny_model)

    def gradients(batch):
        tiny_model.zero_grad()
        out = pair_logps(tiny_model, batch)
        (out["chosen_logps"].sum() - out["rejected_logps"].sum()).backward()
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters()])

    naive, packed = gradients(collate_pairs(pairs, 0)), gradients(pack_pairs(pairs, 0))
    assert_close(packed, naive, atol=1e-5, rtol=1e-4)
    with mock.patch.object(packing, "recomputes_forward", lambda model: False):
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            gradients(pack_pairs(pairs, 0))
    with torch.no_grad():
        assert not packing.recomputes_forward(tiny_model)


def test_pair_spans_by_hand():
    """Row 0: pair 1 (3 tokens) then pair 0 (2 tokens) then 1 padding token -> spans (0, 3), (3, 5)."""
    segment = torch.tensor([[PROMPT_LAST, CHOSEN, REJECTED, PROMPT_LAST, CHOSEN, PAD]])
    pair_index = torch.tensor([[1, 1, 1, 0, 0, -1]])
    spans = pair_spans(segment, pair_index)
    assert [(start, end) for start, end, _ in spans[0]] == [(0, 3), (3, 5)]
    assert spans[0][0][2].shape == (1, 1, 3, 3)


def test_packed_attention_refuses_what_it_cannot_do():
    q = torch.zeros(1, 2, 4, 8)
    spans = [[(0, 4, torch.ones(1, 1, 4, 4, dtype=torch.bool))]]
    with pytest.raises(NashalignError, match="softcap"):
        packed_attention(None, q, q, q, None, nashalign_spans=spans, softcap=30.0)
    with pytest.raises(NashalignError, match="sliding window of 3 tokens"):
        packed_attention(None, q, q, q, None, nashalign_spans=spans, sliding_window=3)
    out, weights = packed_attention(None, q, q, q, None, nashalign_spans=spans, sliding_window=4)
    assert out.shape == (1, 4, 2, 8) and weights is None


def test_eager_attention_gets_an_additive_mask(tiny_tokenizer):
    """On the dense path an eager-attention model adds the mask to its scores: it gets 0 / finfo.min,
    and scores the packed batch like the naive one (1e-5)."""
    from nashalign.models.tiny import build_model

    model = build_model(tiny_tokenizer)
    model.config._attn_implementation = "eager"
    pairs = random_pairs(3, 3)
    batch = pack_pairs(pairs, 0, row_tokens=40)
    mask = packed_attention_mask(model, batch)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    with torch.no_grad(), attention_path("dense"):
        naive, packed = pair_logps(model, collate_pairs(pairs, 0)), pair_logps(model, batch)
    assert_close(packed["chosen_logps"], naive["chosen_logps"], atol=1e-5, rtol=0)
    assert_close(packed["rejected_logps"], naive["rejected_logps"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_learned_absolute_positions(path):
    """A tiny GPT-2 (learned position embeddings, so a wrong position id changes the result) scores a
    packed batch like the naive one (1e-5), on both attention paths."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    pairs = random_pairs(4, 3)
    with torch.no_grad(), attention_path(path):
        naive, packed = pair_logps(model, collate_pairs(pairs, 0)), pair_logps(model, pack_pairs(pairs, 0))
    assert_close(packed["chosen_logps"], naive["chosen_logps"], atol=1e-5, rtol=0)
    assert_close(packed["rejected_logps"], naive["rejected_logps"], atol=1e-5, rtol=0)


def test_peft_lora_model(tiny_model):
    """Through a peft LoRA wrapper (random, non-zero adapters): the packed batch scores like the
    naive one (1e-5), and the wrapped model's attention implementation is restored."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model,
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    pairs = random_pairs(13, 3)
    with torch.no_grad():
        naive, packed = pair_logps(model, collate_pairs(pairs, 0)), pair_logps(model, pack_pairs(pairs, 0))
    assert_close(packed["chosen_logps"], naive["chosen_logps"], atol=1e-5, rtol=0)
    assert_close(packed["rejected_logps"], naive["rejected_logps"], atol=1e-5, rtol=0)
    assert packing.attention_implementation(tiny_model.config) == "sdpa"


def test_unsupported_attention_and_sliding_windows_are_refused(tiny_model):
    batch = pack_pairs(random_pairs(5, 2), 0)
    tiny_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NashalignError, match="attention implementation"):
        packed_attention_mask(tiny_model, batch)
    tiny_model.config._attn_implementation = "sdpa"
    tiny_model.config.sliding_window = 2
    with pytest.raises(NashalignError, match="sliding window of 2 tokens"):
        packed_attention_mask(tiny_model, batch)


def test_bad_pairs_are_rejected():
    with pytest.raises(ValueError, match="at least one pair"):
        pack_pairs([], 0)
    with pytest.raises(ValueError, match="pair\\[x\\].*non-empty"):
        pack_pairs([TokenizedPair([1], [], [2], "pair[x]")], 0)


def test_extra_numbers_are_collated_like_collate_pairs():
    pairs = [TokenizedPair([1], [2], [3], "a", {"chosen_win_rate": 0.75, "note": "x"}),
             TokenizedPair([4], [5], [6], "b", {"chosen_win_rate": 1, "note": "y"})]
    packed, naive = pack_pairs(pairs, 0), collate_pairs(pairs, 0)
    assert torch.equal(packed["chosen_win_rate"], naive["chosen_win_rate"]) and "note" not in packed


def test_scoring_through_the_cache_with_packed_batches(tiny_model):
    """score_pairs with pack_pairs as its collate function returns the default collation's sums (1e-5)."""
    from nashalign.data.cache import score_pairs

    pairs = random_pairs(6, 7)
    default = score_pairs(tiny_model, pairs, batch_size=3, progress=False)
    packed = score_pairs(tiny_model, pairs, batch_size=3, progress=False,
                         collate_fn=functools.partial(pack_pairs, pad_token_id=0))
    assert_close(packed["chosen_logps"], default["chosen_logps"], atol=1e-5, rtol=0)
    assert_close(packed["rejected_logps"], default["rejected_logps"], atol=1e-5, rtol=0)


def test_trainer_with_packing_logs_the_same_steps(tiny_model_dir, tmp_path, monkeypatch):
    """Two INPO optimizer steps (4 pairs in 2 micro-batches, then 2 pairs) with data.packing on and off: the
    same per-step loss, log-probs and gradient norm (1e-5 relative), and the same token count
    (prompt + chosen + prompt + rejected, whatever the layout). The packed run did pack (3 calls)."""
    from nashalign.config import TrainConfig, from_mapping
    from nashalign.train import objectives
    from nashalign.train.loop import train_pairs

    packed_batches = []  # training micro-batches are laid out by the objective (nashalign.train.objectives)
    monkeypatch.setattr(objectives, "pack_pairs", lambda chunk, pad_id: packed_batches.append(chunk) or pack_pairs(chunk, pad_id))
    pairs = random_pairs(7, 6)
    runs = {}
    for packs in (False, True):
        config = from_mapping(TrainConfig, {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"packing": packs},
            "loss": {"name": "inpo", "eta": 0.5},
            "optim": {"per_device_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2, "lr": 1e-3},
            "output": {"dir": str(tmp_path / str(packs)), "save_steps": 0, "report_to": "none"},
        })
        result = train_pairs(str(tiny_model_dir), pairs, config, tmp_path / str(packs), resume="never")
        runs[packs] = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert len(runs[True]) == len(runs[False]) == 2 and len(packed_batches) == 3
    for naive, packed in zip(runs[False], runs[True]):
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            assert packed[key] == pytest.approx(naive[key], rel=1e-5, abs=1e-6), key
    # Two steps of 4 and 2 pairs are one epoch: every pair counted once, cumulatively.
    every_token = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert runs[True][-1]["tokens"] == runs[False][-1]["tokens"] == every_token


def test_transformers_private_attention_reader_exists(tiny_model):
    """transformers has no public reader of a model's resolved attention implementation; packing
    reads `PretrainedConfig._attn_implementation`. If a release drops it, this fails by name rather
    than packing silently falling back to "eager"."""
    from transformers import PretrainedConfig

    assert isinstance(getattr(PretrainedConfig, "_attn_implementation", None), property), (
        "transformers no longer has PretrainedConfig._attn_implementation, which "
        "nashalign.data.packing.attention_implementation reads"
    )
    assert packing.attention_implementation(tiny_model.config) == "sdpa"


def test_a_model_that_declines_the_switch_takes_the_dense_path(tiny_model):
    """transformers' public set_attn_implementation declines (with a warning) for classes it cannot
    switch; the packed batch then goes through the dense mask and still equals the naive batch."""
    pairs = random_pairs(15, 3)
    with torch.no_grad():
        naive = pair_logps(tiny_model, collate_pairs(pairs, 0))
        with mock.patch.object(type(tiny_model), "_can_set_attn_implementation", classmethod(lambda cls: False)), \
                mock.patch.object(packing, "packed_attention_mask", wraps=packing.packed_attention_mask) as dense:
            packed = pair_logps(tiny_model, pack_pairs(pairs, 0))
    assert dense.call_count == 1
    for side in ("chosen", "rejected"):
        assert_close(packed[f"{side}_logps"], naive[f"{side}_logps"], atol=1e-5, rtol=0)
