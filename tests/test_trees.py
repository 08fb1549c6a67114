"""checkpoint.trees: CheckpointManager roots the loop trusts, and removals a kill cannot confuse."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from selfimprove_jax.checkpoint import trees


def _tree(x):
  return {"w": jnp.full((4, 3), x, jnp.float32), "step": jnp.asarray(x, jnp.int32)}


def test_async_saves_are_committed_by_close_and_older_ones_removed(tmp_path):
  ckpts = trees.Checkpoints(tmp_path / "ts", keep=1, async_save=True, verified=False)
  for step in (1, 2, 3):
    ckpts.save(step, _tree(step), meta={"round_step": step})
  ckpts.close()
  again = trees.Checkpoints(tmp_path / "ts", keep=1, async_save=True, verified=False)
  # orbax removes a step once a later save has committed: keep, plus the one just superseded.
  assert again.steps() == [2, 3] and again.meta(3) == {"round_step": 3}
  np.testing.assert_array_equal(again.restore(3, _tree(0))["w"], np.full((4, 3), 3.0))
  again.close()


def test_a_step_committed_without_its_manifest_is_no_checkpoint_and_is_replaced(tmp_path):
  path = tmp_path / "params"
  trees.save_tree(path, _tree(1.0), meta={"steps": 1})
  assert trees.exists(path) and trees.read_meta(path) == {"steps": 1}
  (path / "step_000000" / trees.MANIFEST).unlink()  # killed after orbax's commit
  assert not trees.exists(path)
  with pytest.raises(trees.CheckpointError, match="no complete checkpoint"):
    trees.restore_tree(path, _tree(0.0))
  trees.save_tree(path, _tree(2.0), meta={"steps": 2})
  assert trees.read_meta(path) == {"steps": 2}
  np.testing.assert_array_equal(trees.restore_tree(path, _tree(0.0))["w"], np.full((4, 3), 2.0))


def test_a_deletion_cut_short_leaves_nothing_taken_for_a_checkpoint(tmp_path, monkeypatch):
  root = tmp_path / "train_state"
  ckpts = trees.Checkpoints(root, keep=1, async_save=True, verified=False)
  ckpts.save(4, _tree(4), meta={})
  ckpts.close()
  path_class = type(epath.Path(tmp_path))
  real_rmtree = path_class.rmtree

  def dying_rmtree(self, *args, **kwargs):  # a kill after the first file is gone
    first = next(p for p in sorted(pathlib.Path(self).rglob("*")) if p.is_file())
    first.unlink()
    raise KeyboardInterrupt

  monkeypatch.setattr(path_class, "rmtree", dying_rmtree)
  with pytest.raises(KeyboardInterrupt):
    trees.delete(root)
  monkeypatch.setattr(path_class, "rmtree", real_rmtree)
  assert trees.Checkpoints(root, verified=False).steps() == []
  trees.delete(root)  # a later removal also takes what the cut-short one left
  assert sorted(p.name for p in tmp_path.iterdir()) == []
