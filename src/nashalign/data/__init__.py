"""The data spine: records and formats, tokenization, packing, log-probs, the log-prob cache, artifacts."""
