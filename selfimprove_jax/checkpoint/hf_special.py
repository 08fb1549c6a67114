"""The special token ids (BOS, EOS, padding) an HF export states in config.json and
generation_config.json.

Why every export writes them: transformers gives a key missing from config.json its config class's
default, which belongs to some other vocabulary (Phi3Config's pad 32000 makes ``nn.Embedding``
assert for a vocabulary of 32000 ids or fewer; LlamaConfig's bos 1 / eos 2 are not Llama 3's ids),
and without a generation_config.json ``generate`` takes its stop ids from config.json's own keys, so
a missing ``eos_token_id`` means it never stops early.

Where each id comes from, first match wins (``resolve``):
  1. the tokenizer, when one is given: ``bos_id`` (null when it has none, as Qwen's), ``pad_id``,
     and ``stop_ids`` as ``eos_token_id`` (an int when there is one, else the list);
  2. else the source checkpoint (the HF directory the params were imported from): its config.json
     keys (top level, then ``text_config``), where a key it omits is what transformers read for it,
     the config class's default (``HF_CLASS_DEFAULTS``);
  3. else the family's published ids (``FAMILY_IDS``): those of its released tokenizer.
``TransformerConfig`` holds no special ids, so the model config is not a source.

Range rule: an id outside [0, vocab_size) is written as null, never as an id of another
vocabulary. That covers a family id beyond a small table (a tiny Llama 3 gets bos/eos/pad null) and
an out-of-range id in a source config (transformers itself only warns on those); in an EOS list
only the ids out of range are dropped. Null is accepted by all seven transformers config classes and
kept as None on load (tests/test_hf_export.py checks it): pad None is an embedding without padding
index, eos None makes ``generate`` run to its length limit, bos None only matters for a generate call
without a prompt. A tokenizer id outside the range is a ``ValueError``: tokenizer and model disagree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class FamilyIds:
  """The ids of a family's released tokenizer.

  eos: the end-of-text id (config.json's ``eos_token_id`` of the base checkpoints). end_of_turn: the
  chat end-of-turn ids the instruct checkpoints also stop on (the pieces ``tokenizer.chat`` knows);
  the exported EOS list is ``[eos, *end_of_turn]``. pad: None where the checkpoints define none.
  """

  bos: int | None
  eos: int
  pad: int | None
  end_of_turn: tuple[int, ...] = ()


FAMILY_IDS: dict[str, FamilyIds] = {
    "gemma2": FamilyIds(bos=2, eos=1, pad=0, end_of_turn=(107,)),        # <end_of_turn>
    "gemma3": FamilyIds(bos=2, eos=1, pad=0, end_of_turn=(106,)),        # <end_of_turn>
    "llama3": FamilyIds(bos=128000, eos=128001, pad=None, end_of_turn=(128009,)),  # <|eot_id|>
    "mistral": FamilyIds(bos=1, eos=2, pad=None),
    "phi3": FamilyIds(bos=1, eos=32000, pad=32000, end_of_turn=(32007,)),  # <|end|>
    "qwen2": FamilyIds(bos=151643, eos=151643, pad=None, end_of_turn=(151645,)),  # <|im_end|>
    "qwen3": FamilyIds(bos=151643, eos=151643, pad=None, end_of_turn=(151645,)),  # <|im_end|>
}

# (bos, eos, pad) each family's transformers config class assumes when config.json omits the key
# (transformers 5.25; tests/test_hf_export.py compares them with the classes).
HF_CLASS_DEFAULTS: dict[str, tuple[int | None, int | None, int | None]] = {
    "gemma2": (2, 1, 0), "gemma3": (2, 1, 0), "llama3": (1, 2, None), "mistral": (1, 2, None),
    "phi3": (1, 32000, 32000), "qwen2": (None, None, None), "qwen3": (None, None, None),
}


def _eos_value(ids: Sequence[int]) -> int | list[int] | None:
  ids = list(dict.fromkeys(ids))
  return None if not ids else ids[0] if len(ids) == 1 else ids


def _in_range(value: Any, vocab_size: int) -> Any:
  """``value`` (an id, a list of ids, or None) with every id outside [0, vocab_size) dropped."""
  if isinstance(value, list):
    return _eos_value([i for i in value if isinstance(i, int) and 0 <= i < vocab_size])
  return value if isinstance(value, int) and 0 <= value < vocab_size else None


def from_tokenizer(tokenizer, vocab_size: int) -> dict[str, Any]:
  """The ids a ``Tokenizer`` states. Raises ValueError naming an id outside [0, vocab_size)."""
  ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": _eos_value(tokenizer.stop_ids),
         "pad_token_id": tokenizer.pad_id}
  for key, value in ids.items():
    for i in value if isinstance(value, list) else [value]:
      if i is not None and not 0 <= i < vocab_size:
        raise ValueError(f"tokenizer {key}={value!r} is outside the model's vocabulary "
                         f"[0, {vocab_size}): the tokenizer does not belong to this model")
  return ids


def from_source(hf: Mapping[str, Any], family: str, vocab_size: int) -> dict[str, Any]:
  """The ids transformers read from a source checkpoint's parsed config.json, out-of-range ones
  as None."""
  text = hf.get("text_config") if isinstance(hf.get("text_config"), Mapping) else {}
  out = {}
  for key, default in zip(KEYS, HF_CLASS_DEFAULTS[family]):
    value = hf[key] if key in hf else text[key] if key in text else default
    out[key] = _in_range(value, vocab_size)
  return out


def from_family(family: str, vocab_size: int) -> dict[str, Any]:
  """The family's published ids (``FAMILY_IDS``), each outside [0, vocab_size) as None."""
  ids = FAMILY_IDS[family]
  return {"bos_token_id": _in_range(ids.bos, vocab_size),
          "eos_token_id": _in_range([ids.eos, *ids.end_of_turn], vocab_size),
          "pad_token_id": _in_range(ids.pad, vocab_size)}


def resolve(family: str, vocab_size: int, *, tokenizer=None,
            source: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """``{bos_token_id, eos_token_id, pad_token_id}`` for an export, by the rules of this module.

  Args:
    family, vocab_size: the exported model's.
    tokenizer: a ``Tokenizer``, or None.
    source: the parsed config.json of the checkpoint the params came from, or None.
  Returns:
    every key present; values are ids in [0, vocab_size), a list of them (eos only), or None.
  """
  if tokenizer is not None:
    return from_tokenizer(tokenizer, vocab_size)
  if source is not None:
    return from_source(source, family, vocab_size)
  return from_family(family, vocab_size)
