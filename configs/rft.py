"""Rejection-sampling fine-tuning (Yuan et al., 2023): sample N per problem, keep the correct
ones with distinct reasoning paths (identical texts deduplicated), fine-tune once.

Run:
  python -m selfimprove_jax.main --config=configs/rft.py --workdir=/tmp/rft
  python -m selfimprove_jax.main --config=configs/rft.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "rft"
  c.loop.update(num_rounds=1, restart_from_base=True, prompts_per_round=128)
  c.sample.update(model="current", num_samples=8, temperature=1.0)
  c.score.reward = "correct"
  c.select.update(kind="all_correct", dedup="exact")
  c.train.update(loss="sft", epochs=3, batch_size=16)
  c.train.optimizer.learning_rate = 3e-4
  return finalize(c, variant)
