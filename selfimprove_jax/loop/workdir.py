"""The run's directory: where each file lives, the config check, and the record of what is done.

Layout::

  config.json      the run's config: a rerun with another config is refused (keys named)
  progress.json    completed stages per round (written atomically after each stage)
  base/            the synthetic base model (model.source=synthetic), pretrained once
  metrics.jsonl    one record per train step / stage / round; tensorboard/ mirrors it
  summary.json     held-out metrics of the base and the last round (a finished run)
  round_RRR/       samples.jsonl (offline) or samples/step_*.jsonl (online), eval_samples.jsonl,
                   eval.json, and two orbax CheckpointManager roots (``checkpoint.trees``):
                   train_state/step_SSSSSS (the newest train state) and params/step_000000

``Journal`` is the one writer of progress, metrics and tables during a run; only process 0 writes
files (``multihost.is_writer``), every process keeps the same records in memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from etils import epath

from selfimprove_jax import tables
from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.metrics import MetricsLog

CONFIG_FILE, PROGRESS_FILE = "config.json", "progress.json"
# Keys a rerun may change: more rounds extend a finished run; the others change no result.
RESUMABLE_CHANGES = ("loop.num_rounds", "metrics.wandb.project", "metrics.wandb.entity",
                     "metrics.wandb.mode", "profile.start_step", "profile.num_steps")


class WorkdirError(ValueError):
  """The workdir belongs to another run (different config) or is not a loop workdir."""


@dataclasses.dataclass(frozen=True)
class Workdir:
  """Paths of a run's files (local or ``scheme://``)."""

  root: epath.Path

  @classmethod
  def at(cls, path: str | os.PathLike) -> Workdir:
    return cls(epath.Path(os.path.abspath(path) if "://" not in os.fspath(path) else path))

  @property
  def base(self) -> epath.Path:
    return self.root / "base"

  def round_dir(self, r: int) -> epath.Path:
    return self.root / f"round_{r:03d}"

  def samples(self, r: int) -> epath.Path:
    """An offline round's table."""
    return self.round_dir(r) / "samples.jsonl"

  def step_samples(self, r: int) -> epath.Path:
    """An online round's tables, ``step_SSSSS.jsonl`` each."""
    return self.round_dir(r) / "samples"

  def params(self, r: int) -> epath.Path:
    """The round's trained params (LoRA: the adapters)."""
    return self.round_dir(r) / "params"

  def train_states(self, r: int) -> epath.Path:
    return self.round_dir(r) / "train_state"

  def eval_samples(self, r: int) -> epath.Path:
    return self.round_dir(r) / "eval_samples.jsonl"

  def eval_json(self, r: int) -> epath.Path:
    return self.round_dir(r) / "eval.json"


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=str))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_workdir(workdir: Workdir, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir written by a run with a different config, naming the differing keys."""
  root = workdir.root
  if not (root / CONFIG_FILE).exists():
    if root.exists() and (root / PROGRESS_FILE).exists():
      raise WorkdirError(f"workdir {root} has {PROGRESS_FILE} but no {CONFIG_FILE}")
    return
  try:
    saved = flatten(json.loads((root / CONFIG_FILE).read_text()))
  except json.JSONDecodeError as e:
    raise WorkdirError(f"workdir {root}: {CONFIG_FILE} is corrupted ({e})") from None
  now = flatten(config_json(config))
  # A key added to the schema after the workdir was written is fine at its default value.
  defaults = flatten(config_json(loop_config.base_config()))
  added = {k for k in set(now) - set(saved) if k in defaults and now[k] == defaults[k]}
  diff = sorted(k for k in (set(saved) | set(now)) - added
                if saved.get(k, "<missing>") != now.get(k, "<missing>") and k not in RESUMABLE_CHANGES)
  if diff:
    shown = ", ".join(f"{k}: {saved.get(k, '<missing>')!r} -> {now.get(k, '<missing>')!r}"
                      for k in diff[:8])
    raise WorkdirError(f"workdir {root} holds a run with a different config ({shown}"
                       f"{', ...' if len(diff) > 8 else ''}); use a new --workdir or the same config")


def commit(workdir: Workdir, config: ml_collections.ConfigDict, writer: bool) -> None:
  """Creates the workdir and its config.json: the first write of a run (after every check)."""
  if writer and not (workdir.root / CONFIG_FILE).exists():
    workdir.root.mkdir(parents=True, exist_ok=True)
    tables.atomic_write(workdir.root / CONFIG_FILE, json.dumps(config_json(config), indent=1))


@dataclasses.dataclass
class Progress:
  """Completed stages per round (``progress.json``)."""
  completed: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  train_steps: dict[str, int] = dataclasses.field(default_factory=dict)  # per finished round

  def done(self, round_index: int, stage: str) -> bool:
    return stage in self.completed.get(str(round_index), [])

  def global_step(self, round_index: int) -> int:
    """Update steps taken before ``round_index``."""
    return sum(n for r, n in self.train_steps.items() if int(r) < round_index)

  @classmethod
  def read(cls, workdir: Workdir) -> Progress:
    path = workdir.root / PROGRESS_FILE
    if not path.exists():
      return cls()
    try:
      return cls(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
      raise WorkdirError(f"{path} is corrupted ({e})") from None


class Journal:
  """What a run has done and logged: ``progress.json``, the metrics log, the tables.

  The last round table written is also kept in memory, so the next stage reads it back without
  a file (other processes never write one), and so is every eval result.
  """

  def __init__(self, workdir: Workdir, *, writer: bool):
    self.workdir, self.writer = workdir, writer
    self.progress = Progress.read(workdir)
    self.metrics: MetricsLog | None = None
    self._table: tuple[int, list[dict]] | None = None
    self._evals: dict[int, dict] = {}

  def open_metrics(self, keep: Callable[[dict], bool],
                   config: ml_collections.ConfigDict | None = None) -> None:
    """Opens the metrics log, keeping the records ``keep`` accepts; ``config`` (the run's)
    names a Weights & Biases project in ``metrics.wandb`` to mirror them to."""
    self.metrics = MetricsLog(self.workdir.root, keep=keep, enabled=self.writer,
                              wandb=self._wandb(config) if self.writer and config else None)

  def _wandb(self, config: ml_collections.ConfigDict) -> dict | None:
    """``wandb.init`` arguments from ``config.metrics.wandb``; None when no project is set."""
    settings = config.metrics.wandb
    if not settings.project:
      return None
    return {"project": settings.project, "name": self.workdir.root.name,
            "config": config_json(config),
            **{k: settings[k] for k in ("entity", "mode") if settings[k]}}

  def close(self) -> None:
    if self.metrics is not None:
      self.metrics.close()

  def flush(self) -> None:
    """Puts the metrics on storage: before a checkpoint or a stage mark a resume relies on."""
    if self.metrics is not None:
      self.metrics.flush()

  def log(self, round_index: int, stage: str, step: int, values: dict, **extra) -> None:
    self.metrics.write({"round": round_index, "stage": stage, "step": step, **extra,
                        **{k: tables.jsonable(v) for k, v in values.items()}})

  def mark_done(self, round_index: int, stage: str, train_steps: int | None = None) -> None:
    self.flush()  # what a resumed run keeps of this stage must be on storage first
    self.progress.completed.setdefault(str(round_index), []).append(stage)
    if train_steps is not None:
      self.progress.train_steps[str(round_index)] = train_steps
    if self.writer:
      tables.atomic_write(self.workdir.root / PROGRESS_FILE,
                          json.dumps(dataclasses.asdict(self.progress)))

  def write_round_table(self, r: int, rows: Sequence[dict], stage: str) -> None:
    """Round ``r``'s offline table as ``stage`` leaves it (``tables.ROUND_COLUMNS[stage]``)."""
    if self.writer:
      self.workdir.round_dir(r).mkdir(parents=True, exist_ok=True)
      tables.write_table(self.workdir.samples(r), rows, tables.ROUND_COLUMNS[stage])
    self._table = (r, list(rows))

  def read_round_table(self, r: int, stage: str) -> list[dict]:
    """Round ``r``'s offline table, which must hold ``stage``'s columns."""
    if self._table is not None and self._table[0] == r:
      rows = self._table[1]
      tables.require(rows, tables.ROUND_COLUMNS[stage], os.fspath(self.workdir.samples(r)))
      return rows
    return tables.read_table(self.workdir.samples(r), tables.ROUND_COLUMNS[stage])

  def write_eval(self, r: int, rows: Sequence[dict], result: dict) -> None:
    if self.writer:
      self.workdir.round_dir(r).mkdir(parents=True, exist_ok=True)
      tables.write_table(self.workdir.eval_samples(r), rows, tables.EVAL_COLUMNS)
      tables.atomic_write(self.workdir.eval_json(r), json.dumps(result, indent=1))
    # Other processes must not read eval.json before process 0 has written it.
    self._evals[r] = json.loads(json.dumps(result))

  def eval_result(self, r: int) -> dict:
    """Round ``r``'s held-out metrics (``eval.json``)."""
    if r not in self._evals:
      self._evals[r] = json.loads(self.workdir.eval_json(r).read_text())
    return self._evals[r]
