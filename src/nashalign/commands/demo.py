"""`nashalign demo`: the embedded end-to-end demo (see nashalign.demo); downloads nothing."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nashalign.demo import DemoSettings

    defaults = DemoSettings()
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where the runs and the report go")
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="online iterations per algorithm")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--algorithms",
        default=",".join(defaults.algorithms),
        help="comma list of online algorithms run side by side from the same start (inpo, iterative-dpo, sppo)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from nashalign import NashalignError
    from nashalign.demo import DemoSettings, format_demo_table, run_demo
    from nashalign.online import ALGORITHMS

    algorithms = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        raise NashalignError(f"--algorithms: expected a comma list of {', '.join(ALGORITHMS)}, got {args.algorithms!r}")
    if args.iterations < 1:
        raise NashalignError(f"--iterations: expected a positive integer, got {args.iterations}")
    torch.manual_seed(args.seed)
    summary = run_demo(
        DemoSettings(output_dir=args.output_dir, iterations=args.iterations, seed=args.seed, algorithms=algorithms)
    )
    print()
    for note in summary["notes"]:
        print(note)
    print()
    print(format_demo_table(summary))
    print(f"\nreport: {summary['report']}")
    return 0
