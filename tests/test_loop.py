"""The loop end to end: every method config's smoke variant, resume after SIGKILL, refusals.

The smoke variants share one tiny synthetic base model, pretrained once per session and copied
into each workdir's ``base/`` (the loop reuses a base it finds there).
"""
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from selfimprove_jax import loop
from selfimprove_jax.checkpoint import trees
from selfimprove_jax.loop import updates
from tests.loop_helpers import fresh_workdir, leftovers, method_config

from tests.loop_helpers import REPO
METHODS = ("sft_sharpening", "rlhf_sharpening", "xpo_sharpening", "star", "rest_em", "rft",
           "b_star", "self_rewarding", "intuitor", "ttrl", "grpo")  # demo: a study (test_study.py)
EVAL_KEYS = {"greedy_acc", "t1_acc", "mean_base_logprob_t1", "bon_logprob.1", "bon_logprob.4",
             "pass.1", "pass.4", "maj.4", "bon_mean_logprob.4", "bon_self_certainty.4"}


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_method_smoke_runs_and_logs_expected_keys(method, tmp_path, smoke_base):
  config = method_config(method)
  workdir = fresh_workdir(tmp_path, smoke_base)
  result = loop.run(config, workdir, progress_bars=False)
  rounds = config.loop.num_rounds

  assert set(result) >= {"greedy_acc", "t1_acc", "mean_base_logprob_t1", "bon_logprob", "pass"}
  progress = json.loads((workdir / "progress.json").read_text())
  stages = loop.OFFLINE_STAGES if config.loop.mode == "offline" else loop.ONLINE_STAGES
  assert progress["completed"] == {"0": ["eval"], **{str(r): list(stages)
                                                     for r in range(1, rounds + 1)}}
  recs = records(workdir)
  evals = [r for r in recs if r["stage"] == "eval"]
  assert [r["round"] for r in evals] == list(range(rounds + 1))
  for r in evals:
    assert EVAL_KEYS <= set(r), sorted(EVAL_KEYS - set(r))
  train = [r for r in recs if r["stage"] == "train" and r.get("num_examples") != 0]
  assert train, "no update step ran"
  assert all({"loss", "grad_norm", "learning_rate", "round_step"} <= set(r) for r in train)
  assert [r["step"] for r in train] == list(range(1, len(train) + 1))  # one global step count
  assert all(r["learning_rate"] == pytest.approx(config.train.optimizer.learning_rate) for r in train)
  assert all(np.isfinite(r["loss"]) for r in train)
  summaries = [r for r in recs if r["stage"] == "round"]
  assert [r["round"] for r in summaries] == list(range(rounds + 1))

  selected = 0
  for r in range(1, rounds + 1):
    table = loop.read_table(workdir / f"round_{r:03d}" / (
        "samples.jsonl" if config.loop.mode == "offline" else "samples"))
    assert table and all({"prompt_id", "completion", "tokens", "sampler_logprob", "base_logprob",
                          "length", "extracted", "correct", "reward", "selected"} <= set(row)
                         for row in table)
    selected += sum(row["selected"] for row in table)
    assert trees.exists(workdir / f"round_{r:03d}" / "params")
    assert not (workdir / f"round_{r:03d}" / "train_state").exists()
  assert selected, "no round selected anything"
  eval_rows = loop.read_table(workdir / "round_000" / "eval_samples.jsonl")
  assert len(eval_rows) == config.task.num_eval * (1 + config.eval.num_samples)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  summary = json.loads((workdir / "summary.json").read_text())
  assert set(summary) == {"heldout", "runtime_s"} and set(summary["heldout"]) == {"base", "sharpened"}
  for model in summary["heldout"].values():
    assert set(model) == {"greedy_acc", "t1_acc", "mean_base_logprob_t1", "bon_logprob"}
    assert set(model["bon_logprob"]) == {"1", "2", "4"}


def test_lora_rounds_save_adapters_and_sample_from_the_merged_model(tmp_path, smoke_base):
  config = method_config("sft_sharpening", **{"train.lora.rank": 4, "train.lora.targets": "all_linear",
                                              "train.optimizer.learning_rate": 3e-3})
  workdir = fresh_workdir(tmp_path, smoke_base)
  run = loop.Loop(config, workdir, progress_bars=False)
  run.run()
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  adapters = _restore(workdir / "round_002" / "params")
  assert 0 < count(adapters) < count(run.base_params) / 4
  merged = loop.Loop(config, workdir, progress_bars=False).policy_params(2)  # restored from disk
  assert jax.tree.structure(merged) == jax.tree.structure(run.base_params)
  delta = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), merged,
                       run.base_params)
  from selfimprove_jax.training import lora
  moved = {"/".join(k.key for k in path): d for path, d in jax.tree_util.tree_leaves_with_path(delta)}
  targeted = {p for p in moved if re.fullmatch(lora.ALL_LINEAR_TARGETS, p)}
  assert targeted and all(moved[p] > 0 for p in targeted)  # trained adapters moved the model
  assert all(moved[p] == 0 for p in set(moved) - targeted)  # and nothing else


def test_fsdp_mesh_samples_on_the_folded_mesh_under_lora(tmp_path, smoke_base):
  """Training on data=4 x fsdp=2, sampling and scoring on data=4 x tensor=2 (sample.mesh='tensor'):
  the weights stay split, never gathered; LoRA's adapters follow to the sampling mesh each RL
  step and train."""
  config = method_config("grpo", **{"mesh.fsdp": 2, "train.lora.rank": 4, "loop.num_rounds": 1,
                                    "train.optimizer.learning_rate": 1e-2})
  run = loop.Loop(config, fresh_workdir(tmp_path, smoke_base), progress_bars=False)
  assert dict(run.ctx.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert dict(run.ctx.sample_mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  from selfimprove_jax.loop import rollouts
  sampled = rollouts.for_sampling(run.ctx, run.base_params)
  kernel = sampled["layers_0"]["mlp"]["up_proj"]
  assert kernel.sharding.mesh.shape["tensor"] == 2 and kernel.sharding.spec[-1] == "tensor"
  assert rollouts.for_sampling(run.ctx, run.base_params) is sampled  # one copy per model
  run.run()
  adapters = _restore(run.ctx.workdir.params(1))
  assert any(np.abs(np.asarray(x)).max() > 0 for path, x in
             jax.tree_util.tree_flatten_with_path(adapters)[0] if "lora_b" in str(path))


def test_selection_semantics_in_tables(tmp_path, smoke_base):
  """What each selection writes: top-1 by base log-prob; pairs of base samples; all-correct."""
  workdir = fresh_workdir(tmp_path, smoke_base)
  loop.run(method_config("sft_sharpening", **{"loop.num_rounds": 1}), workdir,
           progress_bars=False, stop_after="select")
  table = loop.read_table(workdir / "round_001" / "samples.jsonl")
  by_prompt = {}
  for row in table:
    by_prompt.setdefault(row["prompt_id"], []).append(row)
  for rows in by_prompt.values():
    assert sum(r["selected"] for r in rows) == 1
    best = max(rows, key=lambda r: r["base_logprob"])
    assert next(r for r in rows if r["selected"])["base_logprob"] == best["base_logprob"]
    assert all(r["reward"] == r["base_logprob"] for r in rows)
    # Round 1 samples from the base: each row's score is its own sample's log-prob.
    np.testing.assert_allclose([r["base_logprob"] for r in rows],
                               [r["model_logprob"] for r in rows], rtol=1e-4, atol=1e-3)
  # Round 0's eval table interleaves prompts (greedy rows, then N samples per prompt); the scorer
  # reads them grouped by prompt and must put every score back on its own row.
  heldout = loop.read_table(workdir / "round_000" / "eval_samples.jsonl")
  np.testing.assert_allclose([r["base_logprob"] for r in heldout],
                             [r["model_logprob"] for r in heldout], rtol=1e-4, atol=1e-3)

  workdir = fresh_workdir(tmp_path, smoke_base, "pairs")
  loop.run(method_config("rlhf_sharpening", **{"loop.num_rounds": 1}), workdir,
           progress_bars=False, stop_after="select")
  table = loop.read_table(workdir / "round_001" / "samples.jsonl")
  assert all(r["source"] == "base" for r in table)
  pairs = {}
  for r in table:
    if r["pair"] is not None:
      pairs.setdefault(r["pair"], []).append(r)
  assert len(pairs) == 4 * 2  # 4 prompts x 4 samples -> 2 pairs each
  for members in pairs.values():
    assert sorted(m["pair_role"] for m in members) == ["first", "second"]
    assert len({m["prompt_id"] for m in members}) == 1


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_round_run(tmp_path_factory, smoke_base):
  """A finished 1-round sft_sharpening smoke run (read-only: copy before changing it)."""
  workdir = tmp_path_factory.mktemp("one_round") / "run"
  shutil.copytree(smoke_base, workdir / "base")
  loop.run(method_config("sft_sharpening", **{"loop.num_rounds": 1, "loop.report": True}), workdir,
           progress_bars=False)
  return workdir


def test_finished_run_writes_the_report(one_round_run):
  report = one_round_run / "report" / "report.md"
  assert report.read_text().startswith("# ")
  assert list((one_round_run / "report").glob("*.png"))


def _params_file(workdir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (workdir / "round_001" / "params").rglob("*")
           if p.is_file() and p.parent.name == "d" and "ocdbt" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_checkpoint_is_a_clear_error_and_changes_nothing(damage, tmp_path, one_round_run):
  workdir = tmp_path / "run"
  shutil.copytree(one_round_run, workdir)
  target = _params_file(workdir)
  data = bytearray(target.read_bytes())
  if damage == "corrupt":
    data[len(data) // 2] ^= 0xFF
  else:
    data = data[:len(data) // 2]
  target.write_bytes(bytes(data))
  before = _snapshot(workdir)
  more_rounds = method_config("sft_sharpening", **{"loop.num_rounds": 2, "loop.report": True})
  with pytest.raises(trees.CheckpointError, match="round_001/params.*" + (
      "CRC" if damage == "corrupt" else "truncated")):
    loop.run(more_rounds, workdir, progress_bars=False)
  assert _snapshot(workdir) == before


def test_workdir_of_another_config_is_refused(tmp_path, one_round_run):
  workdir = tmp_path / "run"
  shutil.copytree(one_round_run, workdir)
  before = _snapshot(workdir)
  other = method_config("sft_sharpening", **{"loop.num_rounds": 1, "loop.report": True, "seed": 3,
                                             "train.optimizer.learning_rate": 1e-3})
  with pytest.raises(loop.WorkdirError, match=r"seed: 0 -> 3.*learning_rate|learning_rate.*seed"):
    loop.run(other, workdir, progress_bars=False)
  assert _snapshot(workdir) == before


def test_missing_dataset_file_is_a_clear_error_and_writes_nothing(tmp_path):
  missing = tmp_path / "data" / "gsm8k_test.jsonl"
  config = method_config("grpo", **{"task.name": "gsm8k", "task.path": str(missing),
                                    "model.source": "preset", "model.preset": "tiny_llama3",
                                    "model.tokenizer": str(tmp_path / "tok.model")})
  with pytest.raises((FileNotFoundError, ValueError), match="gsm8k_test.jsonl"):
    loop.run(config, tmp_path / "run", progress_bars=False)
  assert not (tmp_path / "run").exists()


def test_bad_config_values_name_the_key():
  with pytest.raises(ValueError, match=r"config.select.kind='top2'"):
    loop.run(method_config("sft_sharpening", **{"select.kind": "top2"}), "/tmp/unused")
  with pytest.raises(ValueError, match=r"config.select.kind='top1': train.loss='dpo' needs a pair"):
    loop.run(method_config("sft_sharpening", **{"train.loss": "dpo"}), "/tmp/unused")
  with pytest.raises(ValueError, match="variant 'smok'"):
    method_config("sft_sharpening", "smok")


def test_cli_unknown_key_is_named(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "selfimprove_jax.main", "--config=configs/grpo.py:smoke",
       f"--workdir={tmp_path / 'run'}", "--config.train.lerning_rate=0.1"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "lerning_rate" in out.stderr
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- SIGKILL and resume

KILL_OVERRIDES = ("--config.train.epochs=6", "--config.checkpoint.every_steps=2")


def _launch(workdir, cache_dir):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.Popen(
      [sys.executable, "-m", "selfimprove_jax.main", "--config=configs/sft_sharpening.py:smoke",
       f"--workdir={workdir}", *KILL_OVERRIDES],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _in_round_2(workdir) -> bool:
  try:
    return "eval" in json.loads((workdir / "progress.json").read_text())["completed"].get("1", [])
  except (FileNotFoundError, json.JSONDecodeError):
    return False


def _restore(path):
  return jax.device_get(trees.restore_tree(path))


def _wait_until_working_on_round_2(proc, workdir, launched: float) -> None:
  """Until round 1 is done and this process has opened its metrics log (start-up is over)."""
  metrics = workdir / "metrics.jsonl"
  while not (_in_round_2(workdir) and metrics.exists() and metrics.stat().st_mtime >= launched):
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.02)


def test_sigkill_in_round_2_then_rerun_is_bit_identical(tmp_path, smoke_base):
  cache = tmp_path / "compile_cache"
  reference = fresh_workdir(tmp_path, smoke_base, "reference")
  proc = _launch(reference, cache)
  _wait_until_working_on_round_2(proc, reference, 0.0)
  round_2_start = time.monotonic()
  assert proc.wait(timeout=600) == 0, proc.stderr.read()
  round_2_time = time.monotonic() - round_2_start

  victim = fresh_workdir(tmp_path, smoke_base, "victim")
  rng = random.Random(0)
  kills = []
  while len(kills) < 3:
    launched = time.time() - 1.0  # file mtimes have coarse resolution on some filesystems
    proc = _launch(victim, cache)
    _wait_until_working_on_round_2(proc, victim, launched)
    delay = rng.uniform(len(kills) / 3, (len(kills) + 1) / 3) * round_2_time  # one per third
    time.sleep(delay)
    if proc.poll() is not None:  # finished before the kill: start over from scratch
      shutil.rmtree(victim)
      victim = fresh_workdir(tmp_path, smoke_base, f"victim{len(kills)}")
      continue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    progress = json.loads((victim / "progress.json").read_text())
    kills.append((round(delay, 2), progress["completed"].get("2", [])))
  proc = _launch(victim, cache)
  assert proc.wait(timeout=600) == 0, proc.stderr.read()
  print(f"round 2 takes {round_2_time:.1f} s; killed at (delay s, stages done): {kills}")

  for name in ("progress.json", "metrics.jsonl", "round_001/samples.jsonl",
               "round_002/samples.jsonl", "round_002/eval_samples.jsonl", "round_002/eval.json"):
    assert (victim / name).read_text() == (reference / name).read_text(), (name, kills)
  got, want = _restore(victim / "round_002" / "params"), _restore(reference / "round_002" / "params")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), got, want)
  assert not leftovers(victim)


class _Crash(Exception):
  pass


@pytest.mark.parametrize("method,overrides,crash_at", [
    # offline: 6 steps a round, checkpoints every 2; dies in round 2's 3rd step (resumes at 2)
    ("sft_sharpening", {"train.epochs": 6, "checkpoint.every_steps": 2}, 6 + 3),
    # online: 2 RL steps a round, checkpoint every step; dies in round 2's 2nd step
    ("grpo", {"checkpoint.every_steps": 1}, 2 + 2),
])
def test_crash_mid_train_then_rerun_is_bit_identical(method, overrides, crash_at, tmp_path,
                                                     smoke_base, monkeypatch):
  config = method_config(method, **overrides)
  reference = fresh_workdir(tmp_path, smoke_base, "reference")
  loop.run(config, reference, progress_bars=False)

  calls = [0]
  real_step = updates.run_step

  def dying_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == crash_at:
      raise _Crash
    return real_step(*args, **kwargs)

  victim = fresh_workdir(tmp_path, smoke_base, "victim")
  monkeypatch.setattr(updates, "run_step", dying_step)
  with pytest.raises(_Crash):
    loop.run(config, victim, progress_bars=False)
  assert (victim / "round_002" / "train_state").exists()  # it died with a checkpoint to resume
  monkeypatch.setattr(updates, "run_step", real_step)
  loop.run(config, victim, progress_bars=False)

  tables = ["round_002/samples.jsonl" if method != "grpo" else "round_002/samples"]
  for name in ["progress.json", "metrics.jsonl", "round_002/eval_samples.jsonl", *tables]:
    want, got = reference / name, victim / name
    if want.is_dir():
      assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
      assert loop.read_table(got) == loop.read_table(want)
    else:
      assert got.read_text() == want.read_text(), name
  got, want = _restore(victim / "round_002" / "params"), _restore(reference / "round_002" / "params")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), got, want)


def _assert_same_run(victim, reference, rounds):
  for name in ["progress.json", "metrics.jsonl", *(f"round_{r:03d}/eval.json" for r in rounds)]:
    assert (victim / name).read_text() == (reference / name).read_text(), name
  for r in rounds[1:]:
    got, want = (_restore(w / f"round_{r:03d}" / "params") for w in (victim, reference))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), got, want)


def test_kill_in_the_windows_between_a_stage_and_its_mark_then_rerun_is_bit_identical(
    tmp_path, smoke_base, monkeypatch):
  """Two windows an outside kill harness found (issue 19, items 9 and 10), each cut open here by
  an exception at that exact point: (a) the finished round's train states half deleted (its params
  saved, train not yet marked done); (b) right after round 1's eval is marked done."""
  config = method_config("sft_sharpening", **{"loop.num_rounds": 2, "train.epochs": 2,
                                              "checkpoint.every_steps": 1})
  reference = fresh_workdir(tmp_path, smoke_base, "reference")
  loop.run(config, reference, progress_bars=False)
  from etils import epath  # pylint: disable=g-import-not-at-top

  # (a) A removal that has taken one file of a train-state tree when the process dies.
  path_class = type(epath.Path(tmp_path))
  real_rmtree = path_class.rmtree

  def dying_rmtree(self, *args, **kwargs):
    trained = trees.exists(victim / "round_001" / "params")
    doomed = list(pathlib.Path(self).rglob("_sharding")) if "train_state" in str(self) else []
    if trained and doomed:
      doomed[0].unlink()
      raise _Crash
    return real_rmtree(self, *args, **kwargs)

  victim = fresh_workdir(tmp_path, smoke_base, "victim_a")
  monkeypatch.setattr(path_class, "rmtree", dying_rmtree)
  with pytest.raises(_Crash):
    loop.run(config, victim, progress_bars=False)
  monkeypatch.setattr(path_class, "rmtree", real_rmtree)
  assert trees.exists(victim / "round_001" / "params")
  assert "train" not in json.loads((victim / "progress.json").read_text())["completed"]["1"]
  loop.run(config, victim, progress_bars=False)
  _assert_same_run(victim, reference, [0, 1, 2])
  assert not (victim / "round_001" / "train_state").exists() and not leftovers(victim)

  # (b) Dies the moment round 1's eval is marked done.
  real_mark = loop.workdir.Journal.mark_done

  def dying_mark(self, round_index, stage, **kwargs):
    real_mark(self, round_index, stage, **kwargs)
    if (round_index, stage) == (1, "eval"):
      raise _Crash

  victim = fresh_workdir(tmp_path, smoke_base, "victim_b")
  monkeypatch.setattr(loop.workdir.Journal, "mark_done", dying_mark)
  with pytest.raises(_Crash):
    loop.run(config, victim, progress_bars=False)
  monkeypatch.setattr(loop.workdir.Journal, "mark_done", real_mark)
  loop.run(config, victim, progress_bars=False)
  _assert_same_run(victim, reference, [0, 1, 2])


def test_adaptive_sampling_stops_a_prompt_once_a_likely_sample_is_in_hand(tmp_path, smoke_base):
  """App. D: 2 samples per prompt at a time, up to 4, until one has base probability >= 1/s."""
  def run(name, stop):
    config = method_config("sft_sharpening", **{
        "loop.num_rounds": 1, "sample.num_samples": 4, "sample.adaptive.chunk": 2,
        "sample.adaptive.stop_inverse_prob": stop})
    workdir = fresh_workdir(tmp_path, smoke_base, name)
    loop.run(config, workdir, progress_bars=False, stop_after="score")
    by_prompt = {}
    for row in loop.read_table(workdir / "round_001" / "samples.jsonl"):
      by_prompt.setdefault(row["prompt_id"], []).append(row)
    logged = [r for r in records(workdir) if r["stage"] == "sample"]
    return by_prompt, logged[0]

  never, logged = run("never", 1.0)  # 1 / pi <= 1 needs pi = 1
  assert {len(rows) for rows in never.values()} == {4} and logged["samples_per_prompt"] == 4
  assert all([r["sample_index"] for r in rows] == [0, 1, 2, 3] for rows in never.values())
  first = {pid: max(r["base_logprob"] for r in rows[:2]) for pid, rows in never.items()}
  # Half the prompts stop after one chunk (1e-3 nats of slack: the stage scores a chunk in
  # groups of 2, the score stage all 4 rows of a prompt, which rounds differently).
  threshold = float(np.median(list(first.values()))) - 1e-3
  mixed, logged = run("mixed", float(np.exp(-threshold)))
  for pid, rows in mixed.items():
    assert len(rows) == (2 if first[pid] >= threshold else 4), pid
    assert [r["tokens"] for r in rows[:2]] == [r["tokens"] for r in never[pid][:2]]
  assert {len(rows) for rows in mixed.values()} == {2, 4}
  assert logged["num_samples"] == sum(len(rows) for rows in mixed.values())
