"""Benchmark workloads: a model size, chat-shaped token records drawn with a fixed seed, batch and steps.

Records are token ids drawn uniformly from the vocabulary (no download): a prompt of 60–400 tokens
shared by both responses, and two responses of 20–300 tokens each, the last of which is EOS. They
are written as text for a word-level tokenizer (token k is the word "w<k>", words separated by
spaces), so TRL, which tokenizes text itself, and nashalign's `tokenize_records` both get exactly
these ids back (the harness checks it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
FIRST_WORD_ID = len(SPECIAL_TOKENS)  # ids 0..3 are the special tokens, in this order
EOS_ID = 2


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration; every side of a comparison runs exactly this."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int = 32000
    pairs_per_step: int = 8  # per_device batch size of both trainers, no gradient accumulation
    steps: int = 4  # optimizer steps per trainer run; the first is warm-up and not timed
    prompt_tokens: tuple[int, int] = (60, 400)
    response_tokens: tuple[int, int] = (20, 300)
    max_length: int = 1024  # prompt + response; no record is truncated (400 + 300 < 1024)
    max_prompt_length: int = 512
    generation_prompts: int = 8
    new_tokens: int = 64
    seed: int = 0

    @property
    def model_kwargs(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "num_heads": self.num_heads}

    @property
    def num_records(self) -> int:
        return self.pairs_per_step * self.steps


WORKLOADS = {
    "chat60m": Workload("chat60m", hidden_size=512, num_layers=8, num_heads=8),
    "chat10m": Workload("chat10m", hidden_size=128, num_layers=4, num_heads=4),
    # A few seconds end to end: checks that every part of the harness runs.
    "smoke": Workload("smoke", hidden_size=32, num_layers=2, num_heads=4, vocab_size=1000, pairs_per_step=2,
                      steps=2, prompt_tokens=(6, 20), response_tokens=(3, 12), generation_prompts=2, new_tokens=8),
}


def token_records(workload: Workload) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) per record; responses end with EOS, nothing else is special."""
    rng = random.Random(workload.seed)

    def words(count: int) -> list[int]:
        return [rng.randrange(FIRST_WORD_ID, workload.vocab_size) for _ in range(count)]

    records = []
    for _ in range(workload.num_records):
        prompt = words(rng.randint(*workload.prompt_tokens))
        chosen = words(rng.randint(*workload.response_tokens) - 1) + [EOS_ID]
        rejected = words(rng.randint(*workload.response_tokens) - 1) + [EOS_ID]
        records.append((prompt, chosen, rejected))
    return records


def text_records(workload: Workload) -> list[dict[str, str]]:
    """The token records as {"prompt", "chosen", "rejected"} text; responses start with a space."""

    def text(ids: list[int]) -> str:
        return " ".join("</s>" if i == EOS_ID else f"w{i}" for i in ids)

    return [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)} for p, c, r in token_records(workload)]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer: "<pad>" 0, "<s>" 1, "</s>" 2, "<unk>" 3, then "w4" … "w<vocab_size-1>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD_ID, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    wrapped.padding_side = "right"
    return wrapped


def save_models(workload: Workload, directory: Path) -> dict[str, int]:
    """policy/, ref/ and prev/ (three seeds of the workload's model) with the word tokenizer; parameter counts."""
    from nashalign.models.tiny import build_model

    tokenizer = word_tokenizer(workload.vocab_size)
    counts = {}
    for seed, name in enumerate(("policy", "ref", "prev")):
        model = build_model(tokenizer, seed=seed, max_position_embeddings=2048, **workload.model_kwargs)
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
        if name == "policy":
            counts = parameter_counts(model)
    return counts


def parameter_counts(model) -> dict[str, int]:
    """total; embedding (input lookup: no matmul); head (lm_head); body (everything else: the matmuls per token)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "head": head, "body": total - embedding - head}
