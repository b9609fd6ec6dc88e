"""Shared fixtures: a tiny Llama-style model and a locally trained tokenizer (no network)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import settings

# Property tests: no per-example deadline (the machines are shared and noisy), and a fixed example
# sequence so a CI run is reproducible.
settings.register_profile("nashalign", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("nashalign")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` drive the real engine: where vLLM is not installed they are deselected
    (scripts/test.sh runs them in .venv-vllm with `-m vllm`), not skipped."""
    if importlib.util.find_spec("vllm") is not None:
        return
    deselected = [item for item in items if item.get_closest_marker("vllm")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("vllm")]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nashalign.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from nashalign.tiny import build_model

    return build_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model + tokenizer saved in Hugging Face format (read-only for tests: copy to modify)."""
    from nashalign.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_model"))
