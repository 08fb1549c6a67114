"""Hugging Face ``tokenizers`` backend (``tokenizer.json``: Llama 3, Mistral, Phi-3, Qwen)."""

from __future__ import annotations

import json
import os
import pathlib

import tokenizers

from selfimprove_jax.tokenizer.base import Tokenizer

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer(Tokenizer):
  """Tokenizer over a ``tokenizers.Tokenizer``.

  BOS is managed by ``Tokenizer.encode`` only: the wrapped tokenizer's post-processor (which for
  Llama 3 and Mistral prepends BOS) is bypassed, so ``add_bos`` means exactly what it says.
  Special-token strings written in the text still map to their ids.
  """

  def __init__(self, tokenizer: str | os.PathLike | tokenizers.Tokenizer, *, eos_token: str,
               bos_token: str | None = None, pad_token: str | None = None):
    """Wrap a tokenizer.

    Args:
      tokenizer: path to a ``tokenizer.json`` or a loaded ``tokenizers.Tokenizer``.
      eos_token: EOS string, e.g. ``"<|end_of_text|>"``.
      bos_token: BOS string, or None for models without one (Qwen).
      pad_token: PAD string, or None to pad with EOS.

    Raises:
      FileNotFoundError: the path does not exist.
      KeyError: a given special token is not in the vocabulary.
    """
    if isinstance(tokenizer, tokenizers.Tokenizer):
      self._tok = tokenizer
    else:
      path = pathlib.Path(tokenizer)
      if not path.is_file():
        raise FileNotFoundError(f"tokenizer.json not found: {path}")
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    ids = {k: None if v is None else self.token_to_id(v) for k, v in self._tokens.items()}
    super().__init__(bos_id=ids["bos_token"], eos_id=ids["eos_token"], pad_id=ids["pad_token"])

  @classmethod
  def from_model_dir(cls, model_dir: str | os.PathLike) -> HFTokenizer:
    """Load ``tokenizer.json`` with special tokens from the directory's config files.

    ``bos_token`` / ``eos_token`` / ``pad_token`` are read from ``tokenizer_config.json`` and,
    for keys it lacks, from ``special_tokens_map.json`` (current ``transformers`` also lets the
    former win). Values may be strings, ``{"content": ...}`` dicts or null (no such token).

    Raises:
      FileNotFoundError: no ``tokenizer.json`` in ``model_dir``.
      ValueError: no EOS token configured, or a malformed token entry.
    """
    model_dir = pathlib.Path(model_dir)
    found = special_tokens(model_dir)
    if found.get("eos_token") is None:
      raise ValueError(f"no eos_token in {' or '.join(_CONFIG_FILES)} under {model_dir}; "
                       "construct HFTokenizer with explicit token strings instead")
    tokenizer = cls(model_dir / "tokenizer.json", eos_token=found["eos_token"],
                    bos_token=found.get("bos_token"), pad_token=found.get("pad_token"))
    tokenizer.adds_bos = _adds_bos(model_dir)
    return tokenizer

  def save(self, model_dir: str | os.PathLike) -> pathlib.Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens) to ``model_dir``.

    The result loads back with ``from_model_dir`` / ``load_tokenizer``. Returns the directory.
    """
    model_dir = pathlib.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(self._tokens, indent=2) + "\n",
                                                     encoding="utf-8")
    return model_dir

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _lookup(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def _encode_raw(self, texts: list[str]) -> list[list[int]]:
    encodings = self._tok.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings]

  def _decode_raw(self, batch: list[list[int]], skip_special: bool) -> list[str]:
    return self._tok.decode_batch(batch, skip_special_tokens=skip_special)


def special_tokens(model_dir: str | os.PathLike) -> dict[str, str | None]:
  """``bos_token`` / ``eos_token`` / ``pad_token`` strings of a checkpoint directory, from
  ``tokenizer_config.json`` and, for keys it lacks, ``special_tokens_map.json`` (as transformers
  reads them); a key absent from both is absent here, a null stays None."""
  model_dir = pathlib.Path(model_dir)
  found: dict[str, str | None] = {}
  for name in _CONFIG_FILES:
    path = model_dir / name
    if not path.is_file():
      continue
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in _SPECIAL_KEYS:
      if key in config and key not in found:
        found[key] = _token_content(config[key], f"{path}: {key}")
  return found


def _adds_bos(model_dir: pathlib.Path) -> bool:
  """Whether the checkpoint's tokenizer puts BOS in front of plain text, as transformers'
  ``tokenizer(text)`` does: ``add_bos_token`` in tokenizer_config.json when given, else whether
  tokenizer.json's post-processor inserts a special token (Llama 3, Gemma yes; SmolLM2, Qwen no)."""
  config_path = model_dir / "tokenizer_config.json"
  if config_path.is_file():
    flag = json.loads(config_path.read_text(encoding="utf-8")).get("add_bos_token")
    if isinstance(flag, bool):
      return flag
  processor = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get(
      "post_processor")

  def inserts_special(p) -> bool:
    if not isinstance(p, dict):
      return False
    if p.get("type") == "Sequence":
      return any(inserts_special(q) for q in p.get("processors", []))
    if p.get("type") == "TemplateProcessing":
      return any("SpecialToken" in item for item in p.get("single", []))
    return p.get("type") in ("BertProcessing", "RobertaProcessing")

  return True if processor is None else inserts_special(processor)


def _token_content(value, where: str) -> str | None:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{where}: expected a string, null or a dict with a 'content' string, "
                   f"got {value!r}")
