"""TTRL (Zuo et al., 2025): GRPO on unlabeled prompts, reward 1 when a sample's answer agrees with
the majority answer of its group. Trained too long it collapses onto confident wrong answers.

Run:
  python -m selfimprove_jax.main --config=configs/ttrl.py --workdir=/tmp/ttrl
  python -m selfimprove_jax.main --config=configs/ttrl.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "ttrl"
  c.loop.update(mode="online", num_rounds=2, prompts_per_round=16)
  c.sample.update(model="current", num_samples=8, temperature=1.0)
  c.score.reward = "majority"
  c.train.update(loss="policy_gradient", steps=20)
  c.train.optimizer.learning_rate = 1e-5
  return finalize(c, variant)
