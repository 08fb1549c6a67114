"""The backend-agnostic tokenizer interface.

Every backend reduces to four primitives (raw batch encode without BOS, batch decode, piece
lookup, vocabulary size); the BOS, padding, stop-token and validation policy lives here once so
the SentencePiece and Hugging Face backends cannot drift apart on it.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Iterable, Sequence

from selfimprove_jax.tokenizer.chat import END_OF_TURN_PIECES


class Tokenizer(abc.ABC):
  """Text <-> token ids for one model.

  Attributes exposed as properties:
    vocab_size: number of ids the tokenizer can emit (the model's embedding table may be padded
      larger; never smaller).
    bos_id: beginning-of-sequence id, or None for models that have none (Qwen).
    eos_id: end-of-sequence id.
    pad_id: padding id. Models that ship without one (Llama 3, Mistral) pad with ``eos_id``:
      padded positions are masked out, so any valid id works, and EOS is the one every model has.
    stop_ids: ids that end generation: a checkpoint's ``generation_config.json`` ``eos_token_id``
      list when it has one (what transformers' ``generate`` stops on), else EOS first, then every
      known end-of-turn marker (``<end_of_turn>``, ``<|eot_id|>``, ``<|end|>``, ``<|im_end|>``)
      present in the vocabulary.

  ``adds_bos``: whether ``encode(add_bos=True)`` puts BOS in front of plain text, as the
  checkpoint's own tokenizer does (SmolLM2's and Qwen's do not); loaders set it.
  """

  adds_bos: bool = True

  def __init__(self, *, bos_id: int | None, eos_id: int, pad_id: int | None):
    self._bos_id = bos_id
    self._eos_id = eos_id
    self._pad_id = eos_id if pad_id is None else pad_id
    self._stop_ids: tuple[int, ...] | None = None

  def set_stop_ids(self, ids: Sequence[int]) -> None:
    """Generation stops on exactly ``ids`` (e.g. a generation config's ``eos_token_id`` list)."""
    ids = tuple(int(i) for i in ids)
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if not ids or bad:
      raise ValueError(f"stop ids {list(ids)}: need at least one, each in [0, {self.vocab_size})")
    self._stop_ids = ids
    self.__dict__.pop("stop_ids", None)

  # --- Backend primitives -------------------------------------------------------------------

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of distinct ids, special tokens included."""

  @abc.abstractmethod
  def _lookup(self, piece: str) -> int | None:
    """Id of a single vocabulary piece, or None when the piece is not in the vocabulary."""

  @abc.abstractmethod
  def _encode_raw(self, texts: list[str]) -> list[list[int]]:
    """Encode without adding BOS/EOS; special-token strings in the text map to their ids."""

  @abc.abstractmethod
  def _decode_raw(self, batch: list[list[int]], skip_special: bool) -> list[str]:
    """Decode validated id lists."""

  # --- Public API -----------------------------------------------------------------------------

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @functools.cached_property
  def stop_ids(self) -> tuple[int, ...]:
    if self._stop_ids is not None:
      return self._stop_ids
    ids = [self._eos_id]
    for piece in END_OF_TURN_PIECES:
      i = self._lookup(piece)
      if i is not None and i not in ids:
        ids.append(i)
    return tuple(ids)

  def token_to_id(self, piece: str) -> int:
    """Id of one vocabulary piece (e.g. ``"<end_of_turn>"``); KeyError naming it if absent."""
    i = self._lookup(piece)
    if i is None:
      raise KeyError(
          f"piece {piece!r} is not in the vocabulary of this {type(self).__name__} "
          f"({self.vocab_size} ids)")
    return i

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text``.

    With ``add_bos=True`` the result starts with exactly one BOS, also when the text itself
    already begins with the BOS string (as rendered chat prompts do), if the tokenizer puts BOS
    in front of text at all (``adds_bos``); with ``add_bos=False`` no BOS is added (one written
    literally in the text is kept). Models without a BOS token get none either way. EOS is never
    appended.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return self.encode_batch([text], add_bos=add_bos)[0]

  def encode_batch(self, texts: Iterable[str], add_bos: bool = True) -> list[list[int]]:
    """``encode`` over a batch; returns ragged lists (padding is the caller's business)."""
    if isinstance(texts, str):
      # A bare str is iterable too and would silently encode character by character.
      raise TypeError("encode_batch expects a sequence of str, got a single str")
    texts = list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, expected str")
    batch = self._encode_raw(texts)
    bos = self._bos_id
    if add_bos and self.adds_bos and bos is not None:
      batch = [ids if ids[:1] == [bos] else [bos, *ids] for ids in batch]
    return batch

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    """Text of ``ids`` (any int sequence, numpy arrays included).

    ``skip_special=True`` drops special tokens (BOS/EOS/PAD and chat-turn markers) instead of
    rendering their strings.
    """
    return self.decode_batch([ids], skip_special=skip_special)[0]

  def decode_batch(self, batch: Iterable[Sequence[int]], skip_special: bool = False) -> list[str]:
    """``decode`` over a batch of id sequences."""
    clean = []
    for row, ids in enumerate(batch):
      ids = [int(i) for i in ids]
      bad = [i for i in ids if not 0 <= i < self.vocab_size]
      if bad:
        # Backends disagree on out-of-range ids (one raises, one drops them silently).
        raise ValueError(
            f"decode: row {row} has ids outside [0, {self.vocab_size}): {bad[:5]}")
      clean.append(ids)
    return self._decode_raw(clean, skip_special)
