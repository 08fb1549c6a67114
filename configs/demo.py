"""The embedded CPU demo: the paper's headline and its negative control, side by side, in minutes.

  python -m selfimprove_jax.main --config=configs/demo.py --workdir=runs/demo

One ~0.45M-parameter model is pretrained on addition traces from three regimes, each marked by a
letter before the question (cached in WORKDIR/random/base and shared by the three arms):
  random      40% of traces carry one wrong step, each error rare: greedy is right, T=1 sampling
              reproduces the errors, and the model's own log-prob tells them apart.
  carry_fork  60% of traces drop a carry and then write one of ~19 wrong column sums: greedy takes
              the wrong carry (60% at that token), yet the correct trace is the sequence-level
              mode (40% against ~3% for each wrong one). Best-of-N by log-prob beats greedy.
  drop_carry  the negative control: the same dropped carry at 60%, always continued the same way,
              so the wrong trace is the mode and sharpening makes the model worse.
Each arm then runs the paper's study on 128 held-out prompts of its regime (greedy, T=1,
best-of-k by base log-prob for k = 1..16), one round of SFT-sharpening on self-reward only (16
samples for each of 256 prompts, keep the likeliest, fine-tune; no answer is ever checked) and
the same study on the sharpened model. WORKDIR/report/report.md sets the arms side by side;
WORKDIR/summary.json holds each arm's numbers; WORKDIR/ARM/report/report.md each arm's figures.
"""
from selfimprove_jax.loop.config import base_config, finalize
from selfimprove_jax.loop.study import arm

REGIMES = ("random", "carry_fork", "drop_carry")


def get_config(variant: str = ""):
  c = base_config()
  c.method = "demo"
  c.model.synthetic.update(embed_dim=96, num_layers=3, num_heads=4, head_dim=24, mlp_dim=384,
                           pretrain_steps=500, pretrain_batch_size=128,
                           pretrain_learning_rate=2e-3,
                           regimes="random:0.4,carry_fork:0.6,drop_carry:0.6")
  c.task.update(num_train=512, num_eval=128, regime="random")
  c.loop.update(num_rounds=1, prompts_per_round=256)
  c.sample.update(model="current", num_samples=16, temperature=1.0, batch_size=32)
  c.score.update(reward="logprob", reward_model="base", batch_size=256)
  c.select.kind = "top1"
  c.train.update(loss="sft", epochs=8, batch_size=64)  # 32 steps a round
  c.train.optimizer.update(learning_rate=3e-4, schedule="cosine", warmup_steps=3)
  c.eval.update(num_samples=16, bon_k=(1, 2, 4, 8, 16))
  c.checkpoint.every_steps = 16
  c.study.update(arms={name: arm("task.regime", name) for name in REGIMES},
                 order=REGIMES)
  return finalize(c, variant)
