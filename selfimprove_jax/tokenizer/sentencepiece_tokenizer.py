"""SentencePiece backend (Gemma-style ``tokenizer.model``)."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence

import sentencepiece as spm

from selfimprove_jax.tokenizer.base import Tokenizer

# Gemma's chat markers are user-defined symbols, which SentencePiece does not flag as special;
# naming them lets ``decode(skip_special=True)`` drop them like the HF backend does.
GEMMA_TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")


class SentencePieceTokenizer(Tokenizer):
  """Tokenizer over a SentencePiece model.

  SentencePiece matches user-defined symbols (``<start_of_turn>``) in text but never control
  symbols (``<bos>``, ``<eos>``, ``<pad>``), and its decoder silently drops control ids. This
  class maps control-symbol strings in text to their ids and renders them on decode, so chat
  text such as ``"<bos><start_of_turn>user\\n..."`` round-trips exactly as with a Hugging Face
  ``tokenizer.json``. (For models trained with ``add_dummy_prefix``, text split around a
  control string gets a dummy prefix per segment; Gemma's models do not use it.)
  """

  def __init__(self, model: str | os.PathLike | bytes,
               special_pieces: Sequence[str] = GEMMA_TURN_PIECES):
    """Load a model.

    Args:
      model: path to a ``.model`` file, or the serialized ModelProto bytes.
      special_pieces: extra pieces (besides control symbols) that ``decode(skip_special=True)``
        drops; pieces missing from the vocabulary are ignored.
    """
    if isinstance(model, (bytes, bytearray)):
      self._sp = spm.SentencePieceProcessor(model_proto=bytes(model))
    else:
      path = pathlib.Path(model)
      if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model file not found: {path}")
      self._sp = spm.SentencePieceProcessor(model_file=str(path))
    sp = self._sp
    if sp.eos_id() < 0:
      raise ValueError("SentencePiece model has no EOS piece; generation could never stop")
    super().__init__(bos_id=sp.bos_id() if sp.bos_id() >= 0 else None, eos_id=sp.eos_id(),
                     pad_id=sp.pad_id() if sp.pad_id() >= 0 else None)

    control = {i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0 and sp.is_control(i)}
    self._control_ids = {sp.id_to_piece(i): i for i in control}
    # Longest first so that a piece that is a prefix of another cannot shadow it.
    alternatives = sorted(self._control_ids, key=len, reverse=True)
    self._control_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
    extra = {self._lookup(p) for p in special_pieces} - {None}
    self._special_ids = frozenset(control | extra)

  @property
  def model_proto(self) -> bytes:
    """The serialized model, e.g. to write a ``tokenizer.model`` file."""
    return self._sp.serialized_model_proto()

  def save(self, model_dir: str | os.PathLike) -> pathlib.Path:
    """Write ``tokenizer.model`` into ``model_dir`` (created if needed); returns its path."""
    path = pathlib.Path(model_dir) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(self.model_proto)
    return path

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def _lookup(self, piece: str) -> int | None:
    # piece_to_id answers unk_id for unknown pieces instead of failing.
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None

  def _encode_raw(self, texts: list[str]) -> list[list[int]]:
    if self._control_re is None or not any(self._control_re.search(t) for t in texts):
      return self._sp.encode(texts)
    return [self._encode_with_controls(t) for t in texts]

  def _encode_with_controls(self, text: str) -> list[int]:
    ids: list[int] = []
    pos = 0
    for m in self._control_re.finditer(text):
      if m.start() > pos:
        ids.extend(self._sp.encode(text[pos:m.start()]))
      ids.append(self._control_ids[m.group()])
      pos = m.end()
    if pos < len(text):
      ids.extend(self._sp.encode(text[pos:]))
    return ids

  def _decode_raw(self, batch: list[list[int]], skip_special: bool) -> list[str]:
    return [self._decode_one(ids, skip_special) for ids in batch]

  def _decode_one(self, ids: list[int], skip_special: bool) -> str:
    if self._special_ids.isdisjoint(ids):
      return self._sp.decode(ids)
    out: list[str] = []
    run: list[int] = []
    for i in ids:
      if i in self._special_ids:
        out.append(self._sp.decode(run))
        run = []
        if not skip_special:
          out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)
