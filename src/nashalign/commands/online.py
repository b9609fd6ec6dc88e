"""`nashalign online --config run.yaml [--set key.path=value ...] [--dry-run [--json]]`: run, resume or
extend the online loop, or print its plan and costs without loading a model."""

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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, the stages of every iteration and their counts (samples, tokens, "
        "comparisons, judge calls), then exit; loads no model",
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """Every process of an `accelerate launch` runs the loop; the main process prints the summary."""
    from nashalign import NashalignError
    from nashalign.config import load_config
    from nashalign.online.loop import OnlineConfig

    if args.json and not args.dry_run:
        raise NashalignError("--json: only with --dry-run")
    config = load_config(OnlineConfig, args.config, args.overrides)
    if args.dry_run:
        import json

        from nashalign.online.plan import format_plan, plan_online

        plan = plan_online(config)
        print(json.dumps(plan, indent=2, ensure_ascii=False) if args.json else format_plan(plan))
        return 0

    from nashalign.online.loop import format_summary_table, run_online
    from nashalign.online.sharding import process_state

    result = run_online(config)
    state = process_state()
    if state.is_main_process:
        print(format_summary_table(result.summaries))
        print(f"final model: {result.final_model}")
        print(f"run directory: {result.run_dir}")
    state.destroy_process_group()
    return 0
