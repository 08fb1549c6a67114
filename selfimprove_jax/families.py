"""The model families the project supports, named once (no jax import: tokenizers share it)."""

FAMILIES = ("gemma2", "gemma3", "llama3", "mistral", "phi3", "qwen2", "qwen3")
