"""The sharpening algorithms compared on the greedy-fails regime: the experiment the paper's
theory predicts and never ran.

  python -m selfimprove_jax.main --config=configs/sharpening_algorithms.py --workdir=runs/algorithms

The demo's base (one model pretrained on three regimes, configs/demo.py) on its carry_fork regime,
where greedy decoding takes a wrong carry while the correct trace is the sequence-level mode. Four
arms, self-reward only (the base model's summed log-prob; no answer is ever checked), each drawing
the same 16 samples for each of 256 prompts a round, for 2 rounds:
  sft   SFT-sharpening: the likeliest of 16 samples from the current model (Sec. 4.1).
  rlhf  RLHF-sharpening: pairs of base samples ranked by base log-prob, Eq. 8's pair loss.
  xpo   XPO: one of 8 samples from the current model against one of 8 from the base, Eq. 8 plus
        the optimism term alpha * log pi(y~).
  grpo  GRPO with the base log-prob as the reward: 16 online steps of 16 prompts x group 16.
WORKDIR/report/report.md has the per-round greedy accuracy, T=1 accuracy and mean base log-prob
of every arm in one table and one figure.
"""
from selfimprove_jax.loop.config import finalize
from selfimprove_jax.loop.study import arm

from configs import demo

ARMS = {
    "sft": arm("select.kind", "top1", "train.loss", "sft"),
    # The pair losses at the learning rate and epochs of configs/rlhf_sharpening.py and
    # xpo_sharpening.py: at SFT's 3e-4 x 8 epochs they push the rejected samples' likelihood
    # down without bound and collapse (T=1 0.44 -> 0.01 in two rounds, measured).
    "rlhf": arm("sample.model", "base", "select.kind", "base_pairs", "train.loss", "sharpen",
                "train.batch_size", 32, "train.loss_options.beta", 1.0, "train.epochs", 2,
                "train.optimizer.learning_rate", 1e-4),
    "xpo": arm("sample.model", "both", "sample.num_samples", 8, "select.kind", "xpo_pairs",
               "train.loss", "xpo", "train.batch_size", 32, "train.loss_options.beta", 1.0,
               "train.loss_options.alpha", 0.05, "train.epochs", 2,
               "train.optimizer.learning_rate", 1e-4),
    "grpo": arm("loop.mode", "online", "loop.prompts_per_round", 16, "train.loss",
                "policy_gradient", "train.steps", 16, "train.optimizer.learning_rate", 1e-4),
}


def get_config(variant: str = ""):
  c = demo.get_config()  # the demo's base, task sizes, sampling, scoring and SFT settings
  with c.unlocked():
    c.method = "sharpening_algorithms"
    c.task.regime = "carry_fork"
    c.loop.num_rounds = 2
    c.train.optimizer.update(schedule="constant", warmup_steps=0)
    c.study.arms = ARMS  # replaces the demo's
    c.study.order = tuple(ARMS)
  return finalize(c, variant)
