"""Generation backends: transformers and vLLM (GPU or CPU build)."""
