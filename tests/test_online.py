"""The online loop end to end on the tiny model: stages, artifacts, summary rows, and crash safety.

The crash tests run `nashalign online` in a subprocess, SIGKILL it once during sampling, once during
judging and once during training, rerun the same command, and compare the final weights with those of
an uninterrupted run with the same seed (bit-for-bit on CPU with one thread).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from nashalign.config import from_mapping
from nashalign.data.artifacts import read_json, read_jsonl, write_jsonl
from nashalign.judges.oracles import GameOracle
from nashalign.online.loop import OnlineConfig, run_online

ANSWERS = ["yes", "no", "maybe", "good", "bad"]
GAME_P = [  # a rock-paper-scissors cycle over yes/no/maybe, good/bad lose to all of them
    [0.5, 0.9, 0.1, 0.8, 0.8],
    [0.1, 0.5, 0.9, 0.8, 0.8],
    [0.9, 0.1, 0.5, 0.8, 0.8],
    [0.2, 0.2, 0.2, 0.5, 0.6],
    [0.2, 0.2, 0.2, 0.4, 0.5],
]


def _config(tmp_path: Path, model_dir: Path, *, prompts: int = 4, iterations: int = 2, oracle=None, **over):
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, ({"prompt": [{"role": "user", "content": f"Question {i}: yes or no?"}]}
                               for i in range(prompts)))
    mapping = {
        "model": {"name_or_path": str(model_dir)},
        "oracle": oracle,
        "run": {"name": "run", "dir": str(tmp_path / "runs"), "iterations": iterations, "seed": 3},
        "prompts": {"file": str(prompts_file)},
        "sampling": {"backend": "transformers", "samples_per_prompt": 4, "max_new_tokens": 6, "batch_size": 8},
        "pairs": {"method": "all_pairs"},
        "data": {"max_length": 64, "max_prompt_length": 32, "scoring_batch_size": 16},
        "loss": {"eta": 0.5, "tau": 0.1},
        "optim": {"lr": 1e-3, "epochs": 1, "per_device_batch_size": 4, "warmup_ratio": 0.0},
        "output": {"save_steps": 1, "report_to": "none"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        mapping[section][name] = value
    return mapping


def test_two_inpo_iterations_against_the_game_oracle(tmp_path, tiny_model_dir):
    """Two INPO iterations run end to end; every artifact exists; the trained weights moved; the
    summary rows are consistent with the artifacts."""
    config = from_mapping(OnlineConfig, _config(tmp_path, tiny_model_dir))
    oracle = GameOracle(ANSWERS, GAME_P, invalid="worst")
    result = run_online(config, oracle=oracle)
    run_dir = result.run_dir
    assert (run_dir / "config.yaml").exists()
    for t in range(2):
        it = run_dir / f"iter_{t}"
        generations = read_jsonl(it / "generations.jsonl")
        assert len(generations) == 4 * 4
        assert {(g["prompt_index"], g["sample_index"]) for g in generations} == {(p, j) for p in range(4) for j in range(4)}
        pairs = read_jsonl(it / "pairs.jsonl")
        stats = read_json(it / "pair_stats.json")
        assert stats["kept"] == len(pairs) > 0
        logps = load_file(it / "logps.safetensors")
        assert set(logps) == {"ref_chosen", "ref_rejected", "prev_chosen", "prev_rejected"}
        assert all(v.shape == (len(pairs),) for v in logps.values())
        if t == 0:  # π_0 is the reference: both scorings are the same model
            torch.testing.assert_close(logps["ref_chosen"], logps["prev_chosen"])
        assert (it / "train" / "final" / "model.safetensors").exists()
        summary = read_json(it / "summary.json")
        assert summary["iteration"] == t and summary["pairs_kept"] == len(pairs) and summary["prompts"] == 4
        # π_{t+1}'s sample j of each prompt against π_t's sample j, judged afresh from the artifacts
        following = read_jsonl(run_dir / f"iter_{t + 1}" / "generations.jsonl")
        judge = GameOracle(ANSWERS, GAME_P, invalid="worst")
        probs = judge.prob([str(g["prompt_index"]) for g in generations], [g["text"] for g in following],
                           [g["text"] for g in generations])
        assert [(g["prompt_index"], g["sample_index"]) for g in following] == \
            [(g["prompt_index"], g["sample_index"]) for g in generations]
        assert summary["win_rate_next_vs_current"] == pytest.approx(float(np.mean(probs)), abs=1e-12)
        assert summary["judge_calls"] > 0
    assert len(read_jsonl(run_dir / "iter_2" / "generations.jsonl")) == 16
    assert result.final_model == run_dir / "iter_1" / "train" / "final"
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.final_model / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert [row["iteration"] for row in result.summaries] == [0, 1]

    _check_scoring_roles(config, run_dir, tiny_model_dir)

    # A second call finds every artifact complete and recomputes nothing: the oracle is not asked again.
    calls = oracle.counts.judge_calls
    again = run_online(config, oracle=oracle)
    assert oracle.counts.judge_calls == calls
    assert again.summaries == result.summaries


def _check_scoring_roles(config, run_dir: Path, initial: Path) -> None:
    """π_ref stays π_0 and π_t is iteration t−1's trained weights: the log-probs each iteration
    trained with (logps.safetensors) equal those of its pairs scored afresh under the model loaded
    from π_0 (ref, every t) and from iter_{t-1}/train/final (prev, t ≥ 1; π_0 at t = 0); at t = 1
    the two roles differ (the check tells them apart)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nashalign.data.logprobs import pair_logps
    from nashalign.data.tokenization import collate_pairs
    from nashalign.online.loop import tokenized_pairs
    from nashalign.online.prompts import prompt_set

    tokenizer = AutoTokenizer.from_pretrained(initial)
    for t in range(config.run.iterations):
        it = run_dir / f"iter_{t}"
        rows = read_jsonl(it / "generations.jsonl")
        groups = [sorted((r for r in rows if r["prompt_index"] == p), key=lambda r: r["sample_index"])
                  for p in range(1 + max(r["prompt_index"] for r in rows))]
        pairs = tokenized_pairs(read_jsonl(it / "pairs.jsonl"), groups, prompt_set(config.prompts, t, tokenizer).ids,
                                tokenizer.eos_token_id)
        saved = load_file(it / "logps.safetensors")
        previous = initial if t == 0 else run_dir / f"iter_{t - 1}" / "train" / "final"
        for role, source in (("ref", initial), ("prev", previous)):
            model = AutoModelForCausalLM.from_pretrained(source).eval()
            with torch.no_grad():
                fresh = pair_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
            for side in ("chosen", "rejected"):
                torch.testing.assert_close(saved[f"{role}_{side}"], fresh[f"{side}_logps"], rtol=0, atol=1e-4,
                                           msg=f"iter_{t} {role}_{side}")
        if t >= 1:
            assert float((saved["ref_chosen"] - saved["prev_chosen"]).abs().max()) > 1e-2


def test_a_different_config_in_the_same_run_directory_is_refused(tmp_path, tiny_model_dir):
    from nashalign import NashalignError

    mapping = _config(tmp_path, tiny_model_dir, iterations=1, prompts=2)
    oracle = GameOracle(ANSWERS, GAME_P, invalid="worst")
    run_online(from_mapping(OnlineConfig, mapping), oracle=oracle)
    mapping["loss"]["eta"] = 0.7
    with pytest.raises(NashalignError, match="different config"):
        run_online(from_mapping(OnlineConfig, mapping), oracle=oracle)


def test_pairs_are_scored_on_the_eos_id_that_stopped_each_sample(tmp_path, two_eos_model_dir):
    """A Llama-3-style model stops on the second id of its generation config's EOS list ("<|eot|>",
    not the tokenizer's "</s>"): the generations record it, and the pairs built from them are scored
    and trained on sequences that end with it. Checked by hand: a pair's logps.safetensors entry under
    π_0 equals the summed log-probs of the response tokens followed by the recorded stop token,
    computed directly with the model, and the training phase's data fingerprint is that of the pairs
    built by hand the same way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mapping = _config(tmp_path, two_eos_model_dir, prompts=4, iterations=1, sampling__max_new_tokens=6)
    result = run_online(from_mapping(OnlineConfig, mapping), oracle=GameOracle(ANSWERS, GAME_P, invalid="worst"))
    tokenizer = AutoTokenizer.from_pretrained(two_eos_model_dir)
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot|>")
    it = result.run_dir / "iter_0"
    generations = read_jsonl(it / "generations.jsonl")
    assert {g["stop_token_id"] for g in generations if g["finish_reason"] == "stop"} == {eot}
    groups = {(g["prompt_index"], g["sample_index"]): g for g in generations}
    pairs = read_jsonl(it / "pairs.jsonl")
    logps = load_file(it / "logps.safetensors")
    model = AutoModelForCausalLM.from_pretrained(two_eos_model_dir).eval()
    prompts = [line["prompt"] for line in read_jsonl(tmp_path / "prompts.jsonl")]
    checked = 0
    for n, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            sample = groups[(pair["prompt_index"], pair[f"{side}_index"])]
            if sample["finish_reason"] != "stop":
                continue
            rendered = tokenizer.apply_chat_template(prompts[pair["prompt_index"]], tokenize=False,
                                                     add_generation_prompt=True)
            prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            response = sample["token_ids"] + [eot]
            ids = torch.tensor([prompt_ids + response])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum()
            torch.testing.assert_close(logps[f"ref_{side}"][n], expected, rtol=1e-4, atol=1e-4)
            assert eos not in response
            checked += 1
    assert checked > 0

    # Trained on the same sequences: the training phase's data fingerprint is that of the pairs built
    # here by hand from the generations, each stopped response followed by "<|eot|>".
    from nashalign.data.tokenization import TokenizedPair
    from nashalign.train.checkpoint import latest_checkpoint, load_trainer_state
    from nashalign.train.loop import _data_fingerprint

    def response_ids(sample):
        return sample["token_ids"] + ([eot] if sample["finish_reason"] == "stop" else [])

    by_hand = []
    for pair in pairs:
        rendered = tokenizer.apply_chat_template(prompts[pair["prompt_index"]], tokenize=False,
                                                 add_generation_prompt=True)
        chosen, rejected = (groups[(pair["prompt_index"], pair[f"{side}_index"])] for side in ("chosen", "rejected"))
        by_hand.append(TokenizedPair(tokenizer(rendered, add_special_tokens=False)["input_ids"], response_ids(chosen),
                                     response_ids(rejected), ""))
    state = load_trainer_state(latest_checkpoint(it / "train" / "checkpoints"))
    assert state["data"] == _data_fingerprint(by_hand)


# --------------------------------------------------------------------------- crash safety


def _cli_config(tmp_path: Path, model_dir: Path, name: str) -> Path:
    mapping = _config(
        tmp_path, model_dir, prompts=8, iterations=2,
        oracle={"type": "python", "function": "vowel_judge:prefer_vowels"},
        sampling__max_new_tokens=12, sampling__batch_size=4,
    )
    mapping["run"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "plugins"), env.get("PYTHONPATH", "")])
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    env.update(extra)
    return env


def _run(config: Path, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nashalign.cli", "online", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=600)


def _final_weights(run_dir: Path):
    return load_file(run_dir / "iter_1" / "train" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config = _cli_config(tmp_path, tiny_model_dir, "clean")
    done = _run(config, _env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "runs" / "clean"


def _artifact_rows(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): len(read_jsonl(p)) for p in sorted(run_dir.glob("iter_*/*.jsonl"))}


@pytest.mark.parametrize("stage", ["sampling", "judging", "training"])
def test_killed_run_resumes_to_the_same_weights(stage, tmp_path, tiny_model_dir, uninterrupted, kill_at_pause):
    """The loop is SIGKILLed at a fixed point of each stage (it pauses there, see
    tests/plugins/pause_point.py): iteration 1 about to sample; the first judge call of iteration
    0; iteration 0's training with its first checkpoint complete. The rerun ends with the
    uninterrupted run's weights, bit for bit, and the same artifacts."""
    config = _cli_config(tmp_path, tiny_model_dir, "crash")
    run_dir = tmp_path / "runs" / "crash"
    point = {"sampling": "sampling", "judging": "judging", "training": "checkpoint"}[stage]
    kill_at_pause(point, ["online", "--config", str(config)], _env(tmp_path))
    if stage == "sampling":
        assert (run_dir / "iter_0" / "train" / "final").exists()
        assert not (run_dir / "iter_1" / "generations.jsonl").exists()
    elif stage == "judging":
        assert (run_dir / "iter_0" / "generations.jsonl").exists()
        assert not (run_dir / "iter_0" / "pairs.jsonl").exists()
    else:
        checkpoints = sorted(p.name for p in (run_dir / "iter_0" / "train" / "checkpoints").glob("step_*/COMPLETE"))
        assert len(checkpoints) == 1
        assert not (run_dir / "iter_0" / "train" / "final").exists()

    resumed = _run(config, _env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean, crashed = _final_weights(uninterrupted), _final_weights(run_dir)
    assert clean.keys() == crashed.keys()
    for key in clean:
        torch.testing.assert_close(crashed[key], clean[key], rtol=0, atol=0)
    # No artifact is duplicated or lost: the same files with the same number of rows.
    assert _artifact_rows(run_dir) == _artifact_rows(uninterrupted)
    assert not list(run_dir.rglob(".tmp-*"))


# --------------------------------------------------------------------------- the plan against a real run


def _texts(path: Path) -> dict[tuple[int, int], str]:
    return {(row["prompt_index"], row["sample_index"]): row["text"] for row in read_jsonl(path)}


def test_dry_run_counts_equal_the_uninterrupted_run(uninterrupted, capsys):
    """`online --dry-run` on the run's config predicts, per iteration, the samples and comparisons
    exactly (all_pairs, K = 4: 6 per prompt; the win rate: N·K), and bounds the new tokens and judge
    calls; the judge calls are exactly 2 (both orders) per comparison of two different texts."""
    from nashalign.cli import main
    from nashalign.config import load_config
    from nashalign.online.plan import plan_online

    config_file = uninterrupted / "config.yaml"
    plan = plan_online(load_config(OnlineConfig, config_file))
    assert main(["online", "--config", str(config_file), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(plan))
    tokens = 0
    for t, it in enumerate(plan["iterations"]):
        generations = read_jsonl(uninterrupted / f"iter_{t}" / "generations.jsonl")
        following = uninterrupted / f"iter_{t + 1}" / "generations.jsonl"
        assert it["prompts"] == 8 and it["sample"]["samples"] == len(generations) == 32
        assert it["summary"]["samples"] == (0 if t == 0 else len(read_jsonl(following)))  # iteration 1 reuses
        tokens += sum(len(row["token_ids"]) for row in generations)
        stats, summary = read_json(uninterrupted / f"iter_{t}" / "pair_stats.json"), read_json(
            uninterrupted / f"iter_{t}" / "summary.json")
        assert stats["comparisons"] == it["judge"]["comparisons"] == it["judge"]["comparisons_max"] == 8 * 6
        assert summary["comparisons"] == it["judge"]["comparisons"] + it["summary"]["comparisons"] == 48 + 32
        assert summary["win_rate_comparisons"] == it["summary"]["comparisons"]
        texts, next_texts = _texts(uninterrupted / f"iter_{t}" / "generations.jsonl"), _texts(following)
        differing = sum(texts[j["prompt_index"], j["first_index"]] != texts[j["prompt_index"], j["second_index"]]
                        for j in read_jsonl(uninterrupted / f"iter_{t}" / "judgments.jsonl"))
        differing_next = sum(texts[key] != next_texts[key] for key in texts)
        assert stats["judge_calls"] == 2 * differing <= it["judge"]["judge_calls_max"] == 2 * 48
        assert summary["judge_calls"] == 2 * (differing + differing_next)
        assert summary["judge_calls"] <= it["judge"]["judge_calls_max"] + it["summary"]["judge_calls_max"]
    tokens += sum(len(row["token_ids"]) for row in read_jsonl(uninterrupted / "iter_2" / "generations.jsonl"))
    assert 0 < tokens <= plan["total"]["new_tokens_max"] == (32 + 32 + 32) * 12
    assert plan["total"]["samples"] == 96


# --------------------------------------------------------------------------- extending a finished run


@pytest.mark.parametrize("per_iteration_files", [False, True])
def test_a_finished_run_is_extended_and_other_changes_are_refused(per_iteration_files, tmp_path, tiny_model_dir):
    """A one-iteration run, rerun with run.iterations = 2, continues with iteration 1 only: iteration
    0 is neither judged nor trained again. With one prompts file, π_1's samples that served iteration
    0's win rate are iteration 1's; with prompts.files, iteration 1 answers the appended file (3
    prompts), so those samples (2 prompts) are replaced. A changed key is refused by name."""
    from nashalign import NashalignError

    mapping = _config(tmp_path, tiny_model_dir, iterations=1, prompts=2)
    if per_iteration_files:
        second = tmp_path / "second.jsonl"
        write_jsonl(second, ({"prompt": f"Second {i}: good or bad?"} for i in range(3)))
        mapping["prompts"] = {"files": [mapping["prompts"]["file"]]}
    oracle = GameOracle(ANSWERS, GAME_P, invalid="worst")
    first = run_online(from_mapping(OnlineConfig, mapping), oracle=oracle, progress=False)
    sampled = (first.run_dir / "iter_1" / "generations.jsonl").read_bytes()
    calls = oracle.counts.judge_calls

    longer = copy.deepcopy(mapping)
    longer["run"]["iterations"] = 2
    if per_iteration_files:
        longer["prompts"]["files"].append(str(second))
    for key, value, message in (("loss", {"eta": 0.7}, r"different config \(loss\.eta: was 0\.5, now 0\.7\)"),
                                ("run", {"iterations": 2, "seed": 4}, r"\(run\.seed: was 3, now 4\)")):
        changed = copy.deepcopy(longer)
        changed[key].update(value)
        with pytest.raises(NashalignError, match=message):
            run_online(from_mapping(OnlineConfig, changed), oracle=oracle, progress=False)
    assert oracle.counts.judge_calls == calls

    extended = run_online(from_mapping(OnlineConfig, longer), oracle=oracle, progress=False)
    assert [row["iteration"] for row in extended.summaries] == [0, 1]
    assert extended.summaries[0] == first.summaries[0]
    assert extended.final_model == first.run_dir / "iter_1" / "train" / "final"
    assert (extended.final_model / "model.safetensors").exists()
    assert oracle.counts.judge_calls - calls == extended.summaries[1]["judge_calls"]  # iteration 0: nothing again
    iteration_1 = first.run_dir / "iter_1" / "generations.jsonl"
    if per_iteration_files:
        assert len({row["prompt_index"] for row in read_jsonl(iteration_1)}) == 3
    else:
        assert iteration_1.read_bytes() == sampled
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["run"]["iterations"] == 2
    with pytest.raises(NashalignError, match=r"run\.iterations: was 2, now 1; a run can be extended, not shortened"):
        run_online(from_mapping(OnlineConfig, mapping), oracle=oracle, progress=False)


def test_sampling_dtype_loads_only_the_samplers_copy_in_bfloat16(tmp_path, tiny_model_dir, monkeypatch):
    """sampling.dtype: bfloat16 — every sampler of the run (iteration 0's, the summary's) computes in
    bfloat16, while training loads and saves float32 weights."""
    from nashalign.sampling import engines

    loaded = []
    original = engines._load_causal_lm

    def recording(model):
        result = original(model)
        loaded.append(result.dtype)
        return result

    monkeypatch.setattr(engines, "_load_causal_lm", recording)
    config = from_mapping(OnlineConfig, _config(tmp_path, tiny_model_dir, iterations=1, sampling__dtype="bfloat16"))
    run_dir = run_online(config, oracle=GameOracle(ANSWERS, GAME_P, invalid="worst")).run_dir
    assert loaded == [torch.bfloat16, torch.bfloat16]
    final = load_file(run_dir / "iter_0" / "train" / "final" / "model.safetensors")
    assert {tensor.dtype for tensor in final.values()} == {torch.float32}
