"""STaR (Zelikman et al., 2022): keep the correct rationales; for problems the model gets wrong,
resample with the answer as a hint (rationalization) and keep those that reach it; every round
fine-tunes the base model on the round's data.

Run:
  python -m selfimprove_jax.main --config=configs/star.py --workdir=/tmp/star
  python -m selfimprove_jax.main --config=configs/star.py:smoke --workdir=/tmp/smoke
For a natural-language task set e.g. --config.sample.hint_template='{question} (The answer is {answer}.)'
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "star"
  c.loop.update(num_rounds=3, restart_from_base=True)
  # The synthetic task's vocabulary has digits, "+", "=", " " and ">" only.
  c.sample.update(model="current", num_samples=1, temperature=1.0, rationalize=True,
                  hint_template=">{answer} {question}")
  c.score.reward = "correct"
  c.select.update(kind="all_correct", dedup="exact")
  c.train.update(loss="sft", epochs=2, batch_size=16)
  c.train.optimizer.learning_rate = 3e-4
  return finalize(c, variant)
