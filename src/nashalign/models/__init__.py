"""The one place models and tokenizers are loaded (hub id or directory) and released; tiny test models."""
