"""Shared fixtures: a tiny Llama-style model and a locally trained tokenizer (no network)."""

from __future__ import annotations

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

    from nashalign.tiny import build_model, build_tokenizer

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
