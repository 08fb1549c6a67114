"""LLM-as-judge that reads token probabilities instead of parsing generated text.

The judge prompt (a template with ``{prompt}`` and ``{completion}``) is run through the model once,
teacher-forced, and the next-token distribution after it is read at a few label tokens:
  * ``YesNoJudge``: P(" Yes") / (P(" Yes") + P(" No"));
  * ``RubricJudge``: the additive 5-point rubric of Self-Rewarding Language Models (Yuan et al.,
    2024), scored as the expectation sum_s s * p(s) over the score tokens, renormalized over them.
Both are reward functions. Each label must be exactly one token of the tokenizer (checked at
construction); the template's last characters and the labels must agree on where the space goes
(the defaults end with "Answer:" / "Score:" and put the space in the label, as BPE vocabularies do).
"""
from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selfimprove_jax import multihost
from selfimprove_jax.models import Transformer
from selfimprove_jax.models.transformer import variables as model_variables
from selfimprove_jax.tokenizer import Tokenizer
from selfimprove_jax.verifiers.base import check_batch
from selfimprove_jax.verifiers.self_reward import pad_left

PLACEHOLDERS = ("prompt", "completion")

YES_NO_TEMPLATE = (
    "Below are a question and a proposed answer.\n\nQuestion: {prompt}\n\n"
    "Proposed answer: {completion}\n\nIs the proposed answer correct and complete? "
    "Reply with Yes or No.\nAnswer:")

RUBRIC_TEMPLATE = (
    "Read the user's question and the response below, then grade the response on an additive "
    "scale from 0 to 5. Start from 0 and add one point for each condition it meets:\n"
    "- it is relevant and gives some information about the question, even if partial or with "
    "some unrelated content;\n"
    "- it covers a substantial part of the question, even without a complete or direct answer;\n"
    "- it answers the essential parts of the question in a useful way, despite gaps in style or "
    "completeness;\n"
    "- it answers directly and comprehensively, is well organized, and is clearly written from an "
    "assistant's point of view;\n"
    "- it is flawless: fitted to the question, expert, focused and free of anything superfluous."
    "\n\nQuestion: {prompt}\n\nResponse: {completion}\n\n"
    "Reply with the total number of points only.\nScore:")

RUBRIC_SCORES = {f" {s}": float(s) for s in range(6)}


def check_template(template: str) -> None:
  """Raises ValueError unless ``template`` is a str.format template whose fields are exactly
  {prompt} and {completion} (literal braces written {{ and }})."""
  if not isinstance(template, str):
    raise ValueError(f"judge template must be a str, got {type(template).__name__}")
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f"judge template {template[:80]!r}... is malformed ({e}); write literal "
                     f"braces as {{{{ and }}}}") from e
  missing = [p for p in PLACEHOLDERS if p not in fields]
  unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
  if missing or unknown:
    raise ValueError(f"judge template {template[:80]!r}...: missing placeholder(s) "
                     f"{['{' + m + '}' for m in missing]}, unknown field(s) {unknown}; it must "
                     f"contain exactly {{prompt}} and {{completion}}")


@functools.partial(jax.jit, static_argnames=("model",))
def _next_token_logprobs(model: Transformer, params: Any, tokens_BxL: jax.Array,
                         mask_BxL: jax.Array, label_ids_K: jax.Array) -> jax.Array:
  variables = model_variables(params)
  hidden_BxLxD, _ = model.apply(variables, tokens_BxL, None, mask_BxL, return_hidden=True)
  # Rows are left-padded, so every row's last real token sits at the last index.
  logits_Bx1xV = model.apply(variables, hidden_BxLxD[:, -1:], method=Transformer.logits)
  logp_BxV = jax.nn.log_softmax(logits_Bx1xV[:, 0].astype(jnp.float32), axis=-1)
  return logp_BxV[:, label_ids_K]


def next_token_logprobs(model: Transformer, params: Any, token_ids: Sequence[Sequence[int]],
                        label_ids: Sequence[int], *, batch_size: int = 8,
                        min_length: int = 16) -> np.ndarray:
  """log p(label | tokens) (nats, float32) for each id list and label: (S, K).

  One forward pass per batch of ``batch_size`` rows (the last batch padded); lengths padded to
  power-of-two buckets (``scoring.length_bucket``, >= ``min_length``) so few shapes compile.
  """
  if batch_size < 1:
    raise ValueError(f"next_token_logprobs: batch_size={batch_size} must be >= 1")
  vocab = model.config.vocab_size
  for r, ids in enumerate(token_ids):
    if not ids or min(ids) < 0 or max(ids) >= vocab:
      raise ValueError(f"next_token_logprobs: row {r} is empty or has ids outside [0, {vocab})")
  labels_K = np.asarray(label_ids, np.int32)
  if labels_K.ndim != 1 or labels_K.size == 0 or labels_K.min() < 0 or labels_K.max() >= vocab:
    raise ValueError(f"next_token_logprobs: label_ids={list(label_ids)} must be ids in "
                     f"[0, {vocab})")
  tokens_SxL, mask_SxL = pad_left(token_ids, min_length)
  S = len(token_ids)
  padded = -(-S // batch_size) * batch_size
  tokens_SxL = np.pad(tokens_SxL, ((0, padded - S), (0, 0)))
  mask_SxL = np.pad(mask_SxL, ((0, padded - S), (0, 0)))
  mask_SxL[S:, -1] = True  # padding rows need one real token to stay finite; they are dropped
  out = [multihost.fetch(_next_token_logprobs(model, params, tokens_SxL[i:i + batch_size],
                                         mask_SxL[i:i + batch_size], labels_K))
         for i in range(0, padded, batch_size)]
  return np.concatenate(out)[:S] if out else np.zeros((0, labels_K.size), np.float32)


class _TokenJudge:
  """Formats the template, tokenizes, and reads log-probs at the label tokens."""

  def __init__(self, model: Transformer, params: Any, tokenizer: Tokenizer, template: str,
               labels: Sequence[str], batch_size: int, min_length: int):
    check_template(template)
    ids = []
    for label in labels:
      encoded = tokenizer.encode(label, add_bos=False)
      if len(encoded) != 1:
        raise ValueError(f"judge label {label!r} encodes to {len(encoded)} tokens {encoded}; each "
                         f"label must be a single token of this tokenizer")
      ids.append(encoded[0])
    if len(set(ids)) != len(ids):
      raise ValueError(f"judge labels {list(labels)} map to repeated token ids {ids}")
    self.model, self.params, self.tokenizer, self.template = model, params, tokenizer, template
    self.labels, self.label_ids = tuple(labels), tuple(ids)
    self.batch_size, self.min_length = batch_size, min_length

  def format(self, prompt: str, completion: str) -> str:
    return self.template.format(prompt=prompt, completion=completion)

  def label_logprobs(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """log p(label | judge prompt) for every pair and label: (S, K) float32, nats."""
    check_batch(type(self).__name__, prompts, completions)
    texts = [self.format(p, c) for p, c in zip(prompts, completions)]
    ids = self.tokenizer.encode_batch(texts, add_bos=True)
    return next_token_logprobs(self.model, self.params, ids, self.label_ids,
                               batch_size=self.batch_size, min_length=self.min_length)

  def label_distribution(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """The next-token distribution restricted to the labels and renormalized: (S, K) float64."""
    logp_SxK = self.label_logprobs(prompts, completions).astype(np.float64)
    logp_SxK -= logp_SxK.max(axis=-1, keepdims=True)
    p_SxK = np.exp(logp_SxK)
    return p_SxK / p_SxK.sum(axis=-1, keepdims=True)


class YesNoJudge(_TokenJudge):
  """Reward = P(yes) / (P(yes) + P(no)) at the token after the judge prompt, in [0, 1]."""

  def __init__(self, model: Transformer, params: Any, tokenizer: Tokenizer,
               template: str = YES_NO_TEMPLATE, *, yes: str = " Yes", no: str = " No",
               batch_size: int = 8, min_length: int = 16):
    super().__init__(model, params, tokenizer, template, (yes, no), batch_size, min_length)
    self.__name__ = "yes_no_judge"

  def __call__(self, prompts: list[str], completions: list[str],
               **columns: Any) -> list[float | None]:
    return [float(p) for p in self.label_distribution(prompts, completions)[:, 0]]


class RubricJudge(_TokenJudge):
  """Reward = sum_s s * p(s) over the score tokens, p renormalized over them (0..5 by default).

  scores: label token text -> its numeric score (default " 0" .. " 5").
  """

  def __init__(self, model: Transformer, params: Any, tokenizer: Tokenizer,
               template: str = RUBRIC_TEMPLATE, *, scores: Mapping[str, float] = RUBRIC_SCORES,
               batch_size: int = 8, min_length: int = 16):
    if len(scores) < 2:
      raise ValueError(f"RubricJudge: scores={dict(scores)} needs at least two labels")
    super().__init__(model, params, tokenizer, template, tuple(scores), batch_size, min_length)
    self.values = np.array([float(scores[label]) for label in self.labels])
    self.__name__ = "rubric_judge"

  def __call__(self, prompts: list[str], completions: list[str],
               **columns: Any) -> list[float | None]:
    return [float(e) for e in self.label_distribution(prompts, completions) @ self.values]
