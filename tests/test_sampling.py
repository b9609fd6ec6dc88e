"""Generation backends: counts, padding invariance, seeding, finish reasons, sampling distribution.

The transformers sampler is checked against a naive reference that generates one prompt at a time,
without padding and without the KV cache, drawing each token from the same per-sample generator
(seeded with `sample_seed(seed, prompt, sample)`): the optimized path must give the same tokens.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from nashalign import NashalignError
from nashalign.sampling.engines import (
    Generation,
    TransformersSampler,
    draw_tokens,
    make_sampler,
    sample_seed,
)
from nashalign.sampling.vllm_engine import vllm_available

PROMPTS = ["Paris", "What is the capital of France?", "The quick brown fox jumps over the lazy"]


def naive_generate(model, tokenizer, prompt, *, max_new_tokens, temperature, seed=None):
    """Reference: one unpadded prompt, a full forward pass per token, pad suppressed, then either
    argmax (temperature 0) or a draw from softmax(logits / T) with the given generator seed (the
    first token whose cumulative probability exceeds a uniform number times the total).
    Returns (token_ids without EOS, finish_reason)."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generator = None
    if temperature > 0:
        generator = torch.Generator().manual_seed(seed)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(ids).logits[0, -1].float()
            logits[tokenizer.pad_token_id] = float("-inf")
            if temperature == 0:
                token = int(logits.argmax())
            else:
                # the categorical distribution inverted at one uniform number of the sample's generator
                probs = torch.softmax(logits / temperature, dim=-1)
                point = float(torch.rand(1, generator=generator, dtype=torch.float64)) * float(probs.sum())
                token = int((probs.cumsum(0) > point).nonzero()[0])
            if token == tokenizer.eos_token_id:
                return new, "stop"
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new, "length"


def eos_biased(model, tokenizer, bias):
    """The same model with an lm_head bias of `bias` on the EOS logit (0 elsewhere)."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = bias
    model.lm_head = biased
    return model


def test_draw_tokens_follows_each_rows_distribution_with_its_own_generator():
    """draw_tokens: frequencies match the distribution (20,000 draws, within 5 standard errors),
    zero-probability tokens are never drawn (also unnormalized rows), and a row's draw is the same
    alone as inside a batch with other rows (one uniform number per row from its own generator)."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [2.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    draws = torch.stack([draw_tokens(probs, generators) for _ in range(20_000)])
    for row in range(2):
        expected = probs[row] / probs[row].sum()
        frequency = torch.bincount(draws[:, row], minlength=6).double() / len(draws)
        assert frequency[expected == 0].sum() == 0
        error = (expected.double() * (1 - expected.double()) / len(draws)).sqrt()
        assert ((frequency - expected.double()).abs() <= 5 * error + 1e-12).all(), (row, frequency)
    alone = [draw_tokens(probs[1:], [torch.Generator().manual_seed(s)]) for s in range(50)]
    together = [draw_tokens(probs, [torch.Generator().manual_seed(99), torch.Generator().manual_seed(s)])[1:]
                for s in range(50)]
    assert torch.equal(torch.cat(alone), torch.cat(together))
    # one uniform per row: the generator moves by exactly one float64 draw
    g = torch.Generator().manual_seed(7)
    draw_tokens(probs[:1], [g])
    assert float(torch.rand(1, generator=g, dtype=torch.float64)) == float(
        torch.rand(2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)[1])


def test_the_samplers_copy_attends_eagerly_on_cpu_unless_the_spec_names_an_implementation(tiny_model_dir):
    """make_sampler loads its own copy: eager attention on a CPU (torch's SDPA kernel is slow for one
    query token), the spec's implementation when it names one, and the spec's dtype."""
    from nashalign.models.loader import ModelSpec

    chosen = make_sampler("transformers", ModelSpec(str(tiny_model_dir), dtype="bfloat16"), max_new_tokens=2)
    assert chosen.model.config._attn_implementation == "eager" and chosen.model.dtype == torch.bfloat16
    named = make_sampler("transformers", ModelSpec(str(tiny_model_dir), attn_implementation="sdpa"), max_new_tokens=2)
    assert named.model.config._attn_implementation == "sdpa" and named.model.dtype == torch.float32
    assert len(chosen.generate(PROMPTS[:1], 2, progress=False)[0]) == 2


def test_counts_indices_and_text(tiny_model, tiny_tokenizer):
    """K samples per prompt, in order, with decoded text matching the token ids."""
    sampler = TransformersSampler(tiny_model, tiny_tokenizer, max_new_tokens=6, batch_size=5, seed=3)
    results = sampler.generate(PROMPTS, 4, progress=False)
    assert len(results) == len(PROMPTS)
    for p, row in enumerate(results):
        assert [g.sample_index for g in row] == [0, 1, 2, 3]
        for g in row:
            assert isinstance(g, Generation) and g.prompt_index == p
            assert len(g.token_ids) <= 6
            assert g.text == tiny_tokenizer.decode(g.token_ids)
            assert g.finish_reason in ("stop", "length")
            assert tiny_tokenizer.eos_token_id not in g.token_ids
            assert tiny_tokenizer.pad_token_id not in g.token_ids


def test_greedy_left_padded_batch_equals_unpadded_single_prompt(tiny_model, tiny_tokenizer):
    """Prompts of different lengths share a left-padded batch; greedy output (temperature 0) must equal
    generating each prompt alone without padding or cache, and all K copies are identical."""
    sampler = TransformersSampler(
        tiny_model, tiny_tokenizer, max_new_tokens=10, temperature=0.0, batch_size=3
    )
    results = sampler.generate(PROMPTS, 2, progress=False)
    for prompt, row in zip(PROMPTS, results):
        expected, reason = naive_generate(
            tiny_model, tiny_tokenizer, prompt, max_new_tokens=10, temperature=0
        )
        assert [g.token_ids for g in row] == [expected, expected]
        assert [g.finish_reason for g in row] == [reason, reason]


def test_sampled_tokens_equal_naive_reference_with_same_generators(tiny_model, tiny_tokenizer):
    """Sampling at T=0.7 in padded batches of 4 equals the naive one-prompt-at-a-time reference that
    draws from a generator seeded with sample_seed(seed, prompt, sample)."""
    sampler = TransformersSampler(
        tiny_model, tiny_tokenizer, max_new_tokens=7, temperature=0.7, batch_size=4, seed=11
    )
    results = sampler.generate(PROMPTS, 3, progress=False)
    for p, (prompt, row) in enumerate(zip(PROMPTS, results)):
        for j, g in enumerate(row):
            expected, reason = naive_generate(
                tiny_model,
                tiny_tokenizer,
                prompt,
                max_new_tokens=7,
                temperature=0.7,
                seed=sample_seed(11, p, j),
            )
            assert (g.token_ids, g.finish_reason) == (expected, reason)


def test_seeding(tiny_model, tiny_tokenizer):
    """Same seed: identical samples, also with another batch size and when a subset of prompts is
    regenerated with its original keys. Different seed: different samples. Samples of one prompt
    differ from each other at T=1 (512-token vocabulary, 8 tokens)."""

    def run(seed, batch_size, prompts=PROMPTS, keys=None):
        sampler = TransformersSampler(
            tiny_model, tiny_tokenizer, max_new_tokens=8, batch_size=batch_size, seed=seed
        )
        return sampler.generate(prompts, 3, progress=False, prompt_indices=keys)

    first = run(5, 4)
    assert run(5, 4) == first
    assert run(5, 1) == first
    assert run(5, 9) == first
    assert run(5, 2, prompts=PROMPTS[2:], keys=[2]) == first[2:]
    other = run(6, 4)
    assert all(a.token_ids != b.token_ids for row_a, row_b in zip(first, other) for a, b in zip(row_a, row_b))
    assert all(len({tuple(g.token_ids) for g in row}) == 3 for row in first)


def test_tiny_top_p_and_tiny_temperature_are_greedy(tiny_model, tiny_tokenizer):
    """top_p → 0 keeps only the most likely token, and T → 0 puts all mass on it: both are greedy."""
    greedy = TransformersSampler(tiny_model, tiny_tokenizer, max_new_tokens=6, temperature=0.0)
    nucleus = TransformersSampler(tiny_model, tiny_tokenizer, max_new_tokens=6, top_p=1e-9, seed=1)
    cold = TransformersSampler(tiny_model, tiny_tokenizer, max_new_tokens=6, temperature=1e-4, seed=2)
    expected = [[g.token_ids for g in row] for row in greedy.generate(PROMPTS, 2, progress=False)]
    assert [[g.token_ids for g in row] for row in nucleus.generate(PROMPTS, 2, progress=False)] == expected
    assert [[g.token_ids for g in row] for row in cold.generate(PROMPTS, 2, progress=False)] == expected


def test_first_token_distribution_matches_temperature_and_top_p(tiny_model, tiny_tokenizer):
    """With one new token, the sampled frequencies follow softmax(logits / T) restricted to the top-p
    nucleus and renormalized. The head is scaled ×40 so a few tokens carry most of the mass. Each
    token's count over 600 draws lies within 5 binomial standard deviations of 600·q, and no token
    outside the nucleus is ever drawn."""
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(40.0)
    temperature, top_p, n = 0.8, 0.9, 600
    ids = tiny_tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tiny_model(ids).logits[0, -1].double()
    logits[tiny_tokenizer.pad_token_id] = float("-inf")
    probs = torch.softmax(logits / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    cumulative = torch.cumsum(probs[order], 0)
    keep = order[: int((cumulative < top_p).sum()) + 1]  # smallest prefix with mass >= top_p
    q = torch.zeros_like(probs)
    q[keep] = probs[keep] / probs[keep].sum()
    assert 2 <= len(keep) < 40

    sampler = TransformersSampler(
        tiny_model,
        tiny_tokenizer,
        max_new_tokens=1,
        temperature=temperature,
        top_p=top_p,
        batch_size=200,
        seed=0,
    )
    (row,) = sampler.generate([PROMPTS[0]], n, progress=False)
    counts = torch.zeros_like(probs)
    for g in row:
        token = g.token_ids[0] if g.token_ids else tiny_tokenizer.eos_token_id
        counts[token] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(keep.tolist())
    sd = torch.sqrt(n * q * (1 - q)).clamp_min(1.0)
    assert torch.all((counts - n * q).abs() <= 5 * sd)


def test_finish_reasons_with_eos_bias(tiny_model, tiny_tokenizer):
    """A huge EOS bias: every response is empty and stopped. A moderate bias (EOS ≈ e^3.5 times a
    typical logit) gives a mix of 'stop' and 'length' whose tokens and reasons equal the naive
    reference; nothing after EOS (the padding) is returned."""
    model = eos_biased(tiny_model, tiny_tokenizer, 1e4)
    sampler = TransformersSampler(model, tiny_tokenizer, max_new_tokens=5, batch_size=4, seed=0)
    for row in sampler.generate(PROMPTS, 2, progress=False):
        assert [(g.text, g.token_ids, g.finish_reason) for g in row] == [("", [], "stop")] * 2

    with torch.no_grad():
        model.lm_head.bias[tiny_tokenizer.eos_token_id] = 3.5
    sampler = TransformersSampler(model, tiny_tokenizer, max_new_tokens=12, batch_size=8, seed=4)
    results = sampler.generate(PROMPTS, 6, progress=False)
    reasons = {g.finish_reason for row in results for g in row}
    assert reasons == {"stop", "length"}
    for p, row in enumerate(results):
        for j, g in enumerate(row):
            expected = naive_generate(
                model,
                tiny_tokenizer,
                PROMPTS[p],
                max_new_tokens=12,
                temperature=1.0,
                seed=sample_seed(4, p, j),
            )
            assert (g.token_ids, g.finish_reason) == expected
            assert len(g.token_ids) == 12 if g.finish_reason == "length" else len(g.token_ids) < 12


def _two_eos(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory), tokenizer, tokenizer.convert_tokens_to_ids("<|eot|>")


def test_generation_keeps_the_eos_id_that_stopped_it(two_eos_model_dir):
    """A model whose generation config lists two EOS ids ["</s>", "<|eot|>"] and which is tilted to
    stop on "<|eot|>": every stopped generation records "<|eot|>" as its stop token and its
    response_ids end with it, although the tokenizer's eos_token is "</s>"; a response cut by
    max_new_tokens has no stop token. With the two output rows swapped the model stops on "</s>"
    and that is what is recorded."""
    model, tokenizer, eot = _two_eos(two_eos_model_dir)
    eos = tokenizer.eos_token_id
    assert tokenizer.eos_token_id != eot and model.generation_config.eos_token_id == [eos, eot]
    sampler = TransformersSampler(model, tokenizer, max_new_tokens=6, batch_size=8, seed=2)
    generations = [g for row in sampler.generate(PROMPTS, 4, progress=False) for g in row]
    stopped = [g for g in generations if g.finish_reason == "stop"]
    assert stopped and any(g.token_ids for g in stopped) and len(stopped) < len(generations)
    for g in generations:
        assert eos not in g.token_ids and eot not in g.token_ids
        if g.finish_reason == "stop":
            assert g.stop_token_id == eot and g.response_ids == g.token_ids + [eot]
        else:
            assert g.stop_token_id is None and g.response_ids == g.token_ids and len(g.token_ids) == 6

    with torch.no_grad():
        rows = model.lm_head.weight[[eot, eos]].clone()
        model.lm_head.weight[[eos, eot]] = rows
    swapped = [g for row in sampler.generate(PROMPTS, 4, progress=False) for g in row]
    assert {g.stop_token_id for g in swapped if g.finish_reason == "stop"} == {eos}


def test_generation_rows_round_trip_and_older_rows_default_their_stop_token():
    """Generation.from_row reads a generations.jsonl row back; a row written before stop tokens were
    recorded gets the given default when it stopped, none when it was cut by length."""
    import dataclasses

    g = Generation(3, 1, "hi", [7, 8], "stop", 512)
    assert Generation.from_row(dataclasses.asdict(g), 2) == g
    old = {"prompt_index": 3, "sample_index": 1, "text": "hi", "token_ids": [7, 8], "finish_reason": "stop"}
    assert Generation.from_row(old, 2).response_ids == [7, 8, 2]
    assert Generation.from_row({**old, "finish_reason": "length"}, 2).response_ids == [7, 8]


def test_state_is_restored(tiny_model, tiny_tokenizer):
    """Generation leaves the tokenizer's padding side and the model's training flag as they were."""
    tiny_model.train()
    sampler = TransformersSampler(tiny_model, tiny_tokenizer, max_new_tokens=2, batch_size=2)
    sampler.generate(PROMPTS, 1, progress=False)
    assert tiny_tokenizer.padding_side == "right"
    assert tiny_model.training


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model, tiny_tokenizer):
    """A tokenizer with no pad token (common for base models) pads with EOS for the call and is
    left without one afterwards; greedy outputs still equal the unpadded reference."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    sampler = TransformersSampler(tiny_model, tokenizer, max_new_tokens=6, temperature=0.0, batch_size=3)
    results = sampler.generate(PROMPTS, 1, progress=False)
    assert tokenizer.pad_token is None
    for prompt, row in zip(PROMPTS, results):
        assert (
            row[0].token_ids
            == naive_generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=6, temperature=0)[0]
        )


def test_update_weights(tiny_tokenizer, tiny_model_dir):
    """After update_weights the sampler follows the new policy (a live module or a checkpoint path)."""
    from nashalign.models.tiny import build_model

    first, second = build_model(tiny_tokenizer, seed=0), build_model(tiny_tokenizer, seed=1)
    sampler = TransformersSampler(first, tiny_tokenizer, max_new_tokens=6, temperature=0.0)
    before = sampler.generate(PROMPTS, 1, progress=False)
    sampler.update_weights(second)
    after = sampler.generate(PROMPTS, 1, progress=False)
    assert before != after
    for prompt, row in zip(PROMPTS, after):
        assert (
            row[0].token_ids
            == naive_generate(second, tiny_tokenizer, prompt, max_new_tokens=6, temperature=0)[0]
        )
    sampler.update_weights(tiny_model_dir)  # saved with seed 0: the first model again
    assert sampler.generate(PROMPTS, 1, progress=False) == before


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(tiny_model, tiny_tokenizer, kwargs, field):
    arguments = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(NashalignError, match=field):
        TransformersSampler(tiny_model, tiny_tokenizer, **arguments)


def test_bad_generate_arguments_raise(tiny_model, tiny_tokenizer):
    sampler = TransformersSampler(tiny_model, tiny_tokenizer, max_new_tokens=2)
    with pytest.raises(NashalignError, match="n "):
        sampler.generate(PROMPTS, 0)
    with pytest.raises(NashalignError, match="prompt 1"):
        sampler.generate(["ok", ""], 1)
    with pytest.raises(NashalignError, match="prompt_indices"):
        sampler.generate(PROMPTS, 1, prompt_indices=[0, 0, 1])


def test_make_sampler_backends(tiny_model, tiny_tokenizer, tiny_model_dir, caplog):
    """transformers from a module or a checkpoint path; vLLM unavailable here: a clear error, or the
    documented fallback with a warning; 'auto' picks transformers."""
    available, reason = vllm_available()
    assert isinstance(available, bool) and isinstance(reason, str)
    common = {"max_new_tokens": 3, "temperature": 0.0}
    from_module = make_sampler("transformers", tiny_model, tiny_tokenizer, **common)
    from_path = make_sampler("transformers", tiny_model_dir, **common)
    assert isinstance(from_path, TransformersSampler)
    assert from_path.generate(PROMPTS, 1, progress=False) == from_module.generate(PROMPTS, 1, progress=False)
    with pytest.raises(NashalignError, match="checkpoint directory"):
        make_sampler("vllm", tiny_model, tiny_tokenizer, **common)
    with pytest.raises(NashalignError, match="backend"):
        make_sampler("tgi", tiny_model, tiny_tokenizer, **common)
    if available:
        return
    assert reason
    with pytest.raises(NashalignError, match="vllm.*unavailable"):
        make_sampler("vllm", tiny_model_dir, **common)
    with caplog.at_level(logging.WARNING, logger="nashalign.sampling.engines"):
        fallback = make_sampler("vllm", tiny_model_dir, fallback_to_transformers=True, **common)
    assert isinstance(fallback, TransformersSampler)
    assert "transformers instead" in caplog.text
    assert isinstance(make_sampler("auto", tiny_model_dir, **common), TransformersSampler)


class FakeVLLM:
    """Stands in for the `vllm` package (not installable here) to test the glue in VLLMSampler:
    request construction, output parsing, greedy handling, weight reloads and sleep. Each engine answers a
    request with completions whose tokens are (prompt length + child index) repeated, then a stop
    token for even children (finish "stop"; child j stops on stop_ids[j // 2 % len(stop_ids)],
    included as vLLM returns it, or, with return_stop=False, left out and named by `stop_reason`)
    and max_tokens tokens for odd children (finish "length")."""

    def __init__(self, stop_ids, return_stop=True):
        self.engines, self.cleanups, self.requests, self.calls = [], 0, [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                fake.engines.append(self)

            def collective_rpc(self, method, kwargs=None):
                fake.calls.append((method, kwargs))

            def reset_prefix_cache(self):
                fake.calls.append(("reset_prefix_cache", None))

            def sleep(self, level):
                fake.calls.append(("sleep", level))

            def wake_up(self):
                fake.calls.append(("wake_up", None))

            def generate(self, requests, params, use_tqdm=True):
                fake.requests.append((requests, params))
                outputs = []
                for request, p in zip(requests, params):
                    completions = []
                    for j in range(p.n):
                        token = len(request["prompt_token_ids"]) + j + 10
                        stop = stop_ids[j // 2 % len(stop_ids)] if j % 2 == 0 else None
                        if stop is not None:
                            ids, reason = [token, token] + ([stop] if return_stop else []), "stop"
                        else:
                            ids, reason = [token] * p.max_tokens, "length"
                        completions.append(
                            SimpleNamespace(index=j, token_ids=ids, finish_reason=reason, stop_reason=stop)
                        )
                    outputs.append(SimpleNamespace(outputs=completions[::-1]))  # any order
                return outputs

        def cleanup_dist_env_and_memory():
            fake.cleanups += 1

        self.module = types.ModuleType("vllm")
        self.module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        distributed = types.ModuleType("vllm.distributed")
        parallel_state = types.ModuleType("vllm.distributed.parallel_state")
        parallel_state.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory
        self.modules = {
            "vllm": self.module,
            "vllm.distributed": distributed,
            "vllm.distributed.parallel_state": parallel_state,
        }


def test_vllm_sampler_glue_with_a_fake_engine(monkeypatch, tiny_tokenizer, tiny_model_dir):
    """Without vLLM: prompts are sent as token ids without added special tokens, one request per
    prompt with n samples and a distinct seed; outputs come back ordered by child index with EOS
    and padding removed and the right finish reason; greedy asks once and copies (vLLM refuses
    n > 1 when greedy); update_weights asks the workers to reload the new path's weights in place
    and resets the prefix cache, rebuild frees the engine and builds a new one; with sleep mode the
    engine sleeps on request and wakes before its next use. On a CPU, chunked prefill is off by default."""
    fake = FakeVLLM([tiny_tokenizer.eos_token_id])
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_available() == (True, "")

    sampler = make_sampler("vllm", tiny_model_dir, max_new_tokens=4, seed=7, tensor_parallel_size=2)
    from nashalign.sampling.vllm_engine import VLLMSampler

    assert isinstance(sampler, VLLMSampler)
    assert fake.engines[0].kwargs["model"] == str(tiny_model_dir)
    assert fake.engines[0].kwargs["tensor_parallel_size"] == 2 and fake.engines[0].kwargs["seed"] == 7
    results = sampler.generate(PROMPTS, 3, progress=False)
    requests, params = fake.requests[-1]
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert [len(r["prompt_token_ids"]) for r in requests] == lengths
    assert [p.n for p in params] == [3, 3, 3]
    assert len({p.seed for p in params}) == 3
    assert all(p.stop_token_ids == [tiny_tokenizer.eos_token_id] for p in params)
    for length, row in zip(lengths, results):
        assert [g.sample_index for g in row] == [0, 1, 2]
        assert [g.token_ids for g in row] == [[length + 10] * 2, [length + 11] * 4, [length + 12] * 2]
        assert [g.finish_reason for g in row] == ["stop", "length", "stop"]
        assert [g.stop_token_id for g in row] == [tiny_tokenizer.eos_token_id, None, tiny_tokenizer.eos_token_id]
        assert row[0].text == tiny_tokenizer.decode([length + 10] * 2)

    greedy = make_sampler("vllm", tiny_model_dir, max_new_tokens=4, temperature=0.0, top_p=0.5)
    rows = greedy.generate(PROMPTS, 3, progress=False)
    assert [(p.n, p.top_p) for p in fake.requests[-1][1]] == [(1, 1.0)] * 3
    assert all(g.token_ids == row[0].token_ids for row in rows for g in row)
    assert [g.sample_index for g in rows[0]] == [0, 1, 2]

    engines = len(fake.engines)
    sampler.update_weights(tiny_model_dir)
    assert fake.calls == [("reload_weights", {"weights_path": str(tiny_model_dir)}), ("reset_prefix_cache", None)]
    assert len(fake.engines) == engines and fake.cleanups == 0
    sampler.rebuild(tiny_model_dir)
    assert fake.cleanups == 1 and len(fake.engines) == engines + 1 and sampler.llm is fake.engines[-1]
    with pytest.raises(NashalignError, match="checkpoint directory"):
        sampler.update_weights(object())

    fake.calls.clear()
    sleepy = make_sampler("vllm", tiny_model_dir, max_new_tokens=4, llm_kwargs={"enable_sleep_mode": True})
    sleepy.sleep()
    sleepy.sleep()
    sleepy.generate(PROMPTS, 1, progress=False)
    sleepy.sleep()
    sleepy.update_weights(tiny_model_dir)
    assert [name for name, _ in fake.calls] == [
        "sleep", "wake_up", "sleep", "wake_up", "reload_weights", "reset_prefix_cache"
    ]
    assert fake.engines[-1].kwargs["enable_sleep_mode"] is True  # the default on a GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = make_sampler("vllm", tiny_model_dir, max_new_tokens=4)
    assert on_cpu.llm is fake.engines[-1] and "enable_sleep_mode" not in on_cpu.llm.kwargs
    assert on_cpu.llm.kwargs["enable_chunked_prefill"] is False
    assert on_cpu.llm.kwargs["max_num_batched_tokens"] >= 512  # the tiny model's context
    on_cpu.sleep()  # without sleep mode: nothing happens
    assert fake.calls[-1] == ("reset_prefix_cache", None)


def test_auto_rule_and_sampler_pool_with_a_fake_engine(monkeypatch, tiny_tokenizer, tiny_model_dir, tmp_path):
    """'auto' starts an engine only for vllm_min_work_tokens() sampled tokens or more (or an unknown
    amount; on this CPU-only machine the CPU threshold); a SamplerPool builds one engine, loads each new checkpoint into it in place, gives it
    each call's seed, and shuts it down on close; transformers samplers are built per call."""
    import shutil

    from nashalign.sampling.engines import VLLM_CPU_MIN_WORK_TOKENS, SamplerPool, vllm_min_work_tokens
    from nashalign.sampling.vllm_engine import VLLMSampler

    fake = FakeVLLM([tiny_tokenizer.eos_token_id])
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    common = {"max_new_tokens": 4}
    threshold = vllm_min_work_tokens()
    if not torch.cuda.is_available():
        assert threshold == VLLM_CPU_MIN_WORK_TOKENS
    small = make_sampler("auto", tiny_model_dir, work_tokens=threshold - 1, **common)
    assert isinstance(small, TransformersSampler) and not fake.engines
    assert isinstance(make_sampler("auto", tiny_model_dir, work_tokens=threshold, **common), VLLMSampler)
    assert isinstance(make_sampler("auto", tiny_model_dir, **common), VLLMSampler)
    assert isinstance(make_sampler("vllm", tiny_model_dir, work_tokens=1, **common), VLLMSampler)

    second = shutil.copytree(tiny_model_dir, tmp_path / "second")
    fake.engines.clear()
    pool = SamplerPool()
    first_sampler = pool.sampler("vllm", str(tiny_model_dir), None, seed=1, **common)
    assert pool.sampler("vllm", str(tiny_model_dir), None, seed=2, **common) is first_sampler
    assert first_sampler.seed == 2 and fake.calls == []
    assert pool.sampler("vllm", str(second), None, seed=3, **common) is first_sampler
    assert fake.calls == [("reload_weights", {"weights_path": str(second)}), ("reset_prefix_cache", None)]
    assert len(fake.engines) == 1
    pool.release(first_sampler)
    pool.close()
    assert fake.cleanups == 1 and first_sampler.llm is None

    pool = SamplerPool()
    one = pool.sampler("transformers", str(tiny_model_dir), None, seed=0, **common)
    assert pool.sampler("transformers", str(tiny_model_dir), None, seed=0, **common) is not one
    pool.close()

@pytest.mark.parametrize("return_stop", [True, False])
def test_vllm_sampler_records_which_eos_id_stopped_each_completion(monkeypatch, two_eos_model_dir, return_stop):
    """Without vLLM: a model whose generation config lists two EOS ids sends both as stop_token_ids;
    a completion that stopped on the second one records it as its stop token, whether vLLM returns
    the stop token among the completion's ids or only names it in `stop_reason`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(two_eos_model_dir)
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot|>")
    fake = FakeVLLM([eos, eot], return_stop=return_stop)
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sampler = make_sampler("vllm", two_eos_model_dir, max_new_tokens=4)
    rows = sampler.generate(PROMPTS, 4, progress=False)
    assert all(p.stop_token_ids == [eos, eot] for p in fake.requests[-1][1])
    for row in rows:
        assert [g.stop_token_id for g in row] == [eos, None, eot, None]
        assert [g.finish_reason for g in row] == ["stop", "length", "stop", "length"]
        assert row[2].response_ids == row[2].token_ids + [eot] and eot not in row[2].token_ids
