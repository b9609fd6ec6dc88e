"""nashalign.data.cache: model fingerprints, the on-disk log-prob cache, and scoring only the misses."""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

from nashalign.data import cache as cache_module
from nashalign.data.cache import CacheFileWarning, LogpCache, model_fingerprint, score_pairs
from nashalign.data.logprobs import pair_logps
from nashalign.data.tokenization import TokenizedPair, collate_pairs

FINGERPRINT = "ab" * 32


def key(i):
    return hashlib.sha256(str(i).encode()).hexdigest()


def random_pairs(seed, count):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        length = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(3, 512, (length,), generator=g).tolist()

    return [TokenizedPair(ids(2, 9), ids(1, 7), ids(1, 7), f"pair[{i}]") for i in range(count)]


class ForwardCounter:
    """Counts forward calls of a model and the rows each one saw."""

    def __init__(self, model):
        self.rows = []
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.rows.append(kwargs["input_ids"].shape[0])

    @property
    def calls(self):
        return len(self.rows)


# --- LogpCache -------------------------------------------------------------------------------------


def test_lookup_returns_exactly_what_was_stored(tmp_path):
    """Values come back bit for bit (float32 through safetensors), hits and misses are reported per
    key, misses are NaN, and keys match case-insensitively (they are hex)."""
    cache = LogpCache(tmp_path)
    chosen = torch.tensor([-1.2345678, -0.0, -1e-38, -3.0e4, -math.inf], dtype=torch.float32)
    rejected = torch.tensor([-7.654321, -2.5, -1e-45, -1.0e-3, -9.0], dtype=torch.float32)
    cache.store(FINGERPRINT, [key(i) for i in range(5)], chosen, rejected)

    found = cache.lookup(FINGERPRINT, [key(3), key(99), key(0).upper(), key(4), key(1), key(2)])
    assert found.hit.tolist() == [True, False, True, True, True, True]
    assert found.misses == [1]
    order = [3, 0, 4, 1, 2]
    assert torch.equal(found.chosen_logps[found.hit], chosen[order])
    assert torch.equal(found.rejected_logps[found.hit], rejected[order])
    assert found.chosen_logps[1].isnan() and found.rejected_logps[1].isnan()
    assert torch.equal(found.chosen_logps[found.hit].view(torch.int32), chosen[order].view(torch.int32))


def test_store_adds_and_overwrites_entries(tmp_path):
    cache = LogpCache(tmp_path)
    cache.store(FINGERPRINT, [key(0), key(1)], [-1.0, -2.0], [-3.0, -4.0])
    cache.store(FINGERPRINT, [key(1), key(2)], [-5.0, -6.0], [-7.0, -8.0])
    assert cache.load(FINGERPRINT) == {key(0): (-1.0, -3.0), key(1): (-5.0, -7.0), key(2): (-6.0, -8.0)}
    assert LogpCache(tmp_path).lookup("cd" * 32, [key(0)]).misses == [0]


def test_file_written_is_valid_safetensors(tmp_path):
    """One file per fingerprint with the documented tensors, dtypes, shapes and metadata."""
    path = LogpCache(tmp_path).store(
        FINGERPRINT, [key(0), key(1), key(2)], [-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]
    )
    assert path == tmp_path / f"{FINGERPRINT}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    assert metadata["format"] == "nashalign.logp_cache" and metadata["fingerprint"] == FINGERPRINT
    assert tensors["keys"].dtype == torch.uint8 and tensors["keys"].shape == (3, 32)
    assert [bytes(row).hex() for row in tensors["keys"].numpy()] == [key(0), key(1), key(2)]
    assert tensors["chosen_logps"].dtype == torch.float32
    assert tensors["chosen_logps"].tolist() == [-1.0, -2.0, -3.0]
    assert tensors["rejected_logps"].tolist() == [-4.0, -5.0, -6.0]


def _truncate(data):
    return data[: len(data) - 5]


def _flip_last_byte(data):
    return data[:-1] + bytes([data[-1] ^ 0x01])


@pytest.mark.parametrize(
    "corrupt",
    [_truncate, _flip_last_byte, lambda data: b"", lambda data: b"not a safetensors file at all"],
    ids=["truncated", "flipped-bit", "empty", "garbage"],
)
def test_corrupted_file_warns_and_misses(tmp_path, corrupt):
    """A damaged file is never silently read: a CacheFileWarning, every key a miss; the next store
    writes a sound file again. A flipped bit inside the float data is caught by the checksum."""
    cache = LogpCache(tmp_path)
    path = cache.store(FINGERPRINT, [key(0), key(1)], [-1.0, -2.0], [-3.0, -4.0])
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.warns(CacheFileWarning, match=str(path.name)):
        found = cache.lookup(FINGERPRINT, [key(0), key(1)])
    assert found.misses == [0, 1]
    with pytest.warns(CacheFileWarning):
        cache.store(FINGERPRINT, [key(0)], [-1.5], [-3.5])
    assert cache.load(FINGERPRINT) == {key(0): (-1.5, -3.5)}


def test_file_of_another_fingerprint_is_not_trusted(tmp_path):
    """A file renamed to another model's fingerprint is detected through its metadata."""
    cache = LogpCache(tmp_path)
    path = cache.store(FINGERPRINT, [key(0)], [-1.0], [-2.0])
    path.rename(cache.path("cd" * 32))
    with pytest.warns(CacheFileWarning, match="holds fingerprint"):
        assert cache.lookup("cd" * 32, [key(0)]).misses == [0]


def test_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """Writes go to a temporary file renamed into place: if the rename fails, the old file is whole."""
    cache = LogpCache(tmp_path)
    cache.store(FINGERPRINT, [key(0)], [-1.0], [-2.0])

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("nashalign.data.artifacts.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.store(FINGERPRINT, [key(1)], [-3.0], [-4.0])
    monkeypatch.undo()
    assert cache.load(FINGERPRINT) == {key(0): (-1.0, -2.0)}


def test_bad_arguments_are_rejected(tmp_path):
    cache = LogpCache(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        cache.path("../../etc/passwd")
    with pytest.raises(ValueError, match="hex string"):
        cache.store(FINGERPRINT, ["not-hex"], [-1.0], [-2.0])
    with pytest.raises(ValueError, match="one chosen and one rejected value per key"):
        cache.store(FINGERPRINT, [key(0), key(1)], [-1.0], [-2.0, -3.0])
    with pytest.raises(ValueError, match="NaN"):
        cache.store(FINGERPRINT, [key(0)], [math.nan], [-2.0])
    with pytest.raises(ValueError, match="same length"):
        cache.store(FINGERPRINT, [key(0), "abcd"], [-1.0, -1.0], [-2.0, -2.0])
    assert not any(tmp_path.iterdir())


# --- model_fingerprint -----------------------------------------------------------------------------


# torch.compile's first import warns about torch.jit internals.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fingerprint_is_a_content_hash(tiny_model, tiny_tokenizer, monkeypatch):
    """Equal for equal content (a copy, a fresh build with the same seed, any hashing block size,
    runtime-only config switches, a torch.compile wrapper); different after any change of a weight,
    of the config, or of the dtype."""
    from nashalign.models.tiny import build_model

    reference = model_fingerprint(tiny_model)
    assert len(reference) == 64
    assert model_fingerprint(copy.deepcopy(tiny_model)) == reference
    assert model_fingerprint(build_model(tiny_tokenizer)) == reference
    assert model_fingerprint(torch.compile(tiny_model)) == reference
    monkeypatch.setattr(cache_module, "HASH_BLOCK_BYTES", 7)
    assert model_fingerprint(tiny_model) == reference
    monkeypatch.undo()

    runtime = copy.deepcopy(tiny_model)
    runtime.config.use_cache = not runtime.config.use_cache
    runtime.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(runtime) == reference

    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(changed) != reference

    reconfigured = copy.deepcopy(tiny_model)
    reconfigured.config.rms_norm_eps = 1e-5
    assert model_fingerprint(reconfigured) != reference

    assert model_fingerprint(copy.deepcopy(tiny_model).to(torch.bfloat16)) != reference
    assert model_fingerprint(build_model(tiny_tokenizer, seed=1)) != reference


def test_fingerprint_of_a_peft_model(tiny_model):
    """A LoRA model differs from its base; disabling the adapters or changing a LoRA weight changes
    the fingerprint; re-enabling restores it."""
    from peft import LoraConfig, get_peft_model

    base = model_fingerprint(tiny_model)
    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with_lora = model_fingerprint(model)
    assert with_lora != base
    with model.disable_adapter():
        disabled = model_fingerprint(model)
    assert disabled not in (with_lora, base)
    assert model_fingerprint(model) == with_lora
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_B" in name)[0, 0] = 0.5
    assert model_fingerprint(model) not in (with_lora, disabled)


# --- score_pairs -----------------------------------------------------------------------------------


def test_score_pairs_equals_pair_logps_and_scores_only_once(tiny_model, tmp_path):
    """5 pairs, batch 2: three forward calls, values equal one pair_logps over all pairs (1e-5); the
    second call hits the cache for everything: no forward at all, identical values."""
    pairs = random_pairs(0, 5)
    with torch.no_grad():
        expected = pair_logps(tiny_model, collate_pairs(pairs, 0))
    counter = ForwardCounter(tiny_model)
    cache = LogpCache(tmp_path)
    first = score_pairs(tiny_model, pairs, batch_size=2, cache=cache, progress=False)
    assert counter.rows == [4, 4, 2]
    assert_close(first["chosen_logps"], expected["chosen_logps"], atol=1e-5, rtol=0)
    assert_close(first["rejected_logps"], expected["rejected_logps"], atol=1e-5, rtol=0)
    assert first["chosen_logps"].dtype == torch.float32 and first["chosen_logps"].device.type == "cpu"

    second = score_pairs(tiny_model, pairs, batch_size=2, cache=cache, progress=False)
    assert counter.calls == 3
    assert torch.equal(second["chosen_logps"], first["chosen_logps"])
    assert torch.equal(second["rejected_logps"], first["rejected_logps"])


def test_changed_example_misses_and_unchanged_ones_hit(tiny_model, tmp_path):
    """Changing one pair's chosen tokens re-scores that pair alone (one forward over its 2 rows)."""
    pairs = random_pairs(1, 4)
    cache = LogpCache(tmp_path)
    first = score_pairs(tiny_model, pairs, batch_size=4, cache=cache, progress=False)
    pairs[2] = TokenizedPair(pairs[2].prompt_ids, pairs[2].chosen_ids + [7], pairs[2].rejected_ids, "pair[2]")
    counter = ForwardCounter(tiny_model)
    second = score_pairs(tiny_model, pairs, batch_size=4, cache=cache, progress=False)
    assert counter.rows == [2]
    unchanged = [0, 1, 3]
    assert torch.equal(second["chosen_logps"][unchanged], first["chosen_logps"][unchanged])
    assert second["chosen_logps"][2] != first["chosen_logps"][2]
    assert_close(second["rejected_logps"][2], first["rejected_logps"][2], atol=1e-5, rtol=0)


def test_changed_weight_misses(tiny_model, tmp_path):
    pairs = random_pairs(2, 3)
    cache = LogpCache(tmp_path)
    first = score_pairs(tiny_model, pairs, batch_size=3, cache=cache, progress=False)
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight[:5] += 0.5
    counter = ForwardCounter(tiny_model)
    second = score_pairs(tiny_model, pairs, batch_size=3, cache=cache, progress=False)
    assert counter.rows == [6]
    assert not torch.allclose(second["chosen_logps"], first["chosen_logps"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_without_a_cache_every_call_scores(tiny_model):
    pairs = random_pairs(3, 3)
    counter = ForwardCounter(tiny_model)
    collate = lambda chunk: collate_pairs(chunk, 0)  # noqa: E731
    first = score_pairs(tiny_model, pairs, batch_size=8, collate_fn=collate, progress=False)
    second = score_pairs(tiny_model, pairs, batch_size=8, collate_fn=collate, progress=False)
    assert counter.calls == 2
    assert_close(first["chosen_logps"], second["chosen_logps"], atol=0, rtol=0)


def test_scoring_uses_eval_mode_and_restores_the_mode(tiny_tokenizer, tmp_path):
    """A model with attention dropout 0.5 left in train mode: scored in eval mode (equal to pair_logps
    in eval mode, 1e-5), and still in train mode afterwards."""
    from nashalign.models.tiny import build_model

    model = build_model(tiny_tokenizer)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    pairs = random_pairs(4, 3)
    with torch.no_grad():
        expected = pair_logps(model.eval(), collate_pairs(pairs, 0))
    model.train()
    out = score_pairs(model, pairs, batch_size=3, cache=None, progress=False)
    assert model.training
    assert_close(out["chosen_logps"], expected["chosen_logps"], atol=1e-5, rtol=0)


def test_interrupted_scoring_keeps_what_it_computed(tiny_model, tmp_path):
    """Collation fails on the third batch: the two finished batches (4 pairs) are in the cache, and
    the next call scores only the fifth pair."""
    pairs = random_pairs(5, 5)
    cache = LogpCache(tmp_path)
    calls = []

    def flaky_collate(chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return collate_pairs(chunk, 0)

    with pytest.raises(KeyboardInterrupt):
        score_pairs(tiny_model, pairs, batch_size=2, cache=cache, collate_fn=flaky_collate, progress=False)
    fingerprint = model_fingerprint(tiny_model)
    assert len(cache.lookup(fingerprint, [p.content_hash() for p in pairs]).misses) == 1
    counter = ForwardCounter(tiny_model)
    score_pairs(tiny_model, pairs, batch_size=2, cache=cache, fingerprint=fingerprint, progress=False)
    assert counter.rows == [2]


def test_corrupted_cache_is_rescored_with_a_warning(tiny_model, tmp_path):
    pairs = random_pairs(6, 2)
    cache = LogpCache(tmp_path)
    first = score_pairs(tiny_model, pairs, batch_size=2, cache=cache, progress=False)
    path = cache.path(model_fingerprint(tiny_model))
    path.write_bytes(_truncate(path.read_bytes()))
    counter = ForwardCounter(tiny_model)
    with pytest.warns(CacheFileWarning):
        second = score_pairs(tiny_model, pairs, batch_size=2, cache=cache, progress=False)
    assert counter.calls == 1
    assert_close(second["chosen_logps"], first["chosen_logps"], atol=1e-5, rtol=0)
    assert len(cache.load(model_fingerprint(tiny_model))) == 2


def test_progress_bar_is_shown_when_asked(tiny_model, capsys):
    score_pairs(tiny_model, random_pairs(7, 2), batch_size=1, progress=True)
    assert "log-probs" in capsys.readouterr().err
    score_pairs(tiny_model, random_pairs(7, 2), batch_size=1, progress=False)
    assert capsys.readouterr().err == ""
