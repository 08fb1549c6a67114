"""Multi-process runs on this machine: two JAX processes (one CPU device each, gloo collectives)
run the loop like two TPU hosts would, and must produce exactly what one process with two devices
produces -- and resume after one of them is killed.

Also the host-side pieces on one process: ``multihost`` helpers and the process-invariant prompt
stream ``pipeline.global_batches``.
"""
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from selfimprove_jax import multihost
from selfimprove_jax.data import pipeline
from tests.loop_helpers import REPO, fresh_workdir, leftovers

# One round of the sft_sharpening smoke config with 6 update steps, checkpointed every 2.
OVERRIDES = ("--config.loop.num_rounds=1", "--config.train.epochs=6",
             "--config.checkpoint.every_steps=2")
COMPARED = ("progress.json", "round_000/eval_samples.jsonl", "round_000/eval.json",
            "round_001/samples.jsonl", "round_001/eval_samples.jsonl", "round_001/eval.json")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, cache_dir, num_processes: int, devices_per_process: int):
  """Starts the CLI as ``num_processes`` processes of one run; returns the Popen objects."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  cmd = [sys.executable, "-m", "selfimprove_jax.main", "--config=configs/sft_sharpening.py:smoke",
         f"--workdir={workdir}", *OVERRIDES]
  if num_processes > 1:
    cmd += [f"--coordinator_address=localhost:{_free_port()}", f"--num_processes={num_processes}"]
  return [subprocess.Popen(cmd + ([f"--process_id={i}"] if num_processes > 1 else []), cwd=REPO,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(num_processes)]


def _wait_ok(procs, timeout=600) -> None:
  deadline = time.monotonic() + timeout
  for i, p in enumerate(procs):
    rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    assert rc == 0, f"process {i} exited with {rc}:\n{p.stderr.read()[-4000:]}"


def _metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(workdir):
  """Round 1's parameters, restored onto one device of this process (saved on a 2-device mesh)."""
  from selfimprove_jax.checkpoint import trees  # pylint: disable=g-import-not-at-top
  return jax.device_get(trees.restore_tree(workdir / "round_001" / "params"))


def _assert_same_run(got, want) -> None:
  for name in COMPARED:
    assert (got / name).read_text() == (want / name).read_text(), name
  assert _metrics(got) == _metrics(want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), _params(got),
               _params(want))
  assert not leftovers(got)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, smoke_base, cache_dir):
  """The reference: one process with two CPU devices (the same mesh, data=2, as two processes
  with one device each)."""
  workdir = fresh_workdir(tmp_path_factory.mktemp("one_process"), smoke_base)
  _wait_ok(_launch(workdir, cache_dir, 1, 2))
  return workdir


def test_two_processes_equal_one_process(tmp_path, smoke_base, cache_dir, one_process_run):
  workdir = fresh_workdir(tmp_path, smoke_base)
  _wait_ok(_launch(workdir, cache_dir, 2, 1))
  _assert_same_run(workdir, one_process_run)
  # Process 0 alone writes: one metrics log, one tensorboard event file.
  assert len(list((workdir / "tensorboard").rglob("events.*"))) == 1


def _train_checkpoint(workdir) -> str | None:
  root = workdir / "round_001" / "train_state"
  done = sorted(p.name for p in root.glob("step_*") if (p / "commit_success.txt").exists()) \
      if root.exists() else []
  return done[-1] if done else None


def test_kill_one_process_mid_round_then_rerun_both_resumes(tmp_path, smoke_base, cache_dir,
                                                             one_process_run):
  for attempt in range(3):
    workdir = fresh_workdir(tmp_path, smoke_base, f"run{attempt}")
    procs = _launch(workdir, cache_dir, 2, 1)
    while _train_checkpoint(workdir) is None and all(p.poll() is None for p in procs):
      time.sleep(0.01)
    if any(p.poll() is not None for p in procs):
      _wait_ok(procs)  # a process failed (raises), or the run ended before the first checkpoint
      continue
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    killed_at = _train_checkpoint(workdir)
    try:  # the survivor fails in its next collective, or hangs in it until killed
      survivor = f"exited by itself with {procs[0].wait(timeout=20)}"
    except subprocess.TimeoutExpired:
      procs[0].send_signal(signal.SIGKILL)
      procs[0].wait()
      survivor = "killed after 20 s"
    completed = json.loads((workdir / "progress.json").read_text())["completed"]
    if "train" not in completed.get("1", []):
      break
  else:
    pytest.fail("the run finished round 1's training before a kill landed, three times")
  assert completed["1"] == ["sample", "score", "select"], completed

  _wait_ok(_launch(workdir, cache_dir, 2, 1))
  print(f"killed process 1 after checkpoint {killed_at}; process 0 {survivor}")
  _assert_same_run(workdir, one_process_run)


# ------------------------------------------------------------------ one process, host side

def test_block_splits_rows_contiguously_in_process_order():
  for n in (0, 1, 5, 8, 13):
    for count in (1, 2, 3, 4):
      blocks = [multihost.block(n, i, count) for i in range(count)]
      assert sum((list(range(n))[b] for b in blocks), []) == list(range(n))
      sizes = [b.stop - b.start for b in blocks]
      assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_identities():
  assert multihost.allgather_objects([("7", True), None]) == [("7", True), None]
  assert multihost.map_blocks(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
  x = jax.numpy.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(multihost.fetch({"x": x})["x"], np.arange(6.0).reshape(3, 2))
  assert not multihost.initialize("auto")  # no coordinator anywhere: a single-process run


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="sometimes"), "distributed='sometimes'"),
    (dict(num_processes=0), "num_processes=0"),
    (dict(num_processes=2, process_id=2), "process_id=2"),
])
def test_initialize_names_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    multihost.initialize(**kwargs)


def test_global_batches_do_not_depend_on_the_process_count():
  one = pipeline.global_batches(37, batch_size=8, seed=5, process_index=0, process_count=1)
  for count in (2, 4, 8):
    parts = [pipeline.global_batches(37, batch_size=8, seed=5, process_index=p,
                                     process_count=count) for p in range(count)]
    for b in range(12):  # straddles epochs (37 examples, batches of 8)
      np.testing.assert_array_equal(np.concatenate([part[b] for part in parts]), one[b])
  # Every epoch is a permutation of the examples, reshuffled each epoch.
  stream = np.concatenate([one[b] for b in range(37)])  # 8 epochs
  epochs = stream.reshape(8, 37)
  assert all(sorted(e) == list(range(37)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 8


def test_global_batches_match_the_single_process_prompt_stream():
  """One process reads the same stream ``prompt_batches`` did (runs before multi-host support
  keep their prompts)."""
  examples = [{"id": str(i)} for i in range(37)]
  old = pipeline.prompt_batches(examples, lambda e: [1, 2], batch_size=8, buckets=(16,), pad_id=0,
                                seed=5, num_epochs=None, process_index=0, process_count=1)
  new = pipeline.global_batches(37, batch_size=8, seed=5, process_index=0, process_count=1)
  for b in range(12):
    np.testing.assert_array_equal(old[b]["index"], new[b])


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=6, process_count=4), "batch_size=6"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(process_index=2, process_count=2), "process_index=2"),
    (dict(num_epochs=0), "num_epochs"),
])
def test_global_batches_name_bad_values(kwargs, message):
  args = dict(batch_size=8, process_index=0, process_count=1) | kwargs
  with pytest.raises(ValueError, match=message):
    pipeline.global_batches(37, **args)


def test_no_platform_branches_in_model_or_step_code():
  """The same sharding specs serve CPU, GPU and TPU: model, sampling, scoring and training code
  never asks which platform it runs on."""
  pattern = re.compile(r"\.platform\b|default_backend|process_index\(\)|local_devices\(|"
                       r"[\"'](tpu|gpu|cuda|rocm)[\"']")
  files = [*(REPO / "selfimprove_jax" / "models").glob("*.py"),
           *(REPO / "selfimprove_jax" / "training").glob("*.py"),
           *(REPO / "selfimprove_jax").glob("s[ac]*ing.py"), REPO / "selfimprove_jax" / "sharding.py"]
  assert len(files) >= 10
  found = [f"{f.relative_to(REPO)}:{i}: {line.strip()}" for f in files
           for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
  assert not found, found
