"""Pick a tokenizer backend from the files in a model directory."""

from __future__ import annotations

import json
import os
import pathlib

from selfimprove_jax.tokenizer.base import Tokenizer
from selfimprove_jax.tokenizer.hf_tokenizer import HFTokenizer
from selfimprove_jax.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

# tokenizer.json first: some checkpoints that ship both keep chat tokens only there (Phi-3's
# <|end|> is an added token absent from its tokenizer.model), or as SentencePiece control symbols
# that never match in text (Mistral v0.3's [INST]).
_CANDIDATES = ("tokenizer.json", "tokenizer.model")


def generation_stop_ids(model_dir: str | os.PathLike) -> list[int] | None:
  """``eos_token_id`` of the directory's ``generation_config.json`` as a list (an int or a
  list there), or None without one."""
  path = pathlib.Path(model_dir) / "generation_config.json"
  if not path.is_file():
    return None
  value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
  if value is None:
    return None
  ids = [value] if isinstance(value, int) else value
  if not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)):
    raise ValueError(f"{path}: eos_token_id={value!r} must be an int or a list of ints")
  return ids


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
  """Load the tokenizer of a model directory.

  Uses ``HFTokenizer.from_model_dir`` when ``tokenizer.json`` exists, else
  ``SentencePieceTokenizer`` on ``tokenizer.model``. Generation stops on the ids of the
  directory's ``generation_config.json`` when it has one (``generation_stop_ids``).

  Raises:
    FileNotFoundError: neither file exists (the message names the directory and both files).
  """
  model_dir = pathlib.Path(model_dir)
  if (model_dir / "tokenizer.json").is_file():
    tokenizer = HFTokenizer.from_model_dir(model_dir)
  elif (model_dir / "tokenizer.model").is_file():
    tokenizer = SentencePieceTokenizer(model_dir / "tokenizer.model")
  else:
    tokenizer = None
  if tokenizer is not None:
    stop = generation_stop_ids(model_dir)
    if stop is not None:
      tokenizer.set_stop_ids(stop)
    return tokenizer
  raise FileNotFoundError(
      f"no tokenizer in {model_dir}: looked for {' and '.join(_CANDIDATES)}"
      + ("" if model_dir.is_dir() else " (the directory does not exist)"))
