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
    from nashalign.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from nashalign.models.tiny import build_model

    return build_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model + tokenizer saved in Hugging Face format (read-only for tests: copy to modify)."""
    from nashalign.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def two_eos_model_dir(tmp_path_factory):
    """Llama-3-style stop tokens, saved in Hugging Face format (read-only for tests).

    The tokenizer's eos_token is "</s>" (like <|end_of_text|>); chat turns end with a second special
    token "<|eot|>" (like <|eot_id|>); the generation config lists both as EOS ids, "</s>" first.
    The model is tilted to stop on "<|eot|>" and never on "</s>": every token embedding gets the
    constant first feature 0.1, and the output rows of "<|eot|>" / "</s>" weigh that feature +1.5 /
    -1.5, so after the final norm "<|eot|>" gets a logit of about +4.5 (a stop within 6 tokens in
    most samples) and "</s>" about -4.5.
    """
    import torch

    from nashalign.models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tokenizer.chat_template = tokenizer.chat_template.replace("eos_token", "'<|eot|>'")
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    model = build_model(tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        model.lm_head.weight[eot, 0] = 1.5
        model.lm_head.weight[tokenizer.eos_token_id, 0] = -1.5
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, eot]
    directory = tmp_path_factory.mktemp("two_eos_model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _kill_at_pause(point: str, arguments: list[str], env: dict[str, str], timeout: float = 600, *,
                   process_group: bool = False) -> None:
    """Run `nashalign <arguments>` through tests/plugins/pause_point.py, wait until it reports that it
    reached `point` (it then blocks there for good), SIGKILL it, and check that it died by the kill.
    No polling: the wait is a blocking read on a pipe, which ends early (end-of-file) only if the
    process exits without reaching the point. `timeout` only turns a hang into a failure.
    `process_group`: the process runs in a session of its own and the SIGKILL goes to its whole
    process group, so processes it started die with it (vLLM's engine processes outlive a SIGKILLed
    parent)."""
    import contextlib
    import select
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    plugins = Path(__file__).parent / "plugins"
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would block the process
        try:
            process = subprocess.Popen(
                [sys.executable, str(plugins / "pause_point.py"), point, str(write_end), *arguments],
                env=env, pass_fds=(write_end,), stdout=log, stderr=subprocess.STDOUT, start_new_session=process_group,
            )
            os.close(write_end)
            write_end = -1
            ready, _, _ = select.select([read_end], [], [], timeout)
            message = os.read(read_end, 64) if ready else b""
            if process_group:
                with contextlib.suppress(ProcessLookupError):  # the group is gone if all of it exited
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()  # SIGKILL
            process.wait()
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-3000:]
    assert ready, f"pause point {point!r} not reached in {timeout} s:\n{tail}"
    assert message == b"paused\n", f"exited ({process.returncode}) before pause point {point!r}:\n{tail}"
    assert process.returncode == -signal.SIGKILL


@pytest.fixture()
def kill_at_pause():
    """`kill_at_pause(point, arguments, env, timeout=600, *, process_group=False)`: see _kill_at_pause."""
    return _kill_at_pause
