"""`nashalign eval`: win rate, length-controlled win rate, KL, and ranking accuracy on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nashalign.cli import main
from nashalign.data.artifacts import write_jsonl

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, ({"prompt": [{"role": "user", "content": f"Say something {i}."}]} for i in range(6)))
    return path


def test_win_rate_of_a_model_against_itself(tmp_path, tiny_model_dir, prompts_file, monkeypatch, capsys):
    """Policy = baseline = reference, sampled with the same seed: every prompt gets the same response
    from both, so the oracle gives P = σ(0)/2 + 1/4 = 1/2 on each, the win rate and every bootstrap
    resample are exactly 1/2 (as is the length-controlled rate: no length difference to control
    for: the responses are the same), and KL(π‖π_ref) is exactly 0."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    oracle = tmp_path / "oracle.yaml"
    oracle.write_text("oracle:\n  type: python\n  function: vowel_judge:prefer_vowels\n")
    out = tmp_path / "result.json"
    status = main(["eval", "winrate", "--policy", str(tiny_model_dir), "--baseline", str(tiny_model_dir),
                   "--prompts", str(prompts_file), "--oracle", str(oracle), "--max-new-tokens", "6",
                   "--output", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["prompts"] == 6
    assert result["win_rate"] == {"estimate": 0.5, "low": 0.5, "high": 0.5, "confidence": 0.95}
    assert result["length_controlled_win_rate"] == {"estimate": 0.5, "low": 0.5, "high": 0.5}
    assert result["policy_length"]["n"] == result["baseline_length"]["n"] == 6
    assert result["kl_to_ref"]["estimate"] == 0.0 and result["kl_to_ref"]["stderr"] == 0.0


def test_baseline_responses_file_must_have_one_response_per_prompt(tmp_path, tiny_model_dir, prompts_file, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(PLUGINS))
    oracle = tmp_path / "oracle.yaml"
    oracle.write_text("type: python\nfunction: vowel_judge:prefer_vowels\n")
    baseline = tmp_path / "baseline.jsonl"
    write_jsonl(baseline, [{"response": "hello"}] * 5)
    status = main(["eval", "winrate", "--policy", str(tiny_model_dir), "--baseline", str(baseline),
                   "--prompts", str(prompts_file), "--oracle", str(oracle), "--max-new-tokens", "4"])
    assert status == 2
    err = capsys.readouterr().err
    assert "baseline.jsonl: 5 responses, expected one per prompt (6)" in err and "Traceback" not in err


def test_ranking_accuracy_and_idealized(tmp_path, tiny_model_dir, capsys):
    """With --ref equal to the model every implicit-reward margin is 0, counted ½. With β → 0 the DPO
    optimum ranks by logit(p) alone: p = 0.9 everywhere gives idealized accuracy 1, p = 0.1 gives 0."""
    data = tmp_path / "pairs.jsonl"
    for p, expected in ((0.9, 1.0), (0.1, 0.0)):
        write_jsonl(data, ({"prompt": f"Q{i}: ", "chosen": "yes", "rejected": "no no", "pref_prob": p} for i in range(4)))
        assert main(["eval", "ranking", "--model", str(tiny_model_dir), "--data", str(data),
                     "--ref", str(tiny_model_dir), "--beta", "1e-9"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["pairs"] == 4
        assert result["implicit_reward"] == 0.5
        assert result["idealized"] == expected
        assert 0 <= result["summed"] <= 1 and 0 <= result["length_normalized"] <= 1


def test_ranking_scores_responses_ending_with_the_models_stop_token(tmp_path, two_eos_model_dir, monkeypatch, capsys):
    """A model that stops on a second EOS id "<|eot|>" (its template ends turns with it, its tokenizer's
    eos_token is "</s>"): the pairs eval ranks are scored up to that "<|eot|>", as the model would
    produce them, not through the template's newline to an appended "</s>"."""
    from transformers import AutoTokenizer

    from nashalign.commands import eval as eval_command

    scored = []
    real = eval_command._pair_logps

    def recording(model, tokenizer, pairs, batch_size):
        scored.extend(pairs)
        return real(model, tokenizer, pairs, batch_size)

    monkeypatch.setattr(eval_command, "_pair_logps", recording)
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
                        "rejected": [{"role": "assistant", "content": "no"}]}])
    assert main(["eval", "ranking", "--model", str(two_eos_model_dir), "--data", str(data)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(two_eos_model_dir)
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    (pair,) = scored
    assert pair.chosen_ids == tokenizer("yes", add_special_tokens=False)["input_ids"] + [eot]
    assert json.loads(capsys.readouterr().out)["pairs"] == 1
