"""The run context: everything a stage needs that does not change during a run, built once.

``build(config, workdir)`` validates the config, checks the workdir, and loads the task, the
tokenizer and the model; stages, the training modes and the driver take the resulting frozen
``Context``. Its only lazily computed parts are the base parameters (the synthetic base is
pretrained on first use and cached in ``base/``) and the caches of round models and compiled
steps, which never change what a stage computes.

Everything random is a pure function of (seed, round, stage, step): ``Context.key``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import ml_collections
from jax.sharding import Mesh

from selfimprove_jax import multihost, profiling
from selfimprove_jax import scoring
from selfimprove_jax import sharding as sh
from selfimprove_jax.checkpoint import trees
from selfimprove_jax.data import get_task, pipeline, synthetic
from selfimprove_jax.data.tasks import Task
from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.loop.workdir import Workdir, check_workdir, commit
from selfimprove_jax.models import Transformer, TransformerConfig, get_preset, init_params
from selfimprove_jax.models.transformer import param_shardings
from selfimprove_jax.families import FAMILIES
from selfimprove_jax.tokenizer import Tokenizer
from selfimprove_jax.tokenizer.hf_tokenizer import special_tokens
from selfimprove_jax.tokenizer.template import ChatTemplate, read_template
from selfimprove_jax.training import lora

STAGE_IDS = {"sample": 1, "score": 2, "select": 3, "train": 4, "eval": 5, "rationalize": 6,
             "pretrain": 7, "balance": 8}
_LORA_TARGETS = {"attention": lora.ATTENTION_TARGETS, "all_linear": lora.ALL_LINEAR_TARGETS}


@dataclasses.dataclass(frozen=True)
class Prompts:
  """A batch of examples as the stages use them, keyed by example id: token ids (BOS included),
  rendered text, and the example itself (for grading)."""

  ids: dict[Any, list[int]]
  texts: dict[Any, str]
  examples: dict[Any, dict]


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
  """A run's fixed parts.

  ``train_model`` runs on ``mesh``; ``sample_model`` (sampling, scoring, judging) on
  ``sample_mesh``, the same devices with the fsdp axis folded into tensor by default
  (``sample.mesh``). ``score_lengths``: the (prompt, completion) lengths every
  scoring call pads to, so scoring compiles once per run. ``model_config.dtype`` is the compute
  dtype and
  ``param_dtype`` the stored one: float32 master weights for full fine-tuning, the compute dtype
  for a frozen LoRA base. ``seq_len`` is the padded training length L. ``caches`` holds round
  models, compute-dtype copies and compiled steps (``policies``, ``rollouts``, ``updates``).
  """

  config: ml_collections.ConfigDict
  workdir: Workdir
  writer: bool
  progress_bars: bool
  mesh: Mesh
  sample_mesh: Mesh
  task: Task
  train_examples: list[dict]
  eval_examples: list[dict]
  model_config: TransformerConfig
  tokenizer: Tokenizer
  chat: str | ChatTemplate | None
  sample_model: Transformer
  train_model: Transformer
  encode: Callable[[dict], list[int]]
  seq_len: int
  score_lengths: tuple[int, int]
  lora: lora.LoraConfig | None
  prompt_stream: grain.MapDataset
  checkpoint_params: Any = None  # model.source=hf | native: the loaded base
  caches: dict[str, Any] = dataclasses.field(
      default_factory=lambda: {"policy": {}, "optimizer": {}, "step": {}, "sampling": {}})

  @property
  def bars(self) -> bool:
    """Show progress bars (process 0 only)."""
    return self.progress_bars and self.writer

  @functools.cached_property
  def base_params(self) -> Any:
    """The base model's parameters (train shardings), built on first use."""
    if self.checkpoint_params is not None:
      return self.checkpoint_params
    if self.config.model.source == "synthetic":
      return _synthetic_base(self)
    return init_params(self.model_config, jax.random.key(self.config.seed), self.mesh,
                       sh.TRAIN_RULES)

  @functools.cached_property
  def profiler(self) -> profiling.Profiler:
    """The run's ``jax.profiler`` window (``profile.*``; every process traces its own host)."""
    p = self.config.profile
    return profiling.Profiler(self.workdir.root / "tensorboard", p.start_step, p.num_steps)

  def key(self, round_index: int, stage: str, step: int = 0) -> jax.Array:
    """The key of (seed, round, stage, step): a stage redone after a crash draws the same."""
    key = jax.random.fold_in(jax.random.key(self.config.seed), round_index)
    return jax.random.fold_in(jax.random.fold_in(key, STAGE_IDS[stage]), step)

  def round_prompts(self, index: int) -> list[dict]:
    """Global batch ``index`` of the shuffled, repeating train-prompt stream. Each process reads
    its own block (``pipeline.global_batches``); the blocks are gathered in process order, so the
    batch is the same on any number of processes."""
    indices = multihost.allgather_objects(self.prompt_stream[index].tolist())
    return [self.train_examples[i] for i in indices]

  def prompts(self, examples: Sequence[dict]) -> Prompts:
    c = self.config.task
    return Prompts(
        ids={e["id"]: self.encode(e) for e in examples},
        texts={e["id"]: self.task.render(e, shots=c.shots, chat=self.chat)
               for e in examples},
        examples={e["id"]: e for e in examples})


def build(config: ml_collections.ConfigDict, workdir: str | Any, *,
          progress_bars: bool = True) -> Context:
  """Checks ``config`` and ``workdir`` and loads the task and model (nothing is written)."""
  loop_config.validate(config)
  wd = workdir if isinstance(workdir, Workdir) else Workdir.at(workdir)
  check_workdir(wd, config)
  mesh = sh.make_mesh(dict(config.mesh))
  sample_mesh = sh.sampling_mesh(mesh) if config.sample.mesh == "tensor" else mesh
  shards = mesh.shape[sh.DATA] * mesh.shape[sh.FSDP]
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
  task, train_examples, eval_examples = _load_task(config)
  c = config.train.lora
  lora_config = None if c.rank == 0 else lora.LoraConfig(
      rank=c.rank, alpha=c.alpha, targets=_LORA_TARGETS.get(c.targets, c.targets))
  model_config, tokenizer, chat, params = _load_model(config, mesh, lora_config is None)
  encode = pipeline.prompt_encoder(task, tokenizer, shots=config.task.shots, chat=chat)
  longest = max(len(encode(e)) for e in train_examples + eval_examples)
  max_new = max(config.sample.max_new_tokens, config.eval.max_new_tokens)
  seq_len = config.train.max_len or scoring.round_up(longest + max_new, 16)
  if longest + config.sample.max_new_tokens > seq_len:
    raise ValueError(f"config.train.max_len={seq_len}: prompts of up to {longest} tokens plus "
                     f"sample.max_new_tokens={config.sample.max_new_tokens} do not fit")
  return Context(
      config=config, workdir=wd, writer=multihost.is_writer(), progress_bars=progress_bars,
      mesh=mesh, sample_mesh=sample_mesh, task=task, train_examples=train_examples,
      eval_examples=eval_examples,
      model_config=model_config, tokenizer=tokenizer, chat=chat,
      sample_model=Transformer(model_config, sample_mesh, sh.SAMPLE_RULES),
      train_model=Transformer(model_config, mesh, sh.TRAIN_RULES), encode=encode,
      seq_len=seq_len, lora=lora_config, checkpoint_params=params,
      score_lengths=(scoring.length_bucket(longest), scoring.length_bucket(max_new)),
      prompt_stream=pipeline.global_batches(len(train_examples),
                                            batch_size=config.loop.prompts_per_round,
                                            seed=config.seed))


def _load_task(config: ml_collections.ConfigDict) -> tuple[Task, list[dict], list[dict]]:
  c = config.task
  task = get_task(c.name)
  need = c.num_train + c.num_eval
  if c.name == "synthetic_addition":
    s = config.model.synthetic
    add = synthetic.AdditionConfig(min_digits=s.min_digits, max_digits=s.max_digits,
                                   num_operands=s.num_operands)
    if s.regimes:  # the chosen regime's marker opens every prompt
      add = dataclasses.replace(add, marker=synthetic.parse_regimes(s.regimes)[c.regime].marker)
    # The pretraining stream uses seed = config.seed; prompts come from a disjoint stream.
    examples = task.load(need, seed=config.seed + 1_000_003, config=add)
  elif c.name == "arithmetic":  # generated: seeded by the run's seed
    examples = task.load(need, seed=config.seed + 1_000_003)
  else:
    kwargs = {}
    if c.name == "gsm8k":
      kwargs = dict(split=c.split, data_dir=c.data_dir or None)
    elif not c.path:
      raise ValueError(f"config.task.path='': task {c.name!r} reads its data from files")
    examples = task.load(c.path or None, **kwargs)
  if len(examples) < need:
    raise ValueError(f"config.task: {c.name!r} has {len(examples)} examples, fewer than "
                     f"task.num_train + task.num_eval = {need}")
  return task, list(examples[:c.num_train]), list(examples[c.num_train:need])


def _load_model(config: ml_collections.ConfigDict, mesh: Mesh, master: bool):
  """(model config, tokenizer, chat format or None, loaded params or None).

  Parameters are stored in float32 when they are trained in full (``master``: the optimizer's
  small updates must not round away) and in the compute dtype when they stay frozen (LoRA).
  """
  c = config.model
  param_dtype = "float32" if master else c.dtype
  params = None
  if c.source == "synthetic":
    s = c.synthetic
    model_config = TransformerConfig(
        family="llama3", vocab_size=32, embed_dim=s.embed_dim, num_layers=s.num_layers,
        num_heads=s.num_heads, num_kv_heads=s.num_heads, head_dim=s.head_dim, mlp_dim=s.mlp_dim,
        tie_embeddings=True, rope_theta=10_000.0, max_len=256, dtype=c.dtype,
        param_dtype=param_dtype)
    tokenizer, chat = synthetic.CharTokenizer(), None
  elif c.source in ("hf", "native"):
    from selfimprove_jax import checkpoint  # pylint: disable=g-import-not-at-top
    load = checkpoint.load_hf if c.source == "hf" else checkpoint.load_native
    path = checkpoint.resolve(c.checkpoint)
    model_config, params, tokenizer, template = load(path, mesh=mesh, rules=sh.TRAIN_RULES,
                                                     dtype=param_dtype)
    model_config = model_config.replace(dtype=c.dtype, param_dtype=param_dtype)
    chat = _chat_format(config, tokenizer, template, path)
  else:
    from selfimprove_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    model_config = get_preset(c.preset).replace(dtype=c.dtype, param_dtype=param_dtype)
    tokenizer = load_tokenizer(c.tokenizer)
    found = read_template(c.tokenizer) if os.path.isdir(c.tokenizer) else None
    chat = _chat_format(config, tokenizer, found and found[0], c.tokenizer)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"config.model: the tokenizer has {tokenizer.vocab_size} pieces but the "
                     f"model embeds only {model_config.vocab_size}")
  return model_config, tokenizer, chat, params


def _chat_format(config: ml_collections.ConfigDict, tokenizer: Tokenizer, template: str | None,
                 source: str) -> str | ChatTemplate | None:
  """What renders the prompts: None (plain text), a family name, or the checkpoint's template."""
  c = config.task
  if not c.chat:
    return None
  if c.chat_format != "checkpoint":
    return c.chat_format
  if template is None:
    raise ValueError(f"config.task.chat=True: {source} has no chat template (chat_template.jinja, "
                     "or chat_template in tokenizer_config.json); set config.task.chat_format to "
                     f"a family in {FAMILIES} to render with a built-in format")
  # The special-token strings as transformers passes them (tokenizer_config.json), else decoded.
  named = special_tokens(source) if os.path.isdir(source) else {}
  token = lambda key, i: named[key] if key in named else (
      None if i is None else tokenizer.decode([i]))
  return ChatTemplate(template, bos_token=token("bos_token", tokenizer.bos_id),
                      eos_token=token("eos_token", tokenizer.eos_id), origin=f"of {source}")


def _synthetic_base(ctx: Context) -> Any:
  """The synthetic base model: pretrained once on noisy demonstrations, cached in ``base/``."""
  shardings = param_shardings(ctx.model_config, ctx.mesh, sh.TRAIN_RULES)
  target = sh.abstract(jax.eval_shape(lambda: init_params(ctx.model_config, jax.random.key(0))),
                       shardings)
  if trees.exists(ctx.workdir.base):
    return trees.restore_tree(ctx.workdir.base, target, check=ctx.config.checkpoint.verify)
  s = ctx.config.model.synthetic
  if s.pretrain_steps > 0:
    from selfimprove_jax import synthetic_regime  # pylint: disable=g-import-not-at-top
    task = synthetic.AdditionConfig(min_digits=s.min_digits, max_digits=s.max_digits,
                                    num_operands=s.num_operands, corruption_rate=s.corruption_rate,
                                    corruption=s.corruption)
    if s.regimes:  # one base for every regime of the mixture, told apart by their markers
      task = list(synthetic.parse_regimes(s.regimes, task).values())
    params, _ = synthetic_regime.pretrain(
        task, model_config=ctx.model_config, steps=s.pretrain_steps,
        batch_size=s.pretrain_batch_size, learning_rate=s.pretrain_learning_rate,
        seed=ctx.config.seed, progress=ctx.bars)
    # Every process pretrained the same weights on its own devices; place them on the mesh.
    params = jax.device_put(jax.device_get(params), shardings)
  else:
    params = init_params(ctx.model_config, jax.random.key(ctx.config.seed), ctx.mesh,
                         sh.TRAIN_RULES)
  commit(ctx.workdir, ctx.config, ctx.writer)
  trees.save_tree(ctx.workdir.base, params, meta={"pretrain_steps": s.pretrain_steps})
  return params
