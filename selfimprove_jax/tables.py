"""The samples table: one row per completion, one declared schema for the loop that writes it and
the analyses that read it.

Every column is declared once below with its type and the stage that writes it. Three tables use
them, each the columns of the stages it went through, in this order:

  round_RRR/samples.jsonl          offline round: ``ROUND_COLUMNS`` of sample, then score, select
  round_RRR/samples/step_*.jsonl   online round, one part per RL step: ``RL_COLUMNS``
  round_RRR/eval_samples.jsonl     held-out eval, a greedy row and N T=1 rows a prompt: ``EVAL_COLUMNS``

Tables are JSONL, written atomically; a non-finite float is stored as null. ``write_table``
refuses undeclared columns and rows that lack a column of their table; ``read_table`` and
``require`` fail naming the missing column. Pure Python (no jax), so reports read tables without
the model stack.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from etils import epath

_NUMBER = (int, float)


@dataclasses.dataclass(frozen=True)
class Column:
  """One column: its name, the JSON types of its values, who writes it, and what it means.

  ``nullable``: None is a valid value (no answer found, no reward, a non-finite float).
  """

  name: str
  types: tuple[type, ...]
  stage: str
  doc: str
  nullable: bool = False


COLUMNS: dict[str, Column] = {c.name: c for c in (
    Column("round", (int,), "sample", "the round (0: the base model's eval)"),
    Column("step", (int,), "train", "online: the RL step (1-based) that sampled the row"),
    Column("source", (str,), "sample", "the sampling model: current | base | rationalization"),
    Column("kind", (str,), "eval", "eval tables: greedy | sample"),
    Column("prompt_id", (str, int), "sample", "the example's id"),
    Column("sample_index", (int,), "sample", "n in [0, N) among the prompt's samples"),
    Column("temperature", _NUMBER, "sample", "sampling temperature (0: greedy)"),
    Column("completion", (str,), "sample", "the decoded completion"),
    Column("tokens", (list,), "sample", "completion ids, the stop token included"),
    Column("length", (int,), "sample", "len(tokens)"),
    Column("finish_reason", (str,), "sample", "stop | length"),
    Column("sampler_logprob", _NUMBER, "sample",
           "sum of the tokens' log-probs under the sampling distribution (temperature, top-k, "
           "top-p applied), nats", nullable=True),
    Column("model_logprob", _NUMBER, "sample",
           "sum of the tokens' log-probs under the sampling model at T=1, nats", nullable=True),
    Column("sampler_logprobs", (list,), "sample", "per-token sampler log-probs"),
    Column("extracted", (str,), "score", "the answer the task's extractor found",
           nullable=True),
    Column("correct", (bool,), "score", "the task's gold verdict"),
    Column("base_logprob", _NUMBER, "score", "log pi_base(y|x) summed over the completion, nats",
           nullable=True),
    Column("base_mean_logprob", _NUMBER, "score", "base_logprob / length", nullable=True),
    Column("base_self_certainty", _NUMBER, "score",
           "mean over tokens of KL(uniform || pi_base(.|x, y<t))", nullable=True),
    Column("reward", _NUMBER, "score", "the configured reward (None: none, never selected)",
           nullable=True),
    Column("advantage", _NUMBER, "train", "online: the group-relative advantage", nullable=True),
    Column("selected", (bool,), "select", "in the round's training set"),
    Column("pair", (int,), "select", "pair losses: the pair's index", nullable=True),
    Column("pair_role", (str,), "select", "pair losses: first | second", nullable=True),
)}

# What sampling and verification write, in row order.
GENERATED = ("prompt_id", "sample_index", "temperature", "completion", "tokens", "length",
             "finish_reason", "sampler_logprob", "model_logprob", "sampler_logprobs")
VERIFIED = ("extracted", "correct", "base_logprob", "base_mean_logprob", "base_self_certainty")
# Offline round tables grow stage by stage.
ROUND_COLUMNS = {"sample": ("round", "source", *GENERATED),
                 "score": ("round", "source", *GENERATED, *VERIFIED, "reward"),
                 "select": ("round", "source", *GENERATED, *VERIFIED, "reward", "selected", "pair",
                            "pair_role")}
RL_COLUMNS = ("round", "step", "source", *GENERATED, *VERIFIED, "reward", "advantage", "selected")
EVAL_COLUMNS = ("round", "kind", *GENERATED, *VERIFIED)


class SchemaError(ValueError):
  """A table row lacks a column of its table, or holds an undeclared or mistyped one."""


def require(rows: Iterable[dict], columns: Sequence[str], where: str, *,
            check_types: bool = False) -> None:
  """Raises ``SchemaError`` naming the first row and column of ``columns`` that is missing (or,
  with ``check_types``, holds a value of another type than ``COLUMNS`` declares)."""
  for i, row in enumerate(rows):
    for name in columns:
      if name not in row:
        raise SchemaError(f"{where}: row {i} has no column {name!r} (it has {sorted(row)})")
      if check_types:
        _check_value(row[name], COLUMNS[name], f"{where}: row {i}")


def _check_value(value: Any, column: Column, where: str) -> None:
  if value is None and column.nullable:
    return
  if isinstance(value, float) and not math.isfinite(value) and column.nullable:
    return
  ok = isinstance(value, column.types) and not (isinstance(value, bool) and bool not in
                                                column.types)
  if not ok:
    want = " | ".join(t.__name__ for t in column.types) + (" | None" if column.nullable else "")
    raise SchemaError(f"{where}: column {column.name!r} = {value!r} is not {want}")


def jsonable(value: Any) -> Any:
  """``value`` as JSON can hold it: NumPy scalars and arrays to Python, non-finite floats to None."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return jsonable(value.item())
  if isinstance(value, np.ndarray):
    return [jsonable(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  return value


def atomic_write(path: epath.Path, text: str) -> None:
  """Writes ``text`` to a temporary sibling, then renames it over ``path``."""
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def write_table(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
  """Writes ``rows`` as JSONL, atomically, after checking them against ``columns`` (one of the
  tables above): each row holds every one of them, typed as declared, and nothing undeclared."""
  path = epath.Path(path)
  rows = [{k: jsonable(v) for k, v in r.items()} for r in rows]
  for i, row in enumerate(rows):
    extra = [name for name in row if name not in COLUMNS]
    if extra:
      raise SchemaError(f"{os.fspath(path)}: row {i} has undeclared column(s) {extra}; declare "
                        f"them in tables.COLUMNS")
  require(rows, columns, os.fspath(path), check_types=True)
  atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_table(path: str | os.PathLike, columns: Sequence[str] = ()) -> list[dict]:
  """The rows of a JSONL table, or of every ``*.jsonl`` part of a directory in name order (an
  online round); raises ``SchemaError`` when a row lacks one of ``columns``."""
  path = epath.Path(os.path.abspath(path) if "://" not in os.fspath(path) else path)
  if path.is_dir():
    # iterdir, not glob: fsspec-backed epath globs can mangle scheme:// paths.
    parts = sorted(p for p in path.iterdir() if p.name.endswith(".jsonl"))
    rows = [row for part in parts for row in read_table(part)]
  else:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  require(rows, columns, os.fspath(path))
  return rows


def column_mean(rows: Iterable[dict], name: str) -> float:
  """Mean of a numeric column over ``rows``, None and NaN skipped; NaN when nothing is left."""
  values = np.array([np.nan if r[name] is None else float(r[name]) for r in rows], float)
  return float(np.nanmean(values)) if values.size and not np.all(np.isnan(values)) else math.nan
