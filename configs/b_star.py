"""B-STaR (Zeng et al., 2024): each round samples at several temperatures and keeps the
(temperature, reward threshold) whose selection has the best balance score
min(n'/n*, 1) * n'/n (n selected, n' unique correct), balancing exploration and exploitation.
The reward thresholded here is the base model's mean token log-prob.

Run:
  python -m selfimprove_jax.main --config=configs/b_star.py --workdir=/tmp/b_star
  python -m selfimprove_jax.main --config=configs/b_star.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "b_star"
  c.loop.num_rounds = 3
  c.sample.update(model="current", num_samples=8)
  c.score.update(reward="mean_logprob", reward_model="base")
  c.select.update(kind="balance", temperatures=(0.7, 1.0, 1.3), thresholds=(-1.0, -0.3, -0.1),
                  require_correct=True, n_star=4)
  c.train.update(loss="sft", epochs=2, batch_size=16)
  c.train.optimizer.learning_rate = 3e-4
  return finalize(c, variant)
