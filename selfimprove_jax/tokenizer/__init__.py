"""Tokenizers (SentencePiece and Hugging Face backends) and chat-format rendering.

Nothing here imports jax: tokenization runs on the host, outside jit.
"""

from selfimprove_jax.tokenizer.base import Tokenizer
from selfimprove_jax.tokenizer.chat import FAMILIES
from selfimprove_jax.tokenizer.chat import STOP_STRINGS
from selfimprove_jax.tokenizer.chat import render_chat
from selfimprove_jax.tokenizer.chat import stop_ids_for_family
from selfimprove_jax.tokenizer.hf_tokenizer import HFTokenizer
from selfimprove_jax.tokenizer.loading import load_tokenizer
from selfimprove_jax.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer
from selfimprove_jax.tokenizer.training import train_hf_bpe
from selfimprove_jax.tokenizer.training import train_sentencepiece

__all__ = [
    "FAMILIES",
    "HFTokenizer",
    "STOP_STRINGS",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "render_chat",
    "stop_ids_for_family",
    "train_hf_bpe",
    "train_sentencepiece",
]
