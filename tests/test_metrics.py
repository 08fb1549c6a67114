"""The JSONL metrics log and its mirrors: TensorBoard event files (tensorboardX) and W&B.

Event files are read back here with a small TFRecord reader (tensorboardX ships no reader and
``tensorboard`` is not installed): both CRCs of every record are checked and each payload is
decoded by protobuf as tensorboardX's own ``Event`` message.
"""
import json
import math
import pathlib
import struct
import subprocess
import sys
import types
from collections import Counter

import pytest
from etils import epath
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event

from selfimprove_jax import metrics


def _masked_crc32c(data):
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _events(path):
  """Every ``Event`` of the event file at ``path``, the TFRecord framing and CRCs checked."""
  raw, out, pos = path.read_bytes(), [], 0
  while pos < len(raw):
    assert pos + 12 <= len(raw), f"{path.name}: truncated header at byte {pos}"
    header = raw[pos:pos + 8]
    assert struct.unpack_from("<I", raw, pos + 8)[0] == _masked_crc32c(header), pos
    (size,) = struct.unpack("<Q", header)
    assert pos + 16 + size <= len(raw), f"{path.name}: truncated record at byte {pos}"
    data = raw[pos + 12:pos + 12 + size]
    assert struct.unpack_from("<I", raw, pos + 12 + size)[0] == _masked_crc32c(data), pos
    out.append(Event.FromString(data))
    pos += 16 + size
  return out


def read_events(path):
  """``(step, {tag: simple_value})`` for every summary event of the event file at ``path``."""
  return [(e.step, {v.tag: v.simple_value for v in e.summary.value})
          for e in _events(path) if e.HasField("summary")]


def _tb_files(workdir):
  return sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))


def _each_step_once(workdir):
  """Every ``(tag, step)`` over all of the run's event files appears exactly once."""
  seen = Counter((tag, step) for path in _tb_files(workdir)
                 for step, values in read_events(path) for tag in values)
  return {k: n for k, n in seen.items() if n != 1} == {}


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
  assert crc32c(b"123456789") == 0xE3069283  # so the reader's CRC checks mean something
  with metrics.MetricsLog(tmp_path) as log:
    log.write({"step": 1, "stage": "sft", "round": 0, "loss": 0.5, "ok": True, "name": "x"})
    log.write({"step": 2, "loss": math.nan, "n": 4})
    log.write({"step": 3, "stage": "round", "bon_logprob@4": -1.5, "huge": 1e300})
    with pytest.raises(ValueError, match="int 'step'.*step=None"):
      log.write({"loss": 1.0})
    with pytest.raises(ValueError, match=r"step='3'"):
      log.write({"step": "3", "loss": 1.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == log.records() == [
      {"step": 1, "stage": "sft", "round": 0, "loss": 0.5, "ok": True, "name": "x"},
      {"step": 2, "loss": None, "n": 4},
      {"step": 3, "stage": "round", "bon_logprob@4": -1.5, "huge": 1e300}]
  [tb] = _tb_files(tmp_path)
  assert tb.name.endswith(".selfimprove")
  first = _events(tb)[0]
  assert first.file_version == "brain.Event:2" and not first.HasField("summary")
  events = read_events(tb)
  assert events[0] == (1, {"sft/round": 0.0, "sft/loss": 0.5})
  assert events[1][0] == 2 and events[1][1]["n"] == 4.0 and math.isnan(events[1][1]["loss"])
  assert events[2] == (3, {"round/bon_logprob@4": -1.5, "round/huge": math.inf})  # tag verbatim
  assert len(events) == 3


def test_metrics_log_resume_keeps_filtered_records(tmp_path):
  with metrics.MetricsLog(tmp_path) as log:
    for step in range(1, 6):
      log.write({"step": step, "stage": "train", "loss": step / 4})
  [old_tb] = _tb_files(tmp_path)
  old_tb.rename(old_tb.with_name("events.out.tfevents.0.stale.1.selfimprove"))  # distinct name
  with metrics.MetricsLog(tmp_path, keep=lambda r: r["step"] <= 3) as log:
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.write({"step": 4, "stage": "train", "loss": 9.0})
  expected = [{"step": s, "stage": "train", "loss": s / 4} for s in (1, 2, 3)]
  expected.append({"step": 4, "stage": "train", "loss": 9.0})
  jsonl = tmp_path / "metrics.jsonl"
  assert [json.loads(l) for l in jsonl.read_text().splitlines()] == expected
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".metrics")]
  [tb] = _tb_files(tmp_path)
  assert "stale" not in tb.name
  assert read_events(tb) == [(r["step"], {"train/loss": r["loss"]}) for r in expected]
  assert metrics.MetricsLog(tmp_path, keep=lambda r: False).records() == []
  assert jsonl.read_text() == "" and read_events(_tb_files(tmp_path)[0]) == []


def test_truncated_last_line_is_dropped(tmp_path):
  with metrics.MetricsLog(tmp_path) as log:
    log.write({"step": 1, "loss": 1.0})
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 2, "lo')
  with metrics.MetricsLog(tmp_path) as log:
    assert log.records() == [{"step": 1, "loss": 1.0}]
    log.write({"step": 2, "loss": 2.0})
  assert (tmp_path / "metrics.jsonl").read_text() == (
      '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n')


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "[1, 2]"])
def test_malformed_middle_line_raises(tmp_path, bad):
  content = f'{{"step": 1}}\n{bad}\n{{"step": 3}}\n'
  (tmp_path / "metrics.jsonl").write_text(content)
  with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
    metrics.MetricsLog(tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == content  # left untouched


def test_disabled_touches_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsLog(workdir, enabled=False) as log:
    log.write({"step": 1, "loss": 1.0})
    assert log.records() == []
  assert not workdir.exists()


@pytest.fixture
def object_store(monkeypatch):
  """``s3://`` served by fsspec's in-memory filesystem, made to behave like an object store:
  opening for append fails (gcsfs silently overwrites instead), and an object opened for
  writing appears only when it is closed."""
  import fsspec
  from etils import epath
  from etils.epath import gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class ObjectStore(MemoryFileSystem):
    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError(f"no append on an object store (mode={mode!r})")
      return super()._open(path, mode, **kwargs)

  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  fsspec.register_implementation("s3", ObjectStore, clobber=True)
  root = epath.Path("s3://selfimprove-metrics-test/run")
  yield root
  root.rmtree(missing_ok=True)
  fsspec.register_implementation("s3", MemoryFileSystem, clobber=True)


def test_metrics_log_on_an_object_store_rewrites_on_flush_and_keeps_records_on_resume(
    object_store, monkeypatch):
  records = [{"step": s, "stage": "train", "loss": s / 4} for s in range(1, 6)]
  log = metrics.MetricsLog(object_store)
  for r in records[:3]:
    log.write(r)
  assert not (object_store / "metrics.jsonl").exists()  # buffered: no flush is due yet
  log.flush()
  assert [json.loads(l) for l in (object_store / "metrics.jsonl").read_text().splitlines()] == \
      records[:3]
  monkeypatch.setattr(metrics, "FLUSH_S", 0.0)  # a flush is due on every write now
  log.write(records[3])
  assert len((object_store / "metrics.jsonl").read_text().splitlines()) == 4
  log.write(records[4])
  del log  # a killed writer: never closed

  with metrics.MetricsLog(object_store, keep=lambda r: r["step"] <= 4) as log:
    log.write({"step": 5, "stage": "train", "loss": 9.0})
  expected = records[:4] + [{"step": 5, "stage": "train", "loss": 9.0}]
  assert [json.loads(l) for l in (object_store / "metrics.jsonl").read_text().splitlines()] == \
      expected
  [tb] = [p for p in (object_store / "tensorboard").iterdir() if p.name.startswith("events.")]
  assert read_events(tb) == [(r["step"], {"train/loss": r["loss"]}) for r in expected]


def test_resumed_run_event_files_show_each_step_once(tmp_path):
  """A loop-like log: train steps 1-6, then the round's eval at the round's first step (0).
  The run dies after a checkpoint at round step 4; the rerun keeps steps 1-4 and redoes the rest."""
  train = lambda s, loss: {"round": 1, "stage": "train", "step": s, "round_step": s, "loss": loss}
  evaluation = lambda acc: {"round": 1, "stage": "eval", "step": 0, "acc": acc}
  log = metrics.MetricsLog(tmp_path)
  for s in range(1, 7):
    log.write(train(s, s / 8))
  log.write(evaluation(0.25))
  log.flush()
  del log  # killed: never closed
  [old] = _tb_files(tmp_path)  # as if written by another process: a name the rerun cannot reuse
  old.rename(old.with_name("events.out.tfevents.0.host.1.selfimprove"))
  keep = lambda r: r["stage"] == "train" and r["round_step"] <= 4
  with metrics.MetricsLog(tmp_path, keep=keep) as log:
    for s in (5, 6):
      log.write(train(s, 1.0 + s))
    log.write(evaluation(0.5))
  assert _each_step_once(tmp_path)
  events = [e for path in _tb_files(tmp_path) for e in read_events(path)]
  assert events == [(s, {"train/round": 1.0, "train/round_step": s, "train/loss": s / 8})
                    for s in range(1, 5)] + [
      (s, {"train/round": 1.0, "train/round_step": s, "train/loss": 1.0 + s}) for s in (5, 6)] + [
      (0, {"eval/round": 1.0, "eval/acc": 0.5})]


class _FakeWandb(types.ModuleType):
  """Stands in for the ``wandb`` module: records what a run is told."""

  def __init__(self):
    super().__init__("wandb")
    self.runs = []

  def init(self, **kwargs):
    run = types.SimpleNamespace(kwargs=kwargs, defined={}, logged=[], finished=False)
    run.define_metric = lambda name, step_metric: run.defined.setdefault(name, step_metric)
    run.log = lambda data: run.logged.append(dict(data))
    run.finish = lambda: setattr(run, "finished", True)
    self.runs.append(run)
    return run


def test_wandb_is_off_by_default_and_never_imported(tmp_path, monkeypatch):
  monkeypatch.delitem(sys.modules, "wandb", raising=False)
  with metrics.MetricsLog(tmp_path) as log:
    log.write({"step": 1, "loss": 1.0})
  with metrics.MetricsLog(tmp_path / "other", enabled=False, wandb={"project": "p"}) as log:
    log.write({"step": 1, "loss": 1.0})
  assert "wandb" not in sys.modules


def test_wandb_gets_every_record_against_its_step_and_a_resume_replays_the_kept_ones(
    tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  settings = {"project": "p", "entity": "e", "mode": "offline"}
  with metrics.MetricsLog(tmp_path, wandb=settings) as log:
    log.write({"step": 1, "stage": "train", "loss": 0.5, "note": "x"})
    log.write({"step": 2, "stage": "train", "loss": 0.25})
    log.write({"step": 0, "stage": "eval", "bon_logprob@4": -1.0})  # an earlier step, kept
  [run] = fake.runs
  assert run.kwargs == settings and run.finished
  assert run.logged == [{"train/loss": 0.5, "step": 1}, {"train/loss": 0.25, "step": 2},
                        {"eval/bon_logprob@4": -1.0, "step": 0}]
  assert run.defined == {"train/loss": "step", "eval/bon_logprob@4": "step"}

  with metrics.MetricsLog(tmp_path, keep=lambda r: r["step"] == 1, wandb=settings) as log:
    log.write({"step": 2, "stage": "train", "loss": 9.0})
  resumed = fake.runs[1]
  assert resumed.logged == [{"train/loss": 0.5, "step": 1}, {"train/loss": 9.0, "step": 2}]


def test_the_loop_journal_starts_a_wandb_run_only_when_the_config_names_a_project(
    tmp_path, monkeypatch):
  from selfimprove_jax.loop import config as loop_config
  from selfimprove_jax.loop.workdir import CONFIG_FILE, Journal, Workdir, commit
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)

  def run(name, config, writer=True):
    wd = Workdir.at(tmp_path / name)
    commit(wd, config, writer=True)
    journal = Journal(wd, writer=writer)
    journal.open_metrics(lambda r: True, config)
    journal.log(1, "train", 7, {"loss": 0.5})
    journal.close()
    return json.loads((wd.root / CONFIG_FILE).read_text())

  config = loop_config.base_config()
  run("default", config)
  assert fake.runs == []
  config.metrics.wandb.project, config.metrics.wandb.mode = "p", "offline"
  saved = run("arm", config)
  run("other_process", config, writer=False)
  [wandb_run] = fake.runs
  assert wandb_run.kwargs == {"project": "p", "mode": "offline", "name": "arm", "config": saved}
  assert wandb_run.logged == [{"train/round": 1.0, "train/loss": 0.5, "step": 7}]
  assert wandb_run.finished


def test_importing_metrics_does_not_import_torch():
  """tensorboardX would import torch (installed here for the parity tests) on the way."""
  code = ("import sys; import selfimprove_jax.metrics; "
          "assert 'torch' not in sys.modules, sys.modules.get('torch')")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])


def test_a_resume_killed_while_rewriting_the_jsonl_leaves_no_stray_file(tmp_path, monkeypatch):
  with metrics.MetricsLog(tmp_path) as log:
    log.write({"step": 1, "loss": 1.0})
    log.write({"step": 2, "loss": 2.0})
  gpath = type(epath.Path(tmp_path))
  real_replace = gpath.replace

  def killed(self, target):  # the process dies after writing the temporary file
    raise KeyboardInterrupt

  monkeypatch.setattr(gpath, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    metrics.MetricsLog(tmp_path, keep=lambda r: r["step"] <= 1)
  monkeypatch.setattr(gpath, "replace", real_replace)
  with metrics.MetricsLog(tmp_path, keep=lambda r: r["step"] <= 1) as log:
    assert log.records() == [{"step": 1, "loss": 1.0}]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]
