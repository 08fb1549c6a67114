"""Device traces of a run with ``jax.profiler``: a window of update steps and one sampling call.

Each trace goes to its own TensorBoard run under the workdir's ``tensorboard/`` directory::

  tensorboard/profile_train_steps_S-E/plugins/profile/<session>/<host>.xplane.pb
  tensorboard/profile_sample_call/plugins/profile/<session>/<host>.xplane.pb

which ``tensorboard --logdir WORKDIR/tensorboard`` (with the profile plugin) or XProf lists.
Configured by ``profile.start_step`` (the first global update step traced, 1-based) and
``profile.num_steps`` (0: off). The sampling call traced is the first one after the step window
(the next eval, or the next RL step's rollout), so its sampler is already compiled and the trace
shows steady-state decoding, not XLA compiling; choose ``start_step`` after a round's first
step for the same reason. A rerun that resumes inside the window traces what is left of it.
Tracing adds host overhead to the traced work only; everything outside it is untouched.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import jax


class Profiler:
  """Starts and stops ``jax.profiler`` traces at the configured points; one trace at a time."""

  def __init__(self, logdir: str | os.PathLike, start_step: int, num_steps: int):
    self.logdir, self.start, self.num = os.fspath(logdir), start_step, num_steps
    self.enabled = num_steps > 0
    self._active = False
    self._steps_done = False
    self._sample_done = False

  @property
  def last_step(self) -> int:
    return self.start + self.num - 1

  def before_step(self, step: int) -> None:
    """Called before global update step ``step`` (1-based) runs."""
    if (self.enabled and not self._active and not self._steps_done
        and self.start <= step <= self.last_step):
      self._start(f"profile_train_steps_{self.start}-{self.last_step}")

  def after_step(self, step: int, outputs: Any) -> None:
    """Called once step ``step`` has been dispatched; ``outputs`` are waited for before the
    trace stops, so the trace holds the step's device work."""
    if self._active and step >= self.last_step:
      jax.block_until_ready(outputs)
      self._stop()
      self._steps_done = True

  @contextlib.contextmanager
  def sampling_call(self) -> Iterator[None]:
    """Traces the first sampling call after the step window; other calls run as is."""
    if not self._steps_done or self._active or self._sample_done:
      yield
      return
    self._start("profile_sample_call")
    try:
      yield
    finally:
      self._stop()
      self._sample_done = True

  def close(self) -> None:
    """Stops a trace still running (a window past the run's last step)."""
    if self._active:
      self._stop()

  def _start(self, run: str) -> None:
    jax.profiler.start_trace(os.path.join(self.logdir, run))
    self._active = True

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._active = False
