"""The trainer end to end on 2-layer, hidden-32 Llama models: exactness, invariances, memory, learning."""

from __future__ import annotations

import gc
import json
import random
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nashalign import NashalignError, cli
from nashalign.config import TrainConfig, from_mapping, load_config
from nashalign.data.logprobs import pair_logps
from nashalign.data.tokenization import collate_pairs, load_records, tokenize_records
from nashalign.train import loop as train_module
from nashalign.train import scoring
from nashalign.train.checkpoint import checkpoint_name, latest_checkpoint
from nashalign.train.loop import batch_losses, build_loss, train_pairs

ROOT = Path(__file__).resolve().parents[1]
# Per-step values that legitimately differ between two runs (wall clock).
TIMING_KEYS = {"tokens_per_second"}


def counting_records(count: int, seed: int = 0) -> list[dict]:
    """A learnable task: chosen responses count up from the number in the prompt, rejected are random."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        start = rng.randint(0, 15)
        chosen = " " + " ".join(str(start + k) for k in range(4))
        rejected = " " + " ".join(str(rng.randint(0, 20)) for _ in range(rng.randint(2, 5)))
        records.append({"prompt": f"Count up from {start}:", "chosen": chosen, "rejected": rejected})
    return records


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Three different tiny models sharing one tokenizer: the policy, a reference and a previous iterate."""
    from nashalign.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("models")
    return {name: save_tiny(root / name, seed=seed) for name, seed in (("policy", 0), ("ref", 1), ("prev", 2))}


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dirs["policy"])


def make_pairs(tokenizer, count: int, seed: int = 0):
    from nashalign.data.records import parse_record

    records = [parse_record(row, f"pairs[{i}]")[0] for i, row in enumerate(counting_records(count, seed))]
    pairs, report = tokenize_records(records, tokenizer, max_length=64, max_prompt_length=32)
    assert report.kept == count
    return pairs


def make_config(model_dirs, run_dir: Path, **sections) -> TrainConfig:
    """A tiny config: lr 1e-2, no warmup, constant schedule, no checkpoints unless asked."""
    data = {
        "model": {"name_or_path": str(model_dirs["policy"])},
        "data": {"max_length": 64, "max_prompt_length": 32, "cache_dir": str(run_dir / "cache")},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant", "epochs": 1, "seed": 3},
        "output": {"dir": str(run_dir), "save_steps": 0, "report_to": "none"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_mapping(TrainConfig, data)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


def alone_logp(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log π(response | prompt) from one unpadded forward pass of this sequence alone (float64 sum)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logprobs[len(prompt_ids) - 1 :].sum()


def test_batch_dpo_loss_equals_sequences_scored_alone(model_dirs, tokenizer, tmp_path):
    """Through the trainer's loss path (batch_losses on a padded batch of pairs of different lengths)
    and through a whole first step (metrics.jsonl of train_pairs, max_steps=1, global batch = all pairs):

        loss_i = −log σ(β·[(π(c_i) − ref(c_i)) − (π(r_i) − ref(r_i))])

    with every log-prob computed by scoring each prompt+response alone, unpadded (float32, 1e-5).
    The reference is a different model, so the loss is not the trivial log 2. Also with the SFT term.
    """
    from transformers import AutoModelForCausalLM

    pairs = make_pairs(tokenizer, 5, seed=11)
    assert len({len(p.chosen_ids) + len(p.prompt_ids) for p in pairs} | {len(p.rejected_ids) for p in pairs}) > 2
    policy = AutoModelForCausalLM.from_pretrained(model_dirs["policy"])
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["ref"])
    beta = 0.5
    expected = []
    for pair in pairs:
        margin = (alone_logp(policy, pair.prompt_ids, pair.chosen_ids) - alone_logp(ref, pair.prompt_ids, pair.chosen_ids)) - (
            alone_logp(policy, pair.prompt_ids, pair.rejected_ids) - alone_logp(ref, pair.prompt_ids, pair.rejected_ids)
        )
        expected.append(-F.logsigmoid(beta * margin))
    expected = torch.stack(expected).float()

    config = make_config(model_dirs, tmp_path, loss={"name": "dpo", "beta": beta},
                         model={"ref_name_or_path": str(model_dirs["ref"])},
                         optim={"per_device_batch_size": 5, "max_steps": 1})
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    references = {
        "ref_chosen_logps": torch.stack([alone_logp(ref, p.prompt_ids, p.chosen_ids) for p in pairs]).float(),
        "ref_rejected_logps": torch.stack([alone_logp(ref, p.prompt_ids, p.rejected_ids) for p in pairs]).float(),
    }
    with torch.no_grad():
        losses, _ = batch_losses(policy, batch, build_loss(config.loss), references)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)

    # loss.sft_weight w adds w · (−log π(c) / |c|), the chosen response's mean token NLL.
    nll = torch.stack([-alone_logp(policy, p.prompt_ids, p.chosen_ids) / len(p.chosen_ids) for p in pairs]).float()
    with_sft = make_config(model_dirs, tmp_path, loss={"name": "dpo", "beta": beta, "sft_weight": 0.3})
    with torch.no_grad():
        losses, _ = batch_losses(policy, batch, build_loss(with_sft.loss), references)
    torch.testing.assert_close(losses, expected + 0.3 * nll, rtol=1e-5, atol=1e-5)

    result = train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer)
    (first,) = read_metrics(tmp_path)
    assert result.global_step == 1
    assert first["loss"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert first["rewards/accuracy"] == pytest.approx(float(((expected < torch.log(torch.tensor(2.0))).float()).mean()))


def test_batch_of_four_equals_four_accumulated_micro_batches(model_dirs, tokenizer, tmp_path):
    """6 pairs, global batch 4: steps see 4, 2, 4 pairs (a smaller last batch in epoch 0).

    per_device_batch_size=4 vs per_device_batch_size=1 × 4 accumulation steps: same batches, and the
    loss of a step is sum(per-pair losses)/(pairs in the global batch) in both, so after 3 AdamW steps
    at lr 1e-2 the parameters agree within 1e-5. (Dividing the 2-pair batch by 4 instead of 2, as a
    fixed accumulation count would, changes its gradient by 2× and fails this test.)
    """
    pairs = make_pairs(tokenizer, 6, seed=2)
    states = []
    for name, batch, accumulation in (("b4", 4, 1), ("b1x4", 1, 4)):
        config = make_config(model_dirs, tmp_path / name, loss={"name": "ipo", "beta": 0.5},
                             optim={"per_device_batch_size": batch, "gradient_accumulation_steps": accumulation,
                                    "max_steps": 3})
        train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path / name, tokenizer=tokenizer)
        states.append(final_state(tmp_path / name))
    initial = final_state_of(model_dirs["policy"])
    moved = max(float((states[0][key] - initial[key]).abs().max()) for key in initial)
    assert moved > 1e-3, "the test needs the parameters to actually move"
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-5, atol=1e-5)
    metrics = [read_metrics(tmp_path / name) for name in ("b4", "b1x4")]
    for a, b in zip(*metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["tokens"] == b["tokens"]


def final_state_of(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


class _Crash(Exception):
    pass


def test_killed_run_resumes_to_the_uninterrupted_result(model_dirs, tokenizer, tmp_path):
    """Uninterrupted: 6 steps (2 epochs of 3), checkpoints every 2. Interrupted: the same run dies at
    step 5, after checkpoint 4 and after step 5 was logged; a half-written checkpoint (step_5 without
    COMPLETE) and a temporary directory lie around. Resuming picks checkpoint 4, replays step 5 with
    the same batch and RNG, and ends with identical parameters and per-step metrics."""
    pairs = make_pairs(tokenizer, 6, seed=4)
    sections = {"loss": {"name": "dpo", "beta": 0.5},
                "optim": {"per_device_batch_size": 2, "epochs": 2, "schedule": "cosine", "warmup_steps": 1},
                "output": {"save_steps": 2, "save_total_limit": 3}}
    whole = tmp_path / "whole"
    train_pairs(str(model_dirs["policy"]), pairs, make_config(model_dirs, whole, **sections), whole, tokenizer=tokenizer)

    broken = tmp_path / "broken"

    def crash(step, metrics):
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train_pairs(str(model_dirs["policy"]), pairs, make_config(model_dirs, broken, **sections), broken,
                    tokenizer=tokenizer, callback=crash)
    assert [m["step"] for m in read_metrics(broken)] == [1, 2, 3, 4, 5]
    half = broken / "checkpoints" / checkpoint_name(5)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    (broken / "checkpoints" / f".tmp-{checkpoint_name(6)}-1").mkdir()
    assert latest_checkpoint(broken / "checkpoints").name == checkpoint_name(4)

    result = train_pairs(str(model_dirs["policy"]), pairs, make_config(model_dirs, broken, **sections), broken,
                         tokenizer=tokenizer)
    assert result.global_step == 6
    expected, got = final_state(whole), final_state(broken)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7)
    strip = [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in read_metrics(whole)]
    assert [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in read_metrics(broken)] == strip
    assert len(strip) == 6


def test_run_killed_before_its_first_checkpoint_starts_over_with_clean_metrics(model_dirs, tokenizer, tmp_path):
    """No checkpoint to resume from: the restarted run begins at step 1, and the steps logged by the
    killed start are not kept (metrics.jsonl holds each step exactly once)."""
    pairs = make_pairs(tokenizer, 4, seed=5)
    config = make_config(model_dirs, tmp_path, loss={"name": "dpo"}, optim={"per_device_batch_size": 2})

    def crash(step, metrics):
        raise _Crash

    with pytest.raises(_Crash):
        train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer, callback=crash)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]
    train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


def test_cli_run_killed_with_sigkill_resumes_exactly(model_dirs, tmp_path, kill_at_pause):
    """A real `nashalign train` process, checkpointing every step, is SIGKILLed in the middle of
    writing its second checkpoint (model and optimizer written, no COMPLETE marker: it pauses there,
    see tests/plugins/pause_point.py); `--resume auto` continues from the first, and parameters and
    per-step metrics equal an uninterrupted run of the same config."""
    import os

    def arguments(out):
        return ["train", "--config", str(ROOT / "configs" / "train-tiny.yaml"),
                "--set", f"model.name_or_path={model_dirs['policy']}", "--set", f"output.dir={out}",
                "--set", f"data.train_file={ROOT / 'configs' / 'train-tiny-pairs.jsonl'}",
                "--set", "optim.epochs=8", "--set", "output.save_steps=1", "--set", "output.save_total_limit=2"]

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    kill_at_pause("mid-save", arguments(killed), env)
    assert latest_checkpoint(killed / "checkpoints").name == checkpoint_name(1)
    half = [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert [p.name.split("-")[1] for p in half] == [checkpoint_name(2)]
    assert (half[0] / "optimizer.json").exists() and not (half[0] / "COMPLETE").exists()
    assert [m["step"] for m in read_metrics(killed)] == [1, 2]

    assert cli.main(arguments(killed)) == 0
    whole = tmp_path / "whole"
    assert cli.main(arguments(whole)) == 0
    expected, got = final_state(whole), final_state(killed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7)
    strip = [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in read_metrics(whole)]
    assert [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in read_metrics(killed)] == strip
    assert len(strip) == 24


def test_resume_refuses_a_different_run(model_dirs, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer, 4, seed=5)
    config = make_config(model_dirs, tmp_path, optim={"per_device_batch_size": 2, "epochs": 2},
                         output={"save_steps": 1})
    def crash(step, metrics):
        if step == 2:
            raise _Crash

    with pytest.raises(_Crash):
        train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer, callback=crash)
    with pytest.raises(NashalignError, match=r"cannot resume, data differs"):
        train_pairs(str(model_dirs["policy"]), make_pairs(tokenizer, 4, seed=6), config, tmp_path, tokenizer=tokenizer)
    result = train_pairs(str(model_dirs["policy"]), make_pairs(tokenizer, 4, seed=6), config, tmp_path,
                         tokenizer=tokenizer, resume="never")
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4] and result.global_step == 4


def test_reference_models_are_freed_before_training_and_cached(model_dirs, tokenizer, tmp_path, monkeypatch):
    """inpo with a separate reference and previous iterate: both are loaded, scored and garbage by the
    first optimizer step (weak references dead). With the default reference (the initial policy) only
    one model is ever loaded. A second run on the same cache scores nothing again; a changed pair is
    rescored alone; a changed reference model is rescored entirely."""
    loaded: dict[str, list] = {}
    forwards: dict[str, int] = {}
    real_load = train_module.load_model

    def spy(name_or_path, model_config):
        model = real_load(name_or_path, model_config)
        role = Path(name_or_path).name
        loaded.setdefault(role, []).append(weakref.ref(model))

        def count(module, args, kwargs, output):
            forwards[role] = forwards.get(role, 0) + kwargs["input_ids"].shape[0] // 2

        model.register_forward_hook(count, with_kwargs=True)
        return model

    monkeypatch.setattr(train_module, "load_model", spy)  # the policy
    monkeypatch.setattr(scoring, "load_model", spy)  # the reference and previous iterate
    pairs = make_pairs(tokenizer, 4, seed=7)
    cache = tmp_path / "cache"
    model_section = {"ref_name_or_path": str(model_dirs["ref"]), "prev_name_or_path": str(model_dirs["prev"])}
    alive_at_first_step = []

    def check(step, metrics):
        if step == 1:
            gc.collect()
            alive_at_first_step.extend(role for role in ("ref", "prev") for ref in loaded[role] if ref() is not None)

    config = make_config(model_dirs, tmp_path / "a", loss={"name": "inpo"}, model=model_section,
                         data={"cache_dir": str(cache)}, optim={"per_device_batch_size": 4, "max_steps": 2})
    train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path / "a", tokenizer=tokenizer, callback=check)
    assert alive_at_first_step == []
    assert {role: len(refs) for role, refs in loaded.items()} == {"ref": 1, "prev": 1, "policy": 1}
    assert forwards["ref"] == 4 and forwards["prev"] == 4

    forwards.clear()
    train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path / "b", tokenizer=tokenizer)
    assert forwards.get("ref", 0) == 0 and forwards.get("prev", 0) == 0, "cached pairs were rescored"

    forwards.clear()
    changed = pairs[:3] + make_pairs(tokenizer, 1, seed=8)
    train_pairs(str(model_dirs["policy"]), changed, config, tmp_path / "c", tokenizer=tokenizer)
    assert forwards["ref"] == 1 and forwards["prev"] == 1

    from nashalign.models.tiny import save_tiny

    save_tiny(tmp_path / "ref", seed=9)  # same name, different weights
    forwards.clear()
    moved = make_config(model_dirs, tmp_path / "d", loss={"name": "inpo"},
                        model={**model_section, "ref_name_or_path": str(tmp_path / "ref")},
                        data={"cache_dir": str(cache)}, optim={"per_device_batch_size": 4, "max_steps": 1})
    train_pairs(str(model_dirs["policy"]), pairs, moved, tmp_path / "d", tokenizer=tokenizer)
    assert forwards["ref"] == 4 and forwards.get("prev", 0) == 0

    loaded.clear()
    forwards.clear()
    default = make_config(model_dirs, tmp_path / "e", loss={"name": "inpo"}, data={"cache_dir": str(tmp_path / "c2")},
                          optim={"per_device_batch_size": 4, "max_steps": 1})
    train_pairs(str(model_dirs["policy"]), pairs, default, tmp_path / "e", tokenizer=tokenizer)
    assert {role: len(refs) for role, refs in loaded.items()} == {"policy": 1}
    assert forwards["policy"] == 4 + 4, "the initial policy scores the 4 pairs once (ref = prev), then trains"


@pytest.mark.parametrize(
    ("loss", "steps"),
    [("dpo", 12), ("ipo", 12), ("inpo", 12), ("sppo", 12), ("srpo", 12), ("sparsepo", 12), ("sparsepo:learned", 12)],
)
def test_pair_accuracy_rises_on_a_learnable_task(model_dirs, tokenizer, tmp_path, loss, steps):
    """Chosen responses count up from the prompt's number, rejected ones are random numbers.

    Before training, policy = reference, so every implicit reward margin is 0 (no preference: chance,
    0.5, counting ties as half). After a dozen
    steps, the fraction of training pairs with r_chosen > r_rejected (r = log π − log π_ref) is ≥ 0.9.
    (srpo: the generator's margins, log π(y | x); sparsepo: activation masks, or `:learned` masks.)
    """
    from transformers import AutoModelForCausalLM

    pairs = make_pairs(tokenizer, 16, seed=1)
    name, _, mask = loss.partition(":")
    config = make_config(model_dirs, tmp_path, loss={"name": name, "beta": 0.1, **({"mask": mask} if mask else {})},
                         optim={"per_device_batch_size": 8, "max_steps": steps, "lr": 5e-3})
    first_margin = None

    def record(step, metrics):
        nonlocal first_margin
        if step == 1:
            first_margin = metrics["rewards/margin"]

    result = train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer, callback=record)
    assert abs(first_margin) < 1e-5  # 0 up to float32 rounding (scoring pads batches differently)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        before = pair_logps(AutoModelForCausalLM.from_pretrained(model_dirs["policy"]), batch)
        after = pair_logps(AutoModelForCausalLM.from_pretrained(result.final_dir), batch)
    margins = (after["chosen_logps"] - before["chosen_logps"]) - (after["rejected_logps"] - before["rejected_logps"])
    accuracy = float((margins > 0).float().mean())
    assert accuracy >= 0.9, f"{loss}: accuracy {accuracy}"


def test_lora_trains_only_the_adapters(model_dirs, tokenizer, tmp_path, monkeypatch):
    """One step with LoRA on q_proj/v_proj: only adapter parameters are trainable, the adapter B
    matrices moved (A gets no gradient at step 1 because B starts at 0), the checkpoint holds the
    adapter, and final/ is the merged model: q_proj changed, up_proj (no adapter) bit-identical."""
    import peft
    from safetensors.torch import load_file

    pairs = make_pairs(tokenizer, 4, seed=3)
    config = make_config(model_dirs, tmp_path, model={"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
                         optim={"per_device_batch_size": 4, "max_steps": 1}, output={"save_steps": 1})
    captured = {}
    real_prepare = train_module._prepare_policy

    def spy(model, config, resume_from):
        model = real_prepare(model, config, resume_from)
        captured["model"] = model
        captured["before"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        captured["trainable"] = {k for k, v in model.named_parameters() if v.requires_grad}
        return model

    monkeypatch.setattr(train_module, "_prepare_policy", spy)
    result = train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer)
    assert isinstance(captured["model"], peft.PeftModel) and result.global_step == 1
    trainable = captured["trainable"]
    assert trainable and all("lora_" in k for k in trainable)
    adapter = load_file(str(latest_checkpoint(tmp_path / "checkpoints") / "adapter_model.safetensors"))
    lora_b = [k for k in captured["before"] if "lora_B" in k]
    assert lora_b and all(not torch.equal(adapter[_adapter_key(k)], captured["before"][k]) for k in lora_b)
    merged, base = final_state(tmp_path), final_state_of(model_dirs["policy"])
    for key in base:
        changed = not torch.equal(merged[key], base[key])
        assert changed == (("q_proj" in key or "v_proj" in key) and key.endswith("weight")), key


def test_lora_run_resumes_from_its_adapter_checkpoint(model_dirs, tokenizer, tmp_path):
    """A LoRA run killed after its step-2 checkpoint (the adapter, optimizer, schedule, RNG) and
    resumed ends with the merged weights of the uninterrupted 4-step run."""
    pairs = make_pairs(tokenizer, 4, seed=9)
    sections = {"model": {"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
                "optim": {"per_device_batch_size": 2, "max_steps": 4}, "output": {"save_steps": 2}}

    def crash(step, metrics):
        if step == 3:
            raise _Crash

    train_pairs(str(model_dirs["policy"]), pairs, make_config(model_dirs, tmp_path / "whole", **sections),
                tmp_path / "whole", tokenizer=tokenizer)
    with pytest.raises(_Crash):
        train_pairs(str(model_dirs["policy"]), pairs, make_config(model_dirs, tmp_path / "broken", **sections),
                    tmp_path / "broken", tokenizer=tokenizer, callback=crash)
    result = train_pairs(str(model_dirs["policy"]), pairs, make_config(model_dirs, tmp_path / "broken", **sections),
                         tmp_path / "broken", tokenizer=tokenizer)
    assert result.global_step == 4
    expected, got = final_state(tmp_path / "whole"), final_state(tmp_path / "broken")
    assert any(not torch.equal(expected[k], v) for k, v in final_state_of(model_dirs["policy"]).items())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7)


def _adapter_key(name: str) -> str:
    """peft's saved key of a named parameter: without the adapter name ('.default')."""
    return name.replace(".default", "")


def test_bf16_autocast_step_on_cpu(model_dirs, tokenizer, tmp_path, monkeypatch):
    """mixed_precision=bf16 runs the forward in bfloat16 (checked on a projection's output dtype)
    while the weights stay float32, and the step's loss is finite."""
    pairs = make_pairs(tokenizer, 4, seed=3)
    config = make_config(model_dirs, tmp_path, model={"mixed_precision": "bf16"},
                         optim={"per_device_batch_size": 4, "max_steps": 1})
    dtypes = []
    real_prepare = train_module._prepare_policy

    def spy(model, config, resume_from):
        model = real_prepare(model, config, resume_from)
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        return model

    monkeypatch.setattr(train_module, "_prepare_policy", spy)
    try:
        result = train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer)
    except RuntimeError as error:  # pragma: no cover - depends on the CPU build of torch
        pytest.skip(f"bfloat16 autocast unsupported on this CPU build: {error}")
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert final_state(tmp_path)["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


def test_bf16_reference_scores_are_computed_as_the_autocast_forward(model_dirs, tokenizer, tmp_path):
    """Under mixed_precision bf16 the reference (here the policy's initial weights) is scored under the
    same bfloat16 autocast as the training forward: at the first step the policy/reference log-ratios
    are 0 and the DPO loss is ln 2 (scored in float32 they were off by ~6e-4 and the loss by ~4e-5);
    the scores are cached apart from float32 ones."""
    import math

    pairs = make_pairs(tokenizer, 8, seed=3)
    config = make_config(model_dirs, tmp_path, model={"mixed_precision": "bf16"},
                         optim={"per_device_batch_size": 4, "max_steps": 1},
                         data={"scoring_batch_size": 4, "cache_dir": str(tmp_path / "cache")})
    train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path, tokenizer=tokenizer)
    first = read_metrics(tmp_path)[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    float32 = make_config(model_dirs, tmp_path / "float32", optim={"per_device_batch_size": 4, "max_steps": 1},
                          data={"scoring_batch_size": 4, "cache_dir": str(tmp_path / "cache")})
    train_pairs(str(model_dirs["policy"]), pairs, float32, tmp_path / "float32", tokenizer=tokenizer)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # one file per fingerprint


def test_gradient_checkpointing_changes_nothing(model_dirs, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer, 4, seed=3)
    states = []
    for flag in (False, True):
        config = make_config(model_dirs, tmp_path / str(flag), model={"gradient_checkpointing": flag},
                             optim={"per_device_batch_size": 2, "max_steps": 2})
        train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path / str(flag), tokenizer=tokenizer)
        states.append(final_state(tmp_path / str(flag)))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-5, atol=1e-6)


def test_cli_end_to_end_on_the_tiny_config(model_dirs, tmp_path, capsys):
    """`nashalign train --config configs/train-tiny.yaml` writes config.yaml (the resolved config),
    metrics.jsonl (one line per step) and a final model that from_pretrained loads, with tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    status = cli.main([
        "train", "--config", str(ROOT / "configs" / "train-tiny.yaml"),
        "--set", f"model.name_or_path={model_dirs['policy']}", "--set", f"output.dir={out}",
        "--set", "optim.epochs=1", "--set", f"data.train_file={ROOT / 'configs' / 'train-tiny-pairs.jsonl'}",
        "--set", "output.report_to=tensorboard",
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "trained 3 steps" in printed and str(out / "final") in printed
    saved = load_config(TrainConfig, out / "config.yaml")
    assert saved.model.name_or_path == str(model_dirs["policy"]) and saved.optim.epochs == 1
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
            "logps/rejected", "grad_norm", "lr", "tokens_per_second"} <= set(read_metrics(out)[0])
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").eos_token == "</s>"
    records = load_records(ROOT / "configs" / "train-tiny-pairs.jsonl")
    assert len(records) == 24 and model.config.num_hidden_layers == 2

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "train-tiny.yaml").read_text().replace("beta: 0.1", "beta: -0.1"))
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "bad.yaml:19: loss.beta: expected a float > 0, got -0.1" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(bad), "--set", "loss.beta=0.1", "--set", "optim.lr=0"]) == 2
    assert "--set optim.lr=0: optim.lr: expected a float > 0, got 0" in capsys.readouterr().err


def test_cli_trains_on_a_template_whose_generation_prompt_ends_inside_a_token(model_dirs, tmp_path, capsys):
    """A chat template whose generation prompt ends "assistant: " (a trailing space, the token 'Ġ'
    that merges into the response's first word in the full conversation): `nashalign train` trains on
    such conversational records and its summary reports how many were tokenized as prompt and
    response separately (3 of 4 here: both responses of the fourth start with a space, so its
    conversations keep the prompt's 'Ġ' and need no split; one such response is not enough)."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(model_dirs["policy"], model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tokenizer.save_pretrained(model_dir)
    rows = [
        {"prompt": [{"role": "user", "content": f"Count up from {n}:"}],
         "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}
        for n, chosen, rejected in ((1, "1 2 3", "no"), (2, "2 3 4", "no"), (3, "3 4 5", " no"), (4, " 4 5 6", " no"))
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    status = cli.main([
        "train", "--config", str(ROOT / "configs" / "train-tiny.yaml"), "--set", f"model.name_or_path={model_dir}",
        "--set", f"output.dir={out}", "--set", "optim.epochs=1", "--set", f"data.train_file={data}",
        "--set", "optim.per_device_batch_size=2",
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed
    assert ("data: 4/4 records kept; truncated: 0 prompts, 0 chosen, 0 rejected responses; 0 dropped "
            "(prompt fills max_length); 3 conversational records tokenized as prompt and response separately") in printed


def test_train_file_responses_end_with_the_stop_token_of_the_policy(two_eos_model_dir, tmp_path):
    """`nashalign train` tokenizes data.train_file with the policy's stop ids (its generation config
    lists "</s>" and "<|eot|>", and its template ends turns with "<|eot|>"): a conversational
    response ends with "<|eot|>", the token the policy stops on, and nothing after it."""
    from transformers import AutoTokenizer

    from nashalign.train.loop import training_pairs

    data = tmp_path / "pairs.jsonl"
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    data.write_text(json.dumps(row) + "\n")
    config = from_mapping(TrainConfig, {"model": {"name_or_path": str(two_eos_model_dir)},
                                        "data": {"train_file": str(data)}})
    tokenizer = AutoTokenizer.from_pretrained(two_eos_model_dir)
    (pair,), report = training_pairs(config, tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    assert pair.chosen_ids == tokenizer("yes", add_special_tokens=False)["input_ids"] + [eot]
    assert report.kept == 1


def test_accelerate_private_state_reset_exists():
    """accelerate has no public way to drop its process-wide state so that a second phase in the same
    process may use another mixed precision; nashalign.train.loop calls `AcceleratorState._reset_state`.
    If a release drops it, this fails by name (rather than the second phase failing obscurely)."""
    from accelerate.state import AcceleratorState

    assert callable(getattr(AcceleratorState, "_reset_state", None)), (
        "accelerate no longer has AcceleratorState._reset_state, which nashalign.train.loop._make_accelerator calls"
    )


def test_phases_with_different_precision_run_in_one_process(model_dirs, tokenizer, tmp_path):
    """A bf16 phase then a float32 phase in one process (as the online loop or a notebook would):
    the second Accelerator gets its own precision instead of accelerate refusing the change."""
    pairs = make_pairs(tokenizer, 2, seed=3)
    for precision in ("bf16", "no"):
        config = make_config(model_dirs, tmp_path / precision, model={"mixed_precision": precision},
                             optim={"per_device_batch_size": 2, "max_steps": 1})
        train_pairs(str(model_dirs["policy"]), pairs, config, tmp_path / precision, tokenizer=tokenizer)
        assert train_module._make_accelerator(config, tmp_path / precision).mixed_precision == precision
