"""The synthetic addition task: determinism, corruption, grading, trace checking, tokenizer."""
import dataclasses

import pytest

from selfimprove_jax.data import get_task
from selfimprove_jax.data.synthetic import AdditionConfig
from selfimprove_jax.data.synthetic import CharTokenizer
from selfimprove_jax.data.synthetic import check_trace
from selfimprove_jax.data.synthetic import encode_demonstration
from selfimprove_jax.data.synthetic import extract_answer
from selfimprove_jax.data.synthetic import grade
from selfimprove_jax.data.synthetic import make_example
from selfimprove_jax.data.synthetic import make_examples
from selfimprove_jax.data.synthetic import make_mixture


def test_worked_example_format():
  # 457 + 1389 = 1846: columns 7+9=16, 5+8+1=14, 4+3+1=08, 0+1+0=01, answer W+1 digits.
  target = " 7+9+0=16 5+8+1=14 4+3+1=08 0+1+0=01 >01846"
  assert check_trace("0457+1389=", target).valid
  assert extract_answer(target) == "1846"
  ex = make_example(AdditionConfig(), seed=0, index=1)
  a, b = ex["operands"]
  assert ex["question"] == f"{a:04d}+{b:04d}="
  assert ex["answer"] == str(a + b) and not ex["corrupted"] and ex["corrupted_step"] == -1


def test_deterministic_and_index_stable():
  cfg = AdditionConfig(corruption_rate=0.4)
  assert make_examples(cfg, 50, seed=3) == make_examples(cfg, 50, seed=3)
  assert make_examples(cfg, 50, seed=3) != make_examples(cfg, 50, seed=4)
  # Example i depends on (seed, i) only, not on how many are generated or where they start.
  assert make_examples(cfg, 10, seed=3, start=20) == make_examples(cfg, 30, seed=3)[20:]
  assert make_example(cfg, 3, 7) == make_examples(cfg, 8, seed=3)[7]


def test_operands_do_not_depend_on_corruption_knobs():
  clean = make_examples(AdditionConfig(), 40, seed=1)
  noisy = make_examples(AdditionConfig(corruption_rate=0.9, corruption="drop_carry"), 40, seed=1)
  assert [e["operands"] for e in clean] == [e["operands"] for e in noisy]


@pytest.mark.parametrize("min_digits,max_digits,num_operands", [(3, 4, 2), (1, 2, 5), (6, 6, 3)])
def test_difficulty_knobs(min_digits, max_digits, num_operands):
  cfg = AdditionConfig(min_digits=min_digits, max_digits=max_digits, num_operands=num_operands)
  examples = make_examples(cfg, 200, seed=0)
  lengths = {len(str(x)) for e in examples for x in e["operands"]}
  assert lengths <= set(range(min_digits, max_digits + 1))
  assert len(lengths) == max_digits - min_digits + 1
  for e in examples:
    assert len(e["operands"]) == num_operands
    assert e["question"].count("+") == num_operands - 1
    assert e["target"].split(">")[1] == str(sum(e["operands"])).zfill(max_digits + 1)
    assert check_trace(e["question"], e["target"]).valid, e


def test_corruption_rate_matches_p():
  examples = make_examples(AdditionConfig(corruption_rate=0.3), 4000, seed=0)
  rate = sum(e["corrupted"] for e in examples) / len(examples)
  assert abs(rate - 0.3) < 0.03, rate  # 4 standard deviations
  assert not any(e["corrupted"] for e in make_examples(AdditionConfig(), 500, seed=0))


def test_random_corruption_is_one_wrong_step_then_consistent():
  cfg = AdditionConfig(corruption_rate=1.0, max_delta=2)
  for e in make_examples(cfg, 300, seed=5):
    k = e["corrupted_step"]
    check = check_trace(e["question"], e["target"])
    assert check.well_formed and check.bad_steps == (k,), (e, check)
    assert "sum written" in check.messages[0]
    assert check.answer_consistent, (e, check)  # later steps carry on from the written sum
    assert not grade(e["target"], e["answer"]).correct
    delta, rem = divmod(int(extract_answer(e["target"])) - int(e["answer"]), 10 ** k)
    assert rem == 0 and 1 <= abs(delta) <= 2, e


def test_drop_carry_is_the_same_mistake_every_time():
  cfg = AdditionConfig(corruption_rate=1.0, corruption="drop_carry", num_operands=3)
  examples = make_examples(cfg, 300, seed=2)
  assert any(not e["corrupted"] for e in make_examples(
      dataclasses.replace(cfg, num_operands=2, max_digits=3, min_digits=1), 300, seed=2))
  for e in examples:
    ops, width = e["operands"], cfg.max_digits
    carry, first = 0, None
    for j in range(width):  # The true carries, to find the first non-zero one.
      if carry and first is None:
        first = (j, carry)
      carry = (sum(x // 10 ** j % 10 for x in ops) + carry) // 10
    if first is None:
      assert not e["corrupted"] and grade(e["target"], e["answer"]).correct
      continue
    j, c = first
    assert e["corrupted"] and e["corrupted_step"] == j
    assert int(extract_answer(e["target"])) == sum(ops) - c * 10 ** j
    check = check_trace(e["question"], e["target"])
    assert check.bad_steps == (j,) and "carry in 0" in check.messages[0]
    assert check.answer_consistent


def test_carry_fork_forks_where_drop_carry_does_then_scatters():
  fork_cfg = AdditionConfig(corruption_rate=1.0, corruption="carry_fork")
  drop = make_examples(dataclasses.replace(fork_cfg, corruption="drop_carry"), 2000, seed=4)
  fork = make_examples(fork_cfg, 2000, seed=4)
  written = []
  for d, f in zip(drop, fork):
    assert f["operands"] == d["operands"] and f["corrupted_step"] == d["corrupted_step"]
    if not f["corrupted"]:  # no carry anywhere: nothing to fork
      assert f["target"] == d["target"] and grade(f["target"], f["answer"]).correct
      continue
    j = f["corrupted_step"]
    step = f["target"].split()[j]
    assert step.split("=")[0].endswith("+0")  # the fork token: the carry dropped, as drop_carry
    ops = f["operands"]
    true_total = sum(x // 10 ** j % 10 for x in ops) + 1
    written.append(int(step.split("=")[1]))
    assert written[-1] != true_total and not grade(f["target"], f["answer"]).correct
    check = check_trace(f["question"], f["target"])
    assert check.bad_steps == (j,) and check.answer_consistent  # later steps follow from it
  assert len(written) > 1000 and len(set(written)) == 20  # 0..19: each wrong sum is rare


def test_marker_opens_the_question_and_mixtures_alternate():
  configs = [AdditionConfig(marker="a"), AdditionConfig(marker="b", corruption_rate=1.0,
                                                        corruption="carry_fork")]
  mix = make_mixture(configs, 6, seed=0, start=2)
  assert [e["question"][0] for e in mix] == list("ababab")
  assert mix[1] == make_example(configs[1], 0, 3) and len({e["id"] for e in mix}) == 6
  tok = CharTokenizer()
  for e in mix:
    assert tok.decode(tok.encode(e["question"]), skip_special=True) == e["question"]
    assert check_trace(e["question"], e["target"]).well_formed
  with pytest.raises(ValueError, match="configs is empty"):
    make_mixture([], 1, seed=0)


@pytest.mark.parametrize("completion,gold,expected", [
    (" 7+9+0=16 5+8+1=14 4+3+1=08 0+1+0=01 >01846", "1846", True),
    (">01846<eos>", "1846", True),
    (">1846", "01846", True),
    (">01847", "1846", False),
    (" >18 >1846", "1846", True),  # the last answer counts
    (" >1846 >18", "1846", False),
    ("1846", "1846", False),  # no '>' marker: no answer
    (">", "1846", False),
    ("", "0", False),
    (">0000", "0", True),
])
def test_grader_literal_cases(completion, gold, expected):
  assert grade(completion, gold).correct is expected


@pytest.mark.parametrize("completion", [
    "",
    " 7+9+0=16 5+8+1=14 4+3+1=08 >1846",  # a step missing
    " 7+9+0=16 5+8+1=14 4+3+1=08 0+1+0=01",  # no answer
    " 7+9+0=16 5+8+1=14 4+3+1=08 0+1=01 >01846",  # wrong number of terms
    " 7+9+0=16 5+8+1=14 x 4+3+1=08 0+1+0=01 >01846",  # junk between steps
])
def test_check_trace_rejects_malformed(completion):
  check = check_trace("0457+1389=", completion)
  assert not check.well_formed and not check.valid


def test_check_trace_flags_inconsistent_answer_and_misread_digit():
  check = check_trace("0457+1389=", " 7+9+0=16 5+8+1=14 4+3+1=08 0+1+0=01 >01847")
  assert check.bad_steps == () and not check.answer_consistent
  check = check_trace("0457+1389=", " 7+9+0=16 5+7+1=13 4+3+1=08 0+1+0=01 >01836")
  assert check.bad_steps == (1,) and "digits" in check.messages[0]


def test_tokenizer_round_trip_and_specials():
  tok = CharTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 25)
  for e in make_examples(AdditionConfig(corruption_rate=0.5, num_operands=3), 50, seed=0):
    text = e["question"] + e["target"]
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special=True) == text
    assert tok.decode(ids) == "<bos>" + text
  assert tok.encode("12<eos>", add_bos=False) == [4, 5, 2]
  assert tok.stop_ids == (2,)
  with pytest.raises(ValueError, match="'x' at position 2"):
    tok.encode("12x")


def test_encode_demonstration_ends_with_eos():
  tok = CharTokenizer()
  e = make_example(AdditionConfig(), 0, 0)
  prompt, target = encode_demonstration(tok, e)
  assert prompt[0] == tok.bos_id and target[-1] == tok.eos_id
  assert tok.decode(prompt + target, skip_special=True) == e["question"] + e["target"]


@pytest.mark.parametrize("kwargs,match", [
    ({"min_digits": 5, "max_digits": 4}, "min_digits=5"),
    ({"num_operands": 11}, "11"),
    ({"corruption_rate": 1.5}, "1.5"),
    ({"corruption": "flip"}, "'flip'"),
    ({"max_delta": 0}, "0"),
    ({"marker": "z"}, "'z'"),
    ({"marker": "ab"}, "'ab'"),
])
def test_config_validation_names_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AdditionConfig(**kwargs)


def test_registered_task():
  task = get_task("synthetic_addition")
  examples = task.load(5, seed=1, config=AdditionConfig(max_digits=3))
  for e in examples:
    assert task.render(e) == e["question"]
    assert task.is_correct(e, e["target"] + "<eos>")
    assert task.extract(e["target"]) == e["answer"]
