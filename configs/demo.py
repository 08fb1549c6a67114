"""The embedded CPU demo: sharpening on a laptop in minutes, self-reward only (no gold labels).

  python -m selfimprove_jax.main --config=configs/demo.py --workdir=runs/demo

1. Pretrain a ~0.8M-parameter model on addition traces of which 40% carry one wrong step
   (cached in WORKDIR/base, so a rerun skips it): greedy decoding is nearly always right, T=1
   sampling reproduces the errors, and the model's own log-probability tells them apart.
2. Inference-time sharpening study on 128 held-out prompts: greedy, T=1 accuracy, and best-of-k
   by the base model's log-probability for k = 1..16 (round 0).
3. SFT-sharpening rounds: sample 16 completions per training prompt, keep the one the base model
   finds most likely, fine-tune on it. No answer is ever checked.
4. The same study on the sharpened model; WORKDIR/report/report.md with the figures, and
   WORKDIR/summary.json.
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "demo"
  c.model.synthetic.update(pretrain_steps=300, pretrain_batch_size=128,
                           pretrain_learning_rate=2e-3, corruption_rate=0.4, corruption="random")
  c.task.update(num_train=512, num_eval=128)
  c.loop.update(num_rounds=2, prompts_per_round=256)
  c.sample.update(model="current", num_samples=16, temperature=1.0, batch_size=32)
  c.score.update(reward="logprob", reward_model="base", batch_size=256)
  c.select.kind = "top1"
  c.train.update(loss="sft", epochs=8, batch_size=64)  # 32 steps a round
  c.train.optimizer.learning_rate = 3e-4
  c.eval.update(num_samples=16, bon_k=(1, 2, 4, 8, 16))
  c.checkpoint.every_steps = 16
  return finalize(c, variant)
