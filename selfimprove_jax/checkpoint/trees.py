"""Atomic, verified orbax checkpoints of arbitrary pytrees (train states, round parameters).

A tree is saved to a hidden sibling ``.NAME.tmp`` and renamed to ``NAME`` only once orbax has
finished and a manifest (size and CRC-32 of every file) is written, so a killed process leaves
either the previous checkpoint or a stale temporary that the next save removes -- never a
half-written ``NAME``. ``restore_tree`` checks the manifest first: a truncated or corrupted
checkpoint fails with ``CheckpointError`` naming the file, and nothing on disk is touched.

Layout of a saved tree::

  NAME/tree/       orbax StandardCheckpointer output
  NAME/MANIFEST    {"format": ..., "files": {relative path: [size, crc32]}, "meta": {...}}
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from selfimprove_jax import multihost

FORMAT = "selfimprove_jax.tree/1"
MANIFEST = "MANIFEST"
TREE_DIR = "tree"
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be trusted (truncated, corrupted, or of another shape)."""


def _path(path: str | os.PathLike) -> epath.Path:
  return epath.Path(os.path.abspath(path) if "://" not in str(path) else path)


def _digest(path: epath.Path) -> tuple[int, int]:
  crc, size = 0, 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc, size = zlib.crc32(chunk, crc), size + len(chunk)
  return size, crc


def _files(root: epath.Path) -> dict[str, epath.Path]:
  """Every file under ``root`` by its path relative to ``root``."""
  out, pending = {}, [root]
  while pending:
    for p in pending.pop().iterdir():
      if p.is_dir():
        pending.append(p)
      else:
        out[str(p.relative_to(root))] = p
  return out


def exists(path: str | os.PathLike) -> bool:
  """Whether a complete checkpoint (one with a manifest) is at ``path``."""
  return (_path(path) / MANIFEST).exists()


def delete(path: str | os.PathLike) -> None:
  """Removes the checkpoint at ``path`` (if any), manifest first: a removal cut short leaves a
  directory that ``exists`` no longer takes for a checkpoint, never a manifest over a partial tree."""
  root = _path(path)
  (root / MANIFEST).unlink(missing_ok=True)
  root.rmtree(missing_ok=True)


def save_tree(path: str | os.PathLike, tree: Any, *, meta: dict | None = None) -> None:
  """Saves ``tree`` (jax arrays, possibly sharded over processes; numpy arrays; scalars).

  Replaces an existing checkpoint at ``path`` only once the new one is complete. Every process
  must call it (orbax writes each process's shards); process 0 writes the manifest and renames.
  ``meta`` (JSON-able) is stored in the manifest and returned by ``read_meta``.
  """
  final = _path(path)
  tmp = final.parent / f".{final.name}.tmp"
  if multihost.is_writer() and tmp.exists():
    tmp.rmtree()  # left by a process killed mid-save
  multihost.sync("save_tree_clean")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / TREE_DIR, tree)
  multihost.sync("save_tree_written")
  if multihost.is_writer():
    files = {rel: list(_digest(p)) for rel, p in sorted(_files(tmp).items())}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files, "meta": meta or {}}))
    old = final.parent / f".{final.name}.old"
    delete(old)
    if final.exists():
      final.rename(old)
    tmp.rename(final)
    delete(old)
  multihost.sync("save_tree_done")


def _manifest(root: epath.Path) -> dict:
  try:
    manifest = json.loads((root / MANIFEST).read_text())
  except FileNotFoundError:
    raise CheckpointError(f"checkpoint {root} has no {MANIFEST}: it is incomplete; delete it to "
                          "redo the stage that wrote it") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"checkpoint {root}: {MANIFEST} is corrupted ({e})") from None
  if manifest.get("format") != FORMAT:
    raise CheckpointError(f"checkpoint {root}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def read_meta(path: str | os.PathLike) -> dict:
  return _manifest(_path(path))["meta"]


def verify(path: str | os.PathLike) -> None:
  """Raises ``CheckpointError`` naming the first file that is missing, truncated or altered."""
  root = _path(path)
  for rel, (size, crc) in _manifest(root)["files"].items():
    file = root / rel
    if not file.exists():
      raise CheckpointError(f"checkpoint {root}: file {rel} is missing")
    got_size, got_crc = _digest(file)
    if got_size != size:
      raise CheckpointError(f"checkpoint {root}: file {rel} has {got_size} bytes, the manifest "
                            f"says {size} (truncated?)")
    if got_crc != crc:
      raise CheckpointError(f"checkpoint {root}: file {rel} fails its CRC-32 check (corrupted)")


def restore_tree(path: str | os.PathLike, target: Any, *, check: bool = True) -> Any:
  """Restores onto ``target``: a tree of arrays or ``jax.ShapeDtypeStruct`` with shardings,
  giving the structure, shapes, dtypes and placement (any mesh, not only the saving one).

  Raises:
    CheckpointError: missing manifest, failed checksum (when ``check``), or orbax's own failure
      (e.g. a tree of another shape), with the path named.
  """
  root = _path(path)
  if check:
    verify(root)
  else:
    _manifest(root)
  abstract = jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(root / TREE_DIR, abstract)
  except Exception as e:  # orbax raises many types; name the checkpoint in one error type
    raise CheckpointError(f"checkpoint {root} cannot be restored onto the expected tree: "
                          f"{type(e).__name__}: {e}") from e
