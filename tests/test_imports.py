"""Every module of the package imports, and importing changes no global state."""

import importlib
import pkgutil
import subprocess
import sys

import nashalign


def _all_modules():
    yield "nashalign"
    for info in pkgutil.walk_packages(nashalign.__path__, prefix="nashalign."):
        yield info.name


def test_every_module_imports():
    names = list(_all_modules())
    assert {"nashalign.cli", "nashalign.core.losses", "nashalign.online.loop", "nashalign.commands.game"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_importing_every_module_leaves_rngs_and_logging_alone():
    """In a fresh interpreter: seed, draw; seed again, import everything, draw: the same numbers, and
    the root logger has no handlers (logging is configured by the CLI only)."""
    script = """
import importlib, logging, pkgutil, random
import numpy as np, torch
torch.manual_seed(1234); np.random.seed(1234); random.seed(1234)
expected = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())
torch.manual_seed(1234); np.random.seed(1234); random.seed(1234)
import nashalign
for info in pkgutil.walk_packages(nashalign.__path__, prefix="nashalign."):
    importlib.import_module(info.name)
assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()) == expected, "an import drew or seeded"
assert not logging.getLogger().handlers, logging.getLogger().handlers
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
