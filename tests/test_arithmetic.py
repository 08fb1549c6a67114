"""The generated arithmetic task (the real-model study's task) and configs/real_smollm2.py."""
import re

import pytest

from selfimprove_jax.data import arithmetic
from selfimprove_jax.data.tasks import get_task
from selfimprove_jax.loop import config as loop_config
from tests.loop_helpers import method_config


def test_examples_depend_only_on_seed_and_index():
  ten = arithmetic.load_arithmetic(10, seed=3)
  assert arithmetic.load_arithmetic(4, seed=3) == ten[:4]
  assert arithmetic.load_arithmetic(3, seed=3, start=7) == ten[7:]
  assert arithmetic.load_arithmetic(10, seed=4) != ten
  assert len({e["id"] for e in ten}) == 10


@pytest.mark.parametrize("operators", ["+", "-*", "+-*"])
def test_answers_are_the_operation_and_operands_in_range(operators):
  for e in arithmetic.load_arithmetic(50, seed=0, min_value=2, max_value=12, operators=operators):
    a, op, b = re.fullmatch(r"What is (\d+) (.) (\d+)\?", e["question"]).groups()
    assert op in operators and 2 <= int(a) <= 12 and 2 <= int(b) <= 12
    assert int(e["answer"]) == arithmetic.OPERATORS[op](int(a), int(b))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(min_value=9, max_value=3), "min_value=9 > max_value=3"),
    (dict(operators="+/"), "operators='+/'"),
    (dict(operators=""), "operators=''"),
])
def test_bad_options_are_named(kwargs, needle):
  with pytest.raises(ValueError, match=needle.replace("+", r"\+").replace("*", r"\*")):
    arithmetic.load_arithmetic(2, seed=0, **kwargs)


@pytest.mark.parametrize("completion,correct", [
    ("47 + 38 = 85. The answer is 85.", True),
    ("The answer is 85", True),
    ("85", True),
    ("47 + 38 = 85. The answer is 84.", False),  # the stated answer counts, not the last sum
    ("I think it is 75 or so", False),
    ("no number here", False),
])
def test_the_task_grades_the_number_a_reader_takes(completion, correct):
  task = get_task("arithmetic")
  assert task.grader(completion, "85").correct is correct


def test_the_prompt_carries_the_worked_exemplars_as_chat_turns():
  task = get_task("arithmetic")
  example = arithmetic.load_arithmetic(1, seed=0)[0]
  messages = task.messages(example, shots=2)
  assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
  assert messages[1]["content"] == "12 + 7 = 19. The answer is 19."
  assert messages[-1]["content"] == example["question"]


@pytest.mark.parametrize("variant", ["", "colab"])
def test_the_real_study_config_validates_and_names_a_fetched_model(variant):
  c = method_config("real_smollm2", variant)
  loop_config.validate(c)
  assert c.model.checkpoint == "fetch:smollm2-135m-instruct"
  assert c.task.chat_format == "checkpoint"  # the checkpoint's own template
  assert (c.score.reward, c.score.reward_model) == ("logprob", "base")  # self-reward only
  assert max(c.eval.bon_k) == c.eval.num_samples == (16 if variant == "" else 8)


def test_an_unknown_fetched_model_is_named():
  c = method_config("real_smollm2", "", **{"model.checkpoint": "fetch:gpt-5"})
  with pytest.raises(ValueError, match="model.checkpoint.*fetch:gpt-5"):
    loop_config.validate(c)
