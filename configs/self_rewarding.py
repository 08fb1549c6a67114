"""Self-Rewarding Language Models (Yuan et al., 2024): the current model judges its own N samples
with the additive 5-point rubric (read from its score-token probabilities); DPO on the best vs the
worst, the reference being the model the round starts from.

Run:
  python -m selfimprove_jax.main --config=configs/self_rewarding.py --workdir=/tmp/self_rewarding
  python -m selfimprove_jax.main --config=configs/self_rewarding.py:smoke --workdir=/tmp/smoke
On the synthetic task (no words in its vocabulary) the judge prompt is "<question><answer> >" and
the score labels are the digits 0-5.
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "self_rewarding"
  c.sample.update(model="current", num_samples=4, temperature=1.0)
  c.score.update(reward="judge", reward_model="current")
  c.score.judge.kind = "rubric"
  c.select.kind = "best_worst"
  c.train.update(loss="dpo", epochs=2, batch_size=16, reference="round_start")
  c.train.loss_options.update(beta=0.1, reference="batch")
  c.train.optimizer.learning_rate = 1e-4
  return finalize(c, variant)
