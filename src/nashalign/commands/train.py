"""`nashalign train --config run.yaml [--set key.path=value ...] [--resume auto|never]`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (keys: see docs/training.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, the value parsed as YAML (repeatable), e.g. --set loss.beta=0.2",
    )
    parser.add_argument(
        "--resume",
        choices=("auto", "never"),
        default="auto",
        help="auto: continue from the newest complete checkpoint in output.dir (default); never: start over",
    )


def run(args: argparse.Namespace) -> int:
    from nashalign.config import TrainConfig, load_config

    config = load_config(TrainConfig, args.config, args.overrides)
    from nashalign.train.loop import train

    result = train(config, resume=args.resume)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:  # under accelerate launch: one summary, not one per process
        shown = ("loss", "rewards/accuracy", "rewards/margin")
        summary = ", ".join(f"{key} {result.metrics[key]:.4g}" for key in shown if key in result.metrics)
        print(f"trained {result.global_step} steps ({summary})")
        print(f"data: {result.tokenization.summary()}")
        print(f"final model: {result.final_dir}")
        print(f"metrics: {result.metrics_file}")
    state.destroy_process_group()  # the trainer keeps the group alive for callers with several phases
    return 0
