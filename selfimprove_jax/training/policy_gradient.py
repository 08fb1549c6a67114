"""Group-relative policy gradient: GRPO / Dr. GRPO / DAPO / RLOO advantages and the clipped loss.

Advantages are computed before the step (``group_advantages``, host- or device-side) from all
samples of each prompt, so micro-batching the step never splits a group's statistics. The batch
then carries, besides ``scoring``'s tokens_BxL / input_mask_BxL / loss_mask_BxL:
  advantages_B         one advantage per completion, broadcast over its tokens
  rewards_B            raw rewards (for the ``reward`` metric)
  reward_group_std_B   each row's group reward std (for ``reward_std``, ``frac_reward_zero_std``;
                       a per-row copy keeps these exact under any row split)
  old_logprobs_BxL     sampler-time log-probs, when ``old_logprobs="batch"`` (off-policy reuse)
  ref_logprobs_BxL     reference log-probs, when ``beta > 0`` and ``reference="batch"``
  truncated_B          True for completions cut at the length limit, when ``mask_truncated``

Per token, with ratio rho = exp(logp - old) and advantage A:
  -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3 - entropy_coef * H,
  k3 = exp(ref - logp) - (ref - logp) - 1  (unbiased, non-negative estimate of KL(pi || ref)),
then ``losses.aggregate``. Metric names follow TRL's GRPO trainer.

Einsum legend: B completions, G completions per prompt (group size), N = B / G prompts, L length.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from selfimprove_jax import scoring
from selfimprove_jax.models.transformer import Transformer
from selfimprove_jax.training.losses import (AGGREGATIONS, LOSS_DENOMINATOR, REFERENCES, aggregate,
                                             check, check_chunk_size, masked_mean,
                                             require_ref_params, score_batch)

ESTIMATORS = ("grpo", "rloo")
SCALES = ("group", "batch", "none")
OLD_LOGPROBS = ("current", "batch")
# TRL counts a group as having zero reward spread when its std is (numerically) 0.
ZERO_STD_TOL = 1e-6


def group_advantages(rewards_B: Any, group_size: int, *, estimator: str = "grpo",
                     scale: str = "group", eps: float = 1e-4, ddof: int = 1
                     ) -> tuple[jax.Array, jax.Array]:
  """Advantages from rewards of ``group_size`` consecutive completions per prompt.

  Args:
    rewards_B: rewards, rows [g * G, (g + 1) * G) belonging to prompt g.
    group_size: G.
    estimator: baseline subtracted from each reward. "grpo": the group mean. "rloo": the mean of
      the other G - 1 rewards, i.e. G / (G - 1) * (r - group mean).
    scale: "group" divides by (group std + eps) (GRPO); "batch" by (std of all B rewards + eps);
      "none" does not divide (Dr. GRPO; RLOO's usual choice).
    eps: added to the std so a zero-spread group gets advantage 0, not NaN.
    ddof: delta degrees of freedom of the stds (1: the unbiased std, as TRL computes it).
  Returns:
    (advantages_B, reward_group_std_B) float32; the second repeats each group's std on its rows.
  """
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  check("rewards_B.shape", rewards_B.shape, rewards_B.ndim == 1, "rewards must be 1-D")
  B = rewards_B.shape[0]
  check("group_size", group_size, isinstance(group_size, int) and group_size > 0 and B % group_size
        == 0, f"must be a positive int dividing the number of rewards ({B})")
  check("estimator", estimator, estimator in ESTIMATORS, f"must be one of {ESTIMATORS}")
  check("scale", scale, scale in SCALES, f"must be one of {SCALES}")
  check("ddof", ddof, ddof in (0, 1), "must be 0 or 1")
  needs_two = estimator == "rloo" or ddof == 1
  check("group_size", group_size, group_size >= 2 or not needs_two,
        f"must be >= 2 for estimator={estimator!r}, ddof={ddof}")
  r_NxG = rewards_B.reshape(B // group_size, group_size)
  centered_NxG = r_NxG - jnp.mean(r_NxG, axis=1, keepdims=True)
  if estimator == "rloo":
    centered_NxG = centered_NxG * (group_size / (group_size - 1))
  std_Nx1 = jnp.std(r_NxG, axis=1, ddof=ddof, keepdims=True)
  if scale == "group":
    centered_NxG = centered_NxG / (std_Nx1 + eps)
  elif scale == "batch":
    centered_NxG = centered_NxG / (jnp.std(rewards_B, ddof=ddof) + eps)
  group_std_B = jnp.broadcast_to(std_Nx1, r_NxG.shape).reshape(B)
  return centered_NxG.reshape(B), group_std_B


def policy_gradient_objective(logp_BxL: jax.Array, old_logp_BxL: jax.Array,
                              advantages_B: jax.Array, mask_BxL: jax.Array, *,
                              epsilon_low: float, epsilon_high: float,
                              ref_logp_BxL: jax.Array | None = None, beta: float = 0.0,
                              entropy_BxL: jax.Array | None = None, entropy_coef: float = 0.0,
                              aggregation: str = "token_mean",
                              max_completion_length: int | None = None
                              ) -> tuple[jax.Array, jax.Array, dict]:
  """The clipped surrogate (+ k3 KL, - entropy bonus) on per-token log-probs.

  Returns (loss, denominator, metrics). The KL term needs ``ref_logp_BxL`` when beta > 0 and the
  bonus ``entropy_BxL`` when entropy_coef > 0; both are static choices, so nothing branches on data.
  Clip metrics are token means over the mask of: ``low`` rho < 1 - eps_low with A < 0, ``high``
  rho > 1 + eps_high with A > 0 (the tokens whose gradient the clip removes), ``region`` either.
  """
  mask_BxL = mask_BxL.astype(bool)
  zero = jnp.zeros((), jnp.float32)
  # Masked entries may hold anything (old log-probs of padding); keep exp() away from them.
  log_ratio_BxL = jnp.where(mask_BxL, logp_BxL - old_logp_BxL, zero)
  ratio_BxL = jnp.exp(log_ratio_BxL)
  adv_Bx1 = advantages_B.astype(jnp.float32)[:, None]
  clipped_BxL = jnp.clip(ratio_BxL, 1.0 - epsilon_low, 1.0 + epsilon_high)
  per_token_BxL = -jnp.minimum(ratio_BxL * adv_Bx1, clipped_BxL * adv_Bx1)
  metrics = {}
  if beta > 0:
    if ref_logp_BxL is None:
      raise ValueError(f"beta={beta!r} > 0 needs reference log-probs")
    d_BxL = jnp.where(mask_BxL, ref_logp_BxL - logp_BxL, zero)
    k3_BxL = jnp.exp(d_BxL) - d_BxL - 1.0
    per_token_BxL = per_token_BxL + beta * k3_BxL
    metrics["kl"] = masked_mean(jax.lax.stop_gradient(k3_BxL), mask_BxL)
  if entropy_BxL is not None:
    metrics["entropy"] = masked_mean(jax.lax.stop_gradient(entropy_BxL), mask_BxL)
    if entropy_coef > 0:
      per_token_BxL = per_token_BxL - entropy_coef * entropy_BxL
  elif entropy_coef > 0:
    raise ValueError(f"entropy_coef={entropy_coef!r} > 0 needs per-token entropies")
  loss, denom = aggregate(per_token_BxL, mask_BxL, aggregation,
                          max_completion_length=max_completion_length)
  ratio = jax.lax.stop_gradient(ratio_BxL)
  low_BxL = (ratio < 1.0 - epsilon_low) & (adv_Bx1 < 0)
  high_BxL = (ratio > 1.0 + epsilon_high) & (adv_Bx1 > 0)
  metrics["clip_ratio/low_mean"] = masked_mean(low_BxL.astype(jnp.float32), mask_BxL)
  metrics["clip_ratio/high_mean"] = masked_mean(high_BxL.astype(jnp.float32), mask_BxL)
  region_BxL = (low_BxL | high_BxL).astype(jnp.float32)
  metrics["clip_ratio/region_mean"] = masked_mean(region_BxL, mask_BxL)
  return loss, denom, metrics


@dataclasses.dataclass(frozen=True)
class PolicyGradientLoss:
  """GRPO-family loss over a batch of completions with precomputed advantages.

  Attributes:
    epsilon: lower clip range eps_low (ratio floor 1 - epsilon).
    epsilon_high: upper clip range (DAPO's clip-higher); None means epsilon.
    beta: weight of the k3 KL to the reference; 0 disables it (and the ``kl`` metric).
    reference: where reference log-probs come from: "batch" (``ref_logprobs_BxL``) or "params"
      (scored in the step under ``ref_params``, e.g. the frozen base under LoRA).
    old_logprobs: "current" (on-policy: old = stop_gradient(current), so ratio = 1 and only the
      gradient remains) or "batch" (``old_logprobs_BxL``, for several updates per sample).
    aggregation: one of ``losses.AGGREGATIONS``; "dr_grpo" needs ``max_completion_length``.
    entropy_coef: weight of an entropy bonus (subtracted from the loss).
    mask_truncated: drop rows with ``truncated_B`` from the loss and its token count (DAPO).
    chunk_size: vocabulary-projection chunk of ``scoring.score``.
  """

  epsilon: float = 0.2
  epsilon_high: float | None = None
  beta: float = 0.0
  reference: str = "batch"
  old_logprobs: str = "current"
  aggregation: str = "token_mean"
  max_completion_length: int | None = None
  entropy_coef: float = 0.0
  mask_truncated: bool = False
  chunk_size: int | None = scoring.DEFAULT_CHUNK

  def __post_init__(self):
    check("epsilon", self.epsilon, 0 < self.epsilon < 1, "must be in (0, 1)")
    check("epsilon_high", self.epsilon_high, self.epsilon_high is None or self.epsilon_high > 0,
          "must be > 0 or None")
    check("beta", self.beta, self.beta >= 0, "must be >= 0")
    check("reference", self.reference, self.reference in REFERENCES, f"must be one of {REFERENCES}")
    check("old_logprobs", self.old_logprobs, self.old_logprobs in OLD_LOGPROBS,
          f"must be one of {OLD_LOGPROBS}")
    check("aggregation", self.aggregation, self.aggregation in AGGREGATIONS,
          f"must be one of {AGGREGATIONS}")
    check("max_completion_length", self.max_completion_length,
          self.aggregation != "dr_grpo" or (isinstance(self.max_completion_length, int)
                                            and self.max_completion_length > 0),
          "aggregation='dr_grpo' needs a positive int")
    check("entropy_coef", self.entropy_coef, self.entropy_coef >= 0, "must be >= 0")
    check_chunk_size(self.chunk_size)

  def __call__(self, params: Any, batch: dict, rng: jax.Array, *, model: Transformer,
               ref_params: Any = None) -> tuple[jax.Array, dict]:
    del rng
    scores = score_batch(model, params, batch, self.chunk_size)
    logp_BxL = scores.token_logprobs_BxL
    scored_BxL = scoring.scored_mask(batch["input_mask_BxL"], batch["loss_mask_BxL"])
    mask_BxL = scored_BxL
    if self.mask_truncated:
      mask_BxL = mask_BxL & ~batch["truncated_B"].astype(bool)[:, None]
    old_BxL = (jax.lax.stop_gradient(logp_BxL) if self.old_logprobs == "current"
               else batch["old_logprobs_BxL"])
    ref_BxL = None
    if self.beta > 0:
      if self.reference == "batch":
        ref_BxL = batch["ref_logprobs_BxL"]
      else:
        ref = jax.lax.stop_gradient(require_ref_params(ref_params, "PolicyGradientLoss"))
        ref_BxL = score_batch(model, ref, batch, self.chunk_size,
                              entropy=False).token_logprobs_BxL
      ref_BxL = jax.lax.stop_gradient(ref_BxL)
    eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
    loss, denom, metrics = policy_gradient_objective(
        logp_BxL, old_BxL, batch["advantages_B"], mask_BxL, epsilon_low=self.epsilon,
        epsilon_high=eps_high, ref_logp_BxL=ref_BxL, beta=self.beta,
        entropy_BxL=scores.token_entropy_BxL, entropy_coef=self.entropy_coef,
        aggregation=self.aggregation, max_completion_length=self.max_completion_length)
    group_std_B = batch["reward_group_std_B"].astype(jnp.float32)
    metrics.update({
        LOSS_DENOMINATOR: denom,
        "reward": jnp.mean(batch["rewards_B"].astype(jnp.float32)),
        "reward_std": jnp.mean(group_std_B),
        "frac_reward_zero_std": jnp.mean((group_std_B <= ZERO_STD_TOL).astype(jnp.float32)),
        "completions/mean_length": jnp.mean(jnp.sum(scored_BxL, axis=-1, dtype=jnp.float32)),
    })
    return loss, metrics
