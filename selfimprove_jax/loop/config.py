"""Every key a loop config may set, with its default, and the checks that run before any work.

Method configs in ``configs/`` start from ``base_config()`` and override a few keys; the config is
locked, so a mistyped ``--config.x.y=v`` fails naming the key. ``model``, ``task`` and ``mesh`` are
independent sections: any method runs on any model and task.

Sections:
  model       where the base model comes from (the synthetic CPU model, an HF or native
              checkpoint, or a random preset) and its dtype.
  task        the benchmark, how many train / held-out prompts, the prompt format.
  mesh        device mesh sizes (``sharding.make_mesh``).
  loop        rounds, prompts per round, offline (sample → score → select → train) or online RL,
              restart from base or continue.
  sample      N samples per prompt, from the current or the base model, temperature schedule,
              STaR rationalization.
  score       the reward used for selection or RL: self-rewards, verifier, majority, judge.
  select      how the training set is built from the scored samples.
  train       loss and its options, optimizer, LoRA.
  eval        held-out evaluation after every round (greedy, T=1, best-of-k).
  checkpoint  how often the train state is saved inside a round, and checksum verification.
  metrics     optional Weights & Biases mirror of metrics.jsonl.
  profile     a window of update steps (and one sampling call) traced with jax.profiler.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from selfimprove_jax.checkpoint import fetch
from selfimprove_jax.data import synthetic
from selfimprove_jax.families import FAMILIES
from selfimprove_jax.loop import rewards, selectors
from selfimprove_jax.training import remat as remat_lib
from selfimprove_jax.loop.registry import check as _check
from selfimprove_jax.loop.registry import scheduled

MODEL_SOURCES = ("synthetic", "hf", "native", "preset")
MODES = ("offline", "online")
SAMPLE_MODELS = ("current", "base", "both")
SAMPLE_MESHES = ("tensor", "train")
REWARD_MODELS = rewards.MODELS
JUDGES = ("yes_no", "rubric")
LOSS_OPTIONS = ("aggregation", "chunk_size", "beta", "label_smoothing", "reference", "alpha",
                "epsilon", "epsilon_high", "old_logprobs", "max_completion_length",
                "entropy_coef", "mask_truncated")
OFFLINE_LOSSES = ("sft", "dpo", "sharpen", "xpo")
PAIR_LOSSES = ("dpo", "sharpen", "xpo")


def base_config() -> ml_collections.ConfigDict:
  """The full key set with defaults (an SFT-sharpening run on the synthetic task)."""
  c = ml_collections.ConfigDict()
  c.method = "sft_sharpening"  # a label for metrics and reports
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      source="synthetic",  # one of MODEL_SOURCES
      preset="",  # source=preset: a name for models.get_preset (random weights)
      # source=hf | native: a directory, local or gs://, or "fetch:NAME" for a real model of
      # checkpoint.fetch.MODELS (fetched and converted once into its cache).
      checkpoint="",
      tokenizer="",  # source=preset: a tokenizer file or directory
      # Compute dtype: float32 | bfloat16. Full fine-tuning keeps float32 master weights and
      # optimizer moments whatever it is; a frozen LoRA base and the sampling / scoring copies of a
      # model are stored in it.
      dtype="float32",
      # source=synthetic: the model of synthetic_regime, pretrained here (cached in the workdir).
      synthetic=ml_collections.ConfigDict(dict(
          embed_dim=128, num_layers=4, num_heads=4, head_dim=32, mlp_dim=512,
          pretrain_steps=400, pretrain_batch_size=128, pretrain_learning_rate=2e-3,
          corruption_rate=0.4, corruption="random", min_digits=3, max_digits=4,
          num_operands=2,
          # A mixture instead of corruption / corruption_rate: "random:0.4,carry_fork:0.6,..."
          # (data.synthetic.parse_regimes), each regime marked by a letter before its questions;
          # the run's prompts are those of task.regime, one of the mixture's names.
          regimes="")),
  ))

  c.task = ml_collections.ConfigDict(dict(
      name="synthetic_addition",  # data.get_task name
      path="",  # data file(s) for file-based tasks (jsonl, math, prontoqa, mmlu, mbpp); gsm8k: "" = TFDS
      split="test",  # gsm8k split
      data_dir="",  # TFDS data_dir for gsm8k ("" = TFDS default)
      num_train=512,  # prompts the loop draws from (the first ones of the loaded split)
      num_eval=128,  # held-out prompts, disjoint from the training prompts
      shots=0,  # exemplars in the prompt
      chat=False,  # render prompts as a chat (see chat_format)
      # "checkpoint": the chat template the checkpoint ships (model.checkpoint, or the tokenizer
      # directory of a preset), an error when it has none; or a family name (llama3, gemma2, ...)
      # for the built-in renderer of tokenizer/chat.py.
      chat_format="checkpoint",
      regime="",  # synthetic_addition with model.synthetic.regimes: whose prompts the run uses
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.loop = ml_collections.ConfigDict(dict(
      num_rounds=2,
      mode="offline",  # offline: sample → score → select → train; online: RL steps
      prompts_per_round=64,  # offline: prompts sampled per round; online: prompts per RL step
      restart_from_base=False,  # STaR / ReST-EM: every round trains from the base model
      report=True,  # write WORKDIR/report/report.md (analysis.report) when the last round is done
  ))

  c.sample = ml_collections.ConfigDict(dict(
      model="current",  # which model samples: current | base | both (XPO: one of each)
      num_samples=8,  # N per prompt (per model with "both")
      temperature=1.0,
      temperatures=(),  # optional per-round schedule (the last entry repeats); overrides temperature
      top_k=0,
      top_p=1.0,
      max_new_tokens=48,
      batch_size=16,  # prompts per generate call
      # Where sampling and scoring run: "tensor" folds the mesh's fsdp axis into its tensor axis
      # (weights split over the same chips, never gathered; see sharding.sampling_mesh), "train"
      # keeps the training mesh (an fsdp axis then gathers the whole model inside the sampler).
      mesh="tensor",
      rationalize=False,  # STaR: resample failed prompts with the answer as a hint
      # Adaptive sampling (the paper's App. D): draw `chunk` samples per prompt at a time, up to
      # num_samples, and stop a prompt once 1 / max_j pi_base(y_j|x) <= stop_inverse_prob (k/mu):
      # a sample the base finds that likely is already in hand. chunk 0: always num_samples.
      adaptive=ml_collections.ConfigDict(dict(chunk=0, stop_inverse_prob=0.0)),
      hint_template="",  # str.format template over the example's fields, e.g. "{question} ({answer})"
  ))

  c.score = ml_collections.ConfigDict(dict(
      reward="logprob",  # a name in rewards.REWARDS (loop/rewards.py)
      reward_model="base",  # self-rewards and the judge use the base or the current model
      batch_size=32,  # sequences per scoring call
      judge=ml_collections.ConfigDict(dict(
          kind="rubric",  # yes_no | rubric
          template="",  # "" = the default template of verifiers.judge
          labels=(),  # () = defaults; yes_no: (yes, no); rubric: score labels, value = float(label)
      )),
  ))

  c.select = ml_collections.ConfigDict(dict(
      kind="top1",  # a name in selectors.SELECTORS (loop/selectors.py)
      k=0,  # topk: how many; all_correct: at most k per prompt (0 = no cap)
      threshold=float("-inf"),  # threshold: keep reward >= threshold
      threshold_schedule=(),  # optional per-round thresholds (the last entry repeats)
      require_correct=False,  # threshold / balance: also require the gold verdict
      dedup="none",  # none | exact (identical text) | answer (same extracted answer)
      min_margin=0.0,  # best_worst: skip prompts whose best and worst rewards differ by less
      # B-STaR: each round samples at every temperature and keeps the (temperature, threshold)
      # with the best mean balance score min(n'/n_star, 1) * n'/n.
      temperatures=(0.5, 1.0),
      thresholds=(float("-inf"),),
      n_star=4,
  ))

  c.train = ml_collections.ConfigDict(dict(
      loss="sft",  # training.make_loss name
      loss_options=ml_collections.ConfigDict(
          {name: config_dict.placeholder(object) for name in LOSS_OPTIONS}),
      epochs=1,  # offline: passes over the round's training set
      steps=8,  # online: RL steps per round
      batch_size=16,  # sequences (SFT, RL) or pairs per step
      max_len=0,  # padded sequence length; 0 = prompt bucket + sample.max_new_tokens
      optimizer=ml_collections.ConfigDict(dict(
          learning_rate=1e-4, schedule="constant", warmup_steps=0, max_grad_norm=1.0)),
      num_microbatches=1,
      # Per-layer rematerialization: "auto" = "full" for models of >= 100M parameters (activation
      # memory dominates there) and none below (recomputing a CPU-sized model only costs time);
      # "" = none; or a training.remat policy name.
      remat="auto",
      compute_dtype="",  # the update step's forward dtype; "" = model.dtype
      lora=ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="attention")),  # rank 0: full
      advantage=ml_collections.ConfigDict(dict(estimator="grpo", scale="group")),  # online RL
      reference="base",  # DPO/KL reference: base | round_start (the model the round starts from)
  ))

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=8,  # T=1 samples per held-out prompt (pass@1, best-of-k)
      temperature=1.0,
      bon_k=(1, 2, 4, 8),
      max_new_tokens=0,  # 0 = sample.max_new_tokens
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, verify=True))
  # metrics.jsonl is mirrored to WORKDIR/tensorboard, and to a Weights & Biases run when
  # wandb.project is set (wandb is then imported; it is no dependency). entity / mode ("online",
  # "offline", "disabled"): "" = wandb's defaults. A resumed run starts a new W&B run.
  c.metrics = ml_collections.ConfigDict(dict(
      wandb=ml_collections.ConfigDict(dict(project="", entity="", mode=""))))
  # jax.profiler traces into WORKDIR/tensorboard (``selfimprove_jax.profiling``): global update
  # steps start_step .. start_step + num_steps - 1 (1-based), and the first sampling call after.
  # num_steps=0: off.
  c.profile = ml_collections.ConfigDict(dict(start_step=1, num_steps=0))
  # A study (loop.study): arm name -> the keys it changes, nested as here; empty = one run.
  # order: the arms' run and report order (default by name); the first arm's base is shared.
  c.study = ml_collections.ConfigDict(dict(arms=ml_collections.ConfigDict(), order=()))
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks values and combinations; raises ValueError naming the key and the bad value."""
  _check("model.source", c.model.source, c.model.source in MODEL_SOURCES,
         f"must be one of {MODEL_SOURCES}")
  _check("model.dtype", c.model.dtype, c.model.dtype in ("float32", "bfloat16"),
         "must be 'float32' or 'bfloat16'")
  if c.model.source in ("hf", "native"):
    _check("model.checkpoint", c.model.checkpoint, bool(c.model.checkpoint),
           f"model.source={c.model.source!r} needs a checkpoint directory")
    if c.model.checkpoint.startswith(fetch.FETCH_PREFIX):
      name = c.model.checkpoint[len(fetch.FETCH_PREFIX):]
      _check("model.checkpoint", c.model.checkpoint, name in fetch.MODELS,
             f"fetch: names one of {sorted(fetch.MODELS)}")
  if c.model.source == "preset":
    _check("model.preset", c.model.preset, bool(c.model.preset), "model.source='preset' needs one")
    _check("model.tokenizer", c.model.tokenizer, bool(c.model.tokenizer),
           "model.source='preset' needs a tokenizer path")
  regimes = c.model.synthetic.regimes
  if regimes:
    try:
      names = tuple(synthetic.parse_regimes(regimes))
    except ValueError as e:
      _check("model.synthetic.regimes", regimes, False, str(e))
    _check("task.regime", c.task.regime, c.task.regime in names,
           f"names the regime whose prompts the run uses, one of {names}")
  else:
    _check("task.regime", c.task.regime, not c.task.regime,
           "needs model.synthetic.regimes (a mixture) to choose from")
  _check("task.num_train", c.task.num_train, c.task.num_train >= 1, "must be >= 1")
  _check("task.chat_format", c.task.chat_format,
         c.task.chat_format in ("checkpoint", *FAMILIES),
         f"must be 'checkpoint' or a family in {FAMILIES}")
  _check("task.num_eval", c.task.num_eval, c.task.num_eval >= 1,
         "must be >= 1: every round ends with the held-out eval (eval.json, summary.json)")
  _check("loop.num_rounds", c.loop.num_rounds, c.loop.num_rounds >= 0, "must be >= 0")
  _check("loop.mode", c.loop.mode, c.loop.mode in MODES, f"must be one of {MODES}")
  _check("loop.prompts_per_round", c.loop.prompts_per_round, c.loop.prompts_per_round >= 1,
         "must be >= 1")
  _check("sample.model", c.sample.model, c.sample.model in SAMPLE_MODELS,
         f"must be one of {SAMPLE_MODELS}")
  _check("sample.mesh", c.sample.mesh, c.sample.mesh in SAMPLE_MESHES,
         f"must be one of {SAMPLE_MESHES}")
  _check("sample.num_samples", c.sample.num_samples, c.sample.num_samples >= 1, "must be >= 1")
  for t in (c.sample.temperature, *c.sample.temperatures, *c.select.temperatures):
    _check("sample.temperature", t, t >= 0, "temperatures must be >= 0")
  a = c.sample.adaptive
  if a.chunk:
    _check("sample.adaptive.chunk", a.chunk, 1 <= a.chunk <= c.sample.num_samples,
           f"must be in [1, sample.num_samples={c.sample.num_samples}] (0: off)")
    _check("sample.adaptive.stop_inverse_prob", a.stop_inverse_prob, a.stop_inverse_prob >= 1,
           "must be >= 1: stop once 1 / max_j pi_base(y_j|x) is at most this")
    _check("sample.model", c.sample.model, c.sample.model != "both",
           "adaptive sampling draws from one model")
  _check("sample.max_new_tokens", c.sample.max_new_tokens, c.sample.max_new_tokens >= 1,
         "must be >= 1")
  if c.sample.rationalize:
    _check("sample.hint_template", c.sample.hint_template, bool(c.sample.hint_template),
           "sample.rationalize needs a hint template, e.g. '{question} ({answer})'")
  _check("score.reward", c.score.reward, c.score.reward in rewards.REWARDS,
         f"must be one of {rewards.REWARDS.names()}")
  _check("score.reward_model", c.score.reward_model, c.score.reward_model in REWARD_MODELS,
         f"must be one of {REWARD_MODELS}")
  _check("score.judge.kind", c.score.judge.kind, c.score.judge.kind in JUDGES,
         f"must be one of {JUDGES}")
  rule = selectors.SELECTORS.get(c.select.kind)
  _check("select.dedup", c.select.dedup, c.select.dedup in selectors.DEDUPS,
         f"must be one of {selectors.DEDUPS}")
  _check("select.k", c.select.k, c.select.k >= 0, "must be >= 0")
  if rule.check is not None:
    rule.check(c)
  if c.loop.mode == "offline":
    _check("train.loss", c.train.loss, c.train.loss in OFFLINE_LOSSES,
           f"loop.mode='offline' trains with one of {OFFLINE_LOSSES}")
    pair_rules = tuple(n for n in selectors.SELECTORS.names() if selectors.SELECTORS.get(n).pairs)
    _check("select.kind", c.select.kind, rule.pairs == (c.train.loss in PAIR_LOSSES),
           f"train.loss={c.train.loss!r} needs "
           f"{'a pair selection ' + str(pair_rules) if not rule.pairs else 'a single-sequence selection'}")
  else:
    _check("train.loss", c.train.loss, c.train.loss == "policy_gradient",
           "loop.mode='online' trains with 'policy_gradient'")
    _check("sample.num_samples", c.sample.num_samples, c.sample.num_samples >= 2,
           "online RL needs >= 2 samples per prompt (a group)")
    _check("sample.model", c.sample.model, c.sample.model == "current",
           "online RL samples from the current model")
  _check("train.epochs", c.train.epochs, c.train.epochs >= 1, "must be >= 1")
  _check("train.steps", c.train.steps, c.train.steps >= 1, "must be >= 1")
  _check("train.batch_size", c.train.batch_size, c.train.batch_size >= 1, "must be >= 1")
  _check("train.lora.rank", c.train.lora.rank, c.train.lora.rank >= 0, "must be >= 0 (0 = full)")
  _check("train.remat", c.train.remat, c.train.remat in ("auto", "", *remat_lib.POLICIES),
         f"must be 'auto', '' or one of {sorted(remat_lib.POLICIES)}")
  _check("train.reference", c.train.reference, c.train.reference in ("base", "round_start"),
         "must be 'base' or 'round_start'")
  _check("eval.num_samples", c.eval.num_samples, c.eval.num_samples >= 1, "must be >= 1")
  for k in c.eval.bon_k:
    _check("eval.bon_k", tuple(c.eval.bon_k), 1 <= k <= c.eval.num_samples,
           f"every k must be in [1, eval.num_samples={c.eval.num_samples}]")
  _check("checkpoint.every_steps", c.checkpoint.every_steps, c.checkpoint.every_steps >= 1,
         "must be >= 1")
  _check("profile.num_steps", c.profile.num_steps, c.profile.num_steps >= 0, "must be >= 0")
  _check("profile.start_step", c.profile.start_step, c.profile.start_step >= 1,
         "must be >= 1 (global update steps count from 1)")


def loss_options(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """The loss options that are set (placeholders left at None are the loss's own defaults)."""
  return {k: v for k, v in c.train.loss_options.items() if v is not None}


REMAT_AUTO_PARAMS = 100_000_000


def remat_policy(c: ml_collections.ConfigDict, num_params: int) -> str | None:
  """The update step's per-layer remat policy for a model of ``num_params`` parameters."""
  if c.train.remat == "auto":
    return "full" if num_params >= REMAT_AUTO_PARAMS else None
  return c.train.remat or None


def temperature(c: ml_collections.ConfigDict, round_index: int) -> float:
  """The sampling temperature of round ``round_index`` (1-based)."""
  return scheduled(c.sample.temperatures, round_index, c.sample.temperature)


def sample_temperatures(c: ml_collections.ConfigDict, round_index: int) -> tuple[float, ...]:
  """The temperatures round ``round_index`` samples at: the selection rule's, or the round's."""
  rule = selectors.SELECTORS.get(c.select.kind)
  if rule.temperatures is not None:
    return tuple(rule.temperatures(c, round_index))
  return (temperature(c, round_index),)


VARIANTS = ("", "smoke")


def finalize(c: ml_collections.ConfigDict, variant: str = "") -> ml_collections.ConfigDict:
  """Applies ``variant`` ("" = as configured, "smoke" = CPU-sized) and locks the config."""
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r}: must be one of {VARIANTS} (e.g. "
                     "--config=configs/star.py:smoke)")
  if variant == "smoke":
    shrink_to_smoke(c)
  c.lock()
  return c


def shrink_to_smoke(c: ml_collections.ConfigDict) -> None:
  """Sizes a config for a CPU test: a ~0.1M-parameter synthetic model pretrained for a few
  seconds on one-digit sums, 2 rounds of 8 prompts, short completions."""
  c.model.source = "synthetic"
  c.model.synthetic.update(embed_dim=64, num_layers=2, num_heads=2, head_dim=32, mlp_dim=128,
                           pretrain_steps=300, pretrain_batch_size=32, pretrain_learning_rate=3e-3,
                           min_digits=1, max_digits=1)
  c.task.update(name="synthetic_addition", num_train=32, num_eval=8, shots=0, chat=False)
  c.loop.update(num_rounds=2, prompts_per_round=4, report=False)
  c.sample.update(num_samples=min(c.sample.num_samples, 4), max_new_tokens=16, batch_size=4)
  if c.select.kind == "balance":
    c.select.temperatures = tuple(c.select.temperatures)[:2]
  c.train.update(batch_size=8, steps=2, epochs=1)
  c.train.optimizer.warmup_steps = 0  # a smoke round may have a single step
  c.eval.update(num_samples=4, bon_k=(1, 2, 4))
  c.checkpoint.every_steps = 2
