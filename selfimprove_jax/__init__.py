"""selfimprove_jax: generate -> verify -> distill self-improvement loops and sharpening analyses in JAX."""

__version__ = "0.1.0"
