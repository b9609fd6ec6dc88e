"""`nashalign demo`: the embedded end-to-end demo (see nashalign.demo); downloads nothing."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nashalign.demo import DemoSettings

    defaults = DemoSettings()
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where the runs and the report go")
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="online iterations per algorithm")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--families", type=int, default=defaults.families,
                        help=f"prompt families (1 to {defaults.families}), 6 prompts each")
    parser.add_argument(
        "--algorithms",
        default=",".join(defaults.algorithms),
        help="comma list of online algorithms run side by side from the same start (inpo, inpo-optimistic, "
        "online-ipo, nash-md, iterative-dpo, sppo), and inpo-refresh: INPO whose reference becomes the current "
        "policy every --refresh-every iterations",
    )
    parser.add_argument("--refresh-every", type=int, default=defaults.refresh_every,
                        help="inpo-refresh: iterations between reference refreshes")
    parser.add_argument("--tau", type=float, default=defaults.tau, help="KL weight towards π_ref (inpo*, online-ipo, "
                        "nash-md; also the τ of the reported regularized gap)")
    parser.add_argument("--eta", type=float, default=defaults.eta, help="inpo*: KL weight towards π_t (> tau)")


def run(args: argparse.Namespace) -> int:
    import torch

    from nashalign import NashalignError
    from nashalign.demo import DemoSettings, demo_algorithms, format_demo_table, run_demo

    algorithms = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    known = demo_algorithms()
    unknown = [a for a in algorithms if a not in known]
    if unknown or not algorithms or len(set(algorithms)) != len(algorithms):
        raise NashalignError(f"--algorithms: expected a comma list of distinct names from {', '.join(known)}, "
                             f"got {args.algorithms!r}")
    if not 1 <= args.families <= DemoSettings().families:
        raise NashalignError(f"--families: expected 1 to {DemoSettings().families}, got {args.families}")
    for name in ("iterations", "refresh_every"):
        if getattr(args, name) < 1:
            raise NashalignError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if not 0 < args.tau < args.eta:
        raise NashalignError(f"--tau, --eta: expected 0 < tau < eta, got tau {args.tau}, eta {args.eta}")
    torch.manual_seed(args.seed)
    summary = run_demo(
        DemoSettings(output_dir=args.output_dir, iterations=args.iterations, seed=args.seed, algorithms=algorithms,
                     refresh_every=args.refresh_every, tau=args.tau, eta=args.eta, families=args.families)
    )
    print()
    for note in summary["notes"]:
        print(note)
    print()
    print(format_demo_table(summary))
    print(f"\nreport: {summary['report']}")
    return 0
