"""Nash-MD's mixture sampler: its draws are those of the geometric mixture, computed with the
reference's own KV cache over left-padded prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

from nashalign.core.mixture import geometric_mixture_logprobs
from nashalign.models.tiny import build_model
from nashalign.online.nash_md import MixtureSampler, _mixture_processor
from nashalign.sampling.engines import TransformersSampler

PROMPTS = ["Question 1: yes or no?", "Hi", "A much longer prompt with many more words in it, to pad the others"]
SETTINGS = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 3, "seed": 7}


@pytest.fixture()
def two_models(tiny_tokenizer):
    first, second = build_model(tiny_tokenizer, seed=1), build_model(tiny_tokenizer, seed=2)
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    return first.eval(), second.eval()


def _tokens(groups):
    return [[g.token_ids for g in group] for group in groups]


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_the_mixture_at_either_end_samples_that_model_with_the_same_draws(two_models, tiny_tokenizer, coef):
    """β = 0 is the policy, β = 1 the reference: with the same seed the mixture sampler draws exactly
    the tokens the plain sampler draws from that model (the reference read through its KV cache)."""
    policy, ref = two_models
    mixed = MixtureSampler(policy, ref, tiny_tokenizer, mixture_coef=coef, **SETTINGS).generate(PROMPTS, 3)
    alone = TransformersSampler(ref if coef else policy, tiny_tokenizer, **SETTINGS).generate(PROMPTS, 3)
    assert _tokens(mixed) == _tokens(alone)
    assert any(len(g.token_ids) > 1 for group in mixed for g in group)


def test_the_processor_returns_the_mixture_of_full_forward_passes(two_models, tiny_tokenizer):
    """At every generation step the processor's log-probs equal geometric_mixture_logprobs of the two
    models' logits on the whole (left-padded) prefix, computed without any cache."""
    policy, ref = two_models
    tiny_tokenizer.padding_side = "left"
    try:
        encoded = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tiny_tokenizer.padding_side = "right"
    processor = _mixture_processor(ref, encoded["attention_mask"], 0.3)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            policy_logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            ref_logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        got = processor(ids, policy_logits)
        torch.testing.assert_close(got, geometric_mixture_logprobs(policy_logits, ref_logits, 0.3), atol=1e-4, rtol=1e-4)
        token = torch.multinomial(got.exp(), 1, generator=generator)
        ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
