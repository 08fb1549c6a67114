"""The amortization table's N ablation (the paper's Table 1, N scaled down to 4, 8 and 16).

  python -m selfimprove_jax.main --config=configs/n_ablation.py --workdir=runs/n_ablation

The demo's base and greedy-fails regime (configs/demo.py: carry_fork), one round of SFT-sharpening
on self-reward only, with the likeliest of N samples per training prompt kept, for N = 4, 8, 16.
Everything else is the demo's, including the held-out study (N = 16 there, so BoN@16 is the
same ceiling for every arm). WORKDIR/report/report.md has the three arms side by side and the
amortization table over them: how much of the base's BoN@16 - T=1 gap each N closes, and what
greedy gains. A fourth arm samples adaptively (the paper's App. D: 2 at a time, up to 16, until
one has base probability >= 1/5); metrics.jsonl's sample record counts what it drew.
"""
from selfimprove_jax.loop.config import finalize
from selfimprove_jax.loop.study import arm

from configs import demo

NS = (4, 8, 16)


def get_config(variant: str = ""):
  c = demo.get_config()
  with c.unlocked():
    c.method = "n_ablation"
    c.task.regime = "carry_fork"
    c.study.arms = {f"n{n}": arm("sample.num_samples", n) for n in NS}  # replaces the demo's
    # App. D: 2 samples at a time, up to 16, until one has base probability >= 1/5.
    c.study.arms.adaptive = arm("sample.adaptive.chunk", 2, "sample.adaptive.stop_inverse_prob",
                                5.0)
    c.study.order = (*(f"n{n}" for n in NS), "adaptive")
  return finalize(c, variant)
