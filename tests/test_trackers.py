"""`output.report_to`: trackers selected, a clear error for a missing one, and what an offline W&B run holds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from nashalign import NashalignError, cli
from nashalign.config import OutputConfig, from_mapping
from nashalign.train import trackers


def test_report_to_values(monkeypatch):
    installed = {"tensorboard": True, "wandb": True}
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    assert trackers.tracker_names("none") == []
    assert trackers.tracker_names("auto") == ["tensorboard"]  # wandb only when asked for
    assert trackers.tracker_names("tensorboard,wandb") == ["tensorboard", "wandb"]
    installed["tensorboard"] = False
    assert trackers.tracker_names("auto") == []
    with pytest.raises(NashalignError, match="report_to: expected one of .*got .mlflow."):
        from_mapping(OutputConfig, {"report_to": "mlflow"})


def test_wandb_asked_for_and_not_installed_is_one_clear_error(monkeypatch, tmp_path, capsys, tiny_model_dir):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q:", "chosen": " yes", "rejected": " no"}) + "\n")
    status = cli.main(["train", "--config", str(Path(__file__).parents[1] / "configs" / "train-tiny.yaml"),
                       "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"data.train_file={data}",
                       "--set", f"output.dir={tmp_path / 'run'}", "--set", "output.report_to=wandb"])
    assert status == 2
    err = capsys.readouterr().err
    assert "output.report_to: 'wandb' requested but wandb is not installed (pip install 'nashalign[wandb]')" in err
    assert "Traceback" not in err


def _wandb_records(path: Path):
    """The records of a W&B transaction log (<run>/run-<id>.wandb): a 7-byte header, then 32 KiB
    blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _wandb_runs(run_dir: Path) -> dict[str, list[dict]]:
    """{display name: history rows} of the offline W&B runs in the wandb/ folders under run_dir."""
    runs = {}
    for log in sorted(run_dir.glob("**/wandb/offline-run-*/run-*.wandb")):
        name, rows = None, []
        for record in _wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                name = record.run.display_name
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        runs[name] = rows
    return runs


def test_offline_wandb_run_holds_the_iteration_rows_and_training_metrics(tmp_path, tiny_model_dir, monkeypatch):
    """An online run with report_to wandb (WANDB_MODE=offline, no network): the loop's own W&B run has
    one history row per iteration with the summary row's values and the last training step's metrics
    as train/<key> (equal to summary.json and metrics.jsonl), and each training phase has a run of its
    own with one row per optimizer step."""
    wandb = pytest.importorskip("wandb")
    from nashalign.data.artifacts import read_json, read_jsonl
    from nashalign.judges.oracles import GameOracle
    from nashalign.online.loop import OnlineConfig, run_online
    from test_online import ANSWERS, GAME_P, _config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    mapping = _config(tmp_path, tiny_model_dir, prompts=2, iterations=2)
    mapping["output"].update(report_to="wandb", save_steps=0)
    result = run_online(from_mapping(OnlineConfig, mapping), oracle=GameOracle(ANSWERS, GAME_P, invalid="worst"))
    # run.finish() returns before W&B's service has written the last run's transaction log (seen: the
    # loop's log still 7 bytes, its header, right after the run); shutting the service down waits for it
    wandb.teardown()
    runs = _wandb_runs(result.run_dir)
    assert set(runs) == {"run", "iter_0/train", "iter_1/train"}
    loop = runs["run"]
    assert [row["_step"] for row in loop] == [0, 1]
    for t, row in enumerate(loop):
        summary = read_json(result.run_dir / f"iter_{t}" / "summary.json")
        last = read_jsonl(result.run_dir / f"iter_{t}" / "train" / "metrics.jsonl")[-1]
        for key in ("pairs_kept", "judge_calls", "mean_response_length", "win_rate_next_vs_current", "loss"):
            assert row[key] == pytest.approx(summary[key])
        for key in ("loss", "grad_norm", "rewards/accuracy", "logz/mean", "step"):
            assert row[f"train/{key}"] == pytest.approx(last[key])
        steps = read_jsonl(result.run_dir / f"iter_{t}" / "train" / "metrics.jsonl")
        phase = runs[f"iter_{t}/train"]
        assert [r["_step"] for r in phase] == [m["step"] for m in steps]
        assert [r["loss"] for r in phase] == pytest.approx([m["loss"] for m in steps])
