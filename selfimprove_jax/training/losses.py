"""Supervised and pairwise losses: SFT, DPO, and the RLHF-sharpening pair loss with its XPO term.

Every loss is a frozen dataclass of options whose instance is the pure loss function
``loss(params, batch, rng, *, model, ref_params=None) -> (loss, aux)``; ``registry.make_loss``
builds one from a config. Log-probs always come from ``scoring.score`` (one masking convention).

``aux`` holds scalar metrics plus ``LOSS_DENOMINATOR``: the count the loss is a mean over
(tokens, sequences or pairs), never a function of the params. The update step weights each
micro-batch's loss and gradient by it, so a token-mean over two micro-batches with different
token counts equals the token-mean over the whole batch.

Batch keys (arrays lead with the batch dim B, so the step can split and shard every key alike):
  single sequences   tokens_BxL, input_mask_BxL, loss_mask_BxL (``scoring``'s convention)
  pairs              tokens_Bx2xL, input_mask_Bx2xL, loss_mask_Bx2xL: [:, 0] is the chosen (DPO) or
                     first (sharpening: y; XPO: the on-policy sample) sequence, [:, 1] the
                     rejected / second (XPO: the base sample y~) one
  DPO reference      ref_logps_Bx2: sum log-probs under the reference (reference="batch")
  sharpening         base_logps_Bx2: sum log-probs under the base model, which are also r(y)

Einsum legend: B batch (prompts or pairs), L sequence length.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from selfimprove_jax import scoring
from selfimprove_jax.models.transformer import Transformer

LOSS_DENOMINATOR = "loss_denominator"
AGGREGATIONS = ("token_mean", "sequence_mean", "dapo", "dr_grpo")
REFERENCES = ("batch", "params")


def check(field: str, value: Any, ok: bool, why: str) -> None:
  """Raises ``ValueError("field=value: why")`` unless ``ok``."""
  if not ok:
    raise ValueError(f"{field}={value!r}: {why}")


def check_chunk_size(value: Any) -> None:
  ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
  check("chunk_size", value, ok, "must be a positive int or None")


# ------------------------------------------------------------------------------ aggregation

def aggregate(per_token_BxL: jax.Array, mask_BxL: jax.Array, mode: str = "token_mean", *,
              max_completion_length: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Reduces per-token losses over the masked tokens; returns (loss, denominator).

  Modes (n_b = masked tokens of row b, N = sum_b n_b, B rows):
    token_mean     sum_{b,t} x / N: every token weighs the same (TRL's SFT default).
    dapo           the same sum over all tokens of the group / N (DAPO's token-level loss). The
                   update step divides by the whole step's N across micro-batches, so this is the
                   paper's definition, not a per-micro-batch one.
    sequence_mean  mean over rows with n_b > 0 of sum_t x / n_b (the GRPO paper's form).
    dr_grpo        sum_{b,t} x / (B * max_completion_length): a constant normalizer (Dr. GRPO).
  The denominator is N, the number of non-empty rows, or B * max_completion_length; an empty
  mask gives loss 0. Unmasked entries are never read (NaN or inf there is harmless).
  """
  mask_BxL = mask_BxL.astype(bool)
  x_BxL = jnp.where(mask_BxL, per_token_BxL.astype(jnp.float32), 0.0)
  if mode in ("token_mean", "dapo"):
    denom = jnp.sum(mask_BxL, dtype=jnp.float32)
    total = jnp.sum(x_BxL)
  elif mode == "sequence_mean":
    n_B = jnp.sum(mask_BxL, axis=-1, dtype=jnp.float32)
    denom = jnp.sum(n_B > 0, dtype=jnp.float32)
    total = jnp.sum(jnp.sum(x_BxL, axis=-1) / jnp.maximum(n_B, 1.0))
  elif mode == "dr_grpo":
    check("max_completion_length", max_completion_length,
          isinstance(max_completion_length, int) and max_completion_length > 0,
          "aggregation='dr_grpo' needs a positive int constant normalizer")
    denom = jnp.asarray(x_BxL.shape[0] * max_completion_length, jnp.float32)
    total = jnp.sum(x_BxL)
  else:
    raise ValueError(f"aggregation={mode!r}: must be one of {AGGREGATIONS}")
  return total / jnp.maximum(denom, 1.0), denom


def masked_mean(x_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Mean of ``x`` over the True entries of ``mask`` (0 when there are none)."""
  mask_BxL = mask_BxL.astype(bool)
  n = jnp.sum(mask_BxL, dtype=jnp.float32)
  return jnp.sum(jnp.where(mask_BxL, x_BxL, 0.0)) / jnp.maximum(n, 1.0)


# ------------------------------------------------------------------------------ scoring helpers

def score_batch(model: Transformer, params: Any, batch: dict, chunk_size: int | None, *,
                entropy: bool = True) -> scoring.Scores:
  """``scoring.score`` of the single-sequence keys of ``batch``: log-probs, and per-token
  entropies when ``entropy`` (self-certainty is never needed by a loss)."""
  return scoring.score(model, params, batch["tokens_BxL"], batch["input_mask_BxL"],
                       batch["loss_mask_BxL"], chunk_size=chunk_size, entropy=entropy,
                       self_certainty=False)


def pair_logps(model: Transformer, params: Any, batch: dict, chunk_size: int | None) -> jax.Array:
  """Sum log-probs (B, 2) of both sequences of each pair, in one forward pass over 2B rows."""
  tokens_Bx2xL = batch["tokens_Bx2xL"]
  B, two, L = tokens_Bx2xL.shape
  if two != 2:
    raise ValueError(f"tokens_Bx2xL has shape {tokens_Bx2xL.shape}: the middle dim must be 2")
  flat = lambda x: x.reshape(B * 2, L)
  scores = scoring.score(model, params, flat(tokens_Bx2xL), flat(batch["input_mask_Bx2xL"]),
                         flat(batch["loss_mask_Bx2xL"]), chunk_size=chunk_size, entropy=False,
                         self_certainty=False)
  return scores.sum_logprob_B.reshape(B, 2)


def require_ref_params(ref_params: Any, loss: str) -> Any:
  if ref_params is None:
    raise ValueError(f"{loss}: reference='params' needs reference parameters: pass "
                     "reference_params to create_train_state (or train LoRA adapters, whose "
                     "frozen base is the reference)")
  return ref_params


# ------------------------------------------------------------------------------ SFT

@dataclasses.dataclass(frozen=True)
class SFTLoss:
  """Negative log-likelihood of the completion tokens (``scored_mask``); prompt and padding add 0.

  aggregation: "token_mean" (sum(nll * mask) / num_tokens) or "sequence_mean" (per-sequence mean
  NLL, averaged over sequences). Metrics: ``entropy`` (token mean of the predictive entropy).
  """

  aggregation: str = "token_mean"
  chunk_size: int | None = scoring.DEFAULT_CHUNK

  def __post_init__(self):
    check("aggregation", self.aggregation, self.aggregation in ("token_mean", "sequence_mean"),
          "SFT supports 'token_mean' or 'sequence_mean'")
    check_chunk_size(self.chunk_size)

  def __call__(self, params: Any, batch: dict, rng: jax.Array, *, model: Transformer,
               ref_params: Any = None) -> tuple[jax.Array, dict]:
    del rng, ref_params  # deterministic, reference-free
    scores = score_batch(model, params, batch, self.chunk_size)
    mask_BxL = scoring.scored_mask(batch["input_mask_BxL"], batch["loss_mask_BxL"])
    loss, denom = aggregate(-scores.token_logprobs_BxL, mask_BxL, self.aggregation)
    return loss, {LOSS_DENOMINATOR: denom,
                  "entropy": masked_mean(scores.token_entropy_BxL, mask_BxL)}


# ------------------------------------------------------------------------------ DPO

def dpo_objective(logps_Bx2: jax.Array, ref_logps_Bx2: jax.Array, *, beta: float,
                  label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  """DPO on sequence log-probs (column 0 chosen, column 1 rejected); returns (mean loss, metrics).

  With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) per pair, the loss is
  -(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h): with label smoothing s > 0 this is the
  conservative DPO loss for preferences flipped with probability s. Metrics use TRL's names:
  rewards/* are the implicit rewards beta * (log pi - log ref).
  """
  log_ratio_Bx2 = logps_Bx2 - ref_logps_Bx2
  h_B = log_ratio_Bx2[:, 0] - log_ratio_Bx2[:, 1]
  losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
  rewards_Bx2 = beta * jax.lax.stop_gradient(log_ratio_Bx2)
  metrics = {
      "rewards/chosen": jnp.mean(rewards_Bx2[:, 0]),
      "rewards/rejected": jnp.mean(rewards_Bx2[:, 1]),
      "rewards/margins": jnp.mean(rewards_Bx2[:, 0] - rewards_Bx2[:, 1]),
      "rewards/accuracies": jnp.mean((rewards_Bx2[:, 0] > rewards_Bx2[:, 1]).astype(jnp.float32)),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(logps_Bx2[:, 0])),
      "logps/rejected": jnp.mean(jax.lax.stop_gradient(logps_Bx2[:, 1])),
  }
  return jnp.mean(losses_B), metrics


@dataclasses.dataclass(frozen=True)
class DPOLoss:
  """DPO on pair batches (see the module docstring).

  reference: "batch" reads ``ref_logps_Bx2``; "params" scores the pair under ``ref_params`` in
  the step (no gradient flows there).
  """

  beta: float = 0.1
  label_smoothing: float = 0.0
  reference: str = "batch"
  chunk_size: int | None = scoring.DEFAULT_CHUNK

  def __post_init__(self):
    check("beta", self.beta, self.beta > 0, "must be > 0")
    check("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 0.5,
          "must be in [0, 0.5)")
    check("reference", self.reference, self.reference in REFERENCES, f"must be one of {REFERENCES}")
    check_chunk_size(self.chunk_size)

  def __call__(self, params: Any, batch: dict, rng: jax.Array, *, model: Transformer,
               ref_params: Any = None) -> tuple[jax.Array, dict]:
    del rng
    logps_Bx2 = pair_logps(model, params, batch, self.chunk_size)
    if self.reference == "batch":
      ref_logps_Bx2 = batch["ref_logps_Bx2"]
    else:
      ref = jax.lax.stop_gradient(require_ref_params(ref_params, "DPOLoss"))
      ref_logps_Bx2 = pair_logps(model, ref, batch, self.chunk_size)
    loss, metrics = dpo_objective(logps_Bx2, jax.lax.stop_gradient(ref_logps_Bx2), beta=self.beta,
                                  label_smoothing=self.label_smoothing)
    return loss, {LOSS_DENOMINATOR: jnp.asarray(logps_Bx2.shape[0], jnp.float32), **metrics}


# ------------------------------------------------------------------------------ sharpening

def sharpen_residual(logps_Bx2: jax.Array, base_logps_Bx2: jax.Array, *, beta: float) -> jax.Array:
  """Pair residual (B,): beta log[pi(y)/pi_b(y)] - beta log[pi(y')/pi_b(y')] - (r(y) - r(y')).

  r = log pi_b (the self-reward), so a zero residual on every pair means
  log pi = (1 + 1/beta) log pi_b + const, i.e. pi proportional to pi_b^(1 + 1/beta).
  """
  log_ratio_Bx2 = logps_Bx2 - base_logps_Bx2
  return (beta * (log_ratio_Bx2[:, 0] - log_ratio_Bx2[:, 1])
          - (base_logps_Bx2[:, 0] - base_logps_Bx2[:, 1]))


@dataclasses.dataclass(frozen=True)
class SharpenLoss:
  """RLHF-sharpening pair loss mean(residual^2), plus alpha * mean(log pi(y~)) for XPO.

  Pairs: [:, 0] is y (a base sample, or the on-policy sample for XPO), [:, 1] is y' (a base
  sample y~). ``base_logps_Bx2`` holds log pi_base of both, precomputed (they are the rewards).
  alpha > 0 adds XPO's exploration term, which lowers the policy's likelihood of base samples.
  Metrics: ``pair_loss`` (mean residual^2), ``logps/first``, ``logps/second``.
  """

  beta: float = 1.0
  alpha: float = 0.0
  chunk_size: int | None = scoring.DEFAULT_CHUNK

  def __post_init__(self):
    check("beta", self.beta, self.beta > 0, "must be > 0")
    check("alpha", self.alpha, self.alpha >= 0, "must be >= 0")
    check_chunk_size(self.chunk_size)

  def __call__(self, params: Any, batch: dict, rng: jax.Array, *, model: Transformer,
               ref_params: Any = None) -> tuple[jax.Array, dict]:
    del rng, ref_params  # the base log-probs come precomputed with the batch
    logps_Bx2 = pair_logps(model, params, batch, self.chunk_size)
    base_Bx2 = jax.lax.stop_gradient(batch["base_logps_Bx2"].astype(jnp.float32))
    pair_loss = jnp.mean(jnp.square(sharpen_residual(logps_Bx2, base_Bx2, beta=self.beta)))
    loss = pair_loss + self.alpha * jnp.mean(logps_Bx2[:, 1])
    logps = jax.lax.stop_gradient(logps_Bx2)
    return loss, {LOSS_DENOMINATOR: jnp.asarray(logps_Bx2.shape[0], jnp.float32),
                  "pair_loss": jax.lax.stop_gradient(pair_loss),
                  "logps/first": jnp.mean(logps[:, 0]), "logps/second": jnp.mean(logps[:, 1])}


@dataclasses.dataclass(frozen=True)
class XPOLoss(SharpenLoss):
  """``SharpenLoss`` with the exploration term required (alpha > 0)."""

  alpha: float = 0.1

  def __post_init__(self):
    super().__post_init__()
    check("alpha", self.alpha, self.alpha > 0, "XPO needs alpha > 0 (alpha = 0 is 'sharpen')")
