"""GRPO (Shao et al., 2024) with a ground-truth verifier reward (1 correct, 0 otherwise),
group-normalized advantages, clipped ratio.

Run:
  python -m selfimprove_jax.main --config=configs/grpo.py --workdir=/tmp/grpo
  python -m selfimprove_jax.main --config=configs/grpo.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "grpo"
  c.loop.update(mode="online", num_rounds=2, prompts_per_round=16)
  c.sample.update(model="current", num_samples=8, temperature=1.0)
  c.score.reward = "correct"
  c.train.update(loss="policy_gradient", steps=20)
  c.train.optimizer.learning_rate = 1e-5
  return finalize(c, variant)
