"""Experiment trackers (`output.report_to`): TensorBoard and Weights & Biases, through accelerate's trackers.

    auto               TensorBoard when it is installed, else none (wandb only when asked for)
    none               no tracker
    tensorboard        event files under <run dir>/nashalign/
    wandb              a W&B run whose files go to <run dir>/wandb/ (WANDB_MODE=offline: no network;
                       `wandb sync` uploads later); needs the `wandb` extra
    tensorboard,wandb  both

A training phase logs every `output.logging_steps` optimizer steps (nashalign.train.loop). The online loop
also keeps one run of its own (`IterationTrackers`) with one row per iteration: the summary row and
the last training step's metrics of that iteration as `train/<key>`, at step t. W&B runs are created
with `reinit="create_new"`, so the loop's run stays open while each phase has its own.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from nashalign import NashalignError

PROJECT = "nashalign"
INSTALL_HINT = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'nashalign[wandb]'"}


def tracker_names(report_to: str) -> list[str]:
    """The trackers `output.report_to` selects; NashalignError naming the install command for one that
    is asked for and not installed."""
    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    names = report_to.split(",")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise NashalignError(
                f"output.report_to: {name!r} requested but {name} is not installed ({INSTALL_HINT[name]})"
            )
    return names


def init_kwargs(names: list[str], run_dir: Path, run_name: str, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """accelerate's `init_trackers(init_kwargs=...)`: where and under which name a W&B run is kept, with
    the flat config (given to wandb.init: accelerate's store_init_configuration writes to the global
    wandb.config, which a run made with reinit="create_new" is not)."""
    if "wandb" not in names:
        return {}
    return {"wandb": {"dir": str(run_dir), "name": run_name, "reinit": "create_new", "config": config}}


def store_config(tracker_objects, config: dict[str, Any]) -> None:
    """The flat config as hyperparameters of every tracker but W&B (which got it at init)."""
    for tracker in tracker_objects:
        if tracker.name != "wandb":
            tracker.store_init_configuration(config)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat 'a.b.c' keys with scalar values (lists as JSON), as trackers store it."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


class IterationTrackers:
    """The online loop's own tracker run: `log_iteration(row, metrics_file)` once per iteration.

    Built on the main process only (the loop's caller decides); nothing is opened for `none`."""

    def __init__(self, report_to: str, run_dir: Path, config: dict[str, Any]):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        self.trackers = []
        flat = flatten(config)
        for name in tracker_names(report_to):
            if name == "tensorboard":
                tracker = TensorBoardTracker(PROJECT, logging_dir=str(run_dir))
            else:
                tracker = WandBTracker(PROJECT, **init_kwargs([name], run_dir, run_dir.name, flat)["wandb"])
            tracker.start()
            self.trackers.append(tracker)
        store_config(self.trackers, flat)

    def log_iteration(self, row: dict[str, Any], metrics_file: Path) -> None:
        """The summary row and the last line of the iteration's training metrics, at step = iteration."""
        if not self.trackers:
            return
        values = {key: value for key, value in row.items() if isinstance(value, (int, float)) and key != "iteration"}
        if metrics_file.exists():
            lines = metrics_file.read_text().splitlines()
            if lines:
                values.update({f"train/{key}": value for key, value in json.loads(lines[-1]).items()})
        for tracker in self.trackers:
            tracker.log(values, step=int(row["iteration"]))

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
