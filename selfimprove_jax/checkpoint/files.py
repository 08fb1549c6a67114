"""What the HF and native formats share: the loaded result, atomic directory writes, and the
tokenizer / chat-template files that travel next to the weights.

Paths are ``etils.epath`` paths throughout, so a local directory and a ``gs://`` bucket take the same
code; the tokenizer classes read local files only, so remote tokenizer files are staged in a local
temporary directory first.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from typing import Any, Iterator, NamedTuple

from etils import epath

from selfimprove_jax.models.config import TransformerConfig
from selfimprove_jax.tokenizer import Tokenizer, load_tokenizer
from selfimprove_jax.tokenizer.template import read_template

# Files copied verbatim when a checkpoint is converted: tokenizers, their special-token and chat
# configuration, and HF's default generation settings.
COMPANION_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class LoadedModel(NamedTuple):
  """A loaded checkpoint; unpacks as ``config, params, tokenizer, chat_template``.

  params: the parameter pytree, each leaf placed on its sharding. tokenizer: None only when loading
  was asked to skip it. chat_template: the Jinja template string shipped with the checkpoint, or None.
  """

  config: TransformerConfig
  params: Any
  tokenizer: Tokenizer | None
  chat_template: str | None


def as_path(path: str | os.PathLike) -> epath.Path:
  return epath.Path(path)


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


@contextlib.contextmanager
def atomic_dir(out_dir: epath.Path, overwrite: bool) -> Iterator[epath.Path]:
  """Yields a fresh temporary sibling of ``out_dir``; on success it becomes ``out_dir``.

  On any exception the temporary directory is removed and ``out_dir`` is left exactly as it was.
  An existing non-empty ``out_dir`` is an error unless ``overwrite``; it is then replaced only once
  the new contents are complete.
  """
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
    raise FileExistsError(f"output {out_dir} already exists and is not empty; pass overwrite=True "
                          "(--overwrite) to replace it")
  tag = uuid.uuid4().hex[:8]
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    tmp.rmtree(missing_ok=True)
    raise
  old = out_dir.parent / f".{out_dir.name}.old-{tag}"
  if out_dir.exists():
    out_dir.rename(old)
  tmp.rename(out_dir)
  if old.exists():
    old.rmtree() if old.is_dir() else old.unlink()


def copy_companions(src_dir: epath.Path, dst_dir: epath.Path) -> list[str]:
  """Copies the ``COMPANION_FILES`` present in ``src_dir``; returns their names."""
  copied = []
  for name in COMPANION_FILES:
    if (src_dir / name).exists():
      (src_dir / name).copy(dst_dir / name)
      copied.append(name)
  return copied


def load_dir_tokenizer(model_dir: epath.Path) -> Tokenizer:
  """The tokenizer of a checkpoint directory (see ``tokenizer.load_tokenizer``).

  Raises:
    FileNotFoundError: the directory has neither tokenizer.json nor tokenizer.model.
  """
  if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
    raise FileNotFoundError(
        f"no tokenizer in {model_dir}: looked for {' and '.join(TOKENIZER_FILES)}; pass "
        "with_tokenizer=False to load the weights alone")
  if _is_local(model_dir):
    return load_tokenizer(os.fspath(model_dir))
  with tempfile.TemporaryDirectory() as local:
    copy_companions(model_dir, epath.Path(local))
    return load_tokenizer(local)


def read_chat_template(model_dir: epath.Path) -> str | None:
  """The Jinja chat template text of a checkpoint directory (``template.read_template``)."""
  found = read_template(model_dir)
  return None if found is None else found[0]


def write_tokenizer(tokenizer: Tokenizer | str | os.PathLike, chat_template: str | None,
                    out_dir: epath.Path) -> None:
  """Writes tokenizer files into ``out_dir``: a directory's companion files copied verbatim, or a
  ``Tokenizer`` object's own ``save``; then ``chat_template.jinja`` if a template is given."""
  if isinstance(tokenizer, Tokenizer):
    if _is_local(out_dir):
      tokenizer.save(os.fspath(out_dir))
    else:
      with tempfile.TemporaryDirectory() as local:
        tokenizer.save(local)
        for item in epath.Path(local).iterdir():
          item.copy(out_dir / item.name)
  elif tokenizer is not None:
    src = as_path(tokenizer)
    if not src.is_dir():
      raise FileNotFoundError(f"tokenizer={str(tokenizer)!r} is neither a Tokenizer nor a directory")
    copy_companions(src, out_dir)
  if chat_template is not None:
    (out_dir / "chat_template.jinja").write_text(chat_template)
