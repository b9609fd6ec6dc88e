"""The tiny model fixture: built locally, chat template ends turns with exactly one EOS."""

import torch


def test_tokenizer_roundtrip_and_chat_template(tiny_tokenizer):
    text = "Rock beats scissors."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}], tokenize=False
    )
    assert rendered == "<|user|>\nhi</s>\n<|assistant|>\nyes</s>\n"
    assert tiny_tokenizer.convert_tokens_to_ids("</s>") == tiny_tokenizer.eos_token_id


def test_model_forward_shapes(tiny_tokenizer, tiny_model):
    ids = torch.tensor([[1, 5, 9, 2]])
    logits = tiny_model(input_ids=ids).logits
    assert logits.shape == (1, 4, len(tiny_tokenizer))
    assert torch.isfinite(logits).all()


def test_saved_model_loads(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template is not None
