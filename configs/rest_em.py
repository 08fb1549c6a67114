"""ReST-EM (Singh et al., 2023): E-step samples N per problem and keeps the reward-1 ones (at most
10 per problem); M-step fine-tunes the base model on them; repeat.

Run:
  python -m selfimprove_jax.main --config=configs/rest_em.py --workdir=/tmp/rest_em
  python -m selfimprove_jax.main --config=configs/rest_em.py:smoke --workdir=/tmp/smoke
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "rest_em"
  c.loop.update(num_rounds=3, restart_from_base=True)
  c.sample.update(model="current", num_samples=8, temperature=1.0)
  c.score.reward = "correct"
  c.select.update(kind="all_correct", k=10)
  c.train.update(loss="sft", epochs=2, batch_size=16)
  c.train.optimizer.learning_rate = 3e-4
  return finalize(c, variant)
