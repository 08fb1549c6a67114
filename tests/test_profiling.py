"""profile.start_step / profile.num_steps: jax.profiler traces in the run's TensorBoard directory."""
import pytest

from selfimprove_jax import loop
from tests.loop_helpers import fresh_workdir, method_config


def _traces(board, run):
  """The trace files of TensorBoard run ``run``: where the profile plugin (and XProf) look."""
  return sorted((board / run / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_a_window_of_update_steps_and_one_sampling_call_are_traced(tmp_path, smoke_base):
  config = method_config("sft_sharpening", **{"loop.num_rounds": 1, "train.epochs": 4,
                                              "profile.start_step": 2, "profile.num_steps": 2})
  workdir = fresh_workdir(tmp_path, smoke_base)
  loop.run(config, workdir, progress_bars=False)
  board = workdir / "tensorboard"
  steps, sample = _traces(board, "profile_train_steps_2-3"), _traces(board, "profile_sample_call")
  assert len(steps) == 1 and steps[0].stat().st_size > 0
  assert len(sample) == 1 and sample[0].stat().st_size > 0
  # The sampling call traced comes after the window (a compiled sampler), not round 0's first.
  assert sample[0].parent.name >= steps[0].parent.name  # session names are timestamps
  assert sample[0].stat().st_mtime >= steps[0].stat().st_mtime
  assert {p.name for p in board.iterdir() if p.is_dir()} == {"profile_train_steps_2-3",
                                                            "profile_sample_call"}
  assert list(board.glob("events.out.tfevents.*"))  # the scalars are still there


def test_profiling_is_off_by_default(tmp_path, smoke_base):
  workdir = fresh_workdir(tmp_path, smoke_base)
  loop.run(method_config("sft_sharpening", **{"loop.num_rounds": 1}), workdir, progress_bars=False)
  assert not [p for p in (workdir / "tensorboard").iterdir() if p.is_dir()]


def test_a_negative_window_is_refused_naming_the_key():
  with pytest.raises(ValueError, match="profile.num_steps.*-1"):
    loop.run(method_config("sft_sharpening", **{"profile.num_steps": -1}), "/nonexistent/x")
