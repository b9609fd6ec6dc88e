"""Preference oracles: the contract P(a ≻ b) + P(b ≻ a) = 1, hand-derived values, config errors.

The HTTP judge has its own file (test_http_judge.py).
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nashalign import NashalignError
from nashalign.judges.model_judges import PairModelOracle, RewardModelOracle
from nashalign.judges.oracles import (
    GameOracle,
    PreferenceOracle,
    ScoringOracle,
    export_for_annotation,
    pair_id,
)
from nashalign.judges.registry import build_oracle

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain gradient descent."]
FIRST = ["Paris is the capital of France.", "The sea is wide and blue.", "It moves against the gradient."]
SECOND = ["no", "Rock beats scissors, scissors beat paper, and paper beats rock.", "maybe"]


def _assert_symmetric(oracle, prompts, first, second):
    forward = oracle.prob(prompts, first, second)
    backward = oracle.prob(prompts, second, first)
    assert forward.dtype == np.float64 and forward.shape == (len(first),)
    np.testing.assert_allclose(forward + backward, 1.0, atol=1e-6)
    return forward


# --- game -------------------------------------------------------------------------------------------


@st.composite
def games(draw):
    n = draw(st.integers(2, 6))
    upper = draw(st.lists(st.floats(0.0, 1.0), min_size=n * n, max_size=n * n))
    P = np.triu(np.reshape(upper, (n, n)), 1)
    P = P + np.tril(1.0 - P.T, -1) + 0.5 * np.eye(n)
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), min_size=1, max_size=10))
    return P, pairs


@settings(max_examples=40, deadline=None)
@given(games())
def test_game_oracle_reads_the_matrix_and_is_symmetric(game):
    """P(responses[i] ≻ responses[j]) = P[i, j] for any valid matrix, and the contract holds."""
    P, pairs = game
    responses = [f"response {i}" for i in range(len(P))]
    oracle = build_oracle({"type": "game", "responses": responses, "P": P.tolist()})
    i, j = np.array(pairs).T
    first, second = [responses[a] for a in i], [responses[b] for b in j]
    got = _assert_symmetric(oracle, ["x"] * len(i), first, second)
    np.testing.assert_allclose(got, P[i, j], atol=1e-12)
    assert oracle.counts.comparisons == 2 * len(i)
    assert isinstance(oracle, PreferenceOracle)


def test_game_invalid_responses_error_or_lose():
    """Policy "worst": an unknown text loses to every known one (P = 0, and 1 the other way) and ties
    (½) with another unknown text; policy "error" names the text."""
    P = [[0.5, 0.9], [0.1, 0.5]]
    strict = GameOracle(["rock", "paper"], P)
    with pytest.raises(NashalignError, match="'scissors' is not one of the game's 2 responses"):
        strict.prob(["x"], ["rock"], ["scissors"])
    worst = build_oracle({"type": "game", "responses": ["rock", "paper"], "P": P, "invalid": "worst"})
    got = worst.prob(["x"] * 4, ["rock", "scissors", "scissors", " paper "], ["scissors", "paper", "lizard", "rock"])
    np.testing.assert_allclose(got, [1.0, 0.0, 0.5, 0.1])


def test_game_from_a_game_file(tmp_path):
    path = tmp_path / "rps.json"
    path.write_text(json.dumps({"P": [[0.5, 0, 1], [1, 0.5, 0], [0, 1, 0.5]], "names": ["rock", "paper", "scissors"]}))
    oracle = build_oracle({"type": "game", "path": str(path)})
    np.testing.assert_allclose(oracle.prob(["x"] * 3, ["rock", "paper", "scissors"], ["scissors", "rock", "paper"]), 1.0)
    path.write_text(json.dumps({"P": [[0.5, 0.5], [0.5, 0.5]]}))
    with pytest.raises(NashalignError, match="needs 'names'"):
        build_oracle({"type": "game", "path": str(path)})


def test_game_rejects_a_matrix_that_is_not_a_preference():
    with pytest.raises(NashalignError, match=r"P\[0\]\[1\] \+ P\[1\]\[0\] = 1\.3"):
        build_oracle({"type": "game", "responses": ["a", "b"], "P": [[0.5, 0.9], [0.4, 0.5]]})
    with pytest.raises(NashalignError, match="one row per response"):
        build_oracle({"type": "game", "responses": ["a", "b", "c"], "P": [[0.5, 0.5], [0.5, 0.5]]})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "game", "responses": ["a"], "P": [[0.5]], "colour": 1}, r"oracle: colour: unknown key \(allowed here: responses, P, path, invalid, strip\)"),
        ({"type": "chess"}, r"oracle: type: expected one of game, python, labels, reward_model, pair_model, http_judge, got \'chess\'"),
        ({"responses": ["a"]}, r"oracle: type: expected one of .*, got None"),
        ({"type": "game", "responses": ["a", "b"], "P": [[0.5, 0.5], [0.5, 0.5]], "strip": "yes"}, r"oracle: strip: expected true or false, got \'yes\'"),
        ({"type": "game", "responses": "ab", "P": [[0.5]]}, r"oracle: responses: expected a list, got \'ab\'"),
        ({"type": "game", "responses": ["a", "b"]}, r"oracle: responses: a game oracle needs responses and P, or path"),
        ({"type": "game", "path": "g.json", "P": [[0.5]]}, r"oracle: path: give either path or responses and P, not both"),
        ({"type": "python"}, r"oracle: function: required key missing"),
        ({"type": "python", "function": "no_colon"}, r"oracle: function: expected 'module:function', got 'no_colon'"),
        ({"type": "python", "function": "nashalign_no_such_module:f"}, r"cannot import module 'nashalign_no_such_module'"),
        ({"type": "python", "function": "math:no_such_function"}, r"module 'math' has no attribute 'no_such_function'"),
        ({"type": "python", "function": "math:pi"}, r"'math:pi' is not callable"),
        ({"type": "reward_model", "path": "/nonexistent/model", "dtype": "float8"}, r"oracle: dtype: expected one of \'auto\', \'float32\', \'bfloat16\', \'float16\', got \'float8\'"),
        ({"type": "pair_model", "path": "/nonexistent/model", "batch_size": 0}, r"oracle: batch_size: expected an integer >= 1, got 0"),
        ({"type": "reward_model", "path": "/nonexistent/model"}, r"oracle: path: no model directory '/nonexistent/model'"),
    ],
)
def test_build_oracle_errors_name_the_key(spec, message):
    with pytest.raises(NashalignError, match=message):
        build_oracle(spec)


def test_oracle_rejects_ragged_batches():
    oracle = GameOracle(["a", "b"], [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(NashalignError, match="equal lengths, got 2, 1, 1"):
        oracle.prob(["x", "y"], ["a"], ["b"])


# --- python plugin ----------------------------------------------------------------------------------


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """A module `nashalign_test_plugin` whose judge prefers the first position and longer texts."""
    (tmp_path / "nashalign_test_plugin.py").write_text(
        textwrap.dedent(
            """
            import hashlib

            def biased(prompts, first, second, *, strength=1.0):
                # q = 0.8 if the first text is longer, else 0.3 (position bias: 0.8 + 0.3 != 1)
                return [0.8 * strength if len(a) > len(b) else 0.3 for a, b in zip(first, second)]

            def hashed(prompts, first, second):
                return [hashlib.sha256((p + a + "|" + b).encode()).digest()[0] / 255 for p, a, b in zip(prompts, first, second)]

            def wrong_shape(prompts, first, second):
                return [[0.5, 0.5]] * len(first)

            def out_of_range(prompts, first, second):
                return [1.5] * len(first)

            def nan(prompts, first, second):
                return [float("nan")] * len(first)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nashalign_test_plugin"


def test_python_plugin_is_symmetrized(plugin):
    """q(long, short) = 0.8, q(short, long) = 0.3, so with both orders
    P(long ≻ short) = ½(0.8 + 1 − 0.3) = 0.75 and P(short ≻ long) = ½(0.3 + 1 − 0.8) = 0.25 (2 judge
    calls per comparison). With both_orders false the canonical order is sorted text: "long answer" <
    "short", so P(long ≻ short) = q(long, short) = 0.8 and P(short ≻ long) = 1 − 0.8 = 0.2 (1 call)."""
    oracle = build_oracle({"type": "python", "function": f"{plugin}:biased"})
    np.testing.assert_allclose(oracle.prob(["p", "p"], ["long answer", "short"], ["short", "long answer"]), [0.75, 0.25])
    assert oracle.counts.judge_calls == 4
    once = build_oracle({"type": "python", "function": f"{plugin}:biased", "both_orders": False})
    np.testing.assert_allclose(once.prob(["p", "p"], ["long answer", "short"], ["short", "long answer"]), [0.8, 0.2])
    assert once.counts.judge_calls == 2
    bound = build_oracle({"type": "python", "function": f"{plugin}:biased", "kwargs": {"strength": 0.5}})
    # q(long, short) = 0.4: P = ½(0.4 + 1 − 0.3) = 0.55
    np.testing.assert_allclose(bound.prob(["p"], ["long answer"], ["short"]), [0.55])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8), st.text(max_size=8)), min_size=1, max_size=6),
    st.booleans(),
)
def test_python_plugin_contract_holds_for_any_texts(triples, both_orders):
    """An arbitrary (hash-based) judge becomes an oracle with P(a ≻ b) + P(b ≻ a) = 1, P(a ≻ a) = ½."""
    import sys
    import types

    module = types.ModuleType("nashalign_hashed_judge")
    module.judge = lambda prompts, first, second: [
        (hash((p, a, b)) % 1000) / 999 for p, a, b in zip(prompts, first, second)
    ]
    sys.modules[module.__name__] = module
    try:
        oracle = build_oracle({"type": "python", "function": "nashalign_hashed_judge:judge", "both_orders": both_orders})
        prompts, first, second = map(list, zip(*triples))
        got = _assert_symmetric(oracle, prompts, first, second)
        same = [a == b for a, b in zip(first, second)]
        np.testing.assert_array_equal(got[same], 0.5)
    finally:
        del sys.modules[module.__name__]


@pytest.mark.parametrize(
    ("function", "message"),
    [("wrong_shape", r"returned shape \(4, 2\), expected \(4,\)"), ("out_of_range", "returned 1.5"), ("nan", "returned nan")],
)
def test_python_plugin_output_is_checked(plugin, function, message):
    oracle = build_oracle({"type": "python", "function": f"{plugin}:{function}"})
    with pytest.raises(NashalignError, match=f"python {plugin}:{function}: {message}"):
        oracle.prob(["p", "p"], ["a", "b"], ["b", "c"])


# --- labels -----------------------------------------------------------------------------------------


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_labels_export_then_read_back(tmp_path):
    """Unlabeled pairs are exported and the call stops naming the file; labels then give
    'first' → 1, 'second' → 0, 'tie' → ½, 0.7 → 0.7, the reversed order 1 − p, and two labels of one
    pair (one per order) average: ½(0.9 + (1 − 0.5)) = 0.7."""
    path = tmp_path / "labels.jsonl"
    oracle = build_oracle({"type": "labels", "path": str(path)})
    prompts, first, second = ["p1", "p2", "p3", "p4"], ["a", "b", "c", "d"], ["x", "y", "z", "w"]
    with pytest.raises(NashalignError, match=rf"{path}: 4 of 4 pairs have no label \(4 rows added\)"):
        oracle.prob(prompts, first, second)
    rows = _rows(path)
    assert [set(row) for row in rows] == [{"id", "prompt", "first", "second", "label"}] * 4
    assert rows[1] == {"id": pair_id("p2", "b", "y"), "prompt": "p2", "first": "b", "second": "y", "label": ""}
    for row, label in zip(rows, ["first", "second", "tie", 0.7]):
        row["label"] = label
    rows.append({"id": "extra", "prompt": "p5", "first": "e", "second": "v", "label": 0.9})
    rows.append({"id": "extra2", "prompt": "p5", "first": "v", "second": "e", "label": 0.5})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    np.testing.assert_allclose(oracle.prob(prompts, first, second), [1.0, 0.0, 0.5, 0.7])
    np.testing.assert_allclose(oracle.prob(prompts, second, first), [0.0, 1.0, 0.5, 0.3])
    np.testing.assert_allclose(oracle.prob(["p5"], ["e"], ["v"]), [0.7])


def test_labels_missing_or_invalid_name_the_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    export_for_annotation(path, ["p1", "p2"], ["a", "b"], ["x", "y"])
    assert export_for_annotation(path, ["p1", "p2"], ["x", "b"], ["a", "y"]) == 0  # known in either order
    rows = _rows(path)
    rows[0]["label"] = "first"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    oracle = build_oracle({"type": "labels", "path": str(path)})
    with pytest.raises(NashalignError, match=rf"{path}:2: 1 of 2 pairs have no label \(0 rows added\)"):
        oracle.prob(["p1", "p2"], ["a", "b"], ["x", "y"])
    rows[1]["label"] = "better"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(NashalignError, match=rf"{path}:2: label: expected 'first', 'second', 'tie' or a probability in \[0, 1\], got 'better'"):
        oracle.prob(["p1"], ["a"], ["x"])
    path.write_text(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(NashalignError, match=rf"{path}:2: not valid JSON"):
        oracle.prob(["p1"], ["a"], ["x"])
    path.write_text(json.dumps({"prompt": "p", "first": "a", "label": 1}) + "\n")
    with pytest.raises(NashalignError, match=rf"{path}:1: missing field 'second'"):
        oracle.prob(["p1"], ["a"], ["x"])


# --- reward model -----------------------------------------------------------------------------------


def _reward_model(tokenizer, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
        # a larger head spreads the rewards so that σ(r_a − r_b) is visibly away from ½
        model.score.weight.data.mul_(50.0)
    return model.eval()


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_tokenizer):
    directory = tmp_path_factory.mktemp("reward_model")
    _reward_model(tiny_tokenizer).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def test_reward_model_is_sigmoid_of_reward_difference(reward_model_dir):
    """P(a ≻ b) = σ(r_a − r_b) with r the model's logit on the chat-formatted text, computed here one
    text at a time (no padding), while the oracle scores length-sorted, padded batches of 2."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    oracle = build_oracle({"type": "reward_model", "path": str(reward_model_dir), "batch_size": 2, "device": "cpu"})
    assert isinstance(oracle, ScoringOracle)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)

    def reward(prompt, response):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, 0].item()

    expected = [1 / (1 + math.exp(reward(p, b) - reward(p, a))) for p, a, b in zip(PROMPTS, FIRST, SECOND)]
    got = _assert_symmetric(oracle, PROMPTS, FIRST, SECOND)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.ptp(got) > 0.05  # the rewards differ, so the check above is not ½ against ½
    np.testing.assert_allclose(oracle.score(PROMPTS, FIRST), [reward(p, a) for p, a in zip(PROMPTS, FIRST)], atol=1e-5)
    assert oracle.counts.judge_calls == 6  # 6 distinct (prompt, response) scored once, then memoized
    assert oracle.counts.comparisons == 6


def test_reward_model_without_chat_template_scores_the_text_pair(tiny_tokenizer):
    """Without a chat template the input is the tokenizer's (prompt, response) pair encoding."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    model = _reward_model(tokenizer)
    oracle = RewardModelOracle(model, tokenizer, batch_size=3)
    with torch.no_grad():
        rewards = [
            model(torch.tensor([tokenizer(p, r)["input_ids"]])).logits[0, 0].item() for p, r in zip(PROMPTS, FIRST)
        ]
    np.testing.assert_allclose(oracle.score(PROMPTS, FIRST), rewards, atol=1e-5)


def test_reward_model_needs_one_label(tiny_tokenizer):
    with pytest.raises(NashalignError, match="num_labels=2; expected 1"):
        RewardModelOracle(_reward_model(tiny_tokenizer, num_labels=2), tiny_tokenizer)


# --- pairwise causal-LM judge -----------------------------------------------------------------------


def test_pair_model_is_symmetrized_label_softmax(tiny_model_dir):
    """q(a, b) = softmax(ℓ_A, ℓ_B)[A] at the next position after the chat-formatted template, computed
    here one unpadded sequence at a time; the oracle returns P = ½(q(a, b) + 1 − q(b, a)) from
    left-padded batches of 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = "Q: {prompt}\nA: {first}\nB: {second}\nBetter:"
    oracle = build_oracle(
        {"type": "pair_model", "path": str(tiny_model_dir), "template": template, "batch_size": 2, "device": "cpu"}
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    label_ids = [tokenizer.encode("A", add_special_tokens=False)[0], tokenizer.encode("B", add_special_tokens=False)[0]]

    def q(prompt, a, b):
        messages = [{"role": "user", "content": template.format(prompt=prompt, first=a, second=b)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1, label_ids].double()
        return torch.softmax(logits, -1)[0].item()

    expected = [0.5 * (q(p, a, b) + 1 - q(p, b, a)) for p, a, b in zip(PROMPTS, FIRST, SECOND)]
    got = _assert_symmetric(oracle, PROMPTS, FIRST, SECOND)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(oracle.judge(PROMPTS, FIRST, SECOND), [q(*t) for t in zip(PROMPTS, FIRST, SECOND)], atol=1e-6)
    assert oracle.counts.judge_calls == 2 * 6 + 3


def test_pair_model_options(tiny_tokenizer, tiny_model):
    with pytest.raises(NashalignError, match=r"pair_model: labels: 'Paris is the' is \d+ tokens for this tokenizer; each label must be one token"):
        PairModelOracle(tiny_model, tiny_tokenizer, labels=["Paris is the", "B"])
    with pytest.raises(NashalignError, match=r"pair_model: template: the template must use exactly \{first\}, \{prompt\}, \{second\}"):
        PairModelOracle(tiny_model, tiny_tokenizer, template="{prompt} {first}")
    once = PairModelOracle(tiny_model, tiny_tokenizer, both_orders=False, chat_template=False)
    _assert_symmetric(once, PROMPTS, FIRST, SECOND)
    assert once.counts.judge_calls == 6  # one query per comparison
    np.testing.assert_array_equal(once.prob(PROMPTS[:1], FIRST[:1], FIRST[:1]), [0.5])
    assert once.counts.judge_calls == 6  # identical texts are not sent to the judge
