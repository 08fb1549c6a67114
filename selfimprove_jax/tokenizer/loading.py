"""Pick a tokenizer backend from the files in a model directory."""

from __future__ import annotations

import os
import pathlib

from selfimprove_jax.tokenizer.base import Tokenizer
from selfimprove_jax.tokenizer.hf_tokenizer import HFTokenizer
from selfimprove_jax.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

# tokenizer.json first: some checkpoints that ship both keep chat tokens only there (Phi-3's
# <|end|> is an added token absent from its tokenizer.model), or as SentencePiece control symbols
# that never match in text (Mistral v0.3's [INST]).
_CANDIDATES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
  """Load the tokenizer of a model directory.

  Uses ``HFTokenizer.from_model_dir`` when ``tokenizer.json`` exists, else
  ``SentencePieceTokenizer`` on ``tokenizer.model``.

  Raises:
    FileNotFoundError: neither file exists (the message names the directory and both files).
  """
  model_dir = pathlib.Path(model_dir)
  if (model_dir / "tokenizer.json").is_file():
    return HFTokenizer.from_model_dir(model_dir)
  if (model_dir / "tokenizer.model").is_file():
    return SentencePieceTokenizer(model_dir / "tokenizer.model")
  raise FileNotFoundError(
      f"no tokenizer in {model_dir}: looked for {' and '.join(_CANDIDATES)}"
      + ("" if model_dir.is_dir() else " (the directory does not exist)"))
