"""SRPO: the revision prompt, the six sequences of a pair (exact against scoring alone, through the
cache), and self-revision at inference (`nashalign revise`: rounds written, resumed, compared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nashalign import NashalignError
from nashalign.cli import main
from nashalign.config import TrainConfig, from_mapping
from nashalign.data.artifacts import read_jsonl, write_jsonl
from nashalign.data.tokenization import TokenizedPair
from nashalign.train import scoring
from nashalign.train.loop import build_loss, train_pairs
from nashalign.train.objectives import SRPOObjective
from nashalign.train.srpo import compare_rounds, revision_format, revision_pairs, round_file
from test_train import alone_logp, make_config, make_pairs, model_dirs, tokenizer  # noqa: F401 (fixtures)

PLUGINS = Path(__file__).parent / "plugins"


def test_default_revision_prompt_is_the_next_chat_turn(tiny_tokenizer):
    """With a chat template, T(x, y) for the rendered prompt x of [user: q] is exactly the rendering of
    [user: q, assistant: y, user: instruction] with the generation prompt."""
    form = revision_format(tiny_tokenizer, "Make it better.")
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Count {to} 3"}], tokenize=False,
                                                add_generation_prompt=True)
    expected = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count {to} 3"}, {"role": "assistant", "content": "1 2 {3}"},
         {"role": "user", "content": "Make it better."}], tokenize=False, add_generation_prompt=True)
    assert form.text(prompt, "1 2 {3}") == expected


def test_revision_prompt_without_chat_template_and_with_a_template(tiny_tokenizer):
    plain = type("Plain", (), {"chat_template": None})()
    assert revision_format(plain, "Fix it.").text("Q:", " A") == "Q: A\n\nFix it.\n"
    custom = revision_format(tiny_tokenizer, template="Question: {prompt}\nDraft: {response}\nBetter:")
    assert custom.text("2+2?", "5") == "Question: 2+2?\nDraft: 5\nBetter:"
    for bad in ("{prompt} only", "{prompt}{response}{extra}", "{prompt}{response"):
        with pytest.raises(NashalignError, match="revision_template"):
            revision_format(tiny_tokenizer, template=bad)
    with pytest.raises(NashalignError, match=r"loss\.revision_template: expected a format string"):
        from_mapping(TrainConfig, {"model": {"name_or_path": "m"},
                                   "loss": {"name": "srpo", "revision_template": "{response}"}})
    with pytest.raises(NashalignError, match=r"loss\.alpha: expected a float >= 0 and <= 1, got 1.5"):
        from_mapping(TrainConfig, {"model": {"name_or_path": "m"}, "loss": {"name": "srpo", "alpha": 1.5}})


def test_revision_pairs_keep_the_responses_and_revise_each(tokenizer):  # noqa: F811
    """3N pairs in three blocks; every block keeps y_w, y_l token for token; block 1's prompt is
    T(x, y_l) and block 2's T(x, y_w), tokenized from the decoded prompt and response."""
    pairs = make_pairs(tokenizer, 3, seed=5)
    form = revision_format(tokenizer)
    scored = revision_pairs(pairs, tokenizer, form)
    assert len(scored) == 9 and scored[:3] == pairs
    for i, pair in enumerate(pairs):
        for block, side in ((1, "rejected"), (2, "chosen")):
            revised = scored[block * 3 + i]
            assert (revised.chosen_ids, revised.rejected_ids) == (pair.chosen_ids, pair.rejected_ids)
            response = getattr(pair, f"{side}_ids")[:-1]  # without its EOS
            text = form.text(tokenizer.decode(pair.prompt_ids), tokenizer.decode(response))
            assert revised.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(response) in tokenizer.decode(revised.prompt_ids)


@pytest.mark.parametrize("packing", [False, True])
def test_srpo_batch_losses_equal_the_six_sequences_scored_alone(model_dirs, tokenizer, tmp_path, packing):  # noqa: F811
    """Through the trainer's path (SRPOObjective.collate + batch_losses, padded or packed), each pair's
    loss equals srpo's formula on the six log-probs of policy and a different reference, each scored
    alone and unpadded: h(y|c) = log π(y|c) − log π_ref(y|c) (float32, 1e-4)."""
    from transformers import AutoModelForCausalLM

    pairs = make_pairs(tokenizer, 3, seed=7)
    policy = AutoModelForCausalLM.from_pretrained(model_dirs["policy"])
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["ref"])
    config = make_config(model_dirs, tmp_path, loss={"name": "srpo", "beta": 0.5, "alpha": 0.3},
                         data={"packing": packing})
    objective = SRPOObjective(config, pairs, tokenizer)
    scored = objective.scored_pairs
    beta, alpha = 0.5, 0.3
    expected, references = [], {}
    for i in range(3):
        def h(block, side, i=i):
            pair = scored[block * 3 + i]
            response = getattr(pair, f"{side}_ids")
            return alone_logp(policy, pair.prompt_ids, response) - alone_logp(ref, pair.prompt_ids, response)

        si = (0.5 - beta * (h(1, "chosen") - h(1, "rejected"))) ** 2 + (0.5 - beta * (h(2, "chosen") - h(2, "rejected"))) ** 2
        gen = (beta * (h(1, "chosen") + h(0, "chosen") - h(2, "rejected") - h(0, "rejected")) - 1) ** 2
        expected.append(alpha * si + (1 - alpha) * gen)
    ref_logps = {side: torch.stack([alone_logp(ref, p.prompt_ids, getattr(p, f"{side}_ids")) for p in scored]).float()
                 for side in ("chosen", "rejected")}
    references = objective.reference_columns({"ref": ref_logps})
    batch = objective.collate([0, 1, 2], tokenizer.pad_token_id)
    with torch.no_grad():
        losses, policy_logps = objective.batch_losses(policy, batch, build_loss(config.loss), references)
    torch.testing.assert_close(losses, torch.stack(expected).float(), rtol=1e-4, atol=1e-4)
    assert policy_logps["chosen_logps"].shape == (3,)


def test_srpo_reference_log_probs_go_through_the_cache(model_dirs, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """A separate reference scores the 3N pairs (six sequences each) once; a second run on the same
    cache scores nothing."""
    forwards = []
    real_load = scoring.load_model

    def spy(name_or_path, model_config):
        model = real_load(name_or_path, model_config)
        model.register_forward_hook(lambda m, a, kw, out: forwards.append(kw["input_ids"].shape[0] // 2),
                                    with_kwargs=True)
        return model

    monkeypatch.setattr(scoring, "load_model", spy)
    pairs = make_pairs(tokenizer, 4, seed=9)
    for run in ("a", "b"):
        config = make_config(model_dirs, tmp_path / run, loss={"name": "srpo"},
                             model={"ref_name_or_path": str(model_dirs["ref"])},
                             data={"cache_dir": str(tmp_path / "cache")}, optim={"per_device_batch_size": 4, "max_steps": 1})
        train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path / run, tokenizer=tokenizer)
        assert sum(forwards) == (12 if run == "a" else 0)
        forwards.clear()


def test_revise_command_round_trips_and_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`nashalign revise --rounds 2`: round_0..2.jsonl, one row per prompt; round k's revision prompt is
    T(x, round k−1's response) and its response what the model generated from it. Run again: nothing
    is generated. Remove round 2: only round 2 is generated again, identically (seeded). --oracle
    writes winrate.json, the win rate of round 2 over round 0 (an average of the judge's P). Other
    prompts in the same output directory are refused."""
    from transformers import AutoTokenizer

    from nashalign.sampling.engines import TransformersSampler

    monkeypatch.syspath_prepend(str(PLUGINS))
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, ({"prompt": [{"role": "user", "content": f"Count up from {i}."}]} for i in range(3)))
    oracle = tmp_path / "oracle.yaml"
    oracle.write_text("type: python\nfunction: vowel_judge:prefer_vowels\n")
    calls = []
    real_generate = TransformersSampler.generate

    def counting(self, texts, n, **kwargs):
        calls.append(list(texts))
        return real_generate(self, texts, n, **kwargs)

    monkeypatch.setattr(TransformersSampler, "generate", counting)
    out = tmp_path / "revisions"
    arguments = ["revise", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--rounds", "2",
                 "--output", str(out), "--max-new-tokens", "5", "--oracle", str(oracle)]
    assert main(arguments) == 0
    rounds = [read_jsonl(round_file(out, k)) for k in range(3)]
    assert len(calls) == 3 and all(len(rows) == 3 for rows in rounds)
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    form = revision_format(loaded)
    rendered = [loaded.apply_chat_template([{"role": "user", "content": f"Count up from {i}."}], tokenize=False,
                                              add_generation_prompt=True) for i in range(3)]
    assert calls[0] == rendered and all(row["revision_prompt"] is None for row in rounds[0])
    for k in (1, 2):
        expected = [form.text(x, row["response"]) for x, row in zip(rendered, rounds[k - 1])]
        assert calls[k] == expected == [row["revision_prompt"] for row in rounds[k]]
    result = json.loads((out / "winrate.json").read_text())
    assert result["rounds"] == [0, 2] and result["prompts"] == 3
    assert 0 <= result["win_rate"]["low"] <= result["win_rate"]["estimate"] <= result["win_rate"]["high"] <= 1

    calls.clear()
    assert main(arguments) == 0
    assert calls == []
    round_file(out, 2).unlink()
    assert main(arguments) == 0
    assert len(calls) == 1 and read_jsonl(round_file(out, 2)) == rounds[2]
    capsys.readouterr()

    write_jsonl(prompts, ({"prompt": f"Other prompt {i}."} for i in range(3)))
    assert main(arguments) == 2
    assert "round_0.jsonl: its rows answer other prompts than these 3" in capsys.readouterr().err


def test_compare_rounds_is_the_mean_judged_preference():
    """A judge preferring the longer answer (P = 1, 0, or ½ on ties): round N is longer on 2 prompts,
    shorter on 1, equal on 1 → win rate (1 + 1 + 0 + ½)/4 = 0.625."""
    from nashalign.judges.oracles import PythonOracle

    def longer(prompts, first, second):
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]

    first = [{"prompt": f"p{i}", "response": r} for i, r in enumerate(["a", "bb", "ccc", "dd"])]
    last = [{"prompt": f"p{i}", "response": r} for i, r in enumerate(["aa", "bbb", "c", "ee"])]
    assert compare_rounds(PythonOracle(longer), first, last).estimate == pytest.approx(0.625)
    with pytest.raises(NashalignError, match="different prompts"):
        compare_rounds(PythonOracle(longer), first, last[::-1])


def test_srpo_refuses_previous_iterate_log_probs(tokenizer, tmp_path, model_dirs):  # noqa: F811
    pairs = [TokenizedPair([5, 6], [7, 2], [8, 2], "a")]
    objective = SRPOObjective(make_config(model_dirs, tmp_path, loss={"name": "srpo"}), pairs, tokenizer)
    with pytest.raises(NashalignError, match="π_ref only"):
        objective.reference_columns({"ref": {}, "prev": {}})
