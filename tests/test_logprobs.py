"""nashalign.data.logprobs: the chunked log-softmax and the response log-probs against naive paths."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from nashalign import NashalignError
from nashalign.data.logprobs import (
    pair_logps,
    position_ids_from_mask,
    selective_log_softmax,
    token_logps,
)
from nashalign.data.token_logps import _projects_only_kept_positions


def naive_selective(logits, index):
    return torch.gather(logits.log_softmax(-1), -1, index[..., None])[..., 0]


def naive_token_logps(model, input_ids, attention_mask, response_mask):
    """Full (N, T, V) logits, float32 log_softmax, gather at the next token, mask."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits
    out = torch.zeros(input_ids.shape)
    out[:, 1:] = naive_selective(logits[:, :-1].float(), input_ids[:, 1:])
    return out * response_mask


def alone_response_logps(model, prompt, response):
    """Log-probs of `response` after `prompt`, the sequence scored alone: no padding, no mask."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    return naive_selective(logits[:-1], ids[0, 1:])[len(prompt) - 1 :]


def random_pairs(seed, count, vocab=512):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(
            3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g
        ).tolist()

    return [(ids(2, 9), ids(1, 7), ids(1, 7)) for _ in range(count)]


def collate(pairs, *, pad_to=None, pad_id=0, left=False):
    """Pair batch of (prompt, chosen, rejected) id lists, as data.collate_pairs lays it out."""
    rows = [(p, p + c) for p, c, _ in pairs] + [(p, p + r) for p, _, r in pairs]
    width = pad_to or max(len(row) for _, row in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, row) in enumerate(rows):
        start = width - len(row) if left else 0
        input_ids[i, start : start + len(row)] = torch.tensor(row)
        attention_mask[i, start : start + len(row)] = 1
        response_mask[i, start + len(prompt) : start + len(row)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


class Float32Allocations(TorchDispatchMode):
    """Records the element count of the largest new float32 tensor any aten op returns (views skipped).

    Sees every op of the forward and the backward pass, including a custom autograd Function's.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float32:
                    self.largest = max(self.largest, leaf.numel())
        return out


# --- selective_log_softmax -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    cols=st.integers(1, 4),
    vocab=st.integers(1, 40),
    chunk_size=st.integers(1, 50),
    scale=st.floats(0.1, 30.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_selective_log_softmax_equals_naive_float32(rows, cols, vocab, chunk_size, scale, seed):
    """Any shape and any chunk size: equal to gather(log_softmax) in float32 to 1e-5."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, vocab, generator=g) * scale
    index = torch.randint(0, vocab, (rows, cols), generator=g)
    out = selective_log_softmax(logits, index, chunk_size)
    assert out.dtype == torch.float32 and out.shape == (rows, cols)
    assert_close(out, naive_selective(logits, index), atol=1e-5, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(shift=st.floats(-100.0, 100.0), seed=st.integers(0, 2**31 - 1))
def test_selective_log_softmax_is_shift_invariant(shift, seed):
    """log_softmax(x + c) = log_softmax(x). Tolerance 1e-4: float32 spacing at |x| ~ 110 is 7.6e-6."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, 30, generator=g) * 5
    index = torch.randint(0, 30, (12,), generator=g)
    assert_close(
        selective_log_softmax(logits + shift, index, 5),
        selective_log_softmax(logits, index, 5),
        atol=1e-4,
        rtol=0,
    )


def test_selective_log_softmax_hand_values():
    """Row [log 1, log 2, log 5]: softmax (1/8, 2/8, 5/8), so log-probs log(1/8), log(2/8), log(5/8);
    a row of equal logits over V = 4 gives log(1/4) whatever the target."""
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]] * 3 + [[7.0, 7.0, 7.0]])
    logits = torch.cat([logits, torch.full((4, 1), -math.inf)], dim=1)
    logits[3, 3] = 7.0
    out = selective_log_softmax(logits, torch.tensor([0, 1, 2, 3]), chunk_size=3)
    expected = torch.tensor([math.log(1 / 8), math.log(2 / 8), math.log(5 / 8), math.log(1 / 4)])
    assert_close(out, expected, atol=1e-6, rtol=0)


def test_selective_log_softmax_bfloat16_upcasts_per_chunk():
    """bfloat16 logits are upcast chunk by chunk, so the result is float32 and matches the float64 truth
    of the same (bfloat16-valued) logits to 1e-5. bfloat16's own log_softmax rounds its output to
    bfloat16: 8 significant bits, relative error up to 2**-8, so it agrees with ours only to
    rtol = 2**-7 (one bfloat16 spacing), and is far less accurate (asserted)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 300, generator=g) * 4).bfloat16()
    index = torch.randint(0, 300, (64,), generator=g)
    ours = selective_log_softmax(logits, index, 16)
    assert ours.dtype == torch.float32
    exact = naive_selective(logits.double(), index)
    assert_close(ours.double(), exact, atol=1e-5, rtol=0)
    bfloat16_naive = naive_selective(logits, index)
    assert_close(bfloat16_naive.float(), ours, rtol=2**-7, atol=1e-6)
    assert (ours.double() - exact).abs().max() * 100 < (bfloat16_naive.double() - exact).abs().max()


def test_selective_log_softmax_gradients():
    """float64: torch.autograd.gradcheck against finite differences; float32: the same gradient as the
    naive path; bfloat16: a bfloat16 gradient equal to the float32 one up to bfloat16 rounding."""
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 7, (5,), generator=g)
    x64 = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: selective_log_softmax(x, index, 2), (x64,))

    weights = torch.randn(5, generator=g)
    x32 = x64.detach().float().requires_grad_()
    (selective_log_softmax(x32, index, 2) * weights).sum().backward()
    reference = x64.detach().float().requires_grad_()
    (naive_selective(reference, index) * weights).sum().backward()
    assert_close(x32.grad, reference.grad, atol=1e-6, rtol=1e-5)

    x16 = x64.detach().bfloat16().requires_grad_()
    (selective_log_softmax(x16, index, 2) * weights).sum().backward()
    upcast = x16.detach().float().requires_grad_()
    (naive_selective(upcast, index) * weights).sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    assert_close(x16.grad.float(), upcast.grad, rtol=2**-7, atol=1e-6)


def test_chunked_path_never_allocates_a_float32_rows_by_vocab_tensor():
    """bfloat16 logits (64, 1000), chunks of 8 rows: no op in the forward or backward pass returns a
    float32 tensor larger than one chunk (8 x 1000), while the naive path returns a (64, 1000) float32
    log-softmax (so the check can fail). The gradient is bfloat16."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(64, 1000, generator=g) * 4).bfloat16().requires_grad_()
    index = torch.randint(0, 1000, (64,), generator=g)
    with Float32Allocations() as ours:
        selective_log_softmax(logits, index, 8).sum().backward()
    assert 0 < ours.largest <= 8 * 1000
    assert logits.grad.dtype == torch.bfloat16

    with Float32Allocations() as naive:
        naive_selective(logits.float(), index).sum().backward()
    assert naive.largest >= 64 * 1000


def test_selective_log_softmax_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        selective_log_softmax(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


# --- token_logps / pair_logps ----------------------------------------------------------------------


class TableModel(torch.nn.Module):
    """A bigram 'model' of unknown structure: logits at position t are table[input_ids[t]]."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_token_logps_hand_derived_on_a_bigram_table():
    """table[a] = log q_a with q_0 = (1/2, 1/4, 1/8, 1/8), q_1 = (1/8, 1/8, 1/4, 1/2), q_2 = q_3 uniform.
    Row [0, 1, 2, 3] with response tokens 2 and 3 (positions 2, 3), padded by one token:
    log p(2 | 1) = log q_1(2) = log 1/4 and log p(3 | 2) = log q_2(3) = log 1/4, sum log 1/16.
    Row [1, 0, 0] with response tokens at positions 1, 2: log q_1(0) + log q_0(0) = log 1/8 + log 1/2.
    An off-by-one shift would read q_2(2) = 1/4 then q_3(pad) = 1/4 and q_0(1) = 1/4: different sums."""
    q = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 1 / 8], [1 / 8, 1 / 8, 1 / 4, 1 / 2], [1 / 4] * 4, [1 / 4] * 4])
    model = TableModel(q.log())
    assert not _projects_only_kept_positions(model)
    input_ids = torch.tensor([[0, 1, 2, 3, 0], [1, 0, 0, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    out = token_logps(model, input_ids, attention_mask, response_mask)
    expected = torch.tensor(
        [[0, 0, math.log(1 / 4), math.log(1 / 4), 0], [0, math.log(1 / 8), math.log(1 / 2), 0, 0]]
    )
    assert_close(out, expected, atol=1e-6, rtol=0)


def test_token_logps_equals_naive_full_logits(tiny_model):
    """Right-padded pair batch: equal to full logits + float32 log_softmax + gather (1e-5), and only
    the positions that predict response tokens go through the vocabulary projection."""
    batch = collate(random_pairs(0, 3))
    projected = []
    tiny_model.lm_head.register_forward_hook(lambda m, args, out: projected.append(args[0].shape))
    with torch.no_grad():
        out = token_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert projected == [(int(batch["response_mask"].sum()), tiny_model.config.hidden_size)]
    with torch.no_grad():
        expected = naive_token_logps(
            tiny_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
    assert out.dtype == torch.float32
    assert_close(out, expected, atol=1e-5, rtol=0)
    assert (out[~batch["response_mask"]] == 0).all() and (out[batch["response_mask"]] < 0).all()


def test_pair_logps_concatenated_equals_separate_forwards(tiny_model):
    """One forward over the 2B padded rows equals scoring each sequence alone (no padding), per token
    and summed (1e-5); lengths count the response tokens."""
    pairs = random_pairs(1, 4)
    with torch.no_grad():
        out = pair_logps(tiny_model, collate(pairs))
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            with torch.no_grad():
                alone = alone_response_logps(tiny_model, prompt, response)
            start = len(prompt)
            token = out[f"{side}_token_logps"][i]
            assert_close(token[start : start + len(response)], alone, atol=1e-5, rtol=0)
            assert_close(out[f"{side}_logps"][i], alone.sum(), atol=1e-5, rtol=0)
            assert out[f"{side}_lengths"][i] == len(response)
    assert out["chosen_logps"].shape == out["rejected_logps"].shape == (4,)
    assert out["chosen_token_logps"].shape[0] == 4


# The model fixture is only read, never changed, so sharing it across examples is safe.
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.integers(1, 6), pad_id=st.integers(0, 511), chunk_size=st.integers(1, 40))
def test_extra_padding_and_chunk_size_change_nothing(tiny_model, extra, pad_id, chunk_size):
    """Padding to a longer T with any pad token, and any chunk size: same log-probs (1e-5), zeros in
    the added columns."""
    pairs = random_pairs(2, 3)
    tight = collate(pairs)
    width = tight["input_ids"].shape[1]
    padded = collate(pairs, pad_to=width + extra, pad_id=pad_id)
    with torch.no_grad():
        reference = pair_logps(tiny_model, tight)
        out = pair_logps(tiny_model, padded, chunk_size=chunk_size)
    for side in ("chosen", "rejected"):
        assert_close(out[f"{side}_logps"], reference[f"{side}_logps"], atol=1e-5, rtol=0)
        assert_close(
            out[f"{side}_token_logps"][:, :width], reference[f"{side}_token_logps"], atol=1e-5, rtol=0
        )
        assert (out[f"{side}_token_logps"][:, width:] == 0).all()


def test_left_padding_equals_right_padding():
    """Position ids come from the attention mask, so left-padded rows score like right-padded ones
    (1e-5). Checked on a tiny GPT-2, whose learned absolute position embeddings make position ids
    matter (rotary models like the Llama fixture only see position differences, so a constant
    offset cannot be noticed); the same batch without position ids (the model's default 0..T-1)
    scores differently, so the check can fail."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
        model = GPT2LMHeadModel(config).eval()
    assert _projects_only_kept_positions(model)
    pairs = random_pairs(3, 3)
    right, left = collate(pairs), collate(pairs, left=True)
    with torch.no_grad():
        out_right = pair_logps(model, right)
        out_left = pair_logps(model, left)
        arange_positions = torch.arange(left["input_ids"].shape[1]).expand_as(left["input_ids"])
        out_default = pair_logps(model, {**left, "position_ids": arange_positions})
    assert not torch.equal(right["input_ids"], left["input_ids"])
    assert_close(out_left["chosen_logps"], out_right["chosen_logps"], atol=1e-5, rtol=0)
    assert_close(out_left["rejected_logps"], out_right["rejected_logps"], atol=1e-5, rtol=0)
    assert not torch.allclose(out_default["chosen_logps"], out_right["chosen_logps"], atol=1e-3)


def test_gradients_flow_and_equal_the_naive_path(tiny_model):
    """d(sum of response log-probs)/d(parameters) equals the naive full-logits path's (1e-5) for every
    parameter, and is not zero."""
    batch = collate(random_pairs(4, 2))
    token_logps(
        tiny_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    ).sum().backward()
    ours = {name: p.grad.clone() for name, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    naive_token_logps(
        tiny_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    ).sum().backward()
    for name, p in tiny_model.named_parameters():
        assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert ours["lm_head.weight"].abs().sum() > 0 and ours["model.embed_tokens.weight"].abs().sum() > 0


def test_full_logits_fallback_equals_fast_path(tiny_model):
    """A wrapper that hides the transformers model (forward takes no logits_to_keep) gets the full
    logits path, with the same result (1e-5)."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    wrapper = Wrapper(tiny_model)
    assert _projects_only_kept_positions(tiny_model) and not _projects_only_kept_positions(wrapper)
    batch = collate(random_pairs(5, 3))
    with torch.no_grad():
        assert_close(
            pair_logps(wrapper, batch)["chosen_token_logps"],
            pair_logps(tiny_model, batch)["chosen_token_logps"],
            atol=1e-5,
            rtol=0,
        )


def test_bfloat16_model(tiny_model):
    """A bfloat16 model: float32 outputs equal to the naive path on the same model's full bfloat16
    logits upcast to float32. Both compute identical hidden states; only the number of rows given to
    the bfloat16 lm_head differs, which may round logits differently by one bfloat16 spacing
    (2**-7 relative; logits here are O(1)), so atol = 2e-2 per token."""
    model = tiny_model.to(torch.bfloat16)
    batch = collate(random_pairs(6, 3))
    with torch.no_grad():
        out = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        expected = naive_token_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
    assert out.dtype == torch.float32
    assert_close(out, expected, atol=2e-2, rtol=0)


def test_peft_lora_model(tiny_model):
    """Through a peft LoRA wrapper: the adapters change the log-probs, the fast path still equals the
    naive path through the same wrapper (1e-5), and gradients reach only the LoRA weights."""
    from peft import LoraConfig, get_peft_model

    batch = collate(random_pairs(7, 2))
    with torch.no_grad():
        base = pair_logps(tiny_model, batch)["chosen_logps"]
    model = get_peft_model(
        tiny_model,
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    assert _projects_only_kept_positions(model)
    out = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with torch.no_grad():
        expected = naive_token_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
    assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out[:2].sum(-1), base, atol=1e-3)
    out.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_peft_prompt_learning_is_refused(tiny_model):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    batch = collate(random_pairs(8, 1))
    with pytest.raises(NashalignError, match="virtual tokens"):
        pair_logps(model, batch)


def test_bad_batches_are_rejected(tiny_model):
    batch = collate(random_pairs(9, 2))
    with pytest.raises(ValueError, match="2B rows"):
        pair_logps(tiny_model, {key: value[:3] for key, value in batch.items()})
    with pytest.raises(ValueError, match="no 'response_mask'"):
        pair_logps(tiny_model, {key: batch[key] for key in ("input_ids", "attention_mask")})
    first_counts = batch["response_mask"].clone()
    first_counts[0, 0] = True
    with pytest.raises(ValueError, match=r"response_mask\[:, 0\]"):
        token_logps(tiny_model, batch["input_ids"], batch["attention_mask"], first_counts)
    width = batch["input_ids"].shape[1]
    four_d = torch.ones(4, 1, width, width, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs explicit position_ids"):
        token_logps(tiny_model, batch["input_ids"], four_d, batch["response_mask"])


def test_model_kwargs_reach_the_forward():
    """model_kwargs are passed to the model's forward as they are."""
    seen = {}

    class Recording(TableModel):
        def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
            seen.update(kwargs)
            return super().forward(input_ids, attention_mask, position_ids)

    model = Recording(torch.zeros(4, 4))
    ids = torch.tensor([[0, 1, 2]])
    out = token_logps(model, ids, None, torch.tensor([[False, True, True]]), model_kwargs={"spans": [(0, 3)]})
    assert seen == {"spans": [(0, 3)]}
    assert_close(out, torch.tensor([[0.0, math.log(1 / 4), math.log(1 / 4)]]))
