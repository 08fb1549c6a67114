"""SFT-sharpening (Huang et al., 2024, "Self-Improvement in Language Models: The Sharpening
Mechanism"): sample N completions, keep the one the base model finds most likely, fine-tune on it.
No gold labels: the reward is the base model's own log-likelihood.

Run (the synthetic CPU task; set model.* and task.* for a real model and benchmark):
  python -m selfimprove_jax.main --config=configs/sft_sharpening.py --workdir=/tmp/sft_sharpening
  python -m selfimprove_jax.main --config=configs/sft_sharpening.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "sft_sharpening"
  c.loop.prompts_per_round = 256
  c.sample.update(model="current", num_samples=8, temperature=1.0)
  c.score.update(reward="logprob", reward_model="base")
  c.select.kind = "top1"
  c.train.update(loss="sft", epochs=2, batch_size=32)
  c.train.optimizer.learning_rate = 3e-4
  return finalize(c, variant)
