"""Tiny Llama-style models and tokenizers built locally, in seconds, with nothing downloaded.

Used by the tests, the demo and the benchmarks. The tokenizer is a byte-level BPE trained with
`tokenizers` on a small built-in corpus (plus any extra text given), wrapped as a
`PreTrainedTokenizerFast` with a chat template whose turns end with the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Each turn is "<|role|>\ncontent</s>\n"; the generation prompt is "<|assistant|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A helpful assistant answers questions clearly.
What is the capital of France? Paris is the capital of France. Rock beats scissors, scissors beat
paper, and paper beats rock. Preferences can be intransitive: A is preferred to B, B to C, C to A.
Write a short poem about the sea. The sea is wide and blue, the waves come rolling through.
Explain gradient descent. Gradient descent moves parameters against the gradient of a loss.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.
user assistant system <|user|> <|assistant|> <|system|> yes no maybe good bad better best worst.
"""


def build_tokenizer(extra_text: Iterable[str] = (), vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on the built-in corpus plus `extra_text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()) + ["<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS, *extra_text], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.padding_side = "right"
    return wrapped


def build_model(
    tokenizer=None,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
):
    """A randomly initialised LlamaForCausalLM (float32) sized by the arguments.

    `vocab_size` defaults to the tokenizer's length. ~60M parameters with a 32k vocabulary:
    hidden_size=512, num_layers=8, num_heads=8 (see bench/).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("build_model needs a tokenizer or a vocab_size")
        vocab_size = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else 1,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def save_tiny(directory: str | Path, extra_text: Iterable[str] = (), **model_kwargs) -> Path:
    """Build a tokenizer and model and save both in Hugging Face format to `directory`."""
    directory = Path(directory)
    tokenizer = build_tokenizer(extra_text)
    model = build_model(tokenizer, **model_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_hub_cache(source: str | Path, cache_dir: str | Path, repo_id: str, revision: str = "main") -> Path:
    """Copy a saved model directory into a Hugging Face hub cache under `repo_id`, laid out as the
    hub client lays out a download (models--owner--name/{refs/<revision>, snapshots/<commit>/}), so
    that `from_pretrained(repo_id)` finds it with HF_HUB_CACHE=cache_dir and HF_HUB_OFFLINE=1.
    Returns the snapshot directory. The commit hash is derived from the files' contents."""
    import hashlib
    import shutil

    source, cache_dir = Path(source), Path(cache_dir)
    digest = hashlib.sha1(repo_id.encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source)).encode())
        digest.update(path.read_bytes())
    commit = digest.hexdigest()
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
