"""`nashalign game`: run INPO and baselines on a finite preference game and report the duality gaps.

The game is a built-in (`--game`, default: the Condorcet game of three annotators) or a JSON file
`{"P": [[...]], "reference": [...]}`. Prints two tables, the exact duality gap of the regularized
game and the unregularized gap DG₀ of each algorithm's iterate (a readable subset of iterations,
always the last), the final policies, and writes a PNG plot of both (log scale); `--json` prints one
JSON object instead. The work lives in `nashalign.core.games` and
`nashalign.core.tabular`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nashalign import NashalignError
from nashalign.core.games import BUILTIN_GAMES, Game, find_cycle, load_game, nash_policy, validate_game
from nashalign.core.tabular import (
    ALGORITHMS,
    REFRESHED,
    SAMPLED,
    SCHEDULES,
    TabularRun,
    check_settings,
    run_algorithms,
)

DEFAULT_PLOT = Path("runs/game/duality_gap.png")
GAP_FLOOR = 1e-16
"""Gaps below this (0 up to rounding) are drawn at this value on the log-scale plot."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "game_json",
        nargs="?",
        metavar="GAME_JSON",
        help='game file {"P": [[...]], "reference": [...]} (reference optional: uniform); default: --game',
    )
    parser.add_argument(
        "--game",
        choices=sorted(BUILTIN_GAMES),
        default=None,
        help="built-in game when no GAME_JSON is given (default: condorcet; random uses --seed)",
    )
    parser.add_argument(
        "--tau", type=float, default=0.1, help="KL weight towards the reference (default 0.1)"
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=0.3,
        help="KL weight towards the current iterate, 1/eta is the step size; needs tau < eta (default 0.3)",
    )
    parser.add_argument("--iterations", type=int, default=100, help="iterations per algorithm (default 100)")
    parser.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        help=f"comma-separated list from: {', '.join(ALGORITHMS)} (default: all)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1000,
        help="sampled pairs per iteration for inpo-sampled and iterative-dpo (default 1000)",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="fixed",
        help="fixed: eta every step; theory: eta_t = tau(t+2)/2 from INPO's convergence theorem (default fixed)",
    )
    parser.add_argument(
        "--refresh-every",
        type=int,
        default=20,
        help="comal: refresh the reference to the current policy every N steps (default 20)",
    )
    parser.add_argument(
        "--refresh-tolerance",
        type=float,
        default=0.0,
        help="comal: refresh also as soon as the inner game's regularized gap is <= this; 0: only every N "
        "steps (default 0)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for sampling and the random game (default 0)"
    )
    parser.add_argument("--plot", type=Path, default=None, help=f"PNG plot path (default {DEFAULT_PLOT})")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print only {"<algorithm>": {"duality_gap": [...], "unregularized_gap": [...], "policy": [...], '
        '"refreshes": N}}; plot only with --plot',
    )


def resolve_game(game_json: str | None, builtin: str | None, seed: int) -> tuple[str, Game]:
    """The game to play and its display name: the JSON file, else the built-in (default condorcet)."""
    if game_json is not None and builtin is not None:
        raise NashalignError(f"give either GAME_JSON ({game_json}) or --game ({builtin}), not both")
    if game_json is not None:
        return game_json, load_game(game_json)
    name = builtin or "condorcet"
    game = BUILTIN_GAMES[name](seed)
    validate_game(game.P, game.reference, source=f"built-in game {name!r}")
    return name, game


def parse_algorithms(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    check_settings(names, tau=1.0, eta=2.0, iterations=1, schedule="fixed", samples=1)
    return list(dict.fromkeys(names))


def shown_iterations(iterations: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, 50, … up to `iterations`, always ending with `iterations`."""
    shown, scale = [0], 1
    while scale < iterations:
        shown.extend(k * scale for k in (1, 2, 5) if k * scale < iterations)
        scale *= 10
    return shown + [iterations]


def trend(gaps: np.ndarray, sampled: bool) -> str:
    """A one-word reading of a gap curve, from its third and last quarters (envelopes, because a
    converging gap may still oscillate).

    converged: final gap ≤ 1e-9; falling: the last quarter's maximum is at most 0.8× the third
    quarter's (0.5× for sampled algorithms, whose noise alone moves it); cycling (noisy, for sampled algorithms): otherwise, if the last quarter varies by more
    than 1% of its maximum; flat: it settled at a point that is not the regularized Nash policy.
    """
    if gaps[-1] <= 1e-9:
        return "converged"
    quarter = max((len(gaps) - 1) // 4, 1)
    last, third = gaps[-quarter - 1 :], gaps[-2 * quarter - 1 : -quarter]
    if last.max() <= (0.5 if sampled else 0.8) * third.max():
        return "falling"
    if last.max() - last.min() > 0.01 * last.max():
        return "noisy" if sampled else "cycling"
    return "flat"


def write_plot(runs: dict[str, TabularRun], path: Path, title: str) -> None:
    """Both gaps against iteration, log scale, one panel each and one line per algorithm (matplotlib's
    Agg canvas, used directly so that no global backend or pyplot state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    panels = (
        ("duality_gap", "regularized duality gap of π_t"),
        ("unregularized_gap", "unregularized gap DG₀ of π_t"),
    )
    for index, (field, label) in enumerate(panels):
        axes = figure.add_subplot(1, 2, index + 1)
        for name, run in runs.items():
            gaps = getattr(run, field)
            axes.plot(np.arange(len(gaps)), np.maximum(gaps, GAP_FLOOR), label=name)
        axes.set_yscale("log")
        axes.set_xlabel("iteration t")
        axes.set_ylabel(label)
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    except OSError as error:
        raise NashalignError(f"{path}: cannot write the plot: {error.strerror or error}") from None


def _policy_text(policy: np.ndarray, names: tuple[str, ...]) -> str:
    labels = names or tuple(str(i) for i in range(len(policy)))
    return " ".join(f"{label}={p:.3f}" for label, p in zip(labels, policy))


def _target_gap(run: TabularRun) -> np.ndarray:
    """The gap an algorithm drives to 0: DG₀ for comal (REFRESHED), the regularized gap otherwise."""
    return run.unregularized_gap if run.algorithm in REFRESHED else run.duality_gap


def _gap_table(runs: dict[str, TabularRun], field: str, iterations: int) -> None:
    width = max(12, *(len(a) + 2 for a in runs))
    print("iteration" + "".join(f"{a:>{width}}" for a in runs))
    for t in shown_iterations(iterations):
        print(f"{t:>9}" + "".join(f"{max(getattr(run, field)[t], 0.0):>{width}.3e}" for run in runs.values()))


def run(args: argparse.Namespace) -> int:
    algorithms = parse_algorithms(args.algorithms)
    refresh = {"refresh_every": args.refresh_every, "refresh_tolerance": args.refresh_tolerance}
    check_settings(
        algorithms,
        tau=args.tau,
        eta=args.eta,
        iterations=args.iterations,
        schedule=args.schedule,
        samples=args.samples,
        **refresh,
    )
    name, game = resolve_game(args.game_json, args.game, args.seed)
    runs = run_algorithms(
        algorithms,
        game.P,
        game.reference,
        tau=args.tau,
        eta=args.eta,
        iterations=args.iterations,
        schedule=args.schedule,
        samples=args.samples,
        seed=args.seed,
        **refresh,
    )
    if args.json:
        if args.plot is not None:
            write_plot(runs, args.plot, name)
        result = {
            algorithm: {
                "duality_gap": run.duality_gap.tolist(),
                "unregularized_gap": run.unregularized_gap.tolist(),
                "policy": run.policy.tolist(),
                "refreshes": int(run.refreshes),
            }
            for algorithm, run in runs.items()
        }
        print(json.dumps(result))
        return 0

    nash = nash_policy(game.P, game.reference, args.tau)
    steps = (
        f"eta={args.eta:g} (tau/eta={args.tau / args.eta:.3g})"
        if args.schedule == "fixed"
        else "schedule theory: eta_t = tau(t+2)/2"
    )
    print(f"game: {name}, {game.description}")
    cycle = find_cycle(game.P)
    labels = game.names or tuple(str(i) for i in range(game.n))
    if cycle is not None:
        print("  majority cycle: " + " ≻ ".join(labels[i] for i in (*cycle, cycle[0])))
    else:
        print("  no majority cycle: the majority order is transitive")
    print(f"  reference        {_policy_text(game.reference, game.names)}")
    print(f"  regularized Nash {_policy_text(nash, game.names)}   (tau={args.tau:g})")
    sampled = [a for a in algorithms if a in SAMPLED]
    refreshed = [a for a in algorithms if a in REFRESHED]
    print(
        f"settings: tau={args.tau:g}, {steps}, {args.iterations} iterations, seed {args.seed}"
        + (f", {args.samples} sampled pairs per iteration ({', '.join(sampled)})" if sampled else "")
        + (
            f", reference refreshed every {args.refresh_every} steps"
            + (f" or when the inner gap <= {args.refresh_tolerance:g}" if args.refresh_tolerance > 0 else "")
            + f" ({', '.join(refreshed)})"
            if refreshed
            else ""
        )
    )
    print()
    print("duality gap of π_t (0 exactly at the regularized Nash policy; π_0 = reference)")
    _gap_table(runs, "duality_gap", args.iterations)
    print()
    print("unregularized gap DG₀ of π_t = 2·max_y P(y ≻ π_t) − 1 (0 exactly at a Nash policy of P itself)")
    _gap_table(runs, "unregularized_gap", args.iterations)
    print()
    print(
        "final policies (trend of the gap the algorithm aims at, the regularized one except for comal; "
        "TV = total variation distance to the regularized Nash policy)"
    )
    name_width = max(len(a) for a in algorithms)
    trends = {a: trend(_target_gap(runs[a]), a in SAMPLED) for a in algorithms}
    for algorithm in algorithms:
        result = runs[algorithm]
        if algorithm in REFRESHED:
            closeness = f"DG₀ {max(result.unregularized_gap[-1], 0.0):.2e}"
            closeness += f"  ({int(result.refreshes)} reference refreshes)"
        else:
            closeness = f"TV {0.5 * np.abs(result.policy - nash).sum():.2e}"
        print(
            f"  {algorithm:<{name_width}}  {trends[algorithm]:<9}  {closeness}  "
            f"{_policy_text(result.policy, game.names)}"
        )
    cycling = [a for a in algorithms if trends[a] == "cycling"]
    if cycling:
        print(
            f"note: the gap of {', '.join(cycling)} oscillates instead of converging: with a fixed step the "
            "iterates can cycle around the equilibrium (SPPO has no regularization at all); "
            "INPO converges with --schedule theory, and inpo-optimistic with a fixed step"
        )
    plot = args.plot or DEFAULT_PLOT
    write_plot(runs, plot, f"{name}: tau={args.tau:g}, {steps}")
    print(f"plot: {plot}")
    return 0
