"""`nashalign online --config run.yaml [--set key.path=value ...]`: run or resume the online loop."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (keys: see docs/online.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, the value parsed as YAML (repeatable), e.g. --set run.iterations=2",
    )


def run(args: argparse.Namespace) -> int:
    """Every process of an `accelerate launch` runs the loop; the main process prints the summary."""
    from nashalign.config import load_config
    from nashalign.online import OnlineConfig, format_summary_table, run_online
    from nashalign.sharding import process_state

    config = load_config(OnlineConfig, args.config, args.overrides)
    result = run_online(config)
    state = process_state()
    if state.is_main_process:
        print(format_summary_table(result.summaries))
        print(f"final model: {result.final_model}")
        print(f"run directory: {result.run_dir}")
    state.destroy_process_group()
    return 0
