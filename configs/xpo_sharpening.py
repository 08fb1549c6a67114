"""XPO-sharpening (Huang et al., 2024): the sharpening pair loss on (y ~ pi, y~ ~ pi_base) plus
alpha * log pi(y~), which pushes mass away from base samples (exploration).

Run:
  python -m selfimprove_jax.main --config=configs/xpo_sharpening.py --workdir=/tmp/xpo_sharpening
  python -m selfimprove_jax.main --config=configs/xpo_sharpening.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "xpo_sharpening"
  c.sample.update(model="both", num_samples=4, temperature=1.0)
  c.score.update(reward="logprob", reward_model="base")
  c.select.kind = "xpo_pairs"
  c.train.update(loss="xpo", epochs=2, batch_size=16)
  c.train.loss_options.update(beta=1.0, alpha=0.05)
  c.train.optimizer.learning_rate = 1e-4
  return finalize(c, variant)
