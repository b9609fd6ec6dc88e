"""The one model loader (nashalign.models.loader) and model lifetimes in the online loop.

In-process tests use local directories; hub ids are tested the way users hit them in
tests/test_hub_models.py (a local Hugging Face cache, HF_HUB_OFFLINE=1, the CLI in a subprocess).
"""

from __future__ import annotations

import shutil
import weakref

import pytest
import torch

from nashalign import NashalignError
from nashalign.models.loader import (
    ModelSpec,
    as_spec,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    release,
)


def test_a_local_directory_loads_with_the_spec_settings(tiny_model_dir):
    model = load_causal_lm(ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    auto = load_causal_lm(tiny_model_dir)  # "auto": the checkpoint's own dtype (float32 here)
    assert {p.dtype for p in auto.parameters()} == {torch.float32}


def test_a_sequence_classifier_loads_with_its_head(tiny_model_dir):
    model = load_sequence_classifier(ModelSpec(str(tiny_model_dir), dtype="float32"), num_labels=1)
    assert model.config.num_labels == 1 and model.score.out_features == 1


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path, tiny_model_dir):
    directory = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer = load_tokenizer(directory)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    assert load_tokenizer(directory, pad_fallback=False).pad_token_id is None
    loaded = load_tokenizer(directory)
    assert loaded.pad_token_id == loaded.eos_token_id is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (lambda tmp: ModelSpec(str(tmp / "missing")), "no model directory"),
        (lambda tmp: ModelSpec("./not-here"), "model: no model directory './not-here'"),
    ],
)
def test_a_missing_model_is_one_line_naming_it(tmp_path, spec, message):
    with pytest.raises(NashalignError, match=message) as caught:
        load_causal_lm(spec(tmp_path))
    assert "\n" not in str(caught.value)


def test_a_directory_that_is_not_a_model_is_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NashalignError) as caught:
        load_causal_lm(tmp_path / "empty", where="model.name_or_path")
    text = str(caught.value)
    assert text.startswith("model.name_or_path: cannot load model") and str(tmp_path / "empty") in text
    assert "\n" not in text


def test_spec_validation():
    with pytest.raises(NashalignError, match="dtype: expected one of"):
        ModelSpec("x", dtype="float8")
    with pytest.raises(NashalignError, match="device or device_map, not both"):
        ModelSpec("x", device="cpu", device_map="auto")
    with pytest.raises(NashalignError, match="empty"):
        ModelSpec("")
    spec = ModelSpec("owner/name", revision="v1")
    assert as_spec(spec) is spec and as_spec("owner/name").revision is None
    assert spec.replace(dtype="bfloat16").dtype == "bfloat16" and spec.replace(dtype="bfloat16").revision == "v1"


def test_model_config_spec_carries_every_loading_setting():
    from nashalign.config import ModelConfig

    config = ModelConfig(name_or_path="owner/policy", tokenizer_name_or_path="owner/tok", revision="r1",
                         trust_remote_code=True, dtype="bfloat16", attn_implementation="eager")
    assert config.spec() == ModelSpec("owner/policy", revision="r1", dtype="bfloat16", trust_remote_code=True,
                                      attn_implementation="eager")
    assert config.spec("other").name_or_path == "other" and config.tokenizer_spec().name_or_path == "owner/tok"


def test_a_pair_model_judge_holds_its_model_only_while_judging(tiny_model_dir):
    """Built from a config, the judge reads the model's config now, loads the weights on its first
    call, drops them on release() (nothing else holds them) and loads them again when asked again;
    the answers are the same before and after."""
    from nashalign.judges.registry import build_oracle

    oracle = build_oracle({"type": "pair_model", "path": str(tiny_model_dir), "device": "cpu", "dtype": "float32"})
    assert not oracle.loaded
    prompts, first, second = ["Q?"] * 2, ["yes", "maybe"], ["no", "good"]
    before = oracle.prob(prompts, first, second)
    assert oracle.loaded
    held = weakref.ref(oracle.model)
    oracle.release()
    assert not oracle.loaded and held() is None
    torch.testing.assert_close(oracle.prob(prompts, first, second), before, rtol=0, atol=0)


def test_release_closes_what_it_is_given():
    closed = []

    class Engine:
        def close(self):
            closed.append("engine")

    class Judge:
        def release(self):
            closed.append("judge")

    release(Engine(), Judge(), object())
    assert closed == ["engine", "judge"]


def test_no_judge_sampler_or_scoring_model_is_alive_while_training(tmp_path, tiny_model_dir, monkeypatch):
    """Two online iterations with a pair-model judge: when each training phase starts, every model
    the loop loaded before it (the sampler's policy, the judge, the scoring models) is gone."""
    import nashalign.models.loader as models
    import nashalign.train.loop as train
    from nashalign.config import from_mapping
    from nashalign.online.loop import OnlineConfig, run_online
    from test_online import _config

    loaded: list[tuple[str, weakref.ref]] = []
    original_load = models._load_model

    def recording_load(model_class, spec, what, where, **extra):
        model = original_load(model_class, spec, what, where, **extra)
        loaded.append((where, weakref.ref(model)))
        return model

    alive_at_training: list[list[str]] = []
    original_train = train.train_pairs

    def checking_train(*args, **kwargs):
        alive_at_training.append([where for where, ref in loaded if ref() is not None])
        return original_train(*args, **kwargs)

    monkeypatch.setattr(models, "_load_model", recording_load)
    monkeypatch.setattr(train, "train_pairs", checking_train)
    judge = {"type": "pair_model", "path": str(tiny_model_dir), "device": "cpu", "dtype": "float32",
             "batch_size": 16}
    config = from_mapping(OnlineConfig, _config(tmp_path, tiny_model_dir, prompts=2, oracle=judge))
    run_online(config, progress=False)
    roles = {where for where, _ in loaded}
    assert {"sampling", "oracle: path"} <= roles, roles  # the test saw the models it is about
    assert alive_at_training == [[], []]
