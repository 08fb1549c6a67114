"""A study: the arms of one loop config run side by side, sharing one base, with one report.

A config whose ``study.arms`` is not empty is a study. ``study.arms.NAME`` holds the keys arm NAME
changes, nested as in the config (``arm("task.regime", "carry_fork")`` builds one
from dotted keys). Each arm is an ordinary loop run in ``WORKDIR/NAME``, in ``study.order``
(default: by name), so
rerunning the same command resumes every arm where it stopped. When arms build the same base
(equal ``model`` sections and seed), the first arm's cached base (``base/``) is copied into the
others before they start: a synthetic base is pretrained once for all of them.

``WORKDIR/summary.json`` holds each arm's ``summary.json`` under ``arms`` and the invocation's
``runtime_s``; ``WORKDIR/report/report.md`` (``analysis.compare``) sets the arms side by side.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from typing import Any

import ml_collections
import tqdm
from etils import epath

from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.loop import driver
from selfimprove_jax.loop.workdir import Workdir
from selfimprove_jax.tables import atomic_write


def arm(*pairs: Any) -> dict:
  """Nested overrides from dotted keys and values: ``arm("train.loss", "dpo", "select.kind",
  "best_worst")`` -> ``{"train": {"loss": "dpo"}, "select": {"kind": "best_worst"}}``."""
  if len(pairs) % 2:
    raise ValueError(f"arm{pairs!r}: needs key, value pairs")
  out: dict = {}
  for key, value in zip(pairs[::2], pairs[1::2]):
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _apply(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict, name: str,
           path: str = "") -> None:
  for key, value in overrides.items():
    where = f"{path}{key}"
    if key not in config:
      raise ValueError(f"config.study.arms.{name}.{where}: not a config key")
    if isinstance(value, ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ValueError(f"config.study.arms.{name}.{where}: {config[key]!r} is a value, "
                         "not a section")
      _apply(config[key], value, name, where + ".")
    else:
      config[key] = value


def arm_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's full loop config (validated, locked, ``study.arms`` empty), in order.

  Raises:
    ValueError: an arm that sets an unknown key, or whose config fails ``loop_config.validate``;
      the message names the arm and the key.
  """
  names = list(config.study.order) or sorted(config.study.arms)
  if sorted(names) != sorted(config.study.arms):
    raise ValueError(f"config.study.order={tuple(config.study.order)!r}: must list each arm of "
                     f"config.study.arms {sorted(config.study.arms)} once")
  arms = {}
  for name in names:
    overrides = config.study.arms[name]
    c = copy.deepcopy(config)
    with c.unlocked():
      c.study.arms, c.study.order = ml_collections.ConfigDict(), ()
      _apply(c, overrides, name)
    try:
      loop_config.validate(c)
    except ValueError as e:
      raise ValueError(f"config.study.arms.{name}: {e}") from None
    arms[name] = c
  return arms


def _share_base(arms: dict[str, ml_collections.ConfigDict], root: epath.Path) -> None:
  """Copies the first arm's cached base into every later arm that would build the same one."""
  names = list(arms)
  first = Workdir.at(root / names[0]).base
  for name in names[1:]:
    same = (arms[name].model.to_dict() == arms[names[0]].model.to_dict()
            and arms[name].seed == arms[names[0]].seed)
    target = Workdir.at(root / name).base
    if same and first.exists() and not target.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      partial = target.parent / f".{target.name}.tmp"  # a killed copy is never taken for a base
      shutil.rmtree(partial, ignore_errors=True)
      shutil.copytree(first, partial)
      partial.rename(target)


def run_study(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              stop_after: str | None = None, started: float | None = None,
              progress_bars: bool = True) -> dict[str, dict]:
  """Runs every arm's pending stages (each in ``WORKDIR/NAME``), then writes the study's
  ``summary.json`` and report. Returns {arm: its last round's eval metrics}."""
  started = time.time() if started is None else started
  arms = arm_configs(config)
  root = epath.Path(workdir)
  results = {}
  for i, (name, c) in enumerate(arms.items()):
    if progress_bars:
      tqdm.tqdm.write(f"== arm {i + 1}/{len(arms)}: {name}")
    results[name] = driver.run(c, root / name, stop_after=stop_after, started=started,
                               progress_bars=progress_bars)
    if i == 0:
      _share_base(arms, root)
  summaries = {name: root / name / "summary.json" for name in arms}
  if stop_after is None and all(p.exists() for p in summaries.values()):
    arm_summaries = {name: json.loads(p.read_text()) for name, p in summaries.items()}
    path = root / "summary.json"
    if path.exists() and json.loads(path.read_text())["arms"] == arm_summaries:
      return results  # a rerun with nothing left keeps the study's own runtime and report
    summary = {"arms": arm_summaries, "runtime_s": round(time.time() - started, 1)}
    atomic_write(path, json.dumps(summary, indent=1))
    if config.loop.report:
      from selfimprove_jax.analysis import compare  # pylint: disable=g-import-not-at-top
      path = compare.write_report({name: root / name for name in arms}, root / "report")
      if progress_bars:
        tqdm.tqdm.write(f"report: {path}")
  return results
