"""INTUITOR (Zhao et al., 2025): GRPO whose reward is the policy's own self-certainty
(mean KL(uniform || p) over the completion), computed online; k3 KL to the base with beta 0.005.

Run:
  python -m selfimprove_jax.main --config=configs/intuitor.py --workdir=/tmp/intuitor
  python -m selfimprove_jax.main --config=configs/intuitor.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "intuitor"
  c.loop.update(mode="online", num_rounds=2, prompts_per_round=16)
  c.sample.update(model="current", num_samples=8, temperature=1.0)
  c.score.update(reward="self_certainty", reward_model="current")
  c.train.update(loss="policy_gradient", steps=20)
  c.train.loss_options.update(beta=0.005, reference="params", epsilon=0.2)
  c.train.optimizer.learning_rate = 1e-5
  return finalize(c, variant)
