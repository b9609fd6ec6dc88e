"""The vLLM sampler on the real engine (vLLM's CPU build here; its GPU build elsewhere).

One engine serves the whole module (an engine start costs about a minute on a CPU): it is built on
model A and takes models B and A' in place with update_weights (models from tests/vllm_models.py).
Greedy outputs are checked against the transformers sampler
(float32 both), which tests/test_sampling.py checks against a naive reference.
"""

from __future__ import annotations

import time

import pytest

from nashalign.sampling.engines import make_sampler
from vllm_models import ENGINE_ARGS, save_sampling_model

pytestmark = pytest.mark.vllm

PROMPTS = ["Paris", "What is the capital of France?", "The quick brown fox jumps over the lazy"]
def transformers_greedy(directory, max_new_tokens: int):
    sampler = make_sampler("transformers", str(directory), max_new_tokens=max_new_tokens, temperature=0.0)
    return [(row[0].token_ids, row[0].finish_reason) for row in sampler.generate(PROMPTS, 1, progress=False)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    return {"a": save_sampling_model(root / "a", seed=0), "b": save_sampling_model(root / "b", seed=1)}


@pytest.fixture(scope="module")
def engine(models):
    sampler = make_sampler("vllm", str(models["a"]), max_new_tokens=8, seed=3, llm_kwargs=ENGINE_ARGS)
    yield sampler
    sampler.close()


def test_counts_seeds_and_finish_reasons(engine, models):
    """K samples per prompt in order, decoded text, no EOS in the ids, a finish reason that matches
    the length; the same seed reproduces the samples, also for a subset of prompts with their
    keys; another seed changes them; samples of one prompt differ at T = 1."""
    engine.update_weights(str(models["a"]))
    tokenizer = engine.tokenizer
    engine.seed = 3
    results = engine.generate(PROMPTS, 4, progress=False)
    assert [len(row) for row in results] == [4, 4, 4]
    for p, row in enumerate(results):
        for j, g in enumerate(row):
            assert (g.prompt_index, g.sample_index) == (p, j)
            assert g.text == tokenizer.decode(g.token_ids)
            assert tokenizer.eos_token_id not in g.token_ids
            assert (g.finish_reason == "length") == (len(g.token_ids) == 8)
        assert len({tuple(g.token_ids) for g in row}) == 4
    assert engine.generate(PROMPTS, 4, progress=False) == results
    assert engine.generate(PROMPTS[1:], 4, progress=False, prompt_indices=[1, 2]) == results[1:]
    engine.seed = 4
    other = engine.generate(PROMPTS, 4, progress=False)
    assert all(a.token_ids != b.token_ids for ra, rb in zip(results, other) for a, b in zip(ra, rb))


def test_greedy_equals_transformers_and_weights_update_in_place(engine, models, tmp_path):
    """Greedy decoding equals the transformers sampler's for model A; after update_weights(B) (in
    place: the same engine object) it equals B's, which differs from A's; A' is A with a second
    EOS id (A's first greedy token for the first prompt) in its generation config: after
    update_weights(A') that prompt stops at once with an empty response and the others stop where
    that token comes, as with transformers. The in-place update's time is printed (never asserted;
    bench/sampling_engines.py compares it with a rebuild)."""
    engine.temperature = 0.0
    try:
        engine.update_weights(str(models["a"]))
        expected_a = transformers_greedy(models["a"], 8)
        got = engine.generate(PROMPTS, 2, progress=False)
        assert [(row[0].token_ids, row[0].finish_reason) for row in got] == expected_a
        assert all(g.token_ids == row[0].token_ids for row in got for g in row)

        llm = engine.llm
        start = time.perf_counter()
        engine.update_weights(str(models["b"]))
        in_place = time.perf_counter() - start
        assert engine.llm is llm
        expected_b = transformers_greedy(models["b"], 8)
        assert expected_b != expected_a
        assert [(row[0].token_ids, row[0].finish_reason) for row in engine.generate(PROMPTS, 1, progress=False)] \
            == expected_b

        stop_token = expected_a[0][0][0]
        with_stop = save_sampling_model(tmp_path / "a_stop", seed=0, extra_eos=stop_token)
        engine.update_weights(str(with_stop))
        assert stop_token in engine.eos_ids and engine.tokenizer.eos_token_id in engine.eos_ids
        expected_stop = transformers_greedy(with_stop, 8)
        assert expected_stop[0] == ([], "stop")
        got = [(row[0].token_ids, row[0].finish_reason) for row in engine.generate(PROMPTS, 1, progress=False)]
        assert got == expected_stop
        assert all(stop_token not in ids for ids, _ in got)
        print(f"\nweight update in place: {in_place:.2f} s")
    finally:
        engine.temperature = 1.0

