"""VERIFY: host-side verifiers with one interface, compatible in spirit with TRL/Tunix rewards.

    reward_fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are dataset fields aligned with ``completions`` (e.g. ``answer``, ``test_list``,
``prompt_id``); each function takes what it needs by name. None means "could not judge" (this row
has no reference for this verifier, or a group has no majority answer) and is never a silent 0.
``combine([(fn, weight), ...])`` sums weighted scores, dropping None terms (TRL's nansum); a
completion every function returned None for stays None.

Modules:
  base          RewardFn, Verdict(correct, parsed, extracted), grader_reward, combine.
  graders       GSM8K (strict "#### n" / flexible), ProntoQA True/False, multiple-choice letters,
                exact match; grade_x(completion, reference) -> Verdict plus ready reward fns.
  math_answers  MATH: last \\boxed{}, normalizer, string-then-sympy-then-math-verify equivalence.
  sympy_check   sympy and math-verify comparisons in a killable worker process (timeouts never
                hang the caller, from any thread).
  voting        majority and self-certainty Borda votes; TTRL/SRT majority pseudo-label reward.
  sandbox       untrusted code in a contained child (rlimits, timeout, namespaces, a socket filter,
                leased uids, verdicts from what the host observed); ``evaluate`` returns values.
  code          MBPP-style rewards: each assert split on the host, the program's calls run in the
                sandbox, their plain values compared on the host (``CodeResult``).
  self_reward   log-prob, length-normalized log-prob, self-certainty via the jitted scorer.
  judge         LLM-as-judge from token probabilities (yes/no, 5-point additive rubric).

Graders score an unparsed completion (no answer found) as 0.0: it is a wrong answer. Only the
model-based modules import jax; they load on first access, so graders, voting and the sandbox stay
usable in data workers without it.
"""
import importlib

from selfimprove_jax.verifiers.base import RewardFn, Verdict, check_batch, combine, grader_reward
from selfimprove_jax.verifiers.code import (CodeResult, extract_code, mbpp_program, mbpp_reward,
                                            run_mbpp)
from selfimprove_jax.verifiers.graders import (canonical_number, exact_match_reward,
                                               extract_choice, extract_gsm8k_flexible,
                                               extract_gsm8k_strict, extract_true_false,
                                               grade_exact, grade_gsm8k, grade_gsm8k_flexible,
                                               grade_mmlu, grade_multiple_choice, grade_prontoqa,
                                               gsm8k_flexible_reward, gsm8k_reward, mmlu_reward,
                                               normalize_text, prontoqa_reward)
from selfimprove_jax.verifiers.math_answers import (boxed_answers, extract_math_answer, grade_math,
                                                    last_boxed, latex_to_sympy, math_equal,
                                                    math_reward, normalize_math)
from selfimprove_jax.verifiers.sandbox import (STATUSES, SandboxConfig, SandboxError,
                                               SandboxResult, evaluate, run_program, run_programs)
from selfimprove_jax.verifiers.sympy_check import SympyChecker, default_checker
from selfimprove_jax.verifiers.voting import (borda_ranks, borda_vote, group_indices,
                                              majority_reward, majority_vote)

_LAZY = {
    "SelfReward": "self_reward", "SELF_REWARD_KINDS": "self_reward",
    "score_completions": "self_reward", "score_sampled": "self_reward",
    "rewards_from_scores": "self_reward",
    "YesNoJudge": "judge", "RubricJudge": "judge", "next_token_logprobs": "judge",
    "check_template": "judge", "YES_NO_TEMPLATE": "judge", "RUBRIC_TEMPLATE": "judge",
    "RUBRIC_SCORES": "judge",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"selfimprove_jax.verifiers.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'selfimprove_jax.verifiers' has no attribute {name!r}")


__all__ = [
    "CodeResult", "RewardFn", "STATUSES", "SandboxConfig", "SandboxError", "SandboxResult", "SympyChecker",
    "Verdict", "borda_ranks", "borda_vote", "boxed_answers", "canonical_number", "check_batch", "combine",
    "default_checker", "evaluate", "exact_match_reward", "extract_choice", "extract_code",
    "extract_gsm8k_flexible", "extract_gsm8k_strict", "extract_math_answer", "extract_true_false",
    "grade_exact", "grade_gsm8k", "grade_gsm8k_flexible", "grade_math", "grade_mmlu",
    "grade_multiple_choice", "grade_prontoqa", "grader_reward", "group_indices", "gsm8k_reward",
    "gsm8k_flexible_reward", "last_boxed", "latex_to_sympy", "majority_reward", "majority_vote",
    "math_equal", "math_reward", "mbpp_program", "mbpp_reward", "mmlu_reward", "normalize_math",
    "normalize_text", "prontoqa_reward", "run_mbpp", "run_program", "run_programs", *_LAZY,
]
