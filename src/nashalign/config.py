"""Config trees as dataclasses, loaded strictly from YAML.

Defaults live in one place: the dataclass fields below. The loader is generic (any dataclass tree,
so the online loop can add its own sections) and fails at load time, naming the file, the line and
the key's path, on unknown keys, missing required keys, wrong types and out-of-range values:

    run.yaml:7: loss.eta: expected a float > 0, got -1

Supported field types: bool, int, float, str, Literal[...], X | None, list[X], tuple[X, ...],
tuple[X, Y], and nested dataclasses (also optional ones: `lora: LoraSettings | None`, enabled by
writing the section). Ranges are given in field metadata (`gt`, `ge`, `lt`, `le`); cross-field
rules in a dataclass method `check(self)` that raises `ConfigFieldError(field, message)` (a dotted
field names a key of a nested section), and derived defaults in `resolve(self)` (for example
tau = eta/3), called after the fields are checked. A dataclass may list keys it refuses on purpose
in a class attribute `refused_keys` ({key: why}); writing one is an error that says why.
`config_subset` derives such a section from another: the same fields, defaults and checks, less the
keys a consumer sets itself (the online loop's sections are its training sections less those).

`--set a.b=c` overrides are parsed as YAML scalars and checked exactly like file values.
`dump_config` writes the resolved tree back as YAML; loading a dump gives the same tree.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from nashalign import NashalignError
from nashalign.data.artifacts import atomic_write_text
from nashalign.data.json_input import RECURSION
from nashalign.models.loader import ModelSpec

T = TypeVar("T")

__all__ = [
    "ConfigFieldError",
    "TrainConfig",
    "ModelConfig",
    "LoraSettings",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "OutputConfig",
    "load_config",
    "from_mapping",
    "validated",
    "to_dict",
    "dump_config",
    "config_keys",
    "config_reference",
    "config_subset",
]


class ConfigFieldError(ValueError):
    """Raised by a dataclass's `check()` to reject the value of one of its fields."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **bounds: float) -> Any:
    """A dataclass field with a help text (for the docs) and optional bounds gt/ge/lt/le."""
    metadata = {"help": help, **bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- the training config tree


@dataclasses.dataclass
class LoraSettings:
    r: int = _field(8, "rank of the low-rank update", ge=1)
    alpha: float = _field(16.0, "scaling numerator: the update is scaled by alpha / r", gt=0)
    dropout: float = _field(0.0, "dropout on the adapter's input", ge=0, lt=1)
    target_modules: list[str] = _field(
        help="names of the linear modules that get adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
    )

    def check(self) -> None:
        if not self.target_modules:
            raise ConfigFieldError("target_modules", "expected at least one module name")


@dataclasses.dataclass
class ModelConfig:
    name_or_path: str = _field(help="policy to train: a local directory or a hub name (required)")
    ref_name_or_path: str | None = _field(
        None, "reference model π_ref; unset: the policy's initial weights (scored before training, no copy)"
    )
    prev_name_or_path: str | None = _field(
        None, "previous iterate π_t (inpo, inpo-optimistic*); unset: the policy's initial weights (iteration 0)"
    )
    aux_name_or_path: str | None = _field(
        None, "optimistic INPO's auxiliary policy π̂_{t−1} (inpo-optimistic*); unset: the policy's initial weights"
    )
    tokenizer_name_or_path: str | None = _field(None, "tokenizer; unset: the policy's")
    revision: str | None = _field(None, "hub branch, tag or commit of every hub-named model here; unset: main")
    trust_remote_code: bool = _field(False, "allow custom model code shipped with a hub model")
    dtype: Literal["float32", "bfloat16"] = _field("float32", "dtype the weights are loaded in")
    attn_implementation: str | None = _field(
        None, "attention kernel (eager, sdpa, flash_attention_2, ...); unset: transformers' default"
    )
    mixed_precision: Literal["no", "bf16"] = _field("no", "bf16: bfloat16 autocast of forward passes")
    gradient_checkpointing: bool = _field(False, "recompute activations in the backward pass")
    disable_dropout: bool = _field(True, "set the base model's dropout probabilities to 0, as TRL (LoRA keeps its own)")
    lora: LoraSettings | None = _field(None, "LoRA adapters through peft; off unless this section is set")

    def spec(self, name_or_path: str | None = None, **changes: Any) -> ModelSpec:
        """How to load `name_or_path` (default: the policy) with this section's settings."""
        return ModelSpec(
            str(name_or_path or self.name_or_path), revision=self.revision, dtype=self.dtype,
            trust_remote_code=self.trust_remote_code, attn_implementation=self.attn_implementation, **changes,
        )

    def tokenizer_spec(self) -> ModelSpec:
        return self.spec(self.tokenizer_name_or_path or self.name_or_path)


@dataclasses.dataclass
class DataConfig:
    train_file: str | None = _field(
        None, "preference pairs: .jsonl, .json, .parquet or a datasets directory (required by the CLI)"
    )
    max_length: int = _field(1024, "maximum prompt + response tokens; longer pairs are truncated", ge=2)
    max_prompt_length: int = _field(512, "maximum prompt tokens (the start of long prompts is cut)", ge=1)
    cache_dir: str | None = _field(None, "log-prob cache directory; unset: <output.dir>/logp_cache")
    scoring_batch_size: int = _field(8, "pairs per forward pass when scoring under ref / prev", ge=1)
    packing: bool = _field(
        False, "pack pairs: each prompt computed once for both responses, no padding between pairs (same "
        "log-probs, less compute; sdpa or eager attention)"
    )

    def check(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigFieldError(
                "max_prompt_length",
                f"expected less than data.max_length ({self.max_length}), got {self.max_prompt_length}",
            )


@dataclasses.dataclass
class LossConfig:
    name: Literal["dpo", "ipo", "inpo", "sppo", "srpo", "sparsepo", "inpo-optimistic", "inpo-optimistic-aux",
                  "online-ipo", "nash-md"] = _field(
        "dpo", "the loss (nashalign.core.losses; nash-md reads single responses, see docs/online.md)")
    beta: float = _field(
        0.1, "KL weight of dpo / ipo / sppo / srpo / sparsepo, and the scale of the logged implicit rewards", gt=0
    )
    label_smoothing: float = _field(0.0, "dpo: probability that a label is flipped", ge=0, lt=0.5)
    robust: bool = _field(False, "dpo with label_smoothing: robust DPO (unbiased) instead of conservative DPO")
    average_log_probs: bool = _field(True, "ipo: log-ratios averaged over response tokens (as TRL) instead of summed")
    eta: float = _field(0.005, "inpo, inpo-optimistic*: KL weight towards π_t (1/eta is the step size)", gt=0)
    tau: float | None = _field(
        None, "inpo*, online-ipo, nash-md: KL weight towards π_ref; unset: eta / 3", ge=0
    )
    sft_weight: float = _field(0.0, "weight of the added SFT term (mean NLL per chosen token)", ge=0)
    alpha: float = _field(0.8, "srpo: weight of the self-improvement term (1 - alpha: the generative term)", ge=0, le=1)
    revision_instruction: str = _field(
        "Improve this answer.", "srpo: the request to revise, asked as the next user turn after the answer"
    )
    revision_template: str | None = _field(
        None, "srpo: the revision prompt as a format string with {prompt} and {response}; unset: the "
        "chat-template turn with revision_instruction (see docs/training.md)"
    )
    lambda_u: float = _field(0.001, "sparsepo: L1 weight of the reward-term mask", ge=0)
    lambda_d: float = _field(0.001, "sparsepo: L1 weight of the divergence-term mask", ge=0)
    mask: Literal["activations", "learned"] = _field(
        "activations", "sparsepo: masks from π_ref's activations, or learned by a network on its hidden states"
    )
    mask_activations: list[Literal["mlp", "attention", "residual"]] = _field(
        help="sparsepo activation masks: the per-layer outputs averaged into the mask",
        factory=lambda: ["mlp", "attention", "residual"],
    )
    shared_mask: bool = _field(False, "sparsepo learned masks: one mask for both terms instead of two")
    mask_weight_decay: float = _field(0.0, "sparsepo learned masks: AdamW weight decay of the mask network", ge=0)
    z_loss: float = _field(
        0.0, "weight of the output-logit z-loss, mean (log Z)² over a pair's response tokens (0: off; PaLM: 1e-4)",
        ge=0,
    )

    def check(self) -> None:
        # online-ipo and nash-md read τ alone; the online loop's section has no name and checks this itself
        if getattr(self, "name", None) not in (None, "online-ipo", "nash-md") and self.tau is not None \
                and self.tau >= self.eta:
            raise ConfigFieldError("tau", f"expected tau < eta ({self.eta}) so that tau/eta < 1, got {self.tau}")
        name = getattr(self, "name", None)  # the online loss section has no name (the algorithm picks it)
        if self.z_loss and name in ("srpo", "sparsepo"):
            raise ConfigFieldError("z_loss", f"not supported with loss.name {name!r} (its own batch layout); set it to 0")
        if not getattr(self, "mask_activations", True):  # absent in the online section: sparsepo is offline only
            raise ConfigFieldError("mask_activations", "expected at least one of mlp, attention, residual")
        if getattr(self, "revision_template", None) is not None:
            from nashalign.train.srpo import template_problem

            problem = template_problem(self.revision_template)
            if problem:
                raise ConfigFieldError("revision_template", problem)

    def resolve(self) -> None:
        if self.tau is None:
            self.tau = self.eta / 3


@dataclasses.dataclass
class OptimConfig:
    lr: float = _field(5e-7, "peak learning rate of AdamW", gt=0)
    weight_decay: float = _field(0.0, "AdamW decoupled weight decay", ge=0)
    betas: tuple[float, float] = _field((0.9, 0.999), "AdamW betas")
    eps: float = _field(1e-8, "AdamW epsilon", gt=0)
    schedule: Literal["cosine", "linear", "constant"] = _field("cosine", "decay after warmup")
    warmup_ratio: float = _field(0.1, "fraction of the optimizer steps spent warming up", ge=0, lt=1)
    warmup_steps: int | None = _field(None, "warmup steps; when set, replaces warmup_ratio", ge=0)
    epochs: int = _field(2, "passes over the pairs", ge=1)
    max_steps: int | None = _field(None, "stop after this many optimizer steps (replaces epochs)", ge=1)
    per_device_batch_size: int = _field(8, "pairs per forward pass on each device", ge=1)
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float | None = _field(1.0, "clip the gradient norm to this; unset: no clipping", gt=0)
    seed: int = _field(42, "seed of the data order, initialisation of adapters and dropout", ge=0)

    def check(self) -> None:
        for beta in self.betas:
            if not 0 <= beta < 1:
                raise ConfigFieldError("betas", f"expected two floats in [0, 1), got {list(self.betas)}")


@dataclasses.dataclass
class OutputConfig:
    dir: str = _field("runs/train", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    save_steps: int = _field(500, "checkpoint every this many optimizer steps (0: only at the end)", ge=0)
    save_total_limit: int = _field(2, "keep only the newest this many checkpoints", ge=1)
    logging_steps: int = _field(1, "log to the progress bar and trackers every this many steps", ge=1)
    report_to: Literal["auto", "none", "tensorboard", "wandb", "tensorboard,wandb"] = _field(
        "auto", "trackers: auto = TensorBoard when installed; wandb honours WANDB_MODE=offline"
    )
    attention_logit_steps: int = _field(
        10, "log the largest attention logit (metrics.jsonl) every this many optimizer steps (0: never)", ge=0
    )


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = _field(help="the policy and the models it is compared with (required)")
    data: DataConfig = _field(help="the preference pairs", factory=DataConfig)
    loss: LossConfig = _field(help="the objective", factory=LossConfig)
    optim: OptimConfig = _field(help="optimizer, schedule, batches", factory=OptimConfig)
    output: OutputConfig = _field(help="run directory, checkpoints, logging", factory=OutputConfig)


# --------------------------------------------------------------------------- YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`, a classic trap)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse YAML text; return the data and the 1-based line of every key path."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise NashalignError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:  # the composer recurses once per nesting level
        raise NashalignError(f"{source}: invalid YAML: {RECURSION}") from None
    if node is None:
        return {}, {}
    lines: dict[tuple[str, ...], int] = {}
    _collect_lines(node, (), lines, source)
    return yaml.load(text, Loader=_Loader), lines


def _collect_lines(node: yaml.Node, prefix: tuple[str, ...], lines: dict, source: str) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        path = (*prefix, str(key_node.value))
        if path in lines:
            raise NashalignError(f"{source}:{key_node.start_mark.line + 1}: {'.'.join(path)}: duplicate key")
        lines[path] = key_node.start_mark.line + 1
        _collect_lines(value_node, path, lines, source)


# --------------------------------------------------------------------------- strict conversion


class _Origins:
    """Where each key came from, for messages: 'run.yaml:7', '--set loss.eta=-1' or the source."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int] | None = None):
        self.source = source
        self.lines = lines or {}
        self.overrides: dict[tuple[str, ...], str] = {}

    def where(self, path: tuple[str, ...]) -> str:
        for end in range(len(path), 0, -1):
            if path[:end] in self.overrides:
                return self.overrides[path[:end]]
            if path[:end] in self.lines:
                return f"{self.source}:{self.lines[path[:end]]}"
        return self.source

    def error(self, path: tuple[str, ...], message: str) -> NashalignError:
        key = "".join(part if part.startswith("[") or i == 0 else f".{part}" for i, part in enumerate(path))
        return NashalignError(f"{self.where(path)}: {key or '<top level>'}: {message}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return f"a list {value!r}" if len(repr(value)) < 60 else "a list"
    return str(value)


def _bounds_text(metadata: Mapping[str, Any]) -> str:
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and ".join(f"{symbols[name]} {metadata[name]:g}" for name in symbols if name in metadata)


def _type_name(kind: Any, plural: bool = False) -> str:
    origin = typing.get_origin(kind)
    if plural:
        names = {bool: "booleans", int: "integers", float: "floats", str: "strings"}
        return names.get(kind, f"items ({_type_name(kind)})")
    if kind is type(None):
        return "null"
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a float"
    if kind is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(kind))
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    if origin is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(kind)[0], plural=True)}"
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0], plural=True)}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_type_name(args[0], plural=True)}"
        return "a list of " + ", ".join(_type_name(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(kind))
    return str(kind)


def _convert(value: Any, kind: Any, path: tuple[str, ...], origins: _Origins, metadata: Mapping) -> Any:
    """Check `value` against the annotation `kind` (and metadata bounds); return the typed value."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None:
            if type(None) in options:
                return None
            raise origins.error(path, f"expected {_type_name(kind)}, got null")
        return _convert(value, _unwrap_optional(kind)[0], path, origins, metadata)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise origins.error(path, f"expected a mapping of {kind.__name__} keys, got {_describe(value)}")
        return _build(kind, value, path, origins)
    if origin is Literal:
        if value not in typing.get_args(kind) or isinstance(value, bool):
            raise origins.error(path, f"expected {_type_name(kind)}, got {_describe(value)}")
        return value
    if origin is dict:
        # A free-form section (e.g. `oracle`), validated by its consumer; only string keys are checked.
        if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
            raise origins.error(path, f"expected a mapping with string keys, got {_describe(value)}")
        return copy.deepcopy(dict(value))
    if origin is list:
        if not isinstance(value, list):
            raise origins.error(path, f"expected a list, got {_describe(value)}")
        (inner,) = typing.get_args(kind)
        return [_convert(item, inner, (*path, f"[{i}]"), origins, {}) for i, item in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise origins.error(path, f"expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise origins.error(path, f"expected a list of {len(args)} items, got {_describe(value)}")
        return tuple(
            _convert(item, inner, (*path, f"[{i}]"), origins, {})
            for i, (item, inner) in enumerate(zip(value, args))
        )
    if kind is bool:
        if not isinstance(value, bool):
            raise origins.error(path, f"expected true or false, got {_describe(value)}")
        return value
    if kind in (int, float):
        number_ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        expected = f"{_type_name(kind)} {_bounds_text(metadata)}".strip()
        if isinstance(value, bool) or not number_ok:
            raise origins.error(path, f"expected {expected}, got {_describe(value)}")
        number = kind(value)
        checks = {
            "gt": lambda bound: number > bound,
            "ge": lambda bound: number >= bound,
            "lt": lambda bound: number < bound,
            "le": lambda bound: number <= bound,
        }
        finite = number == number and number not in (float("inf"), float("-inf"))
        if not finite or not all(check(metadata[name]) for name, check in checks.items() if name in metadata):
            raise origins.error(path, f"expected {expected}, got {_describe(value)}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise origins.error(path, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"config field {'.'.join(path)} has an unsupported annotation {kind!r}")


def _build(cls: type[T], mapping: Mapping, path: tuple[str, ...], origins: _Origins) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    refused = getattr(cls, "refused_keys", {})
    for key in mapping:
        if key in refused:
            raise origins.error((*path, str(key)), f"not accepted here: {refused[key]}")
        if key not in fields:
            allowed = ", ".join(fields)
            raise origins.error((*path, str(key)), f"unknown key (allowed here: {allowed})")
    values = {}
    for name, spec in fields.items():
        if name in mapping:
            values[name] = _convert(mapping[name], hints[name], (*path, name), origins, spec.metadata)
        elif dataclasses.is_dataclass(hints[name]):
            # A section left out is built from {} so that its own checks and resolve() run too.
            values[name] = _build(hints[name], {}, (*path, name), origins)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise origins.error((*path, name), f"required key missing ({_type_name(hints[name])})")
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        try:
            check()
        except ConfigFieldError as error:
            raise origins.error((*path, *error.field.split(".")), error.message) from None
    resolve = getattr(instance, "resolve", None)
    if resolve is not None:
        resolve()
    return instance


# --------------------------------------------------------------------------- public API


def _apply_override(mapping: dict, override: str, origins: _Origins) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise NashalignError(f"--set {override}: expected key.path=value, for example loss.beta=0.1")
    value, _ = _parse_yaml(text, f"--set {override}") if text.strip() else (None, {})
    path = tuple(key.split("."))
    node = mapping
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise NashalignError(f"--set {override}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value
    origins.overrides[path] = f"--set {override}"


def from_mapping(cls: type[T], mapping: Mapping | None, *, source: str = "<config>") -> T:
    """Build and validate a config tree of type `cls` from plain data (as parsed from YAML)."""
    origins = _Origins(source)
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise origins.error((), f"expected a mapping of {cls.__name__} keys, got {_describe(mapping)}")
    return _build(cls, mapping, (), origins)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load `path` (YAML) into the dataclass tree `cls`, apply `--set key.path=value` overrides, validate.

    Raises NashalignError naming the file, line and key path on any problem.
    """
    if path is None:
        data, lines, source = {}, {}, "<defaults>"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NashalignError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise NashalignError(f"{source}: cannot read config: {error}") from None
        data, lines = _parse_yaml(text, source)
        if data is None:
            data = {}
    origins = _Origins(source, lines)
    if not isinstance(data, dict):
        raise origins.error((), f"expected a mapping of {cls.__name__} keys, got {_describe(data)}")
    for override in overrides:
        _apply_override(data, override, origins)
    return _build(cls, data, (), origins)


def validated(config: T) -> T:
    """Check a config tree built in Python exactly as if it had been loaded; return the resolved copy."""
    return from_mapping(type(config), to_dict(config), source=f"<{type(config).__name__}>")


def to_dict(config: Any) -> dict[str, Any]:
    """The config tree as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(config)


def dump_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML to `path` (atomically: temp file, then rename)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def config_subset(base: type, name: str, refused: Mapping[str, str], doc: str, module: str) -> type:
    """A config section `module.name` with `base`'s fields (defaults, bounds, help, `check`,
    `resolve`) less the keys of `refused`, which it names with the reason when written ({key: why})."""
    hints = typing.get_type_hints(base)
    unknown = set(refused) - {spec.name for spec in dataclasses.fields(base)}
    if unknown:
        raise TypeError(f"{base.__name__} has no fields {sorted(unknown)}")
    fields = [
        (spec.name, hints[spec.name], dataclasses.field(
            default=spec.default, default_factory=spec.default_factory, metadata=spec.metadata))
        for spec in dataclasses.fields(base) if spec.name not in refused
    ]
    namespace = {"__doc__": doc, "__module__": module, "refused_keys": dict(refused)}
    namespace.update({method: getattr(base, method) for method in ("check", "resolve", "spec", "tokenizer_spec")
                      if hasattr(base, method)})
    return dataclasses.make_dataclass(name, fields, namespace=namespace)


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (kind, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return inner, True
    return kind, False


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted key, annotation, field) for every leaf and section of a config tree."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        kind = hints[spec.name]
        key = f"{prefix}{spec.name}"
        yield key, kind, spec
        inner, _ = _unwrap_optional(kind)
        if dataclasses.is_dataclass(inner):
            yield from _walk(inner, f"{key}.")


def config_keys(cls: type) -> list[str]:
    """Every dotted key of a config tree, sections included (`model`, `model.lora`, `model.lora.r`, ...)."""
    return [key for key, _, _ in _walk(cls)]


def config_defaults(cls: type) -> dict[str, Any]:
    """The default of every leaf key that has one, as plain data (what `to_dict` writes), by dotted key."""
    defaults = {}
    for key, kind, spec in _walk(cls):
        if dataclasses.is_dataclass(_unwrap_optional(kind)[0]):
            continue
        if spec.default is not dataclasses.MISSING:
            defaults[key] = to_dict(spec.default)
        elif spec.default_factory is not dataclasses.MISSING:
            defaults[key] = to_dict(spec.default_factory())
    return defaults


def config_reference(cls: type) -> str:
    """A Markdown table of every leaf key: type, default, allowed range and help (for docs/)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    defaults = config_defaults(cls)
    for key, kind, spec in _walk(cls):
        inner, optional = _unwrap_optional(kind)
        if dataclasses.is_dataclass(inner):
            if optional:
                rows.append(f"| `{key}` | section, optional | unset | {spec.metadata.get('help', '')} |")
            continue
        default = "required"
        if key in defaults:
            default = yaml.safe_dump(defaults[key], default_flow_style=True).strip().removesuffix("...").strip()
        type_text = f"{_type_name(inner)} {_bounds_text(spec.metadata)}".strip()
        if optional:
            type_text += ", or null"
        rows.append(f"| `{key}` | {type_text} | `{default}` | {spec.metadata.get('help', '')} |")
    return "\n".join(rows) + "\n"
