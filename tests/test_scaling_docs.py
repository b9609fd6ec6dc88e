"""docs/scaling.md and the configs it names: every named config exists and loads; the accelerate
configs load through accelerate's own launcher code with the settings nashalign's trainer relies on;
the paper's 8B config holds the paper's values and agrees with the accelerate config it runs under.

Accelerate configs are checked as `accelerate launch --config_file X` reads them: the launcher's
parser and validation, then the environment it hands the processes, from which the FSDP or DeepSpeed
plugin is built. Accelerate copies unknown keys of `fsdp_config` / `deepspeed_config` silently, so
every such key is also checked against the launcher's arguments (a misspelled key fails here).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from nashalign.config import TrainConfig, load_config
from nashalign.online.loop import OnlineConfig, phase_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
ACCELERATE_DIR = ROOT / "configs" / "accelerate"
PAPER_CONFIG = ROOT / "configs" / "llama3-8b-inpo.yaml"


def launch_view(path: Path, monkeypatch) -> dict:
    """What `accelerate launch --config_file path` makes of the file: its ClusterConfig ("config"),
    the environment of the launched processes ("env"), and the FSDP or DeepSpeed plugin that
    accelerate builds from that environment ("plugin", None for DDP). Raises ValueError on a key
    that accelerate's launcher does not know."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    arguments = {action.dest for action in parser._actions}
    args, config, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    unknown = [key for key in config.fsdp_config if key not in arguments]
    unknown += [key for key in config.deepspeed_config if key not in arguments]
    if unknown:
        raise ValueError(f"{path.name}: keys accelerate launch does not know: {unknown}")
    if config.distributed_type == DistributedType.DEEPSPEED:
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for name, value in env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    plugin = None
    if config.distributed_type == DistributedType.FSDP:
        plugin = FullyShardedDataParallelPlugin()
    elif config.distributed_type == DistributedType.DEEPSPEED:
        plugin = DeepSpeedPlugin()
    return {"config": config, "env": env, "plugin": plugin}


def load_named_config(path: Path, monkeypatch):
    """Load a config file the way its consumer does: accelerate configs with launch_view, nashalign
    configs with TrainConfig, or OnlineConfig when they have sections only the online loop has."""
    if path.parent == ACCELERATE_DIR:
        return launch_view(path, monkeypatch)
    sections = set(yaml.safe_load(path.read_text()) or {})
    train_sections = set(TrainConfig.__dataclass_fields__)
    return load_config(TrainConfig if sections <= train_sections else OnlineConfig, path)


def named_configs() -> list[str]:
    return sorted(set(re.findall(r"configs/[\w./-]+\.ya?ml", DOC.read_text())))


# --------------------------------------------------------------------------- the document


def test_scaling_docs_name_the_shipped_configs():
    assert {
        "configs/accelerate/ddp.yaml",
        "configs/accelerate/fsdp.yaml",
        "configs/accelerate/deepspeed-zero2.yaml",
        "configs/accelerate/deepspeed-zero3.yaml",
        "configs/llama3-8b-inpo.yaml",
    } <= set(named_configs())


@pytest.mark.parametrize("name", named_configs())
def test_every_config_named_in_scaling_docs_exists_and_loads(name, monkeypatch):
    path = ROOT / name
    assert path.is_file(), f"docs/scaling.md names {name}, which does not exist"
    assert load_named_config(path, monkeypatch) is not None


def test_the_three_prompt_splits_of_the_docs_are_the_configs():
    """The documented `prompts.files` block is the paper config's, one file per iteration, and
    each iteration t reads its own file (the final policy's samples reuse the last)."""
    from nashalign.online.loop import prompt_file

    block = DOC.read_text().split("### Three prompt splits", 1)[1].split("###", 1)[0]
    documented = yaml.safe_load(re.search(r"    prompts:\n(?:      .*\n)+", block).group(0))["prompts"]["files"]
    config = load_config(OnlineConfig, PAPER_CONFIG)
    assert config.prompts.files == documented and config.prompts.file is None
    assert len(set(documented)) == config.run.iterations == 3
    assert [prompt_file(config.prompts, t) for t in range(4)] == [*documented, documented[-1]]


# --------------------------------------------------------------------------- accelerate configs


def test_every_accelerate_config_is_named_in_the_docs():
    shipped = {f"configs/accelerate/{path.name}" for path in ACCELERATE_DIR.glob("*.yaml")}
    assert shipped and shipped <= set(named_configs())


def test_ddp_config(monkeypatch):
    from accelerate.utils import DistributedType

    view = launch_view(ACCELERATE_DIR / "ddp.yaml", monkeypatch)
    assert view["config"].distributed_type == DistributedType.MULTI_GPU
    assert "ACCELERATE_USE_FSDP" not in view["env"] and "ACCELERATE_USE_DEEPSPEED" not in view["env"]


def test_fsdp_config_fully_shards_llama_layers_and_saves_full_weights(monkeypatch):
    """FSDP2 with resharding after forward (full sharding), one unit per LlamaDecoderLayer (the
    class of the tiny models and of LLaMA-3), a full state dict for final/, whole weights in every
    process at load time (the trainer scores with them before wrapping), and no activation
    checkpointing of FSDP's own (model.gradient_checkpointing does it)."""
    from torch.distributed.fsdp import StateDictType
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    plugin = launch_view(ACCELERATE_DIR / "fsdp.yaml", monkeypatch)["plugin"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == [LlamaDecoderLayer.__name__]
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.activation_checkpointing is False


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_leave_accumulation_to_nashalign(stage, monkeypatch):
    """ZeRO stage as named; DeepSpeed's own accumulation 1 (nashalign accumulates); the micro-batch
    size left to the trainer ("auto"); bf16 from the launcher; for ZeRO-3 whole weights at load
    (no zero.Init) and the 16-bit gather that saving final/ needs."""
    view = launch_view(ACCELERATE_DIR / f"deepspeed-zero{stage}.yaml", monkeypatch)
    plugin = view["plugin"]
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == stage and ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert view["env"]["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if stage == 3:
        assert plugin.zero3_init_flag is False
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_misspelled_accelerate_key_fails(tmp_path, monkeypatch):
    """Accelerate itself would copy `fsdp_state_dict_typ` silently and save sharded weights."""
    text = (ACCELERATE_DIR / "fsdp.yaml").read_text().replace("fsdp_state_dict_type:", "fsdp_state_dict_typ:")
    (tmp_path / "fsdp.yaml").write_text(text)
    with pytest.raises(ValueError, match="fsdp_state_dict_typ"):
        launch_view(tmp_path / "fsdp.yaml", monkeypatch)
    text = (ACCELERATE_DIR / "ddp.yaml").read_text().replace("num_processes:", "num_procesess:")
    (tmp_path / "ddp.yaml").write_text(text)
    with pytest.raises(ValueError, match="num_procesess"):
        launch_view(tmp_path / "ddp.yaml", monkeypatch)


# --------------------------------------------------------------------------- the paper's config


def test_paper_config_holds_the_papers_setting(monkeypatch):
    """INPO (ICLR 2025): η = 0.005, τ = η/3 (resolved from an unset tau), lr 5e-7 cosine with 3%
    warmup, 2 epochs, 3 iterations, K = 8, tournament pairs from a pair preference model, bf16 with
    gradient checkpointing, vLLM sampling; the global batch, per-device batch × accumulation ×
    the processes of the ZeRO-3 config it is launched with, is 128; DeepSpeed clips at
    optim.max_grad_norm."""
    from nashalign.judges.model_judges import PairModelConfig
    from nashalign.judges.oracles import parse_config

    config = load_config(OnlineConfig, PAPER_CONFIG)
    assert config.run.algorithm == "inpo" and phase_config(config, 0).loss.name == "inpo"
    assert config.loss.eta == 0.005 and config.loss.tau == config.loss.eta / 3
    assert (config.optim.lr, config.optim.schedule, config.optim.warmup_ratio) == (5e-7, "cosine", 0.03)
    assert config.optim.epochs == 2 and config.run.iterations == 3
    assert config.sampling.samples_per_prompt == 8 and config.sampling.backend == "vllm"
    assert len(config.prompts.files) == config.run.iterations  # a fresh third of the prompts per iteration
    assert config.pairs.method == "tournament"
    assert config.model.dtype == "bfloat16" and config.model.mixed_precision == "bf16"
    assert config.model.gradient_checkpointing
    oracle = dict(config.oracle)
    assert oracle.pop("type") == "pair_model"
    judge = parse_config(PairModelConfig, oracle, "oracle")
    assert judge.path.endswith("pair-preference-model-LLaMA3-8B") and len(judge.labels) == 2

    view = launch_view(ACCELERATE_DIR / "deepspeed-zero3.yaml", monkeypatch)
    processes = view["config"].num_processes
    assert config.optim.per_device_batch_size * config.optim.gradient_accumulation_steps * processes == 128
    assert view["plugin"].deepspeed_config["gradient_clipping"] == config.optim.max_grad_norm
    tokens = config.data.max_prompt_length + config.sampling.max_new_tokens
    assert tokens <= config.data.max_length

