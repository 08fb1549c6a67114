"""The reward interface and composition, voting on literal cases with ties, and the model-based
verifiers (self-rewards, LLM-as-judge) against NumPy references on tiny random models."""
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from selfimprove_jax import verifiers as v
from selfimprove_jax.models import TINY, Transformer, param_shapes
from selfimprove_jax.sampling import Sampler
from selfimprove_jax.tokenizer import train_sentencepiece
from selfimprove_jax.verifiers import self_reward
from tests import reference_numpy

# ------------------------------------------------------------------------------ interface


def _const(scores, name):
  def fn(prompts, completions, **columns):
    return list(scores)
  fn.__name__ = name
  return fn


def test_combine_weights_and_none_literal():
  f = _const([1.0, None, 0.5, None], "f")
  g = _const([0.0, 2.0, None, None], "g")
  combined = v.combine([(f, 0.5), (g, 2.0)])
  assert combined(["p"] * 4, ["c"] * 4) == [0.5, 4.0, 0.25, None]


def test_combine_refuses_bad_inputs():
  with pytest.raises(ValueError, match="at least one"):
    v.combine([])
  with pytest.raises(ValueError, match="weight 0=nan"):
    v.combine([(_const([1.0], "f"), float("nan"))])
  with pytest.raises(ValueError, match="short returned 1 scores for 2"):
    v.combine([(_const([1.0], "short"), 1.0)])(["p", "q"], ["a", "b"])
  with pytest.raises(ValueError, match=r"bad returned inf for completion 0"):
    v.combine([(_const([math.inf], "bad"), 1.0)])(["p"], ["a"])


def test_grader_reward_scores_and_none():
  completions = ["#### 5", "#### 6", "I give up", "#### 5"]
  answers = ["5", "5", "5", None]
  assert v.gsm8k_reward(["q"] * 4, completions, answer=answers) == [1.0, 0.0, 0.0, None]
  assert v.math_reward(["q"], ["\\boxed{\\frac12}"], answer=["0.5"]) == [1.0]
  assert v.mmlu_reward(["q"] * 2, ["The answer is (B)", "(C)"], answer=[1, 1]) == [1.0, 0.0]


def test_reward_fns_name_the_missing_or_misaligned_column():
  with pytest.raises(ValueError, match="needs the column 'answer'"):
    v.gsm8k_reward(["q"], ["#### 5"], solution=["5"])
  with pytest.raises(ValueError, match=r"column 'answer' has 1 entries, expected .* \(2\)"):
    v.gsm8k_reward(["q", "q"], ["#### 5", "#### 6"], answer=["5"])
  with pytest.raises(ValueError, match="column 'prompts' has 3 entries"):
    v.prontoqa_reward(["q"] * 3, ["True"], answer=[True])


def test_package_import_does_not_import_jax():
  code = "import sys, selfimprove_jax.verifiers; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ voting

@pytest.mark.parametrize("answers,want", [
    (["1", "2", "2", "1"], "1"),  # 2-2 tie: "1" occurs first
    (["2", "1", "1", "2"], "2"),
    (["b", "a", "a"], "a"),
    ([None, "3", None], "3"),
    ([None, None], None),
    ([], None),
    (["x", "y", "z"], "x"),
    ([None, "y", "x", "x", "y"], "y"),
])
def test_majority_vote_literal(answers, want):
  assert v.majority_vote(answers) == want


def test_borda_ranks_ties_by_sample_order():
  assert v.borda_ranks([0.5, 0.9, 0.5, 0.1]) == [2, 1, 3, 4]
  with pytest.raises(ValueError, match=r"self_certainty\[1\]=nan"):
    v.borda_ranks([0.1, float("nan")])


@pytest.mark.parametrize("answers,certainty,power,want", [
    (["x", "y", "y", "x"], [4, 3, 2, 1], 1.0, "x"),  # 4+1 vs 3+2: tie, "x" first
    (["x", "y", "y"], [0.1, 0.2, 0.3], 1.0, "y"),  # 1 vs 2+3
    (["x", "x", "y"], [1, 2, 3], 0.0, "x"),  # power 0 is the majority: 2 vs 1
    (["x", "x", "y"], [1, 2, 3], 1.0, "x"),  # 1+2 vs 3: tie, "x" first
    (["x", "x", "y"], [1, 2, 3], 2.0, "y"),  # 1+4 vs 9
    (["a", None, "b"], [1, 10, 2], 1.0, "b"),  # the unparsed sample takes rank 1 but casts nothing
    ([None, None], [1, 2], 1.0, None),
])
def test_borda_vote_literal(answers, certainty, power, want):
  assert v.borda_vote(answers, certainty, power=power) == want


def test_borda_vote_power_zero_equals_majority():
  rng = np.random.default_rng(0)
  for _ in range(50):
    answers = [str(a) if a < 4 else None for a in rng.integers(0, 5, 7)]
    assert v.borda_vote(answers, rng.normal(size=7), power=0.0) == v.majority_vote(answers)


def test_borda_vote_refuses_bad_inputs():
  with pytest.raises(ValueError, match="2 answers but 3"):
    v.borda_vote(["a", "b"], [1, 2, 3])
  with pytest.raises(ValueError, match="power=-1"):
    v.borda_vote(["a"], [1], power=-1)


def _gsm8k_key(completion):
  found = v.extract_gsm8k_flexible(completion)
  return v.canonical_number(found) if found else None


def test_majority_pseudo_label_reward_by_prompt_text():
  reward = v.majority_reward(_gsm8k_key)
  prompts = ["p1"] * 4 + ["p2"] * 3 + ["p3"] * 2
  completions = ["#### 5", "it is 5.0", "#### 6", "no idea",  # majority 5 ("5.0" votes with it)
                 "pass", "skip", "?",  # no answer in the group: no pseudo-label
                 "#### 7", "#### 8"]  # tie: the first answer is the label
  assert reward(prompts, completions) == [1.0, 1.0, 0.0, 0.0, None, None, None, 1.0, 0.0]


def test_majority_pseudo_label_reward_by_group_column():
  reward = v.majority_reward(_gsm8k_key, group_column="prompt_id")
  prompts = ["same text"] * 4
  got = reward(prompts, ["#### 1", "#### 2", "#### 2", "#### 1"], prompt_id=[0, 0, 0, 1])
  assert got == [0.0, 1.0, 1.0, 1.0]
  with pytest.raises(ValueError, match="needs the column 'prompt_id'"):
    reward(prompts, ["#### 1"] * 4)


# ------------------------------------------------------------------------------ model-based

CORPUS = ([
    "Question: what is 2 plus 3? Answer: Yes. Score: 4",
    "Is the proposed answer correct? Answer: No. Score: 1",
    "Score: 0 Score: 1 Score: 2 Score: 3 Score: 5",
] * 20 + ["The quick brown fox jumps over the lazy dog.", "Yes No yes no 12 plus 30 is 42."] * 5)

PROMPTS = ["Question: what is 2 plus 3?", "Is the fox quick?", "Q"]
COMPLETIONS = ["The answer is 5.", "Yes", ""]


@pytest.fixture(scope="module")
def tok():
  tok = train_sentencepiece(CORPUS, vocab_size=400)
  assert tok.vocab_size <= TINY["mistral"].vocab_size
  return tok


@pytest.fixture(scope="module")
def setup():
  # gemma2: tied embeddings and both soft-caps, the family with the most knobs on the logits path.
  # Random normal parameters from the shapes alone: no init program to compile.
  cfg = TINY["gemma2"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype),
                        param_shapes(cfg))
  return cfg, Transformer(cfg), params


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_self_rewards(cfg, params, prompt_ids, completion_ids):
  """(sum log p, mean log p, self-certainty) per pair from the NumPy forward of the unpadded row."""
  host_params = jax.device_get(params)
  out = []
  for p, c in zip(prompt_ids, completion_ids):
    seq = np.array([p + c])
    mask = np.ones_like(seq, bool)
    positions = np.arange(seq.shape[1])[None]
    logp = _np_log_softmax(reference_numpy.forward(cfg, host_params, seq, positions, mask)[0])
    scored = range(len(p), len(p) + len(c))
    token_logp = [logp[t - 1, seq[0, t]] for t in scored]
    certainty = [-math.log(cfg.vocab_size) - logp[t - 1].mean() for t in scored]
    n = len(token_logp)
    out.append((sum(token_logp), sum(token_logp) / n if n else None,
                sum(certainty) / n if n else None))
  return out


@pytest.mark.parametrize("kind_index,kind", list(enumerate(v.SELF_REWARD_KINDS)))
def test_self_rewards_equal_numpy_reference(setup, tok, kind_index, kind):
  cfg, model, params = setup
  reward = v.SelfReward(model, params, tok, kind, batch_size=2, chunk_size=5)
  prompt_ids, completion_ids = reward.token_ids(PROMPTS, COMPLETIONS)
  assert completion_ids[2] == [tok.eos_id]  # an empty completion still ends with EOS
  want = [r[kind_index] for r in _reference_self_rewards(cfg, params, prompt_ids, completion_ids)]
  got = reward(PROMPTS, COMPLETIONS, answer=["ignored"] * 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-4)
  assert len(set(np.round(got, 4))) == 3, "three different pairs must score differently"


def test_score_completions_token_level_and_empty_rows(setup):
  cfg, model, params = setup
  rng = np.random.default_rng(0)
  prompt_ids = [list(rng.integers(1, cfg.vocab_size, n)) for n in (3, 7, 1)]
  completion_ids = [list(rng.integers(1, cfg.vocab_size, n)) for n in (5, 0, 2)]
  scores = self_reward.score_completions(model, params, prompt_ids, completion_ids, batch_size=2)
  want = _reference_self_rewards(cfg, params, prompt_ids, completion_ids)
  np.testing.assert_array_equal(scores.num_tokens_B, [5, 0, 2])
  for kind_index, kind in enumerate(v.SELF_REWARD_KINDS):
    got = v.rewards_from_scores(scores, kind)
    assert got[1] is None, "an empty completion cannot be judged"
    np.testing.assert_allclose([got[0], got[2]], [want[0][kind_index], want[2][kind_index]],
                               rtol=1e-4, atol=5e-4)


def test_score_sampled_reads_the_sampler_output(setup):
  """The sampler's Completions scored as they are: prompt ids from the sampler, each sample after
  its own prompt, prompt-major rows; equal to the unpadded NumPy forward of each pair."""
  cfg, model, params = setup
  rng = np.random.default_rng(2)
  prompts = [list(map(int, rng.integers(1, cfg.vocab_size, n))) for n in (3, 9, 1)]
  sampler = Sampler(model, params, max_new_tokens=6, batch_size=2, stop_ids=(7,))
  out = sampler(prompts, num_samples=2, rng=3)
  assert out.prompt_ids == prompts
  scores = self_reward.score_sampled(model, params, out, batch_size=2)
  pairs = [(p, t) for p, per_prompt in zip(prompts, out.tokens) for t in per_prompt]
  want = _reference_self_rewards(cfg, params, *zip(*pairs))
  np.testing.assert_array_equal(scores.num_tokens_B, [len(t) for _, t in pairs])
  np.testing.assert_allclose(scores.sum_logprob_B, [w[0] for w in want], rtol=1e-4, atol=5e-4)
  np.testing.assert_allclose(scores.self_certainty_B, [w[2] for w in want], rtol=1e-4, atol=5e-4)
  assert scores.token_entropy_BxL is None  # off unless asked for
  # The sampler's own per-token log-probs are the same numbers.
  for row, (p, t) in enumerate(pairs):
    i, j = divmod(row, 2)
    np.testing.assert_allclose(scores.token_logprobs_BxL[row, :len(t)],
                               out.model_logprobs[i][j], atol=2e-4)
  # Groups of different sizes (padded with unscored rows inside), and batches of one prompt.
  ragged = self_reward.score_groups(model, params, prompts, [out.tokens[0][:1], [], out.tokens[2]],
                                    batch_size=1)
  np.testing.assert_allclose(ragged.sum_logprob_B, scores.sum_logprob_B[[0, 4, 5]], atol=1e-5)
  with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
    self_reward.score_groups(model, params, [[1], []], [[[2]], [[3]]])


def test_self_reward_refuses_bad_input(setup, tok):
  cfg, model, params = setup
  with pytest.raises(ValueError, match=r"completion_ids\[1\] has ids outside \[0, 512\): \[512\]"):
    self_reward.score_completions(model, params, [[1], [2]], [[3], [cfg.vocab_size]])
  with pytest.raises(ValueError, match="kind='likelihood'"):
    v.SelfReward(model, params, tok, "likelihood")


def _reference_label_logprobs(model, params, tok, texts, label_ids):
  """log softmax of the model's own logits at the last token of each judge prompt, from one
  ordinary forward of the prompts right-padded (causal: padding after a token cannot change it)."""
  rows = [tok.encode(text) for text in texts]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for r, ids in enumerate(rows):
    tokens[r, :len(ids)] = ids
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens, None, tokens > 0)[0])
  return np.array([_np_log_softmax(logits[r, len(ids) - 1])[list(label_ids)]
                   for r, ids in enumerate(rows)])


def test_yes_no_judge_equals_softmax_reference(setup, tok):
  _, model, params = setup
  template = "Question: {prompt}\nProposed answer: {completion}\nIs it correct? Answer:"
  judge_fn = v.YesNoJudge(model, params, tok, template, batch_size=2)
  texts = [template.format(prompt=p, completion=c) for p, c in zip(PROMPTS, COMPLETIONS)]
  logp = _reference_label_logprobs(model, params, tok, texts, judge_fn.label_ids)
  want = np.exp(logp[:, 0]) / np.exp(logp).sum(-1)
  got = judge_fn(PROMPTS, COMPLETIONS)
  np.testing.assert_allclose(judge_fn.label_logprobs(PROMPTS, COMPLETIONS), logp, atol=2e-5)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert all(0 < p < 1 for p in got) and len(set(np.round(got, 6))) == 3


def test_rubric_judge_expected_score_equals_softmax_reference(setup, tok):
  _, model, params = setup
  judge_fn = v.RubricJudge(model, params, tok, batch_size=2)  # the default rubric, " 0".." 5"
  texts = [v.RUBRIC_TEMPLATE.format(prompt=p, completion=c) for p, c in zip(PROMPTS, COMPLETIONS)]
  logp = _reference_label_logprobs(model, params, tok, texts, judge_fn.label_ids)
  p = np.exp(logp) / np.exp(logp).sum(-1, keepdims=True)
  want = p @ np.arange(6)
  got = judge_fn(PROMPTS, COMPLETIONS)
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(judge_fn.label_distribution(PROMPTS, COMPLETIONS).sum(-1), 1.0)
  assert all(0 < s < 5 for s in got)


@pytest.mark.parametrize("template,message", [
    ("Q: {prompt} Is it right?", r"missing placeholder\(s\) \['\{completion\}'\]"),
    ("{completion} only", r"missing placeholder\(s\) \['\{prompt\}'\]"),
    ("Q: {prompt} A: {completion} Gold: {answer}", r"unknown field\(s\) \['answer'\]"),
    ("Q: {prompt} A: {completion} {}", r"unknown field\(s\) \[''\]"),
    ("Q: {prompt} A: {completion} a set {1, 2", "malformed"),
])
def test_judge_template_errors_are_clear(setup, tok, template, message):
  _, model, params = setup
  with pytest.raises(ValueError, match=message):
    v.YesNoJudge(model, params, tok, template)


def test_judge_labels_must_be_single_distinct_tokens(setup, tok):
  _, model, params = setup
  with pytest.raises(ValueError, match="' Absolutely certain' encodes to .* single token"):
    v.YesNoJudge(model, params, tok, yes=" Absolutely certain")
  with pytest.raises(ValueError, match="repeated token ids"):
    v.YesNoJudge(model, params, tok, yes=" Yes", no=" Yes")
  with pytest.raises(ValueError, match="at least two labels"):
    v.RubricJudge(model, params, tok, scores={" 1": 1.0})
