"""`nashalign <command>`: a thin dispatcher.

Each command lives in `nashalign/commands/<command>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. Only the chosen command's module is imported, so `nashalign game` never pays for
importing transformers. User errors (`NashalignError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nashalign import NashalignError, __version__

COMMANDS = {
    "game": "run INPO and baselines on a finite preference game and report the duality gap",
    "train": "train a causal language model on preference pairs (dpo, ipo, inpo, sppo, srpo, sparsepo, + sft)",
    "online": "run the online INPO loop: sample, judge, build pairs, train; resumable",
    "eval": "win rates, length-controlled win rate, ranking accuracy, KL",
    "revise": "SRPO self-revision: answer, revise N times with the same model, compare round N with round 0",
    "demo": "the embedded end-to-end demo: a tiny model aligned on an intransitive preference",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="nashalign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nashalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"nashalign.commands.{name}")
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_output(args.command)
    try:
        return int(args._run(args) or 0)
    except NashalignError as error:
        print(f"nashalign {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nashalign {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_output(command: str) -> None:
    """What a run prints: INFO lines from the main process only (under `accelerate launch` the others
    log warnings and errors), and no progress bar from transformers for each model loaded or saved
    (its warnings stay). Not for `game`, which never imports transformers."""
    from nashalign.progress import is_main_process

    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    if command != "game":
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
