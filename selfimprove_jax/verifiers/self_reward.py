"""Self-rewards under given params: log pi(y|x), log pi(y|x)/|y| and self-certainty.

All three come from one teacher-forced pass of the jitted scorer. The sharpening self-reward is
``"logprob"`` under the *base* params, whatever model sampled y. Token-level entry points:
``score_sampled`` (a ``sampling.Completions`` as the sampler returned it, each prompt read once for
its N samples) and ``score_completions`` (any prompt/completion id pairs); text-level:
``SelfReward``, a reward function that tokenizes the prompt (with BOS) and the completion (without)
separately and appends EOS, which is how a sampled completion follows its prompt.

Prompts and completions are padded to power-of-two lengths (``scoring.length_bucket``, at least
the given minimums) so that a stream of batches of varying lengths compiles a handful of shapes,
not one per batch; a caller that knows its longest lengths passes them and compiles one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from selfimprove_jax import multihost
from selfimprove_jax import scoring
from selfimprove_jax.models import Transformer
from selfimprove_jax.tokenizer import Tokenizer
from selfimprove_jax.verifiers.base import check_batch

SELF_REWARD_KINDS = ("logprob", "mean_logprob", "self_certainty")


def _check_ids(name: str, rows: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
  out = []
  for r, ids in enumerate(rows):
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
      # The embedding lookup clips out-of-range ids, which would score the wrong token silently.
      raise ValueError(f"{name}[{r}] has ids outside [0, {vocab_size}): {bad[:5]}")
    out.append(ids)
  return out


def pad_left(rows: Sequence[Sequence[int]], min_length: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads id lists with 0 to ``scoring.length_bucket`` of the longest (>= ``min_length``).

  Returns (tokens_SxL int32, mask_SxL bool), True at real tokens.
  """
  length = scoring.length_bucket(max((len(r) for r in rows), default=1), min_length)
  tokens_SxL = np.zeros((len(rows), length), np.int32)
  mask_SxL = np.zeros((len(rows), length), bool)
  for s, ids in enumerate(rows):
    if ids:
      tokens_SxL[s, length - len(ids):] = ids
      mask_SxL[s, length - len(ids):] = True
  return tokens_SxL, mask_SxL


def score_completions(model: Transformer, params: Any, prompt_ids: Sequence[Sequence[int]],
                      completion_ids: Sequence[Sequence[int]], *, batch_size: int = 8,
                      chunk_size: int | None = scoring.DEFAULT_CHUNK, min_prompt_len: int = 16,
                      min_completion_len: int = 16, entropy: bool = True,
                      self_certainty: bool = True) -> scoring.Scores:
  """Teacher-forced scores of each completion after its prompt (``scoring.Scores`` of NumPy
  arrays with leading dimension S = number of pairs).

  Every completion token is scored, including an EOS if the caller appended one; the first prompt
  token is never scored and is needed: a row with an empty prompt scores its completion from the
  second token on. ``entropy`` / ``self_certainty`` False skip those passes over the vocabulary
  (their fields are then None). N samples of one prompt: ``score_sampled`` reads the prompt once.
  """
  if len(prompt_ids) != len(completion_ids):
    raise ValueError(f"score_completions: {len(prompt_ids)} prompts but {len(completion_ids)} "
                     f"completions")
  vocab = model.config.vocab_size
  prompts = _check_ids("prompt_ids", prompt_ids, vocab)
  completions = _check_ids("completion_ids", completion_ids, vocab)
  prompt_SxP, prompt_mask_SxP = pad_left(prompts, min_prompt_len)
  C = scoring.length_bucket(max((len(c) for c in completions), default=1), min_completion_len)
  completion_SxC = np.zeros((len(completions), C), np.int32)
  for s, ids in enumerate(completions):
    completion_SxC[s, :len(ids)] = ids
  lengths_S = np.array([len(c) for c in completions], np.int32)
  tokens_SxL, input_mask_SxL, loss_mask_SxL = (np.asarray(a) for a in scoring.completion_batch(
      prompt_SxP, prompt_mask_SxP, completion_SxC, lengths_S))
  return scoring.score_in_batches(model, params, tokens_SxL, input_mask_SxL, loss_mask_SxL,
                                  batch_size=batch_size, chunk_size=chunk_size, entropy=entropy,
                                  self_certainty=self_certainty)


def score_groups(model: Transformer, params: Any, prompt_ids: Sequence[Sequence[int]],
                 completion_ids: Sequence[Sequence[Sequence[int]]], *, batch_size: int = 64,
                 chunk_size: int | None = scoring.DEFAULT_CHUNK, min_prompt_len: int = 16,
                 min_completion_len: int = 16, entropy: bool = False, self_certainty: bool = True,
                 progress: bool = False) -> scoring.Scores:
  """Scores of several completions per prompt, each prompt read once (``scoring.score_forked``:
  the prompt is prefilled, then forked to its completions, as the sampler does).

  Args:
    prompt_ids: S prompts' ids (each non-empty).
    completion_ids: per prompt, its completions' ids (any number, the counts may differ: every
      group is padded to the largest G with empty, unscored completions).
    batch_size: sequences per call (``batch_size // G`` prompts, at least one).
    min_prompt_len, min_completion_len: the least padded lengths; prompts are padded to a
      ``scoring.length_bucket`` and completions to a multiple of 16, both over the whole call, so
      a call compiles one program and equal minimums across calls share it.
    entropy, self_certainty: also compute these; per-token entropy (a pass over the vocabulary
      per token) is off by default.
  Returns:
    ``scoring.Scores`` of NumPy arrays, one row per completion in order (prompt 0's first, ...);
    per-token fields (rows, C) aligned with the completion tokens.
  """
  if len(prompt_ids) != len(completion_ids):
    raise ValueError(f"score_groups: {len(prompt_ids)} prompts but {len(completion_ids)} groups "
                     "of completions")
  if batch_size < 1:
    raise ValueError(f"score_groups: batch_size={batch_size!r} must be >= 1")
  vocab = model.config.vocab_size
  prompts = _check_ids("prompt_ids", prompt_ids, vocab)
  if any(not p for p in prompts):
    raise ValueError(f"score_groups: prompt_ids[{[bool(p) for p in prompts].index(False)}] is "
                     "empty; every prompt needs a token to predict the first completion token")
  groups = [_check_ids(f"completion_ids[{i}]", g, vocab) for i, g in enumerate(completion_ids)]
  G = max((len(g) for g in groups), default=0)
  if G == 0:
    return scoring.empty_scores(min_completion_len, entropy, self_certainty)
  prompt_SxP, prompt_mask_SxP = pad_left(prompts, min_prompt_len)
  longest = max(len(c) for g in groups for c in g)
  C = max(scoring.round_up(max(longest, 1), 16), min_completion_len)
  completion_SGxC = np.zeros((len(groups) * G, C), np.int32)
  lengths_SG = np.zeros(len(groups) * G, np.int32)
  real_SG = np.zeros(len(groups) * G, bool)
  for i, group in enumerate(groups):
    for j, ids in enumerate(group):
      completion_SGxC[i * G + j, :len(ids)] = ids
      lengths_SG[i * G + j], real_SG[i * G + j] = len(ids), True

  per_call = max(1, batch_size // G)
  n = len(groups)
  padded = scoring.round_up(n, per_call)  # the last call repeats prompt 0, then drops it
  take = np.concatenate([np.arange(n), np.zeros(padded - n, int)])
  rows = (take[:, None] * G + np.arange(G)).reshape(-1)
  results = []
  for start in tqdm(range(0, padded, per_call), disable=not progress, desc="scoring",
                    unit="batch"):
    b, r = take[start:start + per_call], rows[start * G:(start + per_call) * G]
    place = lambda x: scoring.place_rows(model, x)
    out = scoring.score_forked_jit(model, params, place(prompt_SxP[b]), place(prompt_mask_SxP[b]),
                                   place(completion_SGxC[r]), lengths_SG[r], chunk_size=chunk_size,
                                   entropy=entropy, self_certainty=self_certainty)
    results.append(multihost.fetch(out))
  scores = jax.tree.map(lambda *xs: np.concatenate(xs)[:n * G], *results)
  return jax.tree.map(lambda x: x[real_SG], scores)


def score_sampled(model: Transformer, params: Any, completions: Any, **kwargs: Any
                  ) -> scoring.Scores:
  """``score_groups`` of a ``sampling.Completions`` as the sampler returned it: every sample
  after its own prompt's ids, the prompt read once. Rows are prompt-major (prompt i, sample j is
  row i * N + j); ``kwargs`` go to ``score_groups``."""
  if len(completions.prompt_ids) != len(completions.tokens):
    raise ValueError(f"score_sampled: {len(completions.prompt_ids)} prompt_ids for "
                     f"{len(completions.tokens)} prompts' samples")
  return score_groups(model, params, completions.prompt_ids, completions.tokens, **kwargs)


def rewards_from_scores(scores: scoring.Scores, kind: str) -> list[float | None]:
  """One self-reward per sequence: ``kind`` in SELF_REWARD_KINDS (nats; self-certainty >= 0).
  None for a sequence with no scored token (nothing to judge)."""
  fields = {"logprob": scores.sum_logprob_B, "mean_logprob": scores.mean_logprob_B,
            "self_certainty": scores.self_certainty_B}
  if kind not in fields:
    raise ValueError(f"self-reward kind={kind!r} is not one of {SELF_REWARD_KINDS}")
  values = np.asarray(fields[kind], np.float64)
  counts = np.asarray(scores.num_tokens_B)
  return [float(v) if n > 0 else None for v, n in zip(values, counts)]


class SelfReward:
  """Reward function: the model's own score of each (prompt, completion) text pair.

  Args:
    model, params: the scoring model (the base/reference params for sharpening).
    tokenizer: text -> ids for that model.
    kind: "logprob" (sum, nats), "mean_logprob" (per token) or "self_certainty" (mean KL(U || p)).
    append_eos: score the EOS that ends a finished completion (the sharpening definition of y).
    batch_size, chunk_size: passed to ``score_completions``.
  """

  def __init__(self, model: Transformer, params: Any, tokenizer: Tokenizer, kind: str = "logprob",
               *, append_eos: bool = True, batch_size: int = 8,
               chunk_size: int | None = scoring.DEFAULT_CHUNK):
    if kind not in SELF_REWARD_KINDS:
      raise ValueError(f"SelfReward: kind={kind!r} is not one of {SELF_REWARD_KINDS}")
    self.model, self.params, self.tokenizer, self.kind = model, params, tokenizer, kind
    self.append_eos = append_eos
    self.score_kwargs = dict(batch_size=batch_size, chunk_size=chunk_size)
    self.__name__ = f"self_reward_{kind}"

  def token_ids(self, prompts: Sequence[str], completions: Sequence[str]
                ) -> tuple[list[list[int]], list[list[int]]]:
    """The (prompt ids, completion ids) pairs this reward scores."""
    prompt_ids = self.tokenizer.encode_batch(list(prompts), add_bos=True)
    eos = [self.tokenizer.eos_id] if self.append_eos else []
    completion_ids = [ids + eos for ids in
                      self.tokenizer.encode_batch(list(completions), add_bos=False)]
    return prompt_ids, completion_ids

  def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> scoring.Scores:
    """All per-sequence statistics at once (NumPy ``scoring.Scores``)."""
    check_batch(self.__name__, prompts, completions)
    return score_completions(self.model, self.params, *self.token_ids(prompts, completions),
                             **self.score_kwargs)

  def __call__(self, prompts: list[str], completions: list[str],
               **columns: Any) -> list[float | None]:
    return rewards_from_scores(self.scores(prompts, completions), self.kind)
