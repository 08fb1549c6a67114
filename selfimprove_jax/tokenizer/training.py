"""Tiny in-memory tokenizers for tests and toy runs (no files, no downloads, milliseconds)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from selfimprove_jax.tokenizer.hf_tokenizer import HFTokenizer
from selfimprove_jax.tokenizer.sentencepiece_tokenizer import GEMMA_TURN_PIECES
from selfimprove_jax.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>")


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 512,
                        user_defined_symbols: Sequence[str] = GEMMA_TURN_PIECES,
                        ) -> SentencePieceTokenizer:
  """Train a Gemma-like byte-fallback BPE SentencePiece model on ``texts``.

  Ids follow Gemma: pad=0, eos=1, bos=2, unk=3, then ``user_defined_symbols`` (each always a
  single piece), then 256 byte pieces, so any character outside the training text still
  round-trips. No normalization, no dummy prefix, whitespace kept as is. ``vocab_size`` is an
  upper bound (``hard_vocab_limit=False``); it must exceed 260 + the number of symbols + the
  distinct characters of ``texts``.
  """
  texts = list(texts)
  if not texts:
    raise ValueError("train_sentencepiece: texts is empty")
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, hard_vocab_limit=False, character_coverage=1.0,
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      # The default (4192 bytes) silently skips longer training lines, e.g. whole documents.
      max_sentence_length=1 << 16,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=list(user_defined_symbols), minloglevel=2)
  return SentencePieceTokenizer(buf.getvalue(), special_pieces=user_defined_symbols)


def train_hf_bpe(texts: Iterable[str], vocab_size: int = 512,
                 special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS,
                 bos_token: str | None = "<|begin_of_text|>", eos_token: str = "<|end_of_text|>",
                 pad_token: str | None = None) -> HFTokenizer:
  """Train a Llama-3-like byte-level BPE ``tokenizers`` model on ``texts``.

  ``special_tokens`` get the first ids, in order, and are matched whole in text. Like Llama 3's
  ``tokenizer.json``, the post-processor prepends BOS, so tests see ``HFTokenizer`` bypass it.
  Byte-level BPE needs no fallback: every byte is in the base alphabet.
  """
  texts = list(texts)
  if not texts:
    raise ValueError("train_hf_bpe: texts is empty")
  for name, token in (("bos_token", bos_token), ("eos_token", eos_token),
                      ("pad_token", pad_token)):
    if token is not None and token not in special_tokens:
      raise ValueError(f"train_hf_bpe: {name}={token!r} is not in special_tokens")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  if bos_token is not None:
    bos = (bos_token, tok.token_to_id(bos_token))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[bos])
  return HFTokenizer(tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
