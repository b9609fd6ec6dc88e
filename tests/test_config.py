"""The strict config loader: types, ranges, key paths with file and line, overrides, dumps, docs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nashalign import NashalignError
from nashalign.config import (
    ConfigFieldError,
    TrainConfig,
    config_keys,
    config_reference,
    dump_config,
    from_mapping,
    load_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "model:\n  name_or_path: some/model\n"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_derived_tau(tmp_path):
    """Only model.name_or_path is required; tau defaults to eta/3 = 0.005/3 once resolved."""
    config = load_config(TrainConfig, write(tmp_path, MINIMAL))
    assert config.model.name_or_path == "some/model"
    assert config.loss.name == "dpo" and config.model.lora is None
    assert config.loss.tau == pytest.approx(0.005 / 3)
    config = load_config(TrainConfig, write(tmp_path, MINIMAL + "loss:\n  eta: 0.03\n"))
    assert config.loss.tau == pytest.approx(0.01)
    config = load_config(TrainConfig, write(tmp_path, MINIMAL + "loss:\n  eta: 0.03\n  tau: 0\n"))
    assert config.loss.tau == 0.0


def test_exponent_floats_without_a_dot(tmp_path):
    """YAML 1.1 reads `5e-7` as a string; the loader reads it as the float users mean."""
    config = load_config(TrainConfig, write(tmp_path, MINIMAL + "optim:\n  lr: 5e-7\n  eps: 1E-6\n"))
    assert config.optim.lr == 5e-7 and config.optim.eps == 1e-6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loss:\n  eta: -1\n", "run.yaml:4: loss.eta: expected a float > 0, got -1"),
        ("loss:\n  etaa: 1\n", "run.yaml:4: loss.etaa: unknown key (allowed here: name, beta,"),
        ("optim:\n  epochs: 2.5\n", "run.yaml:4: optim.epochs: expected an integer >= 1, got 2.5"),
        ("optim:\n  epochs: true\n", "run.yaml:4: optim.epochs: expected an integer >= 1, got true"),
        ("optim:\n  lr: fast\n", "run.yaml:4: optim.lr: expected a float > 0, got 'fast'"),
        ("optim:\n  lr: .nan\n", "run.yaml:4: optim.lr: expected a float > 0, got nan"),
        ("loss:\n  name: dop\n", "loss.name: expected one of 'dpo', 'ipo', 'inpo', 'sppo', 'srpo', 'sparsepo', 'inpo-optimistic', 'inpo-optimistic-aux', 'online-ipo', 'nash-md', got 'dop'"),
        ("loss:\n  label_smoothing: 0.5\n", "loss.label_smoothing: expected a float >= 0 and < 0.5, got 0.5"),
        ("loss:\n  eta: 0.01\n  tau: 0.02\n", "run.yaml:5: loss.tau: expected tau < eta (0.01)"),
        ("model:\n  name_or_path: x\n", "run.yaml:3: model: duplicate key"),
        ("optim:\n  betas: [0.9]\n", "optim.betas: expected a list of 2 items, got a list [0.9]"),
        ("optim:\n  betas: [0.9, 1.0]\n", "optim.betas: expected two floats in [0, 1), got [0.9, 1.0]"),
        ("data:\n  max_length: 64\n", "data.max_prompt_length: expected less than data.max_length (64), got 512"),
        ("output: 3\n", "run.yaml:3: output: expected a mapping of OutputConfig keys, got 3"),
        ("optim:\n  betas: [0.9, x]\n", "run.yaml:4: optim.betas[1]: expected a float, got 'x'"),
        ("optim:\n  max_steps: 0\n", "optim.max_steps: expected an integer >= 1, got 0"),
        ("output:\n  report_to: mlflow\n", "output.report_to: expected one of 'auto', 'none', 'tensorboard', 'wandb'"),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path, text, message):
    """Every bad value fails at load time with `file:line: key.path: what was expected, got what`."""
    path = write(tmp_path, MINIMAL + text)
    with pytest.raises(NashalignError) as error:
        load_config(TrainConfig, path)
    assert str(error.value).startswith(str(tmp_path)), str(error.value)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_required_key_and_bad_documents(tmp_path):
    with pytest.raises(NashalignError, match=r"run\.yaml: model\.name_or_path: required key missing"):
        load_config(TrainConfig, write(tmp_path, "loss:\n  name: dpo\n"))
    with pytest.raises(NashalignError, match=r"run\.yaml:2: invalid YAML"):
        load_config(TrainConfig, write(tmp_path, "model:\n\tname_or_path: x\n"))
    with pytest.raises(NashalignError, match=r"<top level>: expected a mapping of TrainConfig keys"):
        load_config(TrainConfig, write(tmp_path, "- a list\n"))
    with pytest.raises(NashalignError, match=r"missing\.yaml: config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_overrides_are_yaml_scalars_checked_like_file_values(tmp_path):
    path = write(tmp_path, MINIMAL + "loss:\n  name: inpo\n")
    config = load_config(
        TrainConfig,
        path,
        ["loss.eta=1e-2", "optim.betas=[0.8, 0.9]", "model.lora.r=4", "optim.max_grad_norm=null", "output.dir=out"],
    )
    assert config.loss.eta == 0.01 and config.loss.tau == pytest.approx(0.01 / 3)
    assert config.optim.betas == (0.8, 0.9)
    assert config.model.lora is not None and config.model.lora.r == 4 and config.model.lora.alpha == 16.0
    assert config.optim.max_grad_norm is None and config.output.dir == "out"
    with pytest.raises(NashalignError, match=r"^--set loss\.eta=-1: loss\.eta: expected a float > 0, got -1$"):
        load_config(TrainConfig, path, ["loss.eta=-1"])
    with pytest.raises(NashalignError, match=r"^--set optim\.lrr=1: optim\.lrr: unknown key"):
        load_config(TrainConfig, path, ["optim.lrr=1"])
    with pytest.raises(NashalignError, match=r"^--set loss\.beta: expected key\.path=value"):
        load_config(TrainConfig, path, ["loss.beta"])
    with pytest.raises(NashalignError, match=r"^--set loss\.name\.x=1: loss\.name is not a section"):
        load_config(TrainConfig, path, ["loss.name.x=1"])


def test_cross_field_error_points_at_the_override_that_caused_it(tmp_path):
    """tau = 0.004 from the file is fine for eta = 0.005, but not after `--set loss.eta=0.003`."""
    path = write(tmp_path, MINIMAL + "loss:\n  tau: 0.004\n")
    assert load_config(TrainConfig, path).loss.tau == 0.004
    with pytest.raises(NashalignError, match=r"run\.yaml:4: loss\.tau: expected tau < eta \(0\.003\)"):
        load_config(TrainConfig, path, ["loss.eta=0.003"])


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(min_value=1e-9, max_value=1.0, allow_subnormal=False),
    eta=st.floats(min_value=1e-4, max_value=10.0),
    tau_fraction=st.floats(min_value=0.0, max_value=0.99),
    name=st.sampled_from(["dpo", "ipo", "inpo", "sppo"]),
    steps=st.none() | st.integers(min_value=1, max_value=10**6),
    lora=st.booleans(),
    modules=st.lists(st.sampled_from(["q_proj", "v_proj", "up_proj"]), min_size=1, max_size=3),
)
def test_dump_then_load_gives_the_same_tree(tmp_path_factory, lr, eta, tau_fraction, name, steps, lora, modules):
    """Property: load(dump(cfg)) == cfg for any valid tree (floats survive YAML exactly)."""
    data = {
        "model": {"name_or_path": "m", **({"lora": {"target_modules": modules}} if lora else {})},
        "loss": {"name": name, "eta": eta, "tau": eta * tau_fraction},
        "optim": {"lr": lr, "max_steps": steps},
    }
    config = from_mapping(TrainConfig, data)
    path = dump_config(config, tmp_path_factory.mktemp("dump") / "config.yaml")
    assert load_config(TrainConfig, path) == config
    assert yaml.safe_load(path.read_text()) == to_dict(config)


@dataclasses.dataclass
class _Sampler:
    backend: Literal["transformers", "vllm"] = "transformers"
    temperature: float = dataclasses.field(default=1.0, metadata={"ge": 0})
    stop: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _OnlineConfig:
    iterations: int = dataclasses.field(default=3, metadata={"ge": 1})
    samples: tuple[int, ...] = (8,)
    sampler: _Sampler | None = None
    train: TrainConfig | None = None

    def check(self) -> None:
        if self.iterations > 10:
            raise ConfigFieldError("iterations", f"expected at most 10, got {self.iterations}")


def test_loader_is_generic_over_other_trees(tmp_path):
    """Another tree (as the online loop will define) gets the same strictness, nested sections included."""
    path = write(tmp_path, "iterations: 2\nsamples: [4, 8]\nsampler:\n  backend: vllm\ntrain:\n  " + MINIMAL.replace("\n  ", "\n    "))
    config = load_config(_OnlineConfig, path)
    assert config.samples == (4, 8) and config.sampler == _Sampler(backend="vllm")
    assert config.train.model.name_or_path == "some/model" and config.train.loss.tau == pytest.approx(0.005 / 3)
    with pytest.raises(NashalignError, match=r"run\.yaml:2: sampler\.backend: expected one of 'transformers', 'vllm'"):
        load_config(_OnlineConfig, write(tmp_path, "sampler:\n  backend: sglang\n"))
    with pytest.raises(NashalignError, match=r"--set iterations=11: iterations: expected at most 10, got 11"):
        load_config(_OnlineConfig, None, ["iterations=11"])
    with pytest.raises(NashalignError, match=r"--set samples=\[1, x\]: samples\[1\]: expected an integer, got 'x'"):
        load_config(_OnlineConfig, None, ["samples=[1, x]"])
    assert config_keys(_OnlineConfig)[:5] == ["iterations", "samples", "sampler", "sampler.backend", "sampler.temperature"]


def test_example_config_loads():
    config = load_config(TrainConfig, ROOT / "configs" / "train-tiny.yaml")
    assert config.data.train_file is not None


def _documented_table(text: str) -> str:
    match = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S)
    assert match, "docs/training.md has no generated config reference block"
    return match.group(1)


def test_docs_reference_matches_the_dataclasses():
    """docs/training.md's table is exactly `config_reference(TrainConfig)`, and every dotted key
    written anywhere in the page (`section.key` in backticks) exists in the config tree."""
    text = (ROOT / "docs" / "training.md").read_text()
    assert _documented_table(text) == config_reference(TrainConfig), (
        "regenerate with: python -c 'from nashalign.config import *; print(config_reference(TrainConfig))'"
    )
    keys = set(config_keys(TrainConfig))
    sections = {key.split(".")[0] for key in keys}
    mentioned = {
        key for key in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)(?:=[^`]*)?`", text) if key.split(".")[0] in sections
    }
    assert mentioned, "the page mentions no config key"
    assert mentioned <= keys, f"documented keys missing from the config tree: {sorted(mentioned - keys)}"
