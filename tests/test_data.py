"""Data pipeline: reading and validating records, tokenizing them into pairs, collating batches."""

from nashalign.data import collate_pairs, load_records, tokenize_records


def test_standard_record_round_trip(tiny_tokenizer):
    """A string record tokenizes to prompt ids + response ids ending with exactly one EOS."""
    records = load_records([{"prompt": "What is the capital of France?", "chosen": " Paris", "rejected": " no"}])
    pairs, report = tokenize_records(records, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert pairs[0].chosen_ids[-1] == eos and pairs[0].chosen_ids.count(eos) == 1
    assert report.kept == 1
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
