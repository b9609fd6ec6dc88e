"""On-disk cache of summed response log-probs, keyed by model fingerprint and example content hash.

The reference model (and, for INPO, the previous iterate) scores the whole dataset once, in inference
mode, before training; during training only the policy is in memory. The scores live in

    <directory>/<fingerprint>.safetensors
        keys            (n, K) uint8    example content hashes (hex strings, stored as their bytes)
        chosen_logps    (n,)   float32  summed response log-probs of prompt+chosen
        rejected_logps  (n,)   float32  summed response log-probs of prompt+rejected
        metadata: format, version, fingerprint, sha256 of the three tensors' bytes

A changed model has another fingerprint (another file); a changed example has another content hash
(a miss). Files are replaced atomically (temporary sibling + os.replace), and a file that cannot be
read whole and verified is reported with a `CacheFileWarning` and treated as empty: a miss, never
wrong data. Two processes storing to the same fingerprint at once may lose one's new entries (the
last rename wins), which only costs a re-scoring.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nashalign.data.logprobs import DEFAULT_CHUNK_SIZE, pair_logps
from nashalign.data.token_logps import unwrap_model

logger = logging.getLogger(__name__)

FORMAT = "nashalign.logp_cache"
VERSION = "1"
TENSOR_NAMES = ("keys", "chosen_logps", "rejected_logps")
# Weights are hashed in blocks of this many bytes, so at most one block is copied to the host at a time.
HASH_BLOCK_BYTES = 64 * 2**20
# Config entries that do not change a model's log-probs (runtime switches, provenance); a weight's
# dtype is hashed with the weight itself.
_IGNORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "architectures",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "dtype",
        "torch_dtype",
    }
)
_FINGERPRINT = re.compile(r"[0-9a-f]{16,128}")


class CacheFileWarning(UserWarning):
    """A cache file could not be read or verified; its entries are treated as misses."""


class _UnreadableCache(Exception):
    pass


# --- model fingerprint -----------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex digest of everything that determines the model's log-probs.

    Hashed, in this order: the model's class and config (JSON with sorted keys, without the entries in
    `_IGNORED_CONFIG_KEYS`); for a peft model its adapter configs and each adapter layer's state
    (active adapters, disabled, merged, scaling); then every tensor of `model.state_dict()` (all
    parameters and persistent buffers) in sorted name order, each as its name, dtype, shape and raw
    bytes. A tensor shared under two names (tied embeddings) is hashed once and referenced by name.
    DistributedDataParallel and torch.compile wrappers are looked through, so they do not change it.

    Cost: one pass over every weight byte, streamed in blocks of HASH_BLOCK_BYTES (the only host
    memory used); sha256 runs at about 1 GB/s per core, so a 7B-parameter bfloat16 model (14 GB)
    takes some 15 s plus the device-to-host copies. Weights on the meta device (offloaded) cannot be
    hashed and raise ValueError.
    """
    model = unwrap_model(model, adapters=False)  # the adapters are part of what is hashed
    digest = hashlib.sha256()
    digest.update(json.dumps(_describe(model), sort_keys=True, default=_json_default).encode())
    seen: dict[int, str] = {}
    state = model.state_dict(keep_vars=True)
    for name in sorted(state):
        tensor = state[name].detach()
        if id(state[name]) in seen:
            digest.update(f"\0{name}=tied:{seen[id(state[name])]}".encode())
            continue
        seen[id(state[name])] = name
        digest.update(f"\0{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        _hash_tensor_bytes(digest, name, tensor)
    return digest.hexdigest()


def _describe(model: torch.nn.Module) -> dict[str, Any]:
    """The non-tensor part of the fingerprint: class, config, peft adapter configs and layer states."""
    config = getattr(model, "config", None)
    described: dict[str, Any] = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _without_ignored_keys(config.to_dict()) if hasattr(config, "to_dict") else None,
    }
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        from peft.tuners.tuners_utils import BaseTunerLayer

        described["peft"] = {
            name: _without_ignored_keys(
                value.to_dict(), {"base_model_name_or_path", "inference_mode", "peft_version"}
            )
            for name, value in peft_config.items()
        }
        described["adapter_layers"] = {
            name: {
                "active": list(module.active_adapters),
                "disabled": bool(module.disable_adapters),
                "merged": list(module.merged_adapters),
                "scaling": getattr(module, "scaling", None),
            }
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
        }
    return described


def _without_ignored_keys(value: Any, extra: frozenset[str] | set[str] = frozenset()) -> Any:
    if isinstance(value, dict):
        return {
            str(key): _without_ignored_keys(item, extra)
            for key, item in value.items()
            if key not in _IGNORED_CONFIG_KEYS and key not in extra
        }
    if isinstance(value, (list, tuple)):
        return [_without_ignored_keys(item, extra) for item in value]
    return value


def _json_default(value: Any) -> Any:
    """JSON for the values configs hold besides plain types: sets (sorted), nested configs, dtypes."""
    if isinstance(value, (set, frozenset)):
        return sorted(str(item) for item in value)
    if hasattr(value, "to_dict"):
        return _without_ignored_keys(value.to_dict())
    return str(value)


def _hash_tensor_bytes(digest, name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":
        raise ValueError(f"cannot fingerprint {name}: its weights are on the meta device (offloaded)")
    flat = tensor.reshape(-1)
    step = max(1, HASH_BLOCK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        block = flat[start : start + step].to("cpu").contiguous()
        digest.update(block.view(torch.uint8).numpy())


# --- the cache -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLookup:
    """Result of `LogpCache.lookup` for n keys: values where `hit`, NaN elsewhere.

    chosen_logps, rejected_logps (n,) float32; hit (n,) bool; misses: indices of the keys not found.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    hit: torch.Tensor

    @property
    def misses(self) -> list[int]:
        return (~self.hit).nonzero().flatten().tolist()


class LogpCache:
    """Summed log-probs per (model fingerprint, example content hash), one safetensors file per model."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, fingerprint: str) -> Path:
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"a model fingerprint is 16 to 128 lowercase hex digits, got {fingerprint!r}")
        return self.directory / f"{fingerprint}.safetensors"

    def load(self, fingerprint: str) -> dict[str, tuple[float, float]]:
        """All entries stored for `fingerprint`: content hash -> (chosen_logps, rejected_logps).

        A missing file is empty; an unreadable or inconsistent one warns (CacheFileWarning) and is empty.
        """
        path = self.path(fingerprint)
        if not path.exists():
            return {}
        try:
            return _read_entries(path, fingerprint)
        except _UnreadableCache as error:
            warnings.warn(
                f"log-prob cache file {path} is unusable ({error}); its entries are treated as misses "
                "and will be recomputed",
                CacheFileWarning,
                stacklevel=2,
            )
            return {}

    def lookup(self, fingerprint: str, keys: Sequence[str]) -> CacheLookup:
        """Stored values of `keys` (content hashes) under `fingerprint`, and which of them are missing."""
        entries = self.load(fingerprint)
        found = [entries.get(_normalize_key(key)) for key in keys]
        return CacheLookup(
            chosen_logps=torch.tensor([v[0] if v else math.nan for v in found], dtype=torch.float32),
            rejected_logps=torch.tensor([v[1] if v else math.nan for v in found], dtype=torch.float32),
            hit=torch.tensor([v is not None for v in found], dtype=torch.bool),
        )

    def store(
        self,
        fingerprint: str,
        keys: Sequence[str],
        chosen_logps: torch.Tensor | Sequence[float],
        rejected_logps: torch.Tensor | Sequence[float],
    ) -> Path:
        """Add (or overwrite) entries and rewrite the fingerprint's file atomically; returns its path."""
        chosen = torch.as_tensor(chosen_logps, dtype=torch.float32).detach().cpu().reshape(-1)
        rejected = torch.as_tensor(rejected_logps, dtype=torch.float32).detach().cpu().reshape(-1)
        if not len(keys) == chosen.numel() == rejected.numel():
            raise ValueError(
                f"store needs one chosen and one rejected value per key: {len(keys)} keys, "
                f"{chosen.numel()} chosen, {rejected.numel()} rejected"
            )
        if chosen.isnan().any() or rejected.isnan().any():
            raise ValueError("refusing to cache NaN log-probs")
        path = self.path(fingerprint)
        entries = self.load(fingerprint)
        entries.update(zip((_normalize_key(key) for key in keys), zip(chosen.tolist(), rejected.tolist())))
        if entries:
            _write_entries(path, fingerprint, entries)
        return path


def _normalize_key(key: str) -> str:
    try:
        return bytes.fromhex(key).hex()
    except (TypeError, ValueError):
        raise ValueError(f"a cache key is a hex string (an example's content hash), got {key!r}") from None


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in TENSOR_NAMES:
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def _write_entries(path: Path, fingerprint: str, entries: dict[str, tuple[float, float]]) -> None:
    from safetensors.torch import save

    from nashalign.data.artifacts import atomic_write_bytes

    raw_keys = [bytes.fromhex(key) for key in entries]
    widths = {len(key) for key in raw_keys}
    if len(widths) != 1:
        raise ValueError(
            f"all cache keys of one file must have the same length, got byte lengths {sorted(widths)}"
        )
    values = torch.tensor(list(entries.values()), dtype=torch.float32).reshape(-1, 2)
    tensors = {
        "keys": torch.frombuffer(bytearray(b"".join(raw_keys)), dtype=torch.uint8).reshape(len(raw_keys), -1),
        "chosen_logps": values[:, 0].clone(),
        "rejected_logps": values[:, 1].clone(),
    }
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "sha256": _checksum(tensors),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _read_entries(path: Path, fingerprint: str) -> dict[str, tuple[float, float]]:
    """Entries of a cache file, verified; raises _UnreadableCache saying what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            if names != set(TENSOR_NAMES):
                raise _UnreadableCache(f"tensors {sorted(names)}, expected {list(TENSOR_NAMES)}")
            tensors = {name: handle.get_tensor(name) for name in TENSOR_NAMES}
    except (OSError, SafetensorError) as error:
        raise _UnreadableCache(f"not a readable safetensors file: {error}") from None
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise _UnreadableCache(
            f"format {metadata.get('format')!r} version {metadata.get('version')!r}, expected {FORMAT!r} {VERSION!r}"
        )
    if metadata.get("fingerprint") != fingerprint:
        raise _UnreadableCache(f"it holds fingerprint {metadata.get('fingerprint')!r}")
    keys, chosen, rejected = (tensors[name] for name in TENSOR_NAMES)
    if (
        keys.dtype != torch.uint8
        or keys.ndim != 2
        or chosen.dtype != torch.float32
        or rejected.dtype != torch.float32
    ):
        raise _UnreadableCache("unexpected tensor dtypes or ranks")
    if not keys.shape[0] == chosen.numel() == rejected.numel() or chosen.ndim != 1 or rejected.ndim != 1:
        raise _UnreadableCache(f"inconsistent lengths {keys.shape[0]}, {chosen.numel()}, {rejected.numel()}")
    if metadata.get("sha256") != _checksum(tensors):
        raise _UnreadableCache("checksum mismatch: the data was altered or truncated")
    hexes = [bytes(row).hex() for row in keys.numpy()]
    return dict(zip(hexes, zip(chosen.tolist(), rejected.tolist())))


# --- scoring ---------------------------------------------------------------------------------------


def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[Any],
    *,
    batch_size: int,
    cache: LogpCache | None = None,
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
    fingerprint: str | None = None,
    progress: bool = True,
    flush_every: int = 64,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, torch.Tensor]:
    """Summed response log-probs of every pair under `model`: {"chosen_logps", "rejected_logps"} (n,).

    `pairs` are `nashalign.data.tokenization.TokenizedPair`s (anything `collate_fn` takes and that has
    `content_hash()` when `cache` is given). With a cache, only the pairs missing under the model's
    fingerprint (computed with `model_fingerprint` unless given) are scored, and their results are
    stored every `flush_every` batches and when scoring stops, even by an exception, so an
    interrupted run keeps what it computed. Scoring runs under `torch.inference_mode()` with the
    model in eval mode (its mode is restored after), longest pairs first to limit padding, with a
    tqdm progress bar unless `progress` is False. `collate_fn` defaults to
    `nashalign.data.tokenization.collate_pairs` padding with the config's pad token (any id works: padding is
    masked). Results are float32 on the CPU, aligned with `pairs`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results = _Results.empty(len(pairs))
    todo = list(range(len(pairs)))
    if cache is not None and todo:
        todo = results.fill_from_cache(cache, fingerprint or model_fingerprint(model), pairs)
    if todo:
        _score_missing(model, pairs, todo, results, batch_size=batch_size,
                       collate=collate_fn or _default_collate(model), progress=progress, flush_every=flush_every,
                       chunk_size=chunk_size)
    return {"chosen_logps": results.chosen, "rejected_logps": results.rejected}


@dataclass
class _Results:
    """score_pairs' (n,) results as they fill (NaN: not yet known), and where scored pairs are written
    back: the cache (if any), under `fingerprint`, by the pairs' content `keys`."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    cache: LogpCache | None = None
    fingerprint: str | None = None
    keys: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # scored, not yet written back

    @classmethod
    def empty(cls, count: int) -> _Results:
        return cls(torch.full((count,), math.nan), torch.full((count,), math.nan))

    def fill_from_cache(self, cache: LogpCache, fingerprint: str, pairs: Sequence[Any]) -> list[int]:
        """Take the pairs' cached results; return the indices of those still to score."""
        self.cache, self.fingerprint = cache, fingerprint
        self.keys = [pair.content_hash() for pair in pairs]
        found = cache.lookup(fingerprint, self.keys)
        self.chosen[found.hit], self.rejected[found.hit] = (
            found.chosen_logps[found.hit],
            found.rejected_logps[found.hit],
        )
        todo = found.misses
        logger.info("log-prob cache %s: %d hits, %d to score", fingerprint[:12], len(pairs) - len(todo), len(todo))
        return todo

    def put(self, indices: list[int], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.chosen[indices], self.rejected[indices] = chosen, rejected
        self.pending.extend(indices)

    def flush(self) -> None:
        """Write the pending results back to the cache (if any)."""
        if self.cache is not None and self.pending:
            self.cache.store(self.fingerprint, [self.keys[i] for i in self.pending], self.chosen[self.pending],
                             self.rejected[self.pending])
        self.pending.clear()


def _score_missing(model: torch.nn.Module, pairs: Sequence[Any], todo: list[int], results: _Results, *,
                   batch_size: int, collate: Callable[[list[Any]], dict[str, torch.Tensor]], progress: bool,
                   flush_every: int, chunk_size: int) -> None:
    """Score pairs `todo` (indices into `pairs`) into `results`, longest first, in batches, in inference
    and eval mode; written back every `flush_every` batches and when scoring stops, even by an exception."""
    from tqdm.auto import tqdm

    todo.sort(key=lambda i: -_pair_length(pairs[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(todo), unit="pair", desc="log-probs", disable=not progress) as bar,
        ):
            for number, start in enumerate(range(0, len(todo), batch_size), start=1):
                indices = todo[start : start + batch_size]
                results.put(indices, *_score_batch(model, [pairs[i] for i in indices], indices, collate, device,
                                                   chunk_size))
                bar.update(len(indices))
                if number % flush_every == 0:
                    results.flush()
    finally:
        results.flush()
        model.train(was_training)


def _score_batch(model: torch.nn.Module, batch_pairs: list[Any], indices: list[int], collate, device,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen and rejected log-probs of one batch of pairs, on the CPU; raises on NaN."""
    batch = collate(batch_pairs)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    scored = pair_logps(model, batch, chunk_size=chunk_size)
    chosen, rejected = scored["chosen_logps"].cpu(), scored["rejected_logps"].cpu()
    if chosen.isnan().any() or rejected.isnan().any():
        sources = [getattr(pair, "source", i) for pair, i in zip(batch_pairs, indices)]
        raise RuntimeError(f"the model produced NaN log-probs for pairs {sources}")
    return chosen, rejected


def _pair_length(pair: Any) -> int:
    """Tokens in the longer row of a TokenizedPair (0 for anything else: the order is then kept)."""
    try:
        return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
    except (AttributeError, TypeError):
        return 0


def _default_collate(model: torch.nn.Module) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    from nashalign.data.tokenization import collate_pairs

    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    return functools.partial(collate_pairs, pad_token_id=pad_token_id if isinstance(pad_token_id, int) else 0)
