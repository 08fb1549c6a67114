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
from selfimprove_jax.loop.config import base_config, finalize
from selfimprove_jax.loop.study import arm

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
  c = base_config()
  c.method = "sharpening_algorithms"
  c.model.synthetic.update(embed_dim=96, num_layers=3, num_heads=4, head_dim=24, mlp_dim=384,
                           pretrain_steps=500, pretrain_batch_size=128,
                           pretrain_learning_rate=2e-3,
                           regimes="random:0.4,carry_fork:0.6,drop_carry:0.6")
  c.task.update(num_train=512, num_eval=128, regime="carry_fork")
  c.loop.update(num_rounds=2, prompts_per_round=256)
  c.sample.update(model="current", num_samples=16, temperature=1.0, batch_size=32)
  c.score.update(reward="logprob", reward_model="base", batch_size=256)
  c.train.update(epochs=8, batch_size=64)
  c.train.optimizer.learning_rate = 3e-4
  c.eval.update(num_samples=16, bon_k=(1, 2, 4, 8, 16))
  c.checkpoint.every_steps = 16
  c.study.update(arms=ARMS, order=tuple(ARMS))
  return finalize(c, variant)
