"""Checkpoints of arbitrary pytrees (train states, round params, the base) through orbax's
``CheckpointManager``.

A checkpoint directory is a manager root of step folders, one tree each::

  NAME/step_SSSSSS/default/               the tree (orbax ``StandardSave``, each host its shards)
  NAME/step_SSSSSS/_CHECKPOINT_METADATA   orbax's step metadata; ``meta`` is its custom metadata
  NAME/step_SSSSSS/MANIFEST               size and CRC-32 of every file (``verified`` roots only)

What holds:

- Orbax commits a step atomically -- a temporary folder renamed into place on a local disk, a
  ``commit_success.txt`` marker on an object store (``gs://``), where a rename is neither atomic
  nor cheap -- and lists committed steps only, so a process killed mid-save leaves the previous
  step, never a half-written one (its temporary is removed by the next manager on that root).
- ``Checkpoints(root, async_save=True)`` returns from ``save`` once the arrays are copied off the
  devices; the files are written in the background while training goes on. ``wait`` (or ``close``)
  blocks until they are committed.
- A ``verified`` root also stores a manifest, written once the step is committed, and a step
  counts only once its manifest is there: ``verify`` / ``restore(check=True)`` then name the first
  file that is missing, truncated or altered (orbax itself has no content checksum). A step
  committed but killed before its manifest is not a checkpoint; the next save replaces it.
- ``delete`` removes a root so that no moment of the removal looks like a checkpoint: on a local
  disk the root is first renamed out of the way (atomic), on an object store every manifest and
  commit marker goes before any tree file.

What does not: train states are saved asynchronously and not ``verified`` (they live for one
round; a manifest would need the save to finish first), so a train state corrupted in place is
caught only by orbax's own decoding errors.
"""
from __future__ import annotations

import json
import os
import uuid
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from selfimprove_jax import multihost

FORMAT = "selfimprove_jax.tree/2"
MANIFEST = "MANIFEST"
COMMIT_MARKER = "commit_success.txt"
_PREFIX = "step"
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be trusted (truncated, corrupted, or of another shape)."""


def _path(path: str | os.PathLike) -> epath.Path:
  return epath.Path(os.path.abspath(path) if "://" not in str(path) else path)


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


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


def _abstract(target: Any) -> Any:
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)


class Checkpoints:
  """The step folders under ``root``: save, list, restore, verify.

  Args:
    keep: how many committed steps to keep; None: all. Orbax removes the older ones once a
      later save has committed, so with async saves one more can sit on disk until then.
    async_save: ``save`` returns once the arrays are off the devices (not with ``verified``).
    verified: store a CRC manifest per step, and count a step only once it has one.
  """

  def __init__(self, root: str | os.PathLike, *, keep: int | None = None, async_save: bool = False,
               verified: bool = True):
    if async_save and verified:
      raise ValueError("Checkpoints(async_save=True, verified=True): a manifest needs the save "
                       "to have finished; pick one")
    self.root, self.verified = _path(root), verified
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, step_prefix=_PREFIX,
        step_format_fixed_length=6, cleanup_tmp_directories=True, create=False)
    self._manager: ocp.CheckpointManager | None = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      if multihost.is_writer():
        self.root.mkdir(parents=True, exist_ok=True)
      multihost.sync("checkpoints_root")
      self._manager = ocp.CheckpointManager(self.root, options=self._options,
                                            item_handlers=ocp.StandardCheckpointHandler())
    return self._manager

  def step_dir(self, step: int) -> epath.Path:
    return self.root / f"{_PREFIX}_{step:06d}"

  def steps(self) -> list[int]:
    """Committed steps (with their manifest, for a ``verified`` root), ascending."""
    if not self.root.exists():
      return []
    self.manager.reload()
    steps = sorted(self.manager.all_steps())
    if self.verified:
      steps = [s for s in steps if (self.step_dir(s) / MANIFEST).exists()]
    return steps

  def latest(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, tree: Any, *, meta: dict | None = None) -> None:
    """Saves ``tree`` (jax arrays, possibly sharded over processes; numpy arrays; scalars) as
    ``step``; every process must call it. ``meta`` (JSON-able) is returned by ``meta(step)``."""
    manager = self.manager
    manager.reload()
    if step in manager.all_steps():  # committed, killed before its manifest: not a checkpoint
      manager.delete(step)
    manager.save(step, args=ocp.args.StandardSave(tree), custom_metadata=meta or {}, force=True)
    if not self.verified:
      return
    manager.wait_until_finished()
    if multihost.is_writer():
      folder = self.step_dir(step)
      files = {rel: list(_digest(p)) for rel, p in sorted(_files(folder).items())}
      tmp = folder / f".{MANIFEST}.tmp"
      tmp.write_text(json.dumps({"format": FORMAT, "files": files}))
      tmp.rename(folder / MANIFEST)
    multihost.sync("checkpoint_manifest")

  def wait(self) -> None:
    """Blocks until every save started is committed."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None

  def meta(self, step: int) -> dict:
    return dict(self.manager.metadata(step).custom_metadata or {})

  def verify(self, step: int) -> None:
    """Raises ``CheckpointError`` naming the first file that is missing, truncated or altered."""
    folder = self.step_dir(step)
    try:
      manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
      raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: it is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupted ({e})") from None
    if manifest.get("format") != FORMAT:
      raise CheckpointError(f"checkpoint {folder}: format {manifest.get('format')!r}, expected "
                            f"{FORMAT!r}")
    for rel, (size, crc) in manifest["files"].items():
      file = folder / rel
      if not file.exists():
        raise CheckpointError(f"checkpoint {folder}: file {rel} is missing")
      got_size, got_crc = _digest(file)
      if got_size != size:
        raise CheckpointError(f"checkpoint {folder}: file {rel} has {got_size} bytes, the "
                              f"manifest says {size} (truncated?)")
      if got_crc != crc:
        raise CheckpointError(f"checkpoint {folder}: file {rel} fails its CRC-32 check (corrupted)")

  def restore(self, step: int, target: Any | None = None, *, check: bool = True) -> Any:
    """Restores ``step`` onto ``target``: a tree of arrays or ``jax.ShapeDtypeStruct`` with
    shardings, giving the structure, shapes, dtypes and placement (any mesh, not only the saving
    one). ``target=None`` restores the saved structure onto one local device.

    Raises:
      CheckpointError: a failed checksum (``check`` on a verified root) or orbax's own failure
        (e.g. a tree of another shape), with the path named.
    """
    if check and self.verified:
      self.verify(step)
    if target is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            self.manager.item_metadata(step))
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(_abstract(target)))
    except Exception as e:  # orbax raises many types; name the checkpoint in one error type
      raise CheckpointError(f"checkpoint {self.step_dir(step)} cannot be restored onto the "
                            f"expected tree: {type(e).__name__}: {e}") from e


# One tree at a path (the base, a round's params): step 0 of a verified root.

def exists(path: str | os.PathLike) -> bool:
  """Whether a complete checkpoint is at ``path``."""
  return bool(Checkpoints(path).steps())


def save_tree(path: str | os.PathLike, tree: Any, *, meta: dict | None = None) -> None:
  """Saves ``tree`` at ``path`` (a verified root holding one step); every process calls it.

  Meant for a path without a complete checkpoint (the loop saves each tree once): a tree already
  there is deleted before the new one is written, not swapped atomically."""
  ckpt = Checkpoints(path)
  try:
    ckpt.save(0, tree, meta=meta)
  finally:
    ckpt.close()


def _only(path: str | os.PathLike) -> tuple[Checkpoints, int]:
  ckpt = Checkpoints(path)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"no complete checkpoint at {ckpt.root}: it is missing or was cut "
                          "short; delete it to redo the stage that wrote it")
  return ckpt, steps[-1]


def read_meta(path: str | os.PathLike) -> dict:
  ckpt, step = _only(path)
  try:
    return ckpt.meta(step)
  finally:
    ckpt.close()


def verify(path: str | os.PathLike) -> None:
  ckpt, step = _only(path)
  try:
    ckpt.verify(step)
  finally:
    ckpt.close()


def restore_tree(path: str | os.PathLike, target: Any | None = None, *, check: bool = True) -> Any:
  """``Checkpoints.restore`` of the one tree at ``path``."""
  ckpt, step = _only(path)
  try:
    return ckpt.restore(step, target, check=check)
  finally:
    ckpt.close()


def delete(path: str | os.PathLike) -> None:
  """Removes the checkpoint root at ``path`` (if any) so that a removal cut short never leaves
  something ``exists`` or ``Checkpoints.steps`` takes for a checkpoint. Process 0 only."""
  root = _path(path)
  if _is_local(root):
    for leftover in root.parent.glob(f".{root.name}.deleting-*"):
      leftover.rmtree(missing_ok=True)
    if not root.exists():
      return
    doomed = root.parent / f".{root.name}.deleting-{uuid.uuid4().hex[:8]}"
    root.rename(doomed)
    doomed.rmtree()
    return
  if not root.exists():
    return
  for folder in root.iterdir():  # markers first: a step without them is not committed
    for marker in (folder / MANIFEST, folder / COMMIT_MARKER, folder / "default" / COMMIT_MARKER):
      marker.unlink(missing_ok=True)
  root.rmtree(missing_ok=True)
