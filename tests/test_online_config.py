"""The online config holds only what the loop reads: keys the loop sets itself or that the chosen
settings ignore are refused by name (file, line, why); each phase's training config comes from one
pure function; a run directory accepts the same config or a larger run.iterations only."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from nashalign import NashalignError
from nashalign.config import TrainConfig, config_keys, from_mapping, load_config, to_dict
from nashalign.data.tokenization import TokenizedPair, truncate_pairs
from nashalign.online.config import (
    aux_policy_path,
    config_change,
    has_aux_phase,
    policy_path,
    reference_path,
    sampling_spec,
    stage_seed,
)
from nashalign.online.loop import OnlineConfig, phase_config

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"name_or_path": "acme/tiny-chat"}, "run": {"name": "r", "dir": "/nonexistent/runs", "seed": 7},
        "prompts": {"file": "p.jsonl"}}


def _mapping(**sections) -> dict:
    mapping = copy.deepcopy(BASE)
    for section, values in sections.items():
        mapping.setdefault(section, {}).update(values)
    return mapping


@pytest.mark.parametrize("section, key, why", [
    ("model", "prev_name_or_path", "π_t is the previous iterate"),
    ("model", "aux_name_or_path", "iter_<t-1>/aux/final"),
    ("data", "train_file", "trains on its own pairs"),
    ("data", "cache_dir", "logp_cache"),
    ("loss", "name", "run.algorithm picks the loss"),
    ("loss", "average_log_probs", "ipo loss, which no online algorithm trains with"),
    ("optim", "seed", "drawn from run.seed"),
    ("output", "dir", "iter_<t>/train"),
])
def test_a_key_the_loop_sets_is_refused_with_file_line_and_reason(tmp_path, section, key, why):
    mapping = _mapping()
    mapping[section] = {**mapping.get(section, {}), key: "x" if key != "average_log_probs" else False}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    lines = path.read_text().splitlines()
    start = lines.index(f"{section}:")
    line = next(n for n in range(start + 1, len(lines)) if lines[n].strip().startswith(f"{key}:")) + 1
    with pytest.raises(NashalignError, match=rf"^{path}:{line}: {section}\.{key}: not accepted here: .*{why}"):
        load_config(OnlineConfig, path)
    with pytest.raises(NashalignError, match=rf"--set {section}\.{key}=1: {section}\.{key}: not accepted here"):
        load_config(OnlineConfig, None, ["model.name_or_path=m", f"{section}.{key}=1"])


@pytest.mark.parametrize("sections, key, why", [
    ({"run": {"algorithm": "iterative-dpo"}, "loss": {"eta": 0.5}}, "loss.eta", "trains with loss 'dpo'"),
    ({"run": {"algorithm": "sppo"}, "loss": {"tau": 0.001}}, "loss.tau", "trains with loss 'sppo'"),
    ({"loss": {"label_smoothing": 0.1}}, "loss.label_smoothing", "trains with loss 'inpo'"),
    ({"loss": {"robust": True}}, "loss.robust", "does not read robust"),
    ({"run": {"algorithm": "sppo"}, "model": {"ref_name_or_path": "ref"}}, "model.ref_name_or_path",
     "current iterate"),
    ({"pairs": {"method": "best_vs_worst", "decide": "threshold"}}, "pairs.decide", "draws no decision"),
    ({"pairs": {"score": "copeland"}}, "pairs.score", "pair method is tournament"),
    ({"sampling": {"backend": "vllm", "batch_size": 4}}, "sampling.batch_size", "transformers backend"),
    ({"sampling": {"backend": "transformers", "tensor_parallel_size": 2}}, "sampling.tensor_parallel_size",
     "vllm backend"),
    ({"run": {"algorithm": "online-ipo"}, "loss": {"eta": 0.5}}, "loss.eta", "trains with loss 'online-ipo'"),
    ({"run": {"algorithm": "nash-md"}, "loss": {"sft_weight": 0.1}}, "loss.sft_weight", "loss 'nash-md'"),
    ({"sampling": {"mixture_coef": 0.3}}, "sampling.mixture_coef", "only by run.algorithm 'nash-md'"),
    ({"run": {"algorithm": "nash-md"}, "pairs": {"method": "tournament"}}, "pairs.method", "no pair construction"),
    ({"run": {"algorithm": "nash-md"}, "pairs": {"decide": "threshold"}}, "pairs.decide", "no pair construction"),
    ({"run": {"algorithm": "iterative-dpo", "ref_update_every": 2}}, "run.ref_update_every", "current iterate"),
    ({"run": {"algorithm": "inpo-optimistic"}, "loss": {"eta": 0.1, "tau": 0.2}}, "loss.tau", "tau < eta"),
    ({"sampling": {"backend": "vllm", "dtype": "bfloat16", "engine_args": {"dtype": "float32"}}},
     "sampling.engine_args", "so does sampling.dtype"),
])
def test_a_key_the_chosen_settings_ignore_is_refused(tmp_path, sections, key, why):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_mapping(**sections), sort_keys=False))
    with pytest.raises(NashalignError, match=rf"^{path}:\d+: {key}: .*{why}"):
        load_config(OnlineConfig, path)


def test_keys_the_chosen_settings_read_are_accepted():
    """The same keys where they are read: eta/tau under inpo, label_smoothing under iterative-dpo,
    beta (the logged rewards' scale) and sft_weight under every algorithm, score with best_vs_worst."""
    from_mapping(OnlineConfig, _mapping(loss={"eta": 0.5, "tau": 0.1, "beta": 0.3, "sft_weight": 0.1},
                                        model={"ref_name_or_path": "ref"}))
    from_mapping(OnlineConfig, _mapping(run={"algorithm": "iterative-dpo"},
                                        loss={"label_smoothing": 0.1, "robust": True, "beta": 0.2},
                                        pairs={"score": "copeland"}))
    from_mapping(OnlineConfig, _mapping(sampling={"backend": "auto", "batch_size": 4, "tensor_parallel_size": 2}))
    # online-ipo and nash-md have no τ/η mix: τ ≥ η (η's default) is fine there
    from_mapping(OnlineConfig, _mapping(run={"algorithm": "online-ipo", "ref_update_every": 2}, loss={"tau": 0.1}))
    from_mapping(OnlineConfig, _mapping(run={"algorithm": "nash-md"}, loss={"tau": 0.1}, sampling={"mixture_coef": 0.2}))
    from_mapping(OnlineConfig, _mapping(run={"algorithm": "inpo-optimistic", "ref_update_every": 3},
                                        loss={"eta": 0.5, "tau": 0.1, "sft_weight": 0.1}))


def test_sampling_dtype_changes_only_the_samplers_load():
    """sampling.dtype: the sampler loads the policy (and nash-md's reference) in that dtype; "auto"
    keeps model.dtype; the training phase's model section is untouched either way."""
    config = from_mapping(OnlineConfig, _mapping(model={"dtype": "float32"}, sampling={"dtype": "bfloat16"}))
    spec = sampling_spec(config, "runs/r/iter_0/train/final")
    assert (spec.name_or_path, spec.dtype) == ("runs/r/iter_0/train/final", "bfloat16")
    assert phase_config(config, 0).model.dtype == "float32"
    assert sampling_spec(from_mapping(OnlineConfig, _mapping(model={"dtype": "bfloat16"})), "m").dtype == "bfloat16"
    assert sampling_spec(from_mapping(OnlineConfig, _mapping()), "m").dtype == "float32"


def test_shipped_online_config_loads():
    config = load_config(OnlineConfig, ROOT / "configs" / "llama3-8b-inpo.yaml")
    assert phase_config(config, 0).loss.name == "inpo"


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_training_key_of_the_online_config_reaches_the_phase_config():
    """Each model/data/loss/optim/output key of the online config is read: set to a value other than
    its default, it appears with that value in iteration t's training config (under inpo, and under
    iterative-dpo for the dpo-only keys); every other key of the phase config is one the loop sets."""
    inpo = {
        "model": {"ref_name_or_path": "acme/ref", "tokenizer_name_or_path": "acme/tok", "trust_remote_code": True,
                  "revision": "v2", "attn_implementation": "eager",
                  "dtype": "bfloat16", "mixed_precision": "bf16", "gradient_checkpointing": True,
                  "disable_dropout": False, "lora": {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q"]}},
        "data": {"max_length": 99, "max_prompt_length": 33, "scoring_batch_size": 3, "packing": True},
        "loss": {"beta": 0.3, "eta": 0.4, "tau": 0.2, "sft_weight": 0.5, "z_loss": 0.01},
        "optim": {"lr": 0.01, "weight_decay": 0.1, "betas": [0.8, 0.9], "eps": 1e-6, "schedule": "linear",
                  "warmup_ratio": 0.2, "warmup_steps": 3, "epochs": 4, "max_steps": 9, "per_device_batch_size": 5,
                  "gradient_accumulation_steps": 2, "max_grad_norm": None},
        "output": {"save_steps": 7, "save_total_limit": 3, "logging_steps": 2, "report_to": "none",
                   "attention_logit_steps": 3},
    }
    dpo = {"loss": {"label_smoothing": 0.1, "robust": True}}
    defaults = _leaves(to_dict(from_mapping(OnlineConfig, _mapping())))
    covered = set()
    for values, run in ((inpo, {}), (dpo, {"algorithm": "iterative-dpo"})):
        phase = _leaves(to_dict(phase_config(from_mapping(OnlineConfig, _mapping(run=run, **values)), 1)))
        written = _leaves(values)
        assert all(value != defaults.get(key) for key, value in written.items()), "a test value equals its default"
        assert {key: phase[key] for key in written} == written
        covered |= set(written)
    sections = ("model.", "data.", "loss.", "optim.", "output.")
    leaves = {key for key in _leaves(to_dict(from_mapping(OnlineConfig, _mapping(model=inpo["model"]))))
              if key.startswith(sections)}
    assert leaves - covered == {"model.name_or_path"}  # π_0, the policy of iteration 0 (test below)
    set_by_loop = {"model.name_or_path", "model.ref_name_or_path", "model.prev_name_or_path",
                   "model.aux_name_or_path", "data.train_file",
                   "data.cache_dir", "loss.name", "loss.average_log_probs", "optim.seed", "output.dir"}
    offline_only = {f"loss.{key}" for key in ("alpha", "revision_instruction", "revision_template", "lambda_u",
                                              "lambda_d", "mask", "mask_activations", "shared_mask",
                                              "mask_weight_decay")}  # srpo / sparsepo
    assert set(config_keys(TrainConfig)) - set(config_keys(OnlineConfig)) == offline_only | set_by_loop - {
        "model.name_or_path", "model.ref_name_or_path"}


def test_phase_config_is_pure_and_derives_each_iteration(monkeypatch):
    config = from_mapping(OnlineConfig, _mapping(loss={"eta": 0.5, "tau": 0.1}))
    before = copy.deepcopy(config)

    def no_io(*args, **kwargs):
        raise AssertionError("phase_config did I/O")

    for name in ("open",):
        monkeypatch.setattr(builtins, name, no_io)
    for name in ("stat", "listdir", "scandir", "mkdir", "makedirs"):
        monkeypatch.setattr(os, name, no_io)
    first, again, later = phase_config(config, 0), phase_config(config, 0), phase_config(config, 2)
    monkeypatch.undo()
    assert first == again and first is not again and config == before
    run_dir = Path("/nonexistent/runs/r")
    assert first.model.name_or_path == first.model.ref_name_or_path == first.model.prev_name_or_path == "acme/tiny-chat"
    assert later.model.name_or_path == later.model.prev_name_or_path == str(run_dir / "iter_1" / "train" / "final")
    assert later.model.ref_name_or_path == "acme/tiny-chat"
    assert (first.loss.name, first.loss.eta, first.loss.tau) == ("inpo", 0.5, 0.1)
    assert first.output.dir == str(run_dir / "iter_0" / "train") and later.output.dir == str(run_dir / "iter_2" / "train")
    assert first.data.cache_dir == later.data.cache_dir == str(run_dir / "logp_cache")
    assert first.optim.seed == stage_seed(7, 0, 2) % 2**31 != later.optim.seed == stage_seed(7, 2, 2) % 2**31
    assert policy_path(config, 3) == str(run_dir / "iter_2" / "train" / "final")

    dpo = phase_config(from_mapping(OnlineConfig, _mapping(run={"algorithm": "iterative-dpo"})), 2)
    assert dpo.loss.name == "dpo" and dpo.model.prev_name_or_path is None
    assert dpo.model.ref_name_or_path == dpo.model.name_or_path == str(run_dir / "iter_1" / "train" / "final")


def _without_io(monkeypatch, derive):
    def no_io(*args, **kwargs):
        raise AssertionError("phase_config did I/O")

    monkeypatch.setattr(builtins, "open", no_io)
    for name in ("stat", "listdir", "scandir", "mkdir", "makedirs"):
        monkeypatch.setattr(os, name, no_io)
    try:
        return derive()
    finally:
        monkeypatch.undo()


def test_phase_config_refreshes_the_reference_every_m_iterations(monkeypatch):
    """run.ref_update_every 2: iterations 0, 1 use model.ref_name_or_path; after iteration 1 the
    reference is π_2 (iterations 2, 3), after iteration 3 π_4; prev is π_t throughout."""
    config = from_mapping(OnlineConfig, _mapping(run={"ref_update_every": 2}, model={"ref_name_or_path": "acme/ref"},
                                                 loss={"eta": 0.5, "tau": 0.1}))
    phases = _without_io(monkeypatch, lambda: [phase_config(config, t) for t in range(5)])
    final = [str(Path("/nonexistent/runs/r") / f"iter_{t - 1}" / "train" / "final") for t in range(1, 6)]
    assert [p.model.ref_name_or_path for p in phases] == ["acme/ref", "acme/ref", final[1], final[1], final[3]]
    assert [p.model.prev_name_or_path for p in phases] == ["acme/tiny-chat", *final[:4]]
    assert reference_path(config, 4) == phases[4].model.ref_name_or_path
    fixed = from_mapping(OnlineConfig, _mapping(loss={"eta": 0.5, "tau": 0.1}))
    assert {phase_config(fixed, t).model.ref_name_or_path for t in range(5)} == {"acme/tiny-chat"}


def test_phase_config_of_optimistic_inpo_online_ipo_and_nash_md(monkeypatch):
    run_dir = Path("/nonexistent/runs/r")
    final = lambda t: str(run_dir / f"iter_{t - 1}" / "train" / "final")  # noqa: E731  π_t
    aux = lambda t: str(run_dir / f"iter_{t}" / "aux" / "final")  # noqa: E731  π̂_t, t ≥ 1
    optimistic = from_mapping(OnlineConfig, _mapping(run={"algorithm": "inpo-optimistic"}, loss={"eta": 0.5, "tau": 0.1}))
    zero, one, two, aux_one, aux_two = _without_io(monkeypatch, lambda: (
        phase_config(optimistic, 0), phase_config(optimistic, 1), phase_config(optimistic, 2),
        phase_config(optimistic, 1, aux=True), phase_config(optimistic, 2, aux=True)))
    assert (zero.loss.name, zero.model.aux_name_or_path) == ("inpo", None)  # π_1 by plain INPO
    assert not has_aux_phase(optimistic, 0) and has_aux_phase(optimistic, 1)
    with pytest.raises(ValueError, match="no auxiliary"):
        phase_config(optimistic, 0, aux=True)
    assert (one.loss.name, one.model.name_or_path, one.model.prev_name_or_path, one.model.aux_name_or_path) == (
        "inpo-optimistic", final(1), final(1), "acme/tiny-chat")  # π̂_0 = π_0
    assert (two.model.name_or_path, two.model.aux_name_or_path) == (final(2), aux(1))
    assert (aux_one.loss.name, aux_one.model.name_or_path, aux_one.model.prev_name_or_path) == (
        "inpo-optimistic-aux", "acme/tiny-chat", final(1))
    assert (aux_two.model.name_or_path, aux_two.model.aux_name_or_path, aux_two.output.dir) == (
        aux(1), aux(1), str(run_dir / "iter_2" / "aux"))
    assert aux_one.model.ref_name_or_path == one.model.ref_name_or_path == "acme/tiny-chat"
    assert aux_one.optim.seed != one.optim.seed and aux_policy_path(optimistic, 2) == aux(2)
    for algorithm, loss in (("online-ipo", "online-ipo"), ("nash-md", "nash-md")):
        config = from_mapping(OnlineConfig, _mapping(run={"algorithm": algorithm}, loss={"tau": 0.2}))
        phase = phase_config(config, 2)
        assert (phase.loss.name, phase.loss.tau, phase.model.prev_name_or_path, phase.model.aux_name_or_path) == (
            loss, 0.2, None, None)
        assert (phase.model.name_or_path, phase.model.ref_name_or_path) == (final(2), "acme/tiny-chat")


def test_a_run_directory_accepts_the_same_config_or_more_iterations():
    config = from_mapping(OnlineConfig, _mapping(run={"iterations": 2}, prompts={"file": None, "files": ["a", "b"]}))
    saved = yaml.safe_load(yaml.safe_dump(to_dict(config)))
    assert config_change(saved, config) is None
    longer = dataclasses.replace(config, run=dataclasses.replace(config.run, iterations=3),
                                 prompts=dataclasses.replace(config.prompts, files=["a", "b", "c"]))
    assert config_change(saved, longer) is None
    shorter = dataclasses.replace(config, run=dataclasses.replace(config.run, iterations=1),
                                  prompts=dataclasses.replace(config.prompts, files=["a"]))
    assert config_change(saved, shorter) == "run.iterations: was 2, now 1; a run can be extended, not shortened"
    replaced = dataclasses.replace(longer, prompts=dataclasses.replace(config.prompts, files=["a", "x", "c"]))
    assert config_change(saved, replaced).startswith("prompts.files: was ['a', 'b'], now ['a', 'x', 'c']")
    other = dataclasses.replace(longer, loss=dataclasses.replace(config.loss, eta=0.5))
    assert config_change(saved, other) == "loss.eta: was 0.005, now 0.5"
    assert config_change({**saved, "oracle": {"type": "game"}}, config) == "oracle: was {'type': 'game'}, now None"
    assert config_change({**saved, "extra": 1}, config) == "extra: was 1, now unset"



def test_a_run_resumes_with_other_batch_sizes_and_keys_newer_than_the_run_at_their_defaults():
    """A run that ran out of memory resumes with smaller batches; a run directory written before a
    key existed (its config.yaml lacks it, or a whole section) continues while the key holds its
    default, and is refused when the new config sets it to something else."""
    config = from_mapping(OnlineConfig, _mapping(sampling={"batch_size": 16}, data={"scoring_batch_size": 8}))
    saved = yaml.safe_load(yaml.safe_dump(to_dict(config)))
    smaller = from_mapping(OnlineConfig, _mapping(sampling={"batch_size": 4}, data={"scoring_batch_size": 2},
                                                  output={"report_to": "none"}))
    assert config_change(saved, smaller) is None
    older = copy.deepcopy(saved)
    del older["sampling"]["dtype"], older["summary"]
    assert config_change(older, config) is None
    bf16 = from_mapping(OnlineConfig, _mapping(sampling={"batch_size": 16, "dtype": "bfloat16"},
                                               data={"scoring_batch_size": 8}))
    assert config_change(older, bf16) == "sampling.dtype: was unset, now 'bfloat16'"
    no_win_rate = from_mapping(OnlineConfig, _mapping(sampling={"batch_size": 16}, data={"scoring_batch_size": 8},
                                                      summary={"win_rate": False}))
    assert config_change(older, no_win_rate) == "summary.win_rate: was unset, now False"
    assert config_change(saved, dataclasses.replace(config, sampling=dataclasses.replace(
        config.sampling, temperature=0.7))) == "sampling.temperature: was 1.0, now 0.7"


def test_truncate_pairs_cuts_like_offline_tokenization():
    """The prompt keeps its end (and a leading BOS), each response its start, prompt + response ≤ max_length."""
    pair = TokenizedPair([1, 5, 6, 7], [8, 9, 10, 2], [11, 2], "prompt[0]")
    (cut,), report = truncate_pairs([pair], max_length=5, max_prompt_length=3, bos_id=1)
    assert (cut.prompt_ids, cut.chosen_ids, cut.rejected_ids) == ([1, 6, 7], [8, 9], [11, 2])
    assert (report.truncated_prompts, report.truncated_chosen, report.truncated_rejected) == (1, 1, 0)
    (same,), report = truncate_pairs([pair], max_length=8, max_prompt_length=4, bos_id=1)
    assert same == pair and report.truncated_prompts == report.truncated_responses == 0
