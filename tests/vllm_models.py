"""Tiny models the vLLM engine runs: head size 64 (vLLM's kernels do not take the tiny default of 8)
and a zero output row for the pad token, so pad never wins an argmax (the transformers sampler
suppresses pad, vLLM does not, and greedy decoding must not depend on that difference)."""

from __future__ import annotations

import torch

from nashalign.models.tiny import build_model, build_tokenizer

ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 128 << 20}


def save_sampling_model(directory, seed: int, extra_eos: int | None = None):
    """Save tokenizer and model to `directory`; `extra_eos`: a second EOS id in the generation config."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=256, num_heads=4, num_layers=2, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.pad_token_id] = 0.0
    if extra_eos is not None:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra_eos]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
