"""RLHF-sharpening pair loss (Huang et al., 2024): pairs (y, y') of base samples, minimize
(beta log pi(y)/pi_b(y) - beta log pi(y')/pi_b(y') - (r(y) - r(y')))^2 with r = log pi_b, whose
minimizer is pi proportional to pi_b^(1 + 1/beta).

Run:
  python -m selfimprove_jax.main --config=configs/rlhf_sharpening.py --workdir=/tmp/rlhf_sharpening
  python -m selfimprove_jax.main --config=configs/rlhf_sharpening.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "rlhf_sharpening"
  c.sample.update(model="base", num_samples=8, temperature=1.0)
  c.score.update(reward="logprob", reward_model="base")
  c.select.kind = "base_pairs"
  c.train.update(loss="sharpen", epochs=2, batch_size=16)
  c.train.loss_options.beta = 1.0
  c.train.optimizer.learning_rate = 1e-4
  return finalize(c, variant)
