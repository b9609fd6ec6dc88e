"""Every module of the package imports, and importing changes no global state."""

import importlib
import pkgutil

import nashalign


def _all_modules():
    yield "nashalign"
    for info in pkgutil.walk_packages(nashalign.__path__, prefix="nashalign."):
        yield info.name


def test_every_module_imports():
    names = list(_all_modules())
    assert "nashalign.cli" in names
    for name in names:
        importlib.import_module(name)


def test_import_does_not_seed_torch():
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    for name in _all_modules():
        importlib.reload(importlib.import_module(name)) if name != "nashalign" else None
    assert torch.equal(torch.rand(3), expected)
