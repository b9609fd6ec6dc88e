"""Models for a training phase: loading them, and scoring pairs under π_ref / π_t before training.

`reference_logps` is the trainer's first stage: every pair's summed log-probs under the reference
model (and, for inpo, the previous iterate; for optimistic INPO also the auxiliary policy), through the on-disk log-prob cache (nashalign.data.cache), in
inference mode. A model given by path is loaded, scores and is deleted before the function returns,
so it is never alive while the policy trains; an unset one is the policy's initial weights and is
scored with the policy object itself, before any update. With several processes the scoring is
split over them and only the main process writes the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path

import torch

from nashalign import NashalignError, progress
from nashalign.config import ModelConfig, TrainConfig
from nashalign.data.packing import pack_pairs
from nashalign.data.tokenization import TokenizedPair, collate_pairs
from nashalign.models.loader import load_causal_lm, release
from nashalign.models.loader import load_tokenizer as _load_tokenizer

logger = logging.getLogger(__name__)


def load_model(name_or_path: str | Path, model_config: ModelConfig):
    """A causal LM (local directory or hub id) with the model section's dtype, revision and trust."""
    return load_causal_lm(model_config.spec(str(name_or_path)), where="model")


def load_tokenizer(name_or_path: str | Path, model_config: ModelConfig):
    """The tokenizer of a local directory or hub id; a missing pad token becomes the EOS token."""
    return _load_tokenizer(model_config.spec(str(name_or_path)), where="model.tokenizer_name_or_path")


def _score(model, pairs: list[TokenizedPair], config: TrainConfig, cache_dir: Path, pad_id: int, device,
           accelerator=None):
    """{"chosen", "rejected"} (N,) float32 log-probs under `model`, through the cache (inference mode);
    with an `accelerator` of several processes the work is split across them (_score_sharded)."""
    from nashalign.data.cache import LogpCache, model_fingerprint, score_pairs

    model, cache = model.to(device), LogpCache(cache_dir)
    collate = lambda chunk: (pack_pairs if config.data.packing else collate_pairs)(chunk, pad_id)  # noqa: E731
    precision, salt = _scoring_precision(config, device)
    fingerprint = model_fingerprint(model)
    if salt:  # the cache's key for these scores: still a hex digest, as the cache requires
        fingerprint = hashlib.sha256(f"{fingerprint}{salt}".encode()).hexdigest()
    began = time.perf_counter()
    with precision:
        if accelerator is not None and accelerator.num_processes > 1:
            scores = _score_sharded(model, pairs, config, cache, collate, accelerator, fingerprint)
        else:
            scores = score_pairs(model, pairs, batch_size=config.data.scoring_batch_size, cache=cache,
                                 collate_fn=collate, fingerprint=fingerprint, progress=progress.is_local_main_process())
    if progress.is_main_process():
        source = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        logger.info("%s", progress.rate_line("log-probs", len(pairs), "pair", time.perf_counter() - began,
                                             f"under {source}"))
    return {side: scores[f"{side}_logps"].float().cpu() for side in ("chosen", "rejected")}


def _scoring_precision(config: TrainConfig, device):
    """(context, cache-key salt): pairs are scored as the training phase's forward passes compute,
    under bfloat16 autocast when `model.mixed_precision` is bf16 (so the policy's log-ratio to π_t is
    0 up to batching at the first step), and such scores are cached apart from those computed without autocast."""
    if config.model.mixed_precision != "bf16":
        return contextlib.nullcontext(), ""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16), "+autocast-bf16"


def _score_sharded(model, pairs, config: TrainConfig, cache, collate, accelerator,
                   fingerprint: str) -> dict[str, torch.Tensor]:
    """score_pairs split over processes: each scores every num_processes-th cache miss, the results
    are gathered on all processes, and only the main process writes them to the cache (one writer,
    so no entry is lost to concurrent rewrites of the cache file)."""
    from accelerate.utils import gather_object

    from nashalign.data.cache import score_pairs

    keys = [pair.content_hash() for pair in pairs]
    found = cache.lookup(fingerprint, keys)
    mine = found.misses[accelerator.process_index :: accelerator.num_processes]
    logger.info("log-prob cache %s: %d hits, %d to score on %d processes (%d here)", fingerprint[:12],
                len(pairs) - len(found.misses), len(found.misses), accelerator.num_processes, len(mine))
    scored = score_pairs(model, [pairs[i] for i in mine], batch_size=config.data.scoring_batch_size,
                         collate_fn=collate, progress=accelerator.is_local_main_process)
    rows = gather_object(list(zip(mine, scored["chosen_logps"].tolist(), scored["rejected_logps"].tolist())))
    chosen, rejected = found.chosen_logps.clone(), found.rejected_logps.clone()
    for index, chosen_logp, rejected_logp in rows:
        chosen[index], rejected[index] = chosen_logp, rejected_logp
    if rows and accelerator.is_main_process:
        cache.store(fingerprint, [keys[i] for i, _, _ in rows], [c for _, c, _ in rows], [r for _, _, r in rows])
    accelerator.wait_for_everyone()  # the next lookup of this cache, on any process, sees these entries
    return {"chosen_logps": chosen, "rejected_logps": rejected}


def reference_sources(config: TrainConfig, given: dict) -> dict[str, str | None]:
    """Models still to score, by role: a path, or None for the policy's initial weights."""
    sources = {"ref": config.model.ref_name_or_path}
    if config.loss.name.startswith("inpo"):
        sources["prev"] = config.model.prev_name_or_path
    if config.loss.name.startswith("inpo-optimistic"):
        sources["aux"] = config.model.aux_name_or_path
    return {role: source for role, source in sources.items() if given.get(role) is None}


def reference_logps(policy, pairs, config: TrainConfig, cache_dir: Path, pad_id: int, device, given=None,
                    accelerator=None):
    """Summed log-probs of every pair under π_ref (+ π_t for inpo*, + π̂_{t−1} for inpo-optimistic*):
    {"ref": {"chosen", "rejected"}, ...}.

    `given` supplies precomputed ones. A role whose model is unset is the policy's initial weights and
    is scored with `policy` itself (before any update); any other model is loaded, scored into the
    cache and deleted before this returns, so it is not alive during training. With an `accelerator`
    of several processes the scoring is split across them.
    """
    given = {role: logps for role, logps in (given or {}).items() if logps is not None}
    results, by_source = dict(given), {}
    for role, source in reference_sources(config, given).items():
        if source in by_source:
            results[role] = by_source[source]
        elif source is None:
            if policy is None:
                raise ValueError("reference_logps needs the initial policy to score it")
            results[role] = by_source[None] = _score(policy, pairs, config, cache_dir, pad_id, device, accelerator)
        else:
            model = load_model(source, config.model)
            results[role] = by_source[source] = _score(model, pairs, config, cache_dir, pad_id, device, accelerator)
            del model
            release()
    for role, logps in results.items():
        for side in ("chosen", "rejected"):
            if tuple(logps[side].shape) != (len(pairs),):
                raise NashalignError(f"{role} log-probs: expected shape ({len(pairs)},) for {side}")
    return results
