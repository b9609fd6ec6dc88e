"""The oracle registry: `build_oracle(spec)` builds an oracle from a mapping whose `type` key names the
implementation (see nashalign.judges.oracles for the protocol and the types):

    game, python, labels                       nashalign.judges.oracles
    reward_model, pair_model                   nashalign.judges.model_judges
    http_judge                                 nashalign.judges.http_judge

It sits above the implementations, so none of them imports it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

from nashalign import NashalignError
from nashalign.core.games import load_game
from nashalign.judges.http_judge import build_http_judge
from nashalign.judges.model_judges import build_pair_model, build_reward_model
from nashalign.judges.oracles import (
    GameConfig,
    GameOracle,
    LabelsConfig,
    LabelsOracle,
    Oracle,
    PythonConfig,
    PythonOracle,
    load_function,
    parse_config,
)


def _build_game(spec, where):
    config = parse_config(GameConfig, spec, where)
    if config.path is None:
        return GameOracle(config.responses, config.P, invalid=config.invalid, strip=config.strip)
    game = load_game(config.path)
    if not game.names:
        raise NashalignError(f"{config.path}: the game file needs 'names' (the response strings) for a game oracle")
    return GameOracle(list(game.names), game.P, invalid=config.invalid, strip=config.strip)


def _build_python(spec, where):
    config = parse_config(PythonConfig, spec, where)
    function = load_function(config.function, f"{where}: function")
    if config.kwargs:
        function = functools.partial(function, **config.kwargs)
    return PythonOracle(function, both_orders=config.both_orders, label=f"python {config.function}")


def _build_labels(spec, where):
    return LabelsOracle(parse_config(LabelsConfig, spec, where).path)


BUILDERS: dict[str, Callable[[Mapping, str], Oracle]] = {
    "game": _build_game,
    "python": _build_python,
    "labels": _build_labels,
    "reward_model": build_reward_model,
    "pair_model": build_pair_model,
    "http_judge": build_http_judge,
}


def build_oracle(spec, where: str = "oracle") -> Oracle:
    """An oracle from a mapping (or dataclass) whose `type` key names the implementation.

    `where` prefixes error messages (the spec's place in the config, e.g. "run.yaml: oracle").
    """
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        spec = dataclasses.asdict(spec)
    if not isinstance(spec, Mapping):
        raise NashalignError(f"{where}: expected a mapping with a 'type' key, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in BUILDERS:
        raise NashalignError(f"{where}: type: expected one of {', '.join(BUILDERS)}, got {kind!r}")
    return BUILDERS[kind](spec, where)
