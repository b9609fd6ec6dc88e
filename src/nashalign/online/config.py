"""The online loop's config: only keys the loop reads, and the training config of each phase derived
from it by one pure function (`phase_config`).

The `model`, `data`, `loss`, `optim` and `output` sections are the training config's sections less
the keys the loop sets itself; writing one of those is an error that says who sets it:

    model.prev_name_or_path   π_t is the previous iterate, iter_<t-1>/train/final
    data.train_file           the loop trains on its own pairs
    data.cache_dir            the loop's log-prob cache is <run.dir>/<run.name>/logp_cache
    loss.name                 run.algorithm picks the loss
    loss.average_log_probs    read only by the ipo loss, which no online algorithm trains with
    loss.alpha, loss.lambda_u, ...  read only by srpo / sparsepo, which no online algorithm trains with
    optim.seed                each phase's seed is drawn from (run.seed, t)
    output.dir                iteration t trains into <run.dir>/<run.name>/iter_<t>/train

Keys that only some settings read are refused under the others when they differ from their default
(`OnlineConfig.check`): a loss's hyperparameters under another algorithm's loss, `pairs.decide`
with best_vs_worst, `pairs.score` without it, `model.ref_name_or_path` when the reference is the
current iterate, `sampling.batch_size` with vLLM and `sampling.tensor_parallel_size` with
transformers.

A run directory keeps the config it was made with; `config_change` says whether another config may
continue it: the same config, or a larger `run.iterations` (with `prompts.files` extended by one
file per added iteration), which extends a finished run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nashalign.config import (
    ConfigFieldError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    TrainConfig,
    _field,
    config_defaults,
    config_subset,
    from_mapping,
    to_dict,
)
from nashalign.online.prompts import PromptsConfig

__all__ = [
    "ALGORITHMS", "OnlineConfig", "PairSettings", "RunSettings", "SamplingSettings", "SummarySettings",
    "aux_policy_path", "config_change", "has_aux_phase", "pair_method", "phase_config", "policy_path",
    "reference_path", "run_directory", "stage_seed",
]

ALGORITHMS = {
    # algorithm: (loss name, reference is the current iterate, default pair construction)
    "inpo": ("inpo", False, "tournament"),
    "inpo-optimistic": ("inpo-optimistic", False, "tournament"),
    "online-ipo": ("online-ipo", False, "tournament"),
    "nash-md": ("nash-md", False, "mixture"),
    "iterative-dpo": ("dpo", True, "best_vs_worst"),
    "sppo": ("sppo", True, "all_pairs"),
}
"""nash-md's "mixture": each sample of π_t is judged against one opponent sampled from the geometric
mixture of π_t and π_ref (no pair construction)."""


@dataclasses.dataclass
class RunSettings:
    name: str = _field("online", "run name: artifacts go to <dir>/<name>/")
    dir: str = _field("runs", "parent directory of runs")
    algorithm: Literal["inpo", "inpo-optimistic", "online-ipo", "nash-md", "iterative-dpo", "sppo"] = _field(
        "inpo", "which online algorithm"
    )
    iterations: int = _field(
        3, "T: online iterations (the paper uses 3); raising it on a finished run extends the run", ge=1
    )
    seed: int = _field(0, "seed of sampling, pair decisions and training", ge=0)
    ref_update_every: int | None = _field(
        None, "M: after iteration t with (t + 1) % M == 0 the reference becomes the current policy "
        "(π_ref ← π_{t+1}; reference refresh, COMAL); unset: π_ref stays fixed", ge=1
    )


@dataclasses.dataclass
class SamplingSettings:
    backend: Literal["transformers", "vllm", "auto"] = _field("auto", "generation engine")
    samples_per_prompt: int = _field(8, "K: responses sampled per prompt", ge=2)
    max_new_tokens: int = _field(256, "response length limit in tokens", ge=1)
    temperature: float = _field(1.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = _field(1.0, "nucleus sampling mass", gt=0, le=1)
    batch_size: int = _field(
        64, "rows (prompt, sample) decoded together (transformers backend); more rows use the matrix units better "
        "and hold more KV cache (samples do not depend on it)", ge=1
    )
    dtype: Literal["auto", "float32", "bfloat16"] = _field(
        "auto", "dtype the sampler's copy of the policy computes in; auto: model.dtype (on CPUs with AVX512-BF16 "
        "bfloat16 samples several times faster, docs/performance.md); training is unaffected"
    )
    tensor_parallel_size: int = _field(1, "GPUs per vLLM engine", ge=1)
    gpu_memory_utilization: float = _field(
        0.5, "vLLM on a GPU: share of its memory the engine takes (weights + KV cache)", gt=0, le=1
    )
    engine_args: dict[str, Any] = _field(
        help="further vllm.LLM arguments (dtype, max_model_len, enforce_eager, enable_sleep_mode, ...)",
        factory=dict,
    )
    mixture_coef: float = _field(
        0.5, "nash-md: β, the opponent is sampled token by token from π_t^(1−β)·π_ref^β (normalized)", ge=0, le=1
    )


@dataclasses.dataclass
class PairSettings:
    method: Literal["auto", "tournament", "best_vs_worst", "all_pairs"] = _field(
        "auto", "pair construction; auto: the algorithm's default"
    )
    decide: Literal["sample", "threshold"] = _field(
        "sample", "tournament / all_pairs: a comparison's outcome, a Bernoulli(P) draw or P > 1/2"
    )
    score: Literal["borda", "copeland"] = _field("borda", "best_vs_worst: ranking with a pairwise oracle")


@dataclasses.dataclass
class SummarySettings:
    win_rate: bool = _field(
        True, "measure the win rate of π_{t+1} over π_t: π_{t+1} samples iteration t's prompts (unless "
        "iteration t+1 answers the same ones) and N·K comparisons are judged; false: neither, the row's "
        "win rate is null"
    )


_ONLINE = "the online loop sets it"
OnlineModelConfig = config_subset(
    ModelConfig, "OnlineModelConfig",
    {"prev_name_or_path": f"{_ONLINE} (π_t is the previous iterate, iter_<t-1>/train/final)",
     "aux_name_or_path": f"{_ONLINE} (inpo-optimistic: π̂_{{t−1}} is iter_<t-1>/aux/final, π̂_0 = π_0)"},
    "The policy π_0, the reference and how every phase loads and trains the policy.", __name__,
)
OnlineDataConfig = config_subset(
    DataConfig, "OnlineDataConfig",
    {"train_file": f"{_ONLINE} (each iteration trains on its own pairs, iter_<t>/pairs.jsonl)",
     "cache_dir": f"{_ONLINE} (the log-prob cache is <run.dir>/<run.name>/logp_cache)"},
    "Token limits of the pairs (applied as in offline training) and scoring.", __name__,
)
OnlineLossConfig = config_subset(
    LossConfig, "OnlineLossConfig",
    {"name": f"{_ONLINE} (run.algorithm picks the loss: iterative-dpo → dpo, any other → its own name)",
     "average_log_probs": "read only by the ipo loss, which no online algorithm trains with",
     **{key: "read only by the srpo / sparsepo losses, which no online algorithm trains with"
        for key in ("alpha", "revision_instruction", "revision_template", "lambda_u", "lambda_d", "mask",
                    "mask_activations", "shared_mask", "mask_weight_decay")}},
    "Hyperparameters of the algorithm's loss.", __name__,
)
OnlineOptimConfig = config_subset(
    OptimConfig, "OnlineOptimConfig",
    {"seed": f"{_ONLINE} (each training phase's seed is drawn from run.seed and the iteration)"},
    "The optimizer of each iteration's training phase.", __name__,
)
OnlineOutputConfig = config_subset(
    OutputConfig, "OnlineOutputConfig",
    {"dir": f"{_ONLINE} (iteration t trains into <run.dir>/<run.name>/iter_<t>/train)"},
    "Checkpointing and logging of each training phase.", __name__,
)


@dataclasses.dataclass
class OnlineConfig:
    model: OnlineModelConfig = _field(help="the initial policy π_0 (and π_ref unless ref_name_or_path is set)")
    oracle: dict[str, Any] | None = _field(None, "the preference oracle: a mapping with a 'type' key")
    run: RunSettings = _field(help="name, algorithm, iterations, seed", factory=RunSettings)
    prompts: PromptsConfig = _field(help="the prompts the policy answers", factory=PromptsConfig)
    sampling: SamplingSettings = _field(help="how responses are sampled", factory=SamplingSettings)
    pairs: PairSettings = _field(help="how pairs are built from judgments", factory=PairSettings)
    summary: SummarySettings = _field(help="what the per-iteration summary row measures", factory=SummarySettings)
    data: OnlineDataConfig = _field(help="token limits and scoring batch size", factory=OnlineDataConfig)
    loss: OnlineLossConfig = _field(help="hyperparameters of the algorithm's loss", factory=OnlineLossConfig)
    optim: OnlineOptimConfig = _field(help="the optimizer of each iteration's training phase", factory=OnlineOptimConfig)
    output: OnlineOutputConfig = _field(help="checkpointing and logging of each training phase",
                                        factory=OnlineOutputConfig)

    def check(self) -> None:
        files = self.prompts.files
        if files is not None and len(files) != self.run.iterations:
            raise ConfigFieldError(
                "prompts",
                f"files: expected one file per iteration, {self.run.iterations} (run.iterations), got {len(files)}",
            )
        problem = _ignored_key(self)
        if problem is not None:
            raise ConfigFieldError(*problem)


def _changed(section: Any, key: str) -> bool:
    """Whether `section.key` differs from the value the section has when the key is not written."""
    return getattr(section, key) != getattr(from_mapping(type(section), {}), key)


def _ignored_key(config: OnlineConfig) -> tuple[str, str] | None:
    """(dotted key, why) of the first key set to a value the chosen settings would ignore."""
    from nashalign.core.losses import LOSSES, loss_hyperparameters

    algorithm = config.run.algorithm
    loss_name, ref_is_current, _ = ALGORITHMS[algorithm]
    read = {"beta", *loss_hyperparameters(loss_name)}  # beta also scales the logged rewards
    if algorithm == "inpo-optimistic":  # the auxiliary policy's loss reads the same keys
        read |= set(loss_hyperparameters("inpo-optimistic-aux"))
    specific = {key for name in LOSSES for key in loss_hyperparameters(name)}
    for spec in dataclasses.fields(config.loss):
        if spec.name in specific - read and _changed(config.loss, spec.name):
            return f"loss.{spec.name}", (f"run.algorithm {algorithm!r} trains with loss {loss_name!r}, which does "
                                         f"not read {spec.name}; remove it")
    loss = config.loss
    if loss_name.startswith("inpo") and loss.tau is not None and loss.tau >= loss.eta:
        return "loss.tau", f"expected tau < eta ({loss.eta}) so that tau/eta < 1, got {loss.tau}"
    if ref_is_current:
        for key, value in (("model.ref_name_or_path", config.model.ref_name_or_path),
                           ("run.ref_update_every", config.run.ref_update_every)):
            if value is not None:
                return key, f"run.algorithm {algorithm!r} uses the current iterate π_t as the reference; remove it"
    if algorithm != "nash-md" and _changed(config.sampling, "mixture_coef"):
        return "sampling.mixture_coef", f"read only by run.algorithm 'nash-md', not {algorithm!r}; remove it"
    if algorithm == "nash-md":
        for key in ("method", "decide"):
            if _changed(config.pairs, key):
                return f"pairs.{key}", ("nash-md judges each sample against one opponent from the mixture and "
                                        "trains on P(y ≻ y′) itself: no pair construction; remove it")
    method = pair_method(config)
    if method == "best_vs_worst" and _changed(config.pairs, "decide"):
        return "pairs.decide", "best_vs_worst ranks the samples and draws no decision; remove it"
    if method != "best_vs_worst" and _changed(config.pairs, "score"):
        return "pairs.score", f"read only by best_vs_worst, and the pair method is {method}; remove it"
    backend = config.sampling.backend
    if backend == "vllm" and _changed(config.sampling, "batch_size"):
        return "sampling.batch_size", "read only by the transformers backend (vLLM batches by itself); remove it"
    if config.sampling.dtype != "auto" and "dtype" in config.sampling.engine_args:
        return "sampling.engine_args", "sets dtype, and so does sampling.dtype; keep one"
    for key in ("tensor_parallel_size", "gpu_memory_utilization", "engine_args"):
        if backend == "transformers" and _changed(config.sampling, key):
            return f"sampling.{key}", "read only by the vllm backend; remove it"
    return None


def pair_method(config: OnlineConfig) -> str:
    """The pair construction: `pairs.method`, or the algorithm's default for "auto"."""
    return ALGORITHMS[config.run.algorithm][2] if config.pairs.method == "auto" else config.pairs.method


def stage_seed(seed: int, t: int, stage: int) -> int:
    """The seed of one stage of iteration t (0 sampling, 1 pair decisions, 2 training, 3 the summary's
    extra samples, 4 nash-md's opponents, 5 the auxiliary phase's training), a 32-bit integer drawn
    from (run.seed, t, stage)."""
    return int(np.random.SeedSequence([seed, t, stage]).generate_state(1, dtype=np.uint32)[0])


def sampling_spec(config: OnlineConfig, name_or_path: str):
    """How the sampler loads `name_or_path` (a policy or, for nash-md, the reference): the model
    section's settings, in `sampling.dtype` unless that is "auto"."""
    spec = config.model.spec(name_or_path)
    return spec if config.sampling.dtype == "auto" else spec.replace(dtype=config.sampling.dtype)


def run_directory(config: OnlineConfig) -> Path:
    return Path(config.run.dir) / config.run.name


def policy_path(config: OnlineConfig, t: int) -> str:
    """π_t: the initial policy for t = 0, else the weights iteration t − 1 trained."""
    if t == 0:
        return config.model.name_or_path
    return str(run_directory(config) / f"iter_{t - 1}" / "train" / "final")


def aux_policy_path(config: OnlineConfig, t: int) -> str:
    """Optimistic INPO's auxiliary policy π̂_t: π_0 for t = 0, else the weights iteration t trained
    into iter_<t>/aux (iteration 0 trains no auxiliary model)."""
    if t == 0:
        return config.model.name_or_path
    return str(run_directory(config) / f"iter_{t}" / "aux" / "final")


def reference_path(config: OnlineConfig, t: int) -> str:
    """π_ref of iteration t: π_t itself (iterative-dpo, sppo); else, with run.ref_update_every = M,
    π_{M·⌊t/M⌋} once t ≥ M (refreshed after every M-th iteration); else `model.ref_name_or_path` or π_0."""
    _, ref_is_current, _ = ALGORITHMS[config.run.algorithm]
    every = config.run.ref_update_every
    if ref_is_current:
        return policy_path(config, t)
    if every is not None and t >= every:
        return policy_path(config, every * (t // every))
    return config.model.ref_name_or_path or config.model.name_or_path


def has_aux_phase(config: OnlineConfig, t: int) -> bool:
    """Whether iteration t also trains optimistic INPO's auxiliary policy π̂_t (inpo-optimistic, t ≥ 1)."""
    return config.run.algorithm == "inpo-optimistic" and t >= 1


def phase_config(config: OnlineConfig, t: int, aux: bool = False) -> TrainConfig:
    """The training config of iteration t (pure: no I/O, equal configs give equal results).

    The policy is π_t; the reference is `reference_path` (π_ref, refreshed every run.ref_update_every
    iterations, or π_t itself for iterative-dpo and sppo); prev is π_t (inpo, inpo-optimistic); the loss
    is the algorithm's, except that inpo-optimistic trains π_1 with plain inpo; inpo-optimistic at
    t ≥ 1 also scores the pairs under the auxiliary policy π̂_{t−1} (aux). The seed is drawn from
    (run.seed, t); the phase writes to iter_<t>/train and the log-prob cache is the run's. Scoring and
    training both read it.

    `aux=True` (inpo-optimistic, t ≥ 1): the auxiliary phase, which trains π̂_t from π̂_{t−1} with
    loss inpo-optimistic-aux on the same pairs and reference log-probs, into iter_<t>/aux.
    """
    loss_name, _, _ = ALGORITHMS[config.run.algorithm]
    if aux and not has_aux_phase(config, t):
        raise ValueError(f"iteration {t} of {config.run.algorithm!r} trains no auxiliary policy")
    run_dir, policy = run_directory(config), policy_path(config, t)
    optimistic = has_aux_phase(config, t)
    if loss_name == "inpo-optimistic" and not optimistic:
        loss_name = "inpo"  # π_1 from π_0 by plain INPO, π̂_0 = π_0
    return from_mapping(TrainConfig, {
        "model": {**to_dict(config.model), "name_or_path": aux_policy_path(config, t - 1) if aux else policy,
                  "ref_name_or_path": reference_path(config, t),
                  "prev_name_or_path": policy if loss_name.startswith("inpo") else None,
                  "aux_name_or_path": aux_policy_path(config, t - 1) if optimistic else None},
        "data": {**to_dict(config.data), "cache_dir": str(run_dir / "logp_cache")},
        "loss": {**to_dict(config.loss), "name": "inpo-optimistic-aux" if aux else loss_name},
        "optim": {**to_dict(config.optim), "seed": stage_seed(config.run.seed, t, 5 if aux else 2) % 2**31},
        "output": {**to_dict(config.output), "dir": str(run_dir / f"iter_{t}" / ("aux" if aux else "train"))},
    }, source=f"<iteration {t} of {run_dir}>")


_UNSET = object()


# Keys a run may change when it is resumed or extended: they set how fast or how visibly the work is
# done, not what is computed (a run that ran out of memory resumes with a smaller batch).
RESUMABLE_CHANGES = frozenset({
    "sampling.batch_size", "data.scoring_batch_size", "sampling.gpu_memory_utilization", "output.report_to",
})


def _changes(old: Mapping, new: Mapping, prefix: str = ""):
    """(dotted key, old value, new value) of every difference, sections compared key by key (a
    section the old config lacks compares as empty)."""
    for key in [*new, *(key for key in old if key not in new)]:
        before, after = old.get(key, _UNSET), new.get(key, _UNSET)
        if before is _UNSET and isinstance(after, Mapping):
            before = {}
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            yield from _changes(before, after, f"{prefix}{key}.")
        elif before != after:
            yield f"{prefix}{key}", before, after


def config_change(saved: Mapping, config: OnlineConfig) -> str | None:
    """Why `config` may not continue a run made with the config `saved` (as read from its
    config.yaml), naming the first key that changed; None when it may: the same config, or a larger
    run.iterations with prompts.files (if set) extended by the added iterations' files. The keys in
    RESUMABLE_CHANGES may differ, and a key the saved config lacks (a run made by an older nashalign)
    counts as unchanged when it holds its default."""
    import yaml

    def show(value: Any) -> str:
        return "unset" if value is _UNSET else repr(value)

    defaults = config_defaults(type(config))
    for key, before, after in _changes(saved, yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False))):
        if key in RESUMABLE_CHANGES or (before is _UNSET and key in defaults and after == defaults[key]):
            continue
        if key == "run.iterations" and isinstance(before, int) and isinstance(after, int):
            if after > before:
                continue
            return f"run.iterations: was {before}, now {after}; a run can be extended, not shortened"
        extended = isinstance(before, list) and isinstance(after, list) and after[: len(before)] == before
        if key == "prompts.files" and extended:
            continue
        hint = "; only files for the added iterations may be appended" if key == "prompts.files" else ""
        return f"{key}: was {show(before)}, now {show(after)}{hint}"
    return None
