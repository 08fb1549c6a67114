"""The synthetic sharpening regime: pretrain a tiny model on noisy addition traces, then measure it.

A fraction of the pretraining demonstrations carries one wrong arithmetic step (the rest of the
trace follows from it, so the answer is wrong). Each corrupted trace is rare, so the correct trace
stays the model's mode while sampling at T=1 reproduces the error rate: greedy decoding beats T=1
sampling, and a sample's log-probability under the model tells correct from wrong. That is the
regime in which the sharpening paper says self-improvement works (../shared reference:
DEMO_TASK.md). ``pretrain`` and ``measure`` are what the CPU demo builds on.

    python -m selfimprove_jax.synthetic_regime                 # ~2-4 min on 2 CPU cores
    python -m selfimprove_jax.synthetic_regime --corruption=drop_carry   # the negative control

Shapes: B batch, L = ``seq_len``, P prompt length (BOS + question), M max new tokens,
N samples per prompt.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from absl import flags

from selfimprove_jax import cli
from selfimprove_jax.data import synthetic
from selfimprove_jax.models import Transformer, TransformerConfig
from selfimprove_jax.sampling import SamplingParams, generate
from selfimprove_jax.training import (create_train_state, make_loss, make_optimizer, make_schedule,
                                      make_update_step, run_step)

# ~0.8M parameters, the size DEMO_TASK.md found to learn addition in a few hundred steps.
MODEL = TransformerConfig(family="llama3", vocab_size=32, embed_dim=128, num_layers=4, num_heads=4,
                          num_kv_heads=4, head_dim=32, mlp_dim=512, tie_embeddings=True,
                          rope_theta=10_000.0, max_len=64)
SEQ_LEN = 64  # BOS + 10-char question + 43-char trace + EOS for 4-digit operands, rounded up


def demonstration_batch(tokenizer: synthetic.CharTokenizer, examples: list[dict],
                        seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
  """SFT batch in the scorer's convention: prompt + target right-padded to ``seq_len``.

  Returns ``tokens_BxL`` int32, ``input_mask_BxL`` (real tokens) and ``loss_mask_BxL`` (the
  target, EOS included) as numpy arrays.
  """
  B = len(examples)
  tokens = np.full((B, seq_len), tokenizer.pad_id, np.int32)
  input_mask = np.zeros((B, seq_len), bool)
  loss_mask = np.zeros((B, seq_len), bool)
  for row, ex in enumerate(examples):
    prompt, target = synthetic.encode_demonstration(tokenizer, ex)
    ids = prompt + target
    if len(ids) > seq_len:
      raise ValueError(f"seq_len={seq_len}: example {ex['id']} needs {len(ids)} tokens")
    tokens[row, :len(ids)] = ids
    input_mask[row, :len(ids)] = True
    loss_mask[row, len(prompt):len(ids)] = True
  return {"tokens_BxL": tokens, "input_mask_BxL": input_mask, "loss_mask_BxL": loss_mask}


def pretrain(task: synthetic.AdditionConfig | Sequence[synthetic.AdditionConfig], *,
             model_config: TransformerConfig = MODEL,
             steps: int = 400, batch_size: int = 128, learning_rate: float = 2e-3,
             warmup_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> tuple[Any, list[float]]:
  """SFT from scratch on a fresh stream of (possibly corrupted) demonstrations.

  Warm-up then cosine decay over the whole budget (a constant rate stalls, per DEMO_TASK.md).
  Several ``task`` configs (each with its own ``marker``) are mixed in equal shares
  (``synthetic.make_mixture``). Returns (params, per-step losses).
  """
  tasks = [task] if isinstance(task, synthetic.AdditionConfig) else list(task)
  tokenizer = synthetic.CharTokenizer()
  schedule = make_schedule("cosine", learning_rate, total_steps=steps,
                           warmup_steps=int(warmup_fraction * steps))
  optimizer = make_optimizer(schedule, max_grad_norm=1.0)
  model = Transformer(model_config)
  state = create_train_state(model_config, optimizer, jax.random.key(seed))
  step_fn = make_update_step(model, make_loss("sft"), optimizer, schedule=schedule)
  losses = []
  bar = tqdm.trange(steps, desc="pretrain", disable=not progress)
  for step in bar:
    examples = synthetic.make_mixture(tasks, batch_size, seed=seed, start=step * batch_size)
    state, metrics = run_step(step_fn, state, demonstration_batch(tokenizer, examples))
    losses.append(metrics["loss"])
    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
  return state.params, losses


@dataclasses.dataclass(frozen=True)
class RegimeStats:
  """Accuracy of greedy and T=1 decoding and how the model's log-prob separates right from wrong.

  t1_logprob_*: mean log pi(y|x) (sum over the completion, EOS included) of T=1 samples that are
  correct / wrong (nan when there are none). correlation: Pearson correlation between a T=1
  sample's log-prob and its correctness (point-biserial), over all samples.
  """
  greedy_accuracy: float
  t1_accuracy: float
  t1_logprob_correct: float
  t1_logprob_wrong: float
  correlation: float
  num_prompts: int
  num_samples: int


def measure(params: Any, prompts: list[dict], *, model_config: TransformerConfig = MODEL,
            num_samples: int = 16, seed: int = 0, max_new_tokens: int = 48,
            chunk: int = 50) -> RegimeStats:
  """Greedy and ``num_samples`` T=1 completions per prompt, graded exactly."""
  tokenizer = synthetic.CharTokenizer()
  model = Transformer(model_config)
  stop = jnp.asarray([tokenizer.eos_id], jnp.int32)
  correct = {"greedy": [], "t1": []}
  logprobs = []
  for start in range(0, len(prompts), chunk):
    group = prompts[start:start + chunk]
    ids = [tokenizer.encode(ex["question"], add_bos=True) for ex in group]
    P = max(map(len, ids))
    prompt_BxP = np.full((len(ids), P), tokenizer.pad_id, np.int32)
    mask_BxP = np.zeros((len(ids), P), bool)
    for row, p in enumerate(ids):
      prompt_BxP[row, P - len(p):], mask_BxP[row, P - len(p):] = p, True
    for kind, n, temperature in (("greedy", 1, 0.0), ("t1", num_samples, 1.0)):
      out = jax.device_get(generate(
          model, params, prompt_BxP, mask_BxP, jax.random.key(seed + start),
          SamplingParams.make(len(ids) * n, temperature=temperature), stop,
          max_new_tokens=max_new_tokens, num_samples=n, pad_id=tokenizer.pad_id,
          vocab_limit=tokenizer.vocab_size))
      for row in range(len(ids) * n):
        text = tokenizer.decode(out.tokens[row, :out.lengths[row]].tolist(), skip_special=True)
        correct[kind].append(synthetic.grade(text, group[row // n]["answer"]).correct)
        if kind == "t1":
          logprobs.append(float(out.model_logprobs[row].sum()))
  t1 = np.asarray(correct["t1"], float)
  lp = np.asarray(logprobs)
  mean = lambda x: float(x.mean()) if x.size else float("nan")
  corr = float(np.corrcoef(lp, t1)[0, 1]) if 0 < t1.mean() < 1 else float("nan")
  return RegimeStats(greedy_accuracy=mean(np.asarray(correct["greedy"], float)),
                     t1_accuracy=mean(t1), t1_logprob_correct=mean(lp[t1 == 1]),
                     t1_logprob_wrong=mean(lp[t1 == 0]), correlation=corr,
                     num_prompts=len(prompts), num_samples=num_samples)


def define_flags(values: flags.FlagValues) -> None:
  """The CLI's flags."""
  on = dict(flag_values=values)
  flags.DEFINE_float("corruption_rate", 0.4, "Fraction of pretraining traces with one wrong step.",
                     lower_bound=0.0, upper_bound=1.0, **on)
  flags.DEFINE_enum("corruption", "random", list(synthetic.CORRUPTIONS), "How a trace is "
                    "corrupted ('drop_carry': the negative control).", **on)
  flags.DEFINE_integer("steps", 400, "Pretraining steps.", lower_bound=1, **on)
  flags.DEFINE_integer("batch_size", 128, "Pretraining batch size.", lower_bound=1, **on)
  flags.DEFINE_float("learning_rate", 2e-3, "Pretraining learning rate.", lower_bound=0.0, **on)
  flags.DEFINE_integer("eval_prompts", 200, "Held-out prompts measured.", lower_bound=1, **on)
  flags.DEFINE_integer("samples", 16, "T=1 samples per held-out prompt.", lower_bound=1, **on)
  flags.DEFINE_integer("seed", 0, "Pretraining seed (held-out prompts use seed + 10000).", **on)


def main(argv: Sequence[str] | None = None) -> RegimeStats:
  """Pretrains on noisy traces, measures greedy vs T=1 and log-prob vs correctness, prints them."""
  args, _ = cli.parse(sys.argv[1:] if argv is None else argv, define_flags,
                      prog="python -m selfimprove_jax.synthetic_regime")
  task = synthetic.AdditionConfig(corruption_rate=args.corruption_rate, corruption=args.corruption)
  t0 = time.perf_counter()
  params, losses = pretrain(task, steps=args.steps, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, seed=args.seed)
  train_s = time.perf_counter() - t0
  # Held-out prompts: a stream seed the pretraining never draws from.
  held_out = synthetic.make_examples(task, args.eval_prompts, seed=args.seed + 10_000)
  stats = measure(params, held_out, num_samples=args.samples, seed=args.seed)
  print(f"pretraining: {args.steps} steps x {args.batch_size} in {train_s:.0f} s, final loss "
        f"{np.mean(losses[-10:]):.3f}; p={args.corruption_rate} ({args.corruption})")
  print(f"greedy accuracy {stats.greedy_accuracy:.3f}   T=1 accuracy {stats.t1_accuracy:.3f}   "
        f"({stats.num_prompts} prompts, {stats.num_samples} samples each)")
  print(f"T=1 log-prob: correct {stats.t1_logprob_correct:.2f}, wrong {stats.t1_logprob_wrong:.2f}; "
        f"correlation(log-prob, correct) = {stats.correlation:.3f}")
  return stats


if __name__ == "__main__":
  main()
