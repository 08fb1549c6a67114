"""The self-improvement loop: rounds of generate → verify → select → distill, resumable from disk.

Orchestration only: sampling is ``sampling.Sampler``, scoring ``verifiers``, selection ``select``,
the update ``training.make_update_step``, estimators ``analysis``. ``Loop(config, workdir).run()``
runs every round that is not done yet; rerunning the same command after a crash resumes.

Round r >= 1, offline (``loop.mode="offline"``), each stage writing its result before it counts
as done:
  sample   N completions per prompt of the round's prompts (grain batch r - 1), from the current
           and/or the base model                              → round_r/samples.jsonl
  score    base-model log-probs and self-certainty, gold verdicts, the configured reward, and
           STaR rationalization of failed prompts              → round_r/samples.jsonl
  select   the training set (rows or pairs) by ``select``      → round_r/samples.jsonl
  train    epochs over the selection from the base or the current model, checkpointed every
           ``checkpoint.every_steps``                          → round_r/params
  eval     held-out greedy / T=1 accuracy, best-of-k by base log-prob, mean base log-prob
                                                               → round_r/eval.json, eval_samples.jsonl
Online (``loop.mode="online"``): ``train`` runs ``train.steps`` RL steps, each sampling a group
per prompt from the current model, rewarding and updating (samples in round_r/samples/*.jsonl).
Round 0 is the evaluation of the base model.

Workdir::

  config.json      the run's config: a rerun with another config is refused (keys named)
  progress.json    completed stages per round (written atomically after each stage)
  base/            the synthetic base model (source=synthetic), pretrained once
  metrics.jsonl    one record per train step / stage / round; tensorboard/ mirrors it
  round_RRR/       the round's samples table(s), train-state checkpoints, params, eval

Everything random is a pure function of (seed, round, stage, step), and a stage restarted from its
last checkpoint redoes exactly the same work, so an interrupted run ends bit-identical to an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath

from selfimprove_jax import loop_config
from selfimprove_jax import multihost
from selfimprove_jax import select as sel
from selfimprove_jax import sharding as sh
from selfimprove_jax.analysis import estimators
from selfimprove_jax.checkpoint import trees
from selfimprove_jax.data import get_task
from selfimprove_jax.data import pipeline
from selfimprove_jax.data import synthetic
from selfimprove_jax.metrics import MetricsLog
from selfimprove_jax.models import Transformer, TransformerConfig, get_preset, init_params
from selfimprove_jax.models.transformer import param_shardings
from selfimprove_jax.sampling import Sampler
from selfimprove_jax.training import (create_train_state, group_advantages, lora, make_loss,
                                      make_optimizer, make_schedule, make_update_step, run_step,
                                      state_shardings)
from selfimprove_jax.verifiers import self_reward, voting
from selfimprove_jax.verifiers.judge import RubricJudge, YesNoJudge

OFFLINE_STAGES = ("sample", "score", "select", "train", "eval")
ONLINE_STAGES = ("train", "eval")
STAGE_IDS = {"sample": 1, "score": 2, "select": 3, "train": 4, "eval": 5, "rationalize": 6,
             "pretrain": 7, "balance": 8}
CONFIG_FILE, PROGRESS_FILE = "config.json", "progress.json"
# Keys a rerun may change: more rounds extend a finished run.
RESUMABLE_CHANGES = ("loop.num_rounds",)
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Process-wide caches: optimizers by hyperparameters, jitted update steps by what they close over.
_OPTIMIZERS: dict[tuple, tuple] = {}
_STEPS: dict[tuple, Callable] = {}


class WorkdirError(ValueError):
  """The workdir belongs to another run (different config) or is not a loop workdir."""


# ------------------------------------------------------------------------------------ files

def _path(path: str | os.PathLike) -> epath.Path:
  return epath.Path(os.path.abspath(path) if "://" not in str(path) else path)


def atomic_write(path: epath.Path, text: str) -> None:
  """Writes ``text`` to a temporary sibling, then renames it over ``path``."""
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def _jsonable(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return _jsonable(value.item())
  if isinstance(value, np.ndarray):
    return [_jsonable(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def write_table(path: epath.Path, rows: Sequence[dict]) -> None:
  """A samples table as JSONL (one row per sample), atomically."""
  atomic_write(path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n"
                             for r in rows))


def read_table(path: str | os.PathLike) -> list[dict]:
  """A samples table written by ``write_table`` (or every part of an online round's directory)."""
  path = _path(path)
  if path.is_dir():
    # iterdir, not glob: fsspec-backed epath globs can mangle scheme:// paths.
    parts = sorted(p for p in path.iterdir() if p.name.endswith(".jsonl"))
    return [row for part in parts for row in read_table(part)]
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=str))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_workdir(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir written by a run with a different config, naming the differing keys."""
  if not (workdir / CONFIG_FILE).exists():
    if workdir.exists() and (workdir / PROGRESS_FILE).exists():
      raise WorkdirError(f"workdir {workdir} has {PROGRESS_FILE} but no {CONFIG_FILE}")
    return
  try:
    saved = _flatten(json.loads((workdir / CONFIG_FILE).read_text()))
  except json.JSONDecodeError as e:
    raise WorkdirError(f"workdir {workdir}: {CONFIG_FILE} is corrupted ({e})") from None
  now = _flatten(config_json(config))
  # A key added to the schema after the workdir was written is fine at its default value.
  defaults = _flatten(config_json(loop_config.base_config()))
  added = {k for k in set(now) - set(saved) if k in defaults and now[k] == defaults[k]}
  diff = sorted(k for k in (set(saved) | set(now)) - added
                if saved.get(k, "<missing>") != now.get(k, "<missing>") and k not in RESUMABLE_CHANGES)
  if diff:
    shown = ", ".join(f"{k}: {saved.get(k, '<missing>')!r} -> {now.get(k, '<missing>')!r}"
                      for k in diff[:8])
    raise WorkdirError(f"workdir {workdir} holds a run with a different config ({shown}"
                       f"{', ...' if len(diff) > 8 else ''}); use a new --workdir or the same config")


# ------------------------------------------------------------------------------------ the loop

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


class Loop:
  """One run of a loop config in a workdir. ``run()`` does every pending stage of every round.

  Attributes built once: ``model_config``, ``tokenizer``, ``task``, ``train_examples``,
  ``eval_examples``, ``mesh``, ``sample_model`` / ``train_model`` (the same weights under the
  sampling and training sharding rules) and ``base_params``.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               progress_bars: bool = True):
    loop_config.validate(config)
    self.config, self.workdir = config, _path(workdir)
    self.bars = progress_bars
    self.writer = multihost.is_writer()
    check_workdir(self.workdir, config)
    self.mesh = sh.make_mesh(dict(config.mesh))
    shards = self.mesh.shape[sh.DATA] * self.mesh.shape[sh.FSDP]
    if config.loop.prompts_per_round % jax.process_count():
      raise ValueError(f"config.loop.prompts_per_round={config.loop.prompts_per_round}: must be a "
                       f"multiple of the {jax.process_count()} processes (each reads its share)")
    rows = (config.train.batch_size if config.loop.mode == "offline"
            else config.loop.prompts_per_round * config.sample.num_samples)
    if rows % (shards * config.train.num_microbatches):
      name = ("train.batch_size" if config.loop.mode == "offline"
              else "loop.prompts_per_round * sample.num_samples")
      raise ValueError(f"config.{name}={rows}: must be a multiple of train.num_microbatches="
                       f"{config.train.num_microbatches} times the mesh's {shards} batch shards "
                       f"(data x fsdp)")
    self._load_task()
    self._load_model()
    self.progress = self._read_progress()
    self._policy_cache: dict[int, Any] = {}
    self._eval_cache: dict[int, dict] = {}

  # -- setup ---------------------------------------------------------------------------------

  def _load_task(self) -> None:
    c = self.config.task
    self.task = get_task(c.name)
    need = c.num_train + c.num_eval
    if c.name == "synthetic_addition":
      s = self.config.model.synthetic
      add = synthetic.AdditionConfig(min_digits=s.min_digits, max_digits=s.max_digits,
                                     num_operands=s.num_operands)
      # The pretraining stream uses seed = config.seed; prompts come from a disjoint stream.
      examples = self.task.load(need, seed=self.config.seed + 1_000_003, config=add)
    else:
      kwargs = {}
      if c.name == "gsm8k":
        kwargs = dict(split=c.split, data_dir=c.data_dir or None)
      elif not c.path:
        raise ValueError(f"config.task.path='': task {c.name!r} reads its data from files")
      examples = self.task.load(c.path or None, **kwargs)
    if len(examples) < need:
      raise ValueError(f"config.task: {c.name!r} has {len(examples)} examples, fewer than "
                       f"task.num_train + task.num_eval = {need}")
    self.train_examples = list(examples[:c.num_train])
    self.eval_examples = list(examples[c.num_train:need])

  def _load_model(self) -> None:
    c = self.config.model
    if c.source == "synthetic":
      s = c.synthetic
      self.model_config = TransformerConfig(
          family="llama3", vocab_size=32, embed_dim=s.embed_dim, num_layers=s.num_layers,
          num_heads=s.num_heads, num_kv_heads=s.num_heads, head_dim=s.head_dim, mlp_dim=s.mlp_dim,
          tie_embeddings=True, rope_theta=10_000.0, max_len=256, dtype=c.dtype,
          param_dtype=c.dtype)
      self.tokenizer = synthetic.CharTokenizer()
      self.chat_family = None
    elif c.source in ("hf", "native"):
      from selfimprove_jax import checkpoint  # pylint: disable=g-import-not-at-top
      load = checkpoint.load_hf if c.source == "hf" else checkpoint.load_native
      loaded = load(c.checkpoint, mesh=self.mesh, rules=sh.TRAIN_RULES, dtype=c.dtype)
      self.model_config, params, self.tokenizer, _ = loaded
      self._base = params
      self.chat_family = self.model_config.family if self.config.task.chat else None
    else:
      from selfimprove_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
      self.model_config = get_preset(c.preset).replace(dtype=c.dtype, param_dtype=c.dtype)
      self.tokenizer = load_tokenizer(c.tokenizer)
      self.chat_family = self.model_config.family if self.config.task.chat else None
    if self.tokenizer.vocab_size > self.model_config.vocab_size:
      raise ValueError(f"config.model: the tokenizer has {self.tokenizer.vocab_size} pieces but the "
                       f"model embeds only {self.model_config.vocab_size}")
    self.sample_model = Transformer(self.model_config, self.mesh, sh.SAMPLE_RULES)
    self.train_model = Transformer(self.model_config, self.mesh, sh.TRAIN_RULES)
    self.encode = pipeline.prompt_encoder(self.task, self.tokenizer, shots=self.config.task.shots,
                                          family=self.chat_family)
    longest = max(len(self.encode(e)) for e in self.train_examples + self.eval_examples)
    max_new = max(self.config.sample.max_new_tokens, self.config.eval.max_new_tokens)
    self.seq_len = self.config.train.max_len or _round_up(longest + max_new, 16)
    if longest + self.config.sample.max_new_tokens > self.seq_len:
      raise ValueError(f"config.train.max_len={self.seq_len}: prompts of up to {longest} tokens plus "
                       f"sample.max_new_tokens={self.config.sample.max_new_tokens} do not fit")

  @property
  def base_params(self) -> Any:
    """The base model's parameters (train shardings), built on first use."""
    if not hasattr(self, "_base"):
      self._base = self._make_synthetic_base() if self.config.model.source == "synthetic" else \
          init_params(self.model_config, jax.random.key(self.config.seed), self.mesh, sh.TRAIN_RULES)
    return self._base

  def _make_synthetic_base(self) -> Any:
    """The synthetic base model: pretrained once on noisy demonstrations, cached in ``base/``."""
    path = self.workdir / "base"
    target = jax.eval_shape(lambda: init_params(self.model_config, jax.random.key(0)))
    shardings = param_shardings(self.model_config, self.mesh, sh.TRAIN_RULES)
    target = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), target,
                          shardings)
    if trees.exists(path):
      return trees.restore_tree(path, target, check=self.config.checkpoint.verify)
    s = self.config.model.synthetic
    if s.pretrain_steps > 0:
      from selfimprove_jax import synthetic_regime  # pylint: disable=g-import-not-at-top
      task = synthetic.AdditionConfig(min_digits=s.min_digits, max_digits=s.max_digits,
                                      num_operands=s.num_operands, corruption_rate=s.corruption_rate,
                                      corruption=s.corruption)
      params, _ = synthetic_regime.pretrain(
          task, model_config=self.model_config, steps=s.pretrain_steps,
          batch_size=s.pretrain_batch_size, learning_rate=s.pretrain_learning_rate,
          seed=self.config.seed, progress=self.bars and self.writer)
      # Every process pretrained the same weights on its own devices; place them on the mesh.
      params = jax.device_put(jax.device_get(params), shardings)
    else:
      params = init_params(self.model_config, jax.random.key(self.config.seed), self.mesh,
                           sh.TRAIN_RULES)
    self._commit_workdir()
    trees.save_tree(path, params, meta={"pretrain_steps": s.pretrain_steps})
    return params

  def _commit_workdir(self) -> None:
    """Creates the workdir and its config.json: the first write of a run (after every check)."""
    if self.writer and not (self.workdir / CONFIG_FILE).exists():
      self.workdir.mkdir(parents=True, exist_ok=True)
      atomic_write(self.workdir / CONFIG_FILE, json.dumps(config_json(self.config), indent=1))

  def _read_progress(self) -> Progress:
    path = self.workdir / PROGRESS_FILE
    if not path.exists():
      return Progress()
    try:
      return Progress(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
      raise WorkdirError(f"{path} is corrupted ({e})") from None

  def _mark_done(self, round_index: int, stage: str, train_steps: int | None = None) -> None:
    self._flush_metrics()  # what a resumed run keeps of this stage must be on storage first
    self.progress.completed.setdefault(str(round_index), []).append(stage)
    if train_steps is not None:
      self.progress.train_steps[str(round_index)] = train_steps
    if self.writer:
      atomic_write(self.workdir / PROGRESS_FILE, json.dumps(dataclasses.asdict(self.progress)))

  def _flush_metrics(self) -> None:
    if getattr(self, "metrics", None) is not None:
      self.metrics.flush()

  def round_dir(self, round_index: int) -> epath.Path:
    return self.workdir / f"round_{round_index:03d}"

  def key(self, round_index: int, stage: str, step: int = 0) -> jax.Array:
    """The key of (seed, round, stage, step): a stage redone after a crash draws the same."""
    key = jax.random.fold_in(jax.random.key(self.config.seed), round_index)
    return jax.random.fold_in(jax.random.fold_in(key, STAGE_IDS[stage]), step)

  # -- running -------------------------------------------------------------------------------

  @property
  def stages(self) -> tuple[str, ...]:
    return OFFLINE_STAGES if self.config.loop.mode == "offline" else ONLINE_STAGES

  def pending(self) -> list[tuple[int, str]]:
    todo = [] if self.progress.done(0, "eval") else [(0, "eval")]
    for r in range(1, self.config.loop.num_rounds + 1):
      todo += [(r, s) for s in self.stages if not self.progress.done(r, s)]
    return todo

  def run(self, stop_after: str | None = None, *, started: float | None = None) -> dict:
    """Runs the pending stages in order (stopping after the first ``stop_after`` stage run).

    ``started`` (a ``time.time()``) is when the invocation began, for ``summary.json``'s
    runtime (default: now). Returns the last round's eval metrics.
    """
    started = time.time() if started is None else started
    if stop_after is not None and stop_after not in OFFLINE_STAGES:
      raise ValueError(f"stop_after={stop_after!r}: must be one of {OFFLINE_STAGES}")
    todo = self.pending()
    resume = self._resume_point(todo)  # restores (and so verifies) checkpoints before any write
    self._commit_workdir()
    self.metrics = MetricsLog(self.workdir, keep=self._keeper(resume), enabled=self.writer)
    try:
      for round_index, stage in todo:
        start = time.perf_counter()
        getattr(self, f"stage_{stage}")(round_index)
        if self.writer and self.bars:
          tqdm.tqdm.write(f"round {round_index} {stage}: {time.perf_counter() - start:.1f} s")
        if stage == "eval":
          self._summary(round_index)
        if stage == stop_after:
          break
      else:
        if self.writer and self.progress.done(self.config.loop.num_rounds, "eval"):
          self.write_summary(started)
        report_md = self.workdir / "report" / "report.md"
        if self.config.loop.report and self.writer and (todo or not report_md.exists()):
          from selfimprove_jax.analysis import report  # pylint: disable=g-import-not-at-top
          path = report.write_report(self.workdir)
          if self.bars:
            tqdm.tqdm.write(f"report: {path}")
    finally:
      self.metrics.close()
    last = max((r for r, _ in self._evals()), default=0)
    return self.eval_result(last) if self.progress.done(last, "eval") else {}

  def _resume_point(self, todo: list[tuple[int, str]]) -> tuple[int, int] | None:
    """Verifies every checkpoint the first pending stage reads -- before anything is written, so
    a damaged one fails with the workdir untouched -- and returns (round, steps done) of an
    interrupted train stage, if that is where the run resumes."""
    if not todo:
      return None
    round_index, stage = todo[0]
    check = trees.verify if self.config.checkpoint.verify else trees.read_meta
    if trees.exists(self.workdir / "base"):
      check(self.workdir / "base")
    for r in range(1, round_index):
      if self.progress.done(r, "train"):
        check(self.round_dir(r) / "params")
    if stage != "train":
      return None
    step = self._latest_train_checkpoint(round_index)
    if step is None:
      return None
    check(self._train_state_dir(round_index, step))
    return round_index, step

  def _keeper(self, resume: tuple[int, int] | None) -> Callable[[dict], bool]:
    """Which metrics records survive a restart: those of finished stages and of checkpointed
    steps of the interrupted train stage."""
    def keep(record: dict) -> bool:
      r, stage = record.get("round"), record.get("stage")
      if r is None or stage is None:
        return True
      if stage == "round":
        return self.progress.done(r, "eval")
      if self.progress.done(r, stage):
        return True
      if resume is not None and stage == "train" and r == resume[0]:
        return record.get("round_step", 0) <= resume[1]
      return False
    return keep

  def log(self, round_index: int, stage: str, step: int, values: dict, **extra) -> None:
    self.metrics.write({"round": round_index, "stage": stage, "step": step, **extra,
                        **{k: _jsonable(v) for k, v in values.items()}})

  def _summary(self, round_index: int) -> None:
    e = self.eval_result(round_index)
    line = (f"round {round_index}: greedy {e['greedy_acc']:.3f}  T=1 {e['t1_acc']:.3f}  "
            f"base log-prob (T=1) {e['mean_base_logprob_t1']:.2f}  "
            + "  ".join(f"BoN@{k} {v:.3f}" for k, v in e["bon_logprob"].items()))
    if self.writer:
      tqdm.tqdm.write(line)
    self.log(round_index, "round", self.progress.global_step(round_index + 1),
             {"greedy_acc": e["greedy_acc"], "t1_acc": e["t1_acc"],
              "mean_base_logprob_t1": e["mean_base_logprob_t1"],
              **{f"bon_logprob@{k}": v for k, v in e["bon_logprob"].items()}})

  # -- models of a round ---------------------------------------------------------------------

  def policy_params(self, round_index: int) -> Any:
    """The model after round ``round_index`` (the base for 0), full params, train shardings."""
    if round_index == 0:
      return self.base_params
    if round_index not in self._policy_cache:
      path = self.round_dir(round_index) / "params"
      trainable = trees.restore_tree(path, self._saved_target(), check=self.config.checkpoint.verify)
      self._policy_cache = {round_index: self._full_params(round_index, trainable)}
    return self._policy_cache[round_index]

  def start_params(self, round_index: int) -> Any:
    """What round ``round_index`` trains from: the base, or the previous round's model."""
    return self.base_params if self.config.loop.restart_from_base else \
        self.policy_params(round_index - 1)

  def _full_params(self, round_index: int, trainable: Any) -> Any:
    cfg = self._lora_config()
    if cfg is None:
      return trainable
    return lora.merge(self.start_params(round_index), trainable, cfg)

  def _lora_config(self) -> lora.LoraConfig | None:
    c = self.config.train.lora
    if c.rank == 0:
      return None
    targets = {"attention": lora.ATTENTION_TARGETS, "all_linear": lora.ALL_LINEAR_TARGETS}
    return lora.LoraConfig(rank=c.rank, alpha=c.alpha, targets=targets.get(c.targets, c.targets))

  def _for_sampling(self, params: Any) -> Any:
    return jax.device_put(params, param_shardings(self.model_config, self.mesh, sh.SAMPLE_RULES))

  # -- sampling and scoring helpers ----------------------------------------------------------

  def _sampler(self, params: Any, max_new_tokens: int | None = None) -> Sampler:
    return Sampler(self.sample_model, self._for_sampling(params), self.tokenizer,
                   max_new_tokens=max_new_tokens or self.config.sample.max_new_tokens,
                   batch_size=self.config.sample.batch_size, prompt_buckets=PROMPT_BUCKETS)

  def _generate(self, sampler: Sampler, examples: Sequence[dict], prompt_ids: Sequence[list[int]],
                num_samples: int, temperature: float, key: jax.Array, desc: str,
                **columns) -> list[dict]:
    """Samples ``num_samples`` per prompt in groups of ``sample.batch_size``; rows grouped by
    prompt in input order."""
    c = self.config.sample
    rows = []
    bar = tqdm.tqdm(total=len(prompt_ids) * num_samples, desc=desc, unit="sample", leave=False,
                    disable=not (self.bars and self.writer))
    for chunk, start in enumerate(range(0, len(prompt_ids), c.batch_size)):
      ids = prompt_ids[start:start + c.batch_size]
      out = sampler(ids, num_samples, rng=jax.random.fold_in(key, chunk), temperature=temperature,
                    top_k=c.top_k, top_p=c.top_p)
      for b in range(len(ids)):
        example = examples[start + b]
        for n in range(num_samples):
          tokens = out.tokens[b][n]
          rows.append({
              **columns, "prompt_id": example["id"], "sample_index": n,
              "temperature": temperature, "completion": out.texts[b][n], "tokens": tokens,
              "length": len(tokens), "finish_reason": out.finish_reasons[b][n],
              "sampler_logprob": float(np.sum(out.sampler_logprobs[b][n])),
              "model_logprob": float(np.sum(out.model_logprobs[b][n])),
              "sampler_logprobs": out.sampler_logprobs[b][n].tolist()})
      bar.update(len(ids) * num_samples)
    bar.close()
    return rows

  def _score_rows(self, params: Any, rows: Sequence[dict], prompt_ids: dict[str, list[int]]
                  ) -> Any:
    """``scoring.Scores`` (NumPy, one row per sample) of each completion under ``params``."""
    return self_reward.score_completions(
        self.sample_model, self._for_sampling(params), [prompt_ids[r["prompt_id"]] for r in rows],
        [r["tokens"] for r in rows], batch_size=self.config.score.batch_size)

  def _grade(self, rows: Sequence[dict], by_id: dict[str, dict]) -> None:
    """Ground-truth verdicts (``extracted``, ``correct``) of every row; each process grades
    its block of the rows (code runs in the sandbox there) and the verdicts are gathered."""
    def grade(row):
      verdict = self.task.grade(by_id[row["prompt_id"]], row["completion"])
      return verdict.extracted, bool(verdict.correct)
    for r, (extracted, correct) in zip(rows, multihost.map_blocks(grade, rows)):
      r["extracted"], r["correct"] = extracted, correct

  def _base_scores(self, rows: Sequence[dict], prompt_ids: dict[str, list[int]]) -> None:
    scores = self._score_rows(self.base_params, rows, prompt_ids)
    for i, r in enumerate(rows):
      r["base_logprob"] = float(scores.sum_logprob_B[i])
      r["base_mean_logprob"] = float(scores.mean_logprob_B[i])
      r["base_self_certainty"] = float(scores.self_certainty_B[i])

  def _rewards(self, rows: Sequence[dict], params: Any, prompt_ids: dict[str, list[int]],
               prompt_texts: dict[str, str]) -> list[float | None]:
    """The configured reward of every row (None: no reward, never selected)."""
    c = self.config.score
    if c.reward in ("logprob", "mean_logprob", "self_certainty"):
      if c.reward_model == "base":
        column = {"logprob": "base_logprob", "mean_logprob": "base_mean_logprob",
                  "self_certainty": "base_self_certainty"}[c.reward]
        return [r[column] for r in rows]
      return self_reward.rewards_from_scores(self._score_rows(params, rows, prompt_ids), c.reward)
    if c.reward == "correct":
      return [float(r["correct"]) for r in rows]
    if c.reward == "majority":
      votes = {}
      for r in rows:
        votes.setdefault(r["prompt_id"], []).append(r["extracted"])
      winner = {pid: voting.majority_vote(answers) for pid, answers in votes.items()}
      return [float(r["extracted"] is not None and r["extracted"] == winner[r["prompt_id"]])
              for r in rows]
    judge_params = self._for_sampling(self.base_params if c.reward_model == "base" else params)
    template, labels = c.judge.template, tuple(c.judge.labels)
    if self.config.task.name == "synthetic_addition" and not template:
      # The character vocabulary has no words: judge "<question><answer> >" by digit labels.
      template = "{prompt}{completion} >"
      labels = labels or (("1", "0") if c.judge.kind == "yes_no" else tuple("012345"))
    kwargs = {"template": template} if template else {}
    if c.judge.kind == "yes_no":
      if labels:
        kwargs.update(yes=labels[0], no=labels[1])
      judge = YesNoJudge(self.sample_model, judge_params, self.tokenizer, **kwargs)
    else:
      if labels:
        kwargs["scores"] = {label: float(label.strip()) for label in labels}
      judge = RubricJudge(self.sample_model, judge_params, self.tokenizer, **kwargs)
    return judge([prompt_texts[r["prompt_id"]] for r in rows], [r["completion"] for r in rows])

  def _round_prompts(self, index: int) -> list[dict]:
    """Global batch ``index`` of the shuffled, repeating train-prompt stream. Each process reads
    its own block (``pipeline.global_batches``); the blocks are gathered in process order, so the
    batch is the same on any number of processes."""
    if not hasattr(self, "_prompt_ds"):
      self._prompt_ds = pipeline.global_batches(
          len(self.train_examples), batch_size=self.config.loop.prompts_per_round,
          seed=self.config.seed)
    indices = multihost.allgather_objects(self._prompt_ds[index].tolist())
    return [self.train_examples[i] for i in indices]

  def _prompt_maps(self, examples: Sequence[dict]):
    ids = {e["id"]: self.encode(e) for e in examples}
    texts = {e["id"]: self.task.render(e, shots=self.config.task.shots, family=self.chat_family)
             for e in examples}
    return ids, texts, {e["id"]: e for e in examples}

  def _table_path(self, round_index: int) -> epath.Path:
    return self.round_dir(round_index) / "samples.jsonl"

  def _write_round_table(self, round_index: int, rows: Sequence[dict]) -> None:
    if self.writer:
      self.round_dir(round_index).mkdir(parents=True, exist_ok=True)
      write_table(self._table_path(round_index), rows)
    self._table = (round_index, list(rows))

  def _read_round_table(self, round_index: int) -> list[dict]:
    if getattr(self, "_table", (None,))[0] == round_index:
      return self._table[1]
    return read_table(self._table_path(round_index))

  # -- offline stages ------------------------------------------------------------------------

  def stage_sample(self, r: int) -> None:
    c = self.config.sample
    examples = self._round_prompts(r - 1)
    ids, _, _ = self._prompt_maps(examples)
    prompt_ids = [ids[e["id"]] for e in examples]
    temperatures = ((loop_config.temperature(self.config, r),) if self.config.select.kind != "balance"
                    else tuple(self.config.select.temperatures))
    sources = {"current": ("current",), "base": ("base",), "both": ("current", "base")}[c.model]
    rows = []
    for t_index, t in enumerate(temperatures):
      for source in sources:
        params = self.policy_params(r - 1) if source == "current" else self.base_params
        key = jax.random.fold_in(self.key(r, "sample", t_index), sources.index(source))
        rows += self._generate(self._sampler(params), examples, prompt_ids, c.num_samples, t, key,
                               f"round {r} sample ({source}, T={t})", round=r, source=source)
    # Rows of one prompt together (the table is grouped by prompt), stable within a prompt.
    order = {e["id"]: i for i, e in enumerate(examples)}
    rows.sort(key=lambda row: order[row["prompt_id"]])
    self._write_round_table(r, rows)
    self._mark_done(r, "sample")

  def stage_score(self, r: int) -> None:
    rows = self._read_round_table(r)
    examples = self._round_prompts(r - 1)
    ids, texts, by_id = self._prompt_maps(examples)
    self._grade(rows, by_id)
    if self.config.sample.rationalize:
      rows = rows + self._rationalize(r, rows, examples, by_id)
    self._base_scores(rows, ids)
    for row, reward in zip(rows, self._rewards(rows, self.policy_params(r - 1), ids, texts)):
      row["reward"] = reward
    self._write_round_table(r, rows)
    self.log(r, "score", self.progress.global_step(r), {
        "reward": _nanmean([row["reward"] for row in rows]),
        "correct": _nanmean([row["correct"] for row in rows]),
        "base_logprob": _nanmean([row["base_logprob"] for row in rows]),
        "length": _nanmean([row["length"] for row in rows])})
    self._mark_done(r, "score")

  def _rationalize(self, r: int, rows: Sequence[dict], examples: Sequence[dict],
                   by_id: dict[str, dict]) -> list[dict]:
    """STaR: one hinted sample for every prompt without a correct sample; the hint is dropped
    from the prompt the rationale is trained on."""
    solved = {row["prompt_id"] for row in rows if row["correct"]}
    failed = [e for e in examples if e["id"] not in solved]
    if not failed:
      return []
    hint_ids = []
    for e in failed:
      try:
        hinted = dict(e, question=self.config.sample.hint_template.format(**e))
      except KeyError as err:
        raise ValueError(f"config.sample.hint_template={self.config.sample.hint_template!r}: "
                         f"examples have no field {err}") from None
      hint_ids.append(self.encode(hinted))
    extra = self._generate(self._sampler(self.policy_params(r - 1)), failed, hint_ids, 1,
                           loop_config.temperature(self.config, r), self.key(r, "rationalize"),
                           f"round {r} rationalize", round=r, source="rationalization")
    self._grade(extra, by_id)
    return extra

  def stage_select(self, r: int) -> None:
    c = self.config.select
    rows = self._read_round_table(r)
    group = np.array([row["prompt_id"] for row in rows])
    reward = np.array([np.nan if row["reward"] is None else row["reward"] for row in rows], float)
    correct = np.array([bool(row["correct"]) for row in rows])
    keys = self._dedup_keys(rows)
    chosen = self._balance(rows, group, reward, correct) if c.kind == "balance" else {}
    pairs = np.zeros((0, 2), np.int64)
    if c.kind in ("top1", "topk"):
      picked = sel.top_k(group, reward, 1 if c.kind == "top1" else c.k, keys_R=keys)
    elif c.kind in ("threshold", "balance"):
      threshold = chosen.get("threshold", loop_config.scheduled(c.threshold_schedule, r, c.threshold))
      keep = (reward >= threshold) & chosen.get("mask", True)
      keep &= correct if c.require_correct else True
      picked = sel.where(group, keep, max_per_group=c.k, keys_R=keys)
    elif c.kind == "all_correct":
      picked = sel.where(group, correct, max_per_group=c.k, keys_R=keys)
    elif c.kind == "best_worst":
      pairs = sel.best_worst_pairs(group, reward, min_margin=c.min_margin)
    elif c.kind == "base_pairs":
      pairs = sel.consecutive_pairs(group)
    else:  # xpo_pairs
      pairs = sel.cross_pairs(group, np.array([row["source"] == "current" for row in rows]))
    if len(pairs):
      picked = np.unique(pairs)
    for row in rows:
      row["selected"], row["pair"], row["pair_role"] = False, None, None
    for i in picked:
      rows[i]["selected"] = True
    for p, (a, b) in enumerate(pairs):
      rows[a]["pair"], rows[a]["pair_role"] = p, "first"
      rows[b]["pair"], rows[b]["pair_role"] = p, "second"
    self._write_round_table(r, rows)
    self.log(r, "select", self.progress.global_step(r), {
        "num_selected": int(len(picked)), "num_pairs": int(len(pairs)),
        "selected_correct": _nanmean([row["correct"] for row in rows if row["selected"]]),
        "selected_base_logprob": _nanmean([row["base_logprob"] for row in rows if row["selected"]]),
        **{k: v for k, v in chosen.items() if k != "mask"}})
    self._mark_done(r, "select")

  def _dedup_keys(self, rows: Sequence[dict]) -> list | None:
    mode = self.config.select.dedup
    if mode == "none":
      return None
    return [row["completion"] if mode == "exact" else row["extracted"] for row in rows]

  def _balance(self, rows, group, reward, correct) -> dict:
    """B-STaR: the (temperature, threshold) with the best mean balance score this round."""
    c = self.config.select
    temps = np.array([row["temperature"] for row in rows])
    keys = [row["completion"] for row in rows]
    best = None
    for t in c.temperatures:
      mask = temps == t
      for tau in c.thresholds:
        chosen = mask & (reward >= tau) & (correct if c.require_correct else True)
        score = sel.balance_score(group[mask], chosen[mask], correct[mask],
                                  [k for k, m in zip(keys, mask) if m], c.n_star)
        if best is None or score > best["balance_score"]:
          best = {"temperature": float(t), "threshold": float(tau), "balance_score": score,
                  "mask": mask}
    return best

  # -- training ------------------------------------------------------------------------------

  def _fresh_state(self, params: Any, total_steps: int, reference: Any, abstract: bool = False):
    """(state, optimizer, schedule) for a stage of ``total_steps`` updates from ``params``."""
    optimizer, schedule = self._optimizer(total_steps)
    if abstract:
      return None, optimizer, schedule
    state = create_train_state(self.model_config, optimizer, self.key(0, "train"), mesh=self.mesh,
                               params=params, lora_config=self._lora_config(),
                               reference_params=reference)
    return state, optimizer, schedule

  def _optimizer(self, total_steps: int):
    """The optimizer and schedule, one object per distinct schedule so the step compiles once."""
    c = self.config.train.optimizer
    total = max(total_steps, 1) if c.schedule != "constant" else None
    spec = (c.schedule, c.learning_rate, total, c.warmup_steps, c.max_grad_norm)
    if spec not in _OPTIMIZERS:
      schedule = make_schedule(c.schedule, c.learning_rate, total_steps=total,
                               warmup_steps=c.warmup_steps)
      _OPTIMIZERS[spec] = (make_optimizer(schedule, max_grad_norm=c.max_grad_norm or None), schedule)
    return _OPTIMIZERS[spec]

  def _state_shardings(self, optimizer, frozen_keys=()):
    return state_shardings(self.model_config, optimizer, self.mesh, sh.TRAIN_RULES,
                           lora_config=self._lora_config(), frozen_keys=frozen_keys)

  def _saved_target(self) -> Any:
    """Abstract tree (with shardings) of a round's saved trainable params."""
    _, optimizer, _ = self._fresh_state(None, 1, None, abstract=True)
    shards = self._state_shardings(optimizer).params
    shapes = jax.eval_shape(lambda p: self._trainable_of(p), self.base_params)
    return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes,
                        shards)

  def _trainable_of(self, params):
    cfg = self._lora_config()
    if cfg is None:
      return params
    from selfimprove_jax.models.transformer import param_logical_names  # pylint: disable=g-import-not-at-top
    return lora.init_lora(params, cfg, jax.random.key(0),
                          base_names=param_logical_names(self.model_config))

  def _train_state_dir(self, r: int, step: int) -> epath.Path:
    return self.round_dir(r) / "train_state" / f"step_{step:06d}"

  def _latest_train_checkpoint(self, r: int) -> int | None:
    root = self.round_dir(r) / "train_state"
    if not root.exists():
      return None
    steps = [int(p.name[5:]) for p in root.iterdir()
             if p.name.startswith("step_") and trees.exists(p)]
    return max(steps) if steps else None

  def _save_train_state(self, r: int, state, step: int) -> None:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}
    self._flush_metrics()  # a resume from this checkpoint keeps the records up to it
    trees.save_tree(self._train_state_dir(r, step), tree, meta={"round": r, "round_step": step})
    if self.writer:
      for p in (self.round_dir(r) / "train_state").iterdir():
        if p.name.startswith("step_") and p.name != f"step_{step:06d}":
          p.rmtree()

  def _restore_train_state(self, r: int, state, step: int):
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}
    got = trees.restore_tree(self._train_state_dir(r, step), tree,
                             check=self.config.checkpoint.verify)
    return state.replace(step=got["step"], params=got["params"], opt_state=got["opt_state"],
                         rng=jax.random.wrap_key_data(got["rng"]))

  def _make_step(self, optimizer, schedule, frozen_keys):
    """The jitted update step, shared by every round (and every loop of this process) with the
    same model, loss and optimizer, so it compiles once."""
    c = self.config.train
    loss = make_loss(c.loss, **loop_config.loss_options(self.config))
    key = (self.train_model, loss, id(optimizer), tuple(frozen_keys), c.num_microbatches,
           self._lora_config(), c.compute_dtype, c.remat)
    if key not in _STEPS:
      _STEPS[key] = make_update_step(
          self.train_model, loss, optimizer, schedule=schedule,
          state_shardings=self._state_shardings(optimizer, frozen_keys),
          num_microbatches=c.num_microbatches, lora_config=self._lora_config(),
          compute_dtype=c.compute_dtype or None, remat=c.remat or None, mesh=self.mesh)
    return _STEPS[key]

  def _pack(self, prompt: list[int], completion: list[int]) -> tuple[np.ndarray, ...]:
    L = self.seq_len
    ids = (prompt + completion)[:L]
    tokens = np.full(L, self.tokenizer.pad_id, np.int32)
    input_mask, loss_mask = np.zeros(L, bool), np.zeros(L, bool)
    tokens[:len(ids)], input_mask[:len(ids)] = ids, True
    loss_mask[len(prompt):len(ids)] = True
    return tokens, input_mask, loss_mask

  def _offline_examples(self, r: int, rows: list[dict]) -> list[dict]:
    """One dict of arrays per training example (a sequence, or a pair stacked on axis 0)."""
    ids, _, _ = self._prompt_maps(self._round_prompts(r - 1))
    pairs = self.config.train.loss in loop_config.PAIR_LOSSES
    if not pairs:
      out = []
      for row in rows:
        if row["selected"]:
          t, im, lm = self._pack(ids[row["prompt_id"]], row["tokens"])
          out.append({"tokens_BxL": t, "input_mask_BxL": im, "loss_mask_BxL": lm})
      return out
    by_pair = {}
    for row in rows:
      if row["pair"] is not None:
        by_pair.setdefault(row["pair"], {})[row["pair_role"]] = row
    ref = None
    if self.config.train.loss == "dpo" and self.config.train.reference == "round_start":
      flat = [row for p in sorted(by_pair) for row in (by_pair[p]["first"], by_pair[p]["second"])]
      ref = self._score_rows(self.start_params(r), flat, ids).sum_logprob_B.reshape(-1, 2)
    out = []
    for i, p in enumerate(sorted(by_pair)):
      first, second = by_pair[p]["first"], by_pair[p]["second"]
      packed = [self._pack(ids[first["prompt_id"]], x["tokens"]) for x in (first, second)]
      base = np.array([first["base_logprob"], second["base_logprob"]], np.float32)
      out.append({"tokens_Bx2xL": np.stack([x[0] for x in packed]),
                  "input_mask_Bx2xL": np.stack([x[1] for x in packed]),
                  "loss_mask_Bx2xL": np.stack([x[2] for x in packed]),
                  "base_logps_Bx2": base,
                  "ref_logps_Bx2": base if ref is None else ref[i].astype(np.float32)})
    return out

  def _batch(self, examples: list[dict], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Stacks ``examples[indices]``, filling to ``train.batch_size`` with loss-free copies."""
    B = self.config.train.batch_size
    chosen = [examples[i] for i in indices]
    filler = dict(chosen[0])
    for k in filler:
      if k.startswith("loss_mask"):
        filler[k] = np.zeros_like(filler[k])
    chosen += [filler] * (B - len(chosen))
    return {k: np.stack([e[k] for e in chosen]) for k in chosen[0]}

  def stage_train(self, r: int) -> None:
    if self.config.loop.mode == "online":
      return self._train_online(r)
    rows = self._read_round_table(r)
    examples = self._offline_examples(r, rows)
    c = self.config.train
    per_epoch = -(-len(examples) // c.batch_size)
    total = per_epoch * c.epochs
    start = self.start_params(r)
    if total == 0:  # nothing selected: the round's model is its starting model
      trees.save_tree(self.round_dir(r) / "params", self._trainable_of(start) if
                      self._lora_config() else start, meta={"round": r, "steps": 0})
      self.log(r, "train", self.progress.global_step(r), {"num_examples": 0})
      self._mark_done(r, "train", train_steps=0)
      return
    state, optimizer, schedule = self._fresh_state(start, total, None)
    step_fn = self._make_step(optimizer, schedule, tuple(state.frozen or {}))
    done = self._latest_train_checkpoint(r) or 0
    if done:
      state = self._restore_train_state(r, state, done)
    rng = np.random.default_rng([self.config.seed, r, STAGE_IDS["train"]])
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(c.epochs)])
    offset = self.progress.global_step(r)
    bar = tqdm.trange(done, total, desc=f"round {r} train", unit="step", leave=False,
                      disable=not (self.bars and self.writer))
    for i in bar:
      batch = self._batch(examples, self._epoch_slice(order, i, per_epoch, len(examples)))
      state, m = run_step(step_fn, state, batch)
      bar.set_postfix(loss=f"{m['loss']:.3f}")
      self.log(r, "train", offset + i + 1, m, round_step=i + 1)
      if (i + 1) % self.config.checkpoint.every_steps == 0 or i + 1 == total:
        self._save_train_state(r, state, i + 1)
    bar.close()
    self._finish_train(r, state.params, total)

  def _epoch_slice(self, order: np.ndarray, i: int, per_epoch: int, n: int) -> np.ndarray:
    epoch, j = divmod(i, per_epoch)
    B = self.config.train.batch_size
    return order[epoch * n:(epoch + 1) * n][j * B:(j + 1) * B]

  def _finish_train(self, r: int, trainable: Any, total: int) -> None:
    trees.save_tree(self.round_dir(r) / "params", trainable, meta={"round": r, "steps": total})
    self._policy_cache = {r: self._full_params(r, trainable)}
    if self.writer and (self.round_dir(r) / "train_state").exists():
      (self.round_dir(r) / "train_state").rmtree()
    self._mark_done(r, "train", train_steps=total)

  def _train_online(self, r: int) -> None:
    """``train.steps`` RL steps: sample a group per prompt from the current model, reward,
    group-relative advantages, one update; each step's samples land in samples/step_*.jsonl."""
    c, steps = self.config, self.config.train.steps
    G = c.sample.num_samples
    start = self.start_params(r)
    reference = self.base_params if (loop_config.loss_options(c).get("reference") == "params"
                                     and self._lora_config() is None) else None
    state, optimizer, schedule = self._fresh_state(start, steps, reference)
    step_fn = self._make_step(optimizer, schedule, tuple(state.frozen or {}))
    done = self._latest_train_checkpoint(r) or 0
    if done:
      state = self._restore_train_state(r, state, done)
    parts = self.round_dir(r) / "samples"
    if self.writer:
      parts.mkdir(parents=True, exist_ok=True)
      for p in parts.iterdir():  # steps after the checkpoint are redone
        if p.name.startswith("step_") and p.name.endswith(".jsonl") and int(p.stem[5:]) > done:
          p.unlink()
    offset = self.progress.global_step(r)
    bar = tqdm.trange(done, steps, desc=f"round {r} RL", unit="step", leave=False,
                      disable=not (self.bars and self.writer))
    for i in bar:
      params = self._full_params(r, state.params) if self._lora_config() else state.params
      examples = self._round_prompts((r - 1) * steps + i)
      ids, texts, by_id = self._prompt_maps(examples)
      temperature = loop_config.temperature(c, r)
      rows = self._generate(self._sampler(params), examples, [ids[e["id"]] for e in examples], G,
                            temperature, self.key(r, "train", i), f"step {i + 1} sample",
                            round=r, step=i + 1, source="current")
      self._grade(rows, by_id)
      self._base_scores(rows, ids)
      rewards = self._rewards(rows, params, ids, texts)
      rewards = np.array([0.0 if x is None else x for x in rewards], np.float32)
      adv, std = group_advantages(rewards, G, estimator=c.train.advantage.estimator,
                                  scale=c.train.advantage.scale)
      for row, reward, a in zip(rows, rewards, np.asarray(adv)):
        row["reward"], row["advantage"], row["selected"] = float(reward), float(a), True
      packed = [self._pack(ids[row["prompt_id"]], row["tokens"]) for row in rows]
      batch = {"tokens_BxL": np.stack([p[0] for p in packed]),
               "input_mask_BxL": np.stack([p[1] for p in packed]),
               "loss_mask_BxL": np.stack([p[2] for p in packed]),
               "advantages_B": np.asarray(adv, np.float32), "rewards_B": rewards,
               "reward_group_std_B": np.asarray(std, np.float32),
               "truncated_B": np.array([row["finish_reason"] == "length" for row in rows])}
      state, m = run_step(step_fn, state, batch)
      m.update(correct=_nanmean([row["correct"] for row in rows]),
               base_logprob=_nanmean([row["base_logprob"] for row in rows]))
      bar.set_postfix(reward=f"{m['reward']:.3f}")
      if self.writer:
        write_table(parts / f"step_{i + 1:05d}.jsonl", rows)
      self.log(r, "train", offset + i + 1, m, round_step=i + 1)
      if (i + 1) % c.checkpoint.every_steps == 0 or i + 1 == steps:
        self._save_train_state(r, state, i + 1)
    bar.close()
    self._finish_train(r, state.params, steps)

  # -- evaluation ----------------------------------------------------------------------------

  def stage_eval(self, r: int) -> None:
    """Greedy and T=1 samples on the held-out prompts, scored under the base model."""
    c = self.config.eval
    examples = self.eval_examples
    if not examples:
      self._mark_done(r, "eval")
      return
    ids, _, by_id = self._prompt_maps(examples)
    prompt_ids = [ids[e["id"]] for e in examples]
    sampler = self._sampler(self.policy_params(r), c.max_new_tokens or None)
    greedy = self._generate(sampler, examples, prompt_ids, 1, 0.0, self.key(r, "eval", 0),
                            f"round {r} eval greedy", round=r, kind="greedy")
    t1 = self._generate(sampler, examples, prompt_ids, c.num_samples, c.temperature,
                        self.key(r, "eval", 1), f"round {r} eval T={c.temperature}", round=r,
                        kind="sample")
    rows = greedy + t1
    self._grade(rows, by_id)
    self._base_scores(rows, ids)
    if self.writer:
      self.round_dir(r).mkdir(parents=True, exist_ok=True)
      write_table(self.round_dir(r) / "eval_samples.jsonl", rows)
    result = eval_metrics(rows, c.num_samples, tuple(c.bon_k))
    if self.writer:
      atomic_write(self.round_dir(r) / "eval.json", json.dumps(result, indent=1))
    # Other processes must not read eval.json before process 0 has written it.
    self._eval_cache[r] = json.loads(json.dumps(result))
    self.log(r, "eval", self.progress.global_step(r + 1), _flatten(result, ""))
    self._mark_done(r, "eval")

  def write_summary(self, started: float) -> dict:
    """``summary.json``: held-out metrics of the base (round 0) and of the last round's model,
    and ``runtime_s``, the wall time of the invocation that finished the run."""
    keys = ("greedy_acc", "t1_acc", "mean_base_logprob_t1", "bon_logprob")
    pick = lambda r: {k: v for k, v in self.eval_result(r).items() if k in keys}
    summary = {"heldout": {"base": pick(0), "sharpened": pick(self.config.loop.num_rounds)},
               "runtime_s": round(time.time() - started, 1)}
    atomic_write(self.workdir / "summary.json", json.dumps(summary, indent=1))
    return summary

  def _evals(self) -> list[tuple[int, str]]:
    return [(int(r), "eval") for r, stages in self.progress.completed.items() if "eval" in stages]

  def eval_result(self, round_index: int) -> dict:
    """Round ``round_index``'s held-out metrics (``eval.json``)."""
    if round_index not in self._eval_cache:
      self._eval_cache[round_index] = json.loads(
          (self.round_dir(round_index) / "eval.json").read_text())
    return self._eval_cache[round_index]


def eval_metrics(rows: Sequence[dict], num_samples: int, bon_k: Sequence[int]) -> dict:
  """Held-out metrics from an eval table: greedy accuracy, T=1 accuracy (pass@1), pass@k, maj@k,
  best-of-k by the base model's log-prob, mean log-prob and self-certainty (exact estimators), and
  the mean base log-prob of T=1 samples."""
  greedy = [r for r in rows if r["kind"] == "greedy"]
  samples = [r for r in rows if r["kind"] == "sample"]
  by_prompt = {}
  for r in samples:
    by_prompt.setdefault(r["prompt_id"], []).append(r)
  column = lambda name: np.array([[s[name] for s in v] for v in by_prompt.values()], float)
  correct_PxN, logp_PxN = column("correct"), column("base_logprob")
  n_P = np.full(len(by_prompt), num_samples)
  bon = lambda scores_PxN, k: float(np.mean(estimators.bon_at_k_batch(scores_PxN, correct_PxN, k)))

  def maj(k: int) -> float:
    per_prompt = []
    for v in by_prompt.values():
      truth = {}
      for s in v:
        truth.setdefault(s["extracted"], bool(s["correct"]))
      per_prompt.append(estimators.maj_at_k([s["extracted"] for s in v], truth, k,
                                            exact_limit=2_000, num_subsets=1_000))
    return float(np.mean(per_prompt))

  return {
      "greedy_acc": float(np.mean([r["correct"] for r in greedy])),
      "t1_acc": float(correct_PxN.mean()),
      "mean_base_logprob_t1": float(logp_PxN.mean()),
      "mean_length_t1": float(np.mean([r["length"] for r in samples])),
      "pass": {str(k): float(np.mean(estimators.pass_at_k(n_P, correct_PxN.sum(1), k)))
               for k in bon_k},
      "bon_logprob": {str(k): bon(logp_PxN, k) for k in bon_k},
      "bon_mean_logprob": {str(k): bon(column("base_mean_logprob"), k) for k in bon_k},
      "bon_self_certainty": {str(k): bon(column("base_self_certainty"), k) for k in bon_k},
      "maj": {str(k): maj(k) for k in bon_k},
      "num_prompts": len(by_prompt),
  }


def _nanmean(values: Sequence[Any]) -> float:
  arr = np.array([np.nan if v is None else float(v) for v in values], float)
  return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else float("nan")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        stop_after: str | None = None, started: float | None = None, **kwargs) -> dict:
  """``Loop(config, workdir).run()``: every pending stage, resuming where a previous run stopped."""
  started = time.time() if started is None else started
  return Loop(config, workdir, **kwargs).run(stop_after=stop_after, started=started)
