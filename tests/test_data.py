"""Loaders (TFDS array_record without TensorFlow, JSONL/JSON/Parquet), tasks and answer parsing."""
import json
import sys
from unittest import mock

import numpy as np
import pyarrow as pa  # a dependency of tensorflow-datasets
import pyarrow.parquet as pq
import pytest

from selfimprove_jax.data import DataError
from selfimprove_jax.data import Shot
from selfimprove_jax.data import TASK_NAMES
from selfimprove_jax.data import get_task
from selfimprove_jax.data import answers
from selfimprove_jax.data import loaders
from selfimprove_jax.families import FAMILIES
from selfimprove_jax.verifiers import grade_exact



def write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def write_parquet(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def gsm8k_row(i):
  return {"question": f"Tom has {i} apples and buys 2 more. How many now?",
          "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"}


# --- Answer parsing --------------------------------------------------------------------------

@pytest.mark.parametrize("answer,numeric", [
    ("42", True), ("-3", True), ("0.25", True), (".5", True), ("1,000", True),
    ("10{,}000", True), ("5.", True), ("\\frac{1}{2}", False), ("2\\sqrt{3}", False),
    ("(1,2)", False), ("1,2", False), ("x+1", False), ("5\\text{ cm}", False), ("", False),
])
def test_is_numeric_answer(answer, numeric):
  assert answers.is_numeric_answer(answer) is numeric


def test_gsm8k_gold_after_hashes():
  assert answers.after_hashes("a\n#### 1,200 ") == "1,200"
  assert answers.after_hashes("#### ") is None


# --- GSM8K through TFDS array_record, no TensorFlow ------------------------------------------

@pytest.fixture(scope="module")
def gsm8k_data_dir(tmp_path_factory):
  """A real (tiny) gsm8k array_record dataset built by the real TFDS builder, offline.

  Only the download is replaced: the builder's four JSONL URLs map to local files.
  """
  import tensorflow_datasets as tfds
  import tensorflow_datasets.text.gsm8k  # noqa: F401  (registers the builder)
  root = tmp_path_factory.mktemp("tfds")
  files = {}
  for split, n in (("train", 3), ("test", 7), ("train_socratic", 1), ("test_socratic", 1)):
    files[split] = str(write_jsonl(root / f"{split}.jsonl", [gsm8k_row(i) for i in range(n)]))
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         lambda self, urls: files):
    tfds.builder("gsm8k", data_dir=root / "data", file_format="array_record"
                 ).download_and_prepare()
  return root / "data"


def test_gsm8k_tfds_array_record(gsm8k_data_dir):
  examples = loaders.load_gsm8k(split="test", data_dir=gsm8k_data_dir)
  assert "tensorflow" not in sys.modules  # data_source + array_record never import TF
  assert len(examples) == 7
  by_question = {e["question"]: e for e in examples}
  for i in range(7):
    e = by_question[gsm8k_row(i)["question"]]
    assert e["answer"] == str(i + 2) and e["solution"] == gsm8k_row(i)["answer"]
    assert e["id"].startswith("gsm8k/test:")
  assert len(loaders.load_gsm8k(split="test", data_dir=gsm8k_data_dir, first_n=3)) == 3


def test_gsm8k_tfds_through_grain(gsm8k_data_dir):
  from selfimprove_jax.data import pipeline
  from selfimprove_jax.tokenizer import train_sentencepiece
  task = get_task("gsm8k")
  examples = task.load(split="test", data_dir=gsm8k_data_dir)
  tok = train_sentencepiece([task.render(e, shots=1, chat="gemma2") for e in examples],
                            vocab_size=400)
  ds = pipeline.prompt_batches(examples, pipeline.prompt_encoder(task, tok, shots=1,
                                                                 chat="gemma2"),
                               batch_size=4, buckets=(128, 256, 512), pad_id=tok.pad_id,
                               seed=0, process_index=0, process_count=1)
  batches = list(pipeline.iterator(ds))
  assert len(batches) == 2 and batches[1]["valid"].tolist() == [True, True, True, False]
  seen = []
  for b in batches:
    for row in np.flatnonzero(b["valid"]):
      ex = examples[b["index"][row]]
      text = tok.decode(b["tokens"][row][b["mask"][row]])
      assert text == task.render(ex, shots=1, chat="gemma2")
      seen.append(ex["id"])
  assert sorted(seen) == sorted(e["id"] for e in examples)


def test_gsm8k_tfds_mock_data_through_grain():
  # tfds.testing.mock_data stands in for a prepared dataset (no files, no TF); its rows come from
  # as_data_source_fn, in the features' byte-string form that tfds.data_source returns.
  import tensorflow_datasets as tfds
  from selfimprove_jax.data import pipeline
  rows = [{k: v.encode() for k, v in gsm8k_row(i).items()} for i in range(5)]
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: rows):
    examples = get_task("gsm8k").load(split="test")
  assert "tensorflow" not in sys.modules
  assert [e["answer"] for e in examples] == [str(i + 2) for i in range(5)]
  encode = lambda ex: [1] + [int(c) + 3 for c in ex["answer"]]
  ds = pipeline.prompt_batches(examples, encode, batch_size=2, buckets=(4,), pad_id=0, seed=0,
                               process_index=0, process_count=1)
  batches = list(pipeline.iterator(ds))
  assert [b["tokens"].shape for b in batches] == [(2, 4)] * 3
  got = sorted(examples[i]["answer"] for b in batches for i, ok in zip(b["index"], b["valid"]) if ok)
  assert got == sorted(e["answer"] for e in examples)


def test_gsm8k_tfds_mock_data_rows_are_validated():
  # tfds.testing.mock_data patches tfds.data_source too (no TF needed), but its rows are
  # random text without '#### ', so the loader must reject them, naming record and field.
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(DataError, match=r"tfds gsm8k/test record 0: field 'answer'"):
      loaders.load_gsm8k(split="test")


def test_gsm8k_tfds_missing_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    loaders.load_gsm8k(split="test", data_dir=tmp_path)


def test_gsm8k_jsonl(tmp_path):
  path = write_jsonl(tmp_path / "test.jsonl", [gsm8k_row(i) for i in range(5)])
  examples = loaders.load_gsm8k(path, first_n=2)
  assert [e["answer"] for e in examples] == ["2", "3"]
  assert examples[0]["id"] == f"{tmp_path.name}/test:0"


# --- MATH, ProntoQA, MMLU, MBPP, generic -----------------------------------------------------

def math_row(answer, level="Level 2"):
  return {"problem": f"Find {answer}.", "level": level, "type": "Algebra",
          "solution": f"First \\boxed{{0}}, finally $\\boxed{{{answer}}}$."}


def test_math_parquet_numeric_only_and_first_n(tmp_path):
  answers_ = ["12", "\\frac{1}{2}", "-3", "x+1", "0.5", "7"]
  write_parquet(tmp_path / "algebra" / "test-0.parquet", [math_row(a) for a in answers_[:3]])
  write_parquet(tmp_path / "geometry" / "test-0.parquet", [math_row(a) for a in answers_[3:]])
  every = loaders.load_math(tmp_path)
  assert [e["answer"] for e in every] == answers_
  assert len({e["id"] for e in every}) == 6  # same file names, different folders
  numeric = loaders.load_math(tmp_path, numeric_only=True, first_n=3)
  assert [e["answer"] for e in numeric] == ["12", "-3", "0.5"]
  permuted = loaders.load_math(tmp_path, order_seed=0)
  assert sorted(e["id"] for e in permuted) == sorted(e["id"] for e in every)
  assert permuted == loaders.load_math(tmp_path, order_seed=0)


def test_math_jsonl_and_task_grader(tmp_path):
  [ex] = loaders.load_math(write_jsonl(tmp_path / "m.jsonl", [math_row("\\frac{3}{4}")]))
  assert ex["answer"] == "\\frac{3}{4}" and ex["level"] == "Level 2"
  task = get_task("math")
  assert task.is_correct(ex, "so the answer is $\\boxed{\\frac{3}{4}}$")
  assert task.is_correct(ex, "$\\boxed{0.75}$")  # equivalent, by the MATH grader
  assert not task.is_correct(ex, "$\\boxed{0.7}$")
  verdict = task.grade(ex, "I give up.")
  assert not verdict.correct and not verdict.parsed


def test_prontoqa_layouts(tmp_path):
  rows = [
      {"id": "ProntoQA_1", "context": "Cats are furry. Tom is a cat.",
       "question": "Is the following statement true or false? Tom is furry.",
       "options": ["A) True", "B) False"], "answer": "A"},
      {"id": 2, "context": "c.", "question": "q?", "answer": "false"},
      {"id": "3", "context": "c.", "question": "q?", "answer": True},
  ]
  (tmp_path / "p.json").write_text(json.dumps(rows))
  examples = loaders.load_prontoqa(tmp_path / "p.json")
  assert [e["answer"] for e in examples] == ["True", "False", "True"]
  assert [e["id"] for e in examples] == ["ProntoQA_1", "2", "3"]
  assert examples[0]["question"] == ("Cats are furry. Tom is a cat.\nIs the following "
                                     "statement true or false? Tom is furry.")
  assert get_task("prontoqa").is_correct(examples[1], "... The answer is: False")


def mmlu_row(subject, answer=1, choices=("w", "x", "y", "z")):
  return {"question": f"A {subject} question?", "subject": subject, "choices": list(choices),
          "answer": answer}


def test_mmlu_subject_filter(tmp_path):
  write_parquet(tmp_path / "college_physics" / "test-0.parquet",
                [mmlu_row("college_physics", a) for a in (0, 3)])
  write_parquet(tmp_path / "astronomy" / "test-0.parquet", [mmlu_row("astronomy")])
  write_parquet(tmp_path / "college_biology" / "test-0.parquet", [mmlu_row("college_biology")])
  with pytest.raises(DataError, match=r"no rows for subject\(s\) \['college_chemistry'\]"):
    loaders.load_mmlu(tmp_path)
  examples = loaders.load_mmlu(tmp_path, subjects=["college_physics"])
  assert [e["answer"] for e in examples] == ["A", "D"]
  assert examples[0]["question"] == "A college_physics question?\nA. w\nB. x\nC. y\nD. z"
  assert len(loaders.load_mmlu(tmp_path, subjects=None)) == 4
  assert get_task("mmlu").is_correct(examples[1], "Because... The answer is D.")


def test_mbpp(tmp_path):
  row = {"task_id": 11, "text": "Write f.", "code": "def f():\n  return 1",
         "test_list": ["assert f() == 1"], "test_setup_code": "", "challenge_test_list": []}
  [ex] = loaders.load_mbpp(write_jsonl(tmp_path / "mbpp.jsonl", [row]))
  assert ex["id"] == "11" and ex["test_list"] == ["assert f() == 1"]
  assert ex["question"].endswith("these tests:\nassert f() == 1")
  task = get_task("mbpp")
  assert task.is_correct(ex, "Here:\n```python\ndef f():\n  return 1\n```")
  assert not task.is_correct(ex, "```python\ndef f():\n  return 2\n```")


def test_generic_jsonl_fields(tmp_path):
  path = write_jsonl(tmp_path / "qa.jsonl", [
      {"q": "Capital of France?", "a": "Paris", "key": "k1", "topic": "geo"},
      "",  # blank lines are skipped but still counted in line numbers
      {"q": "2+2?", "a": 4, "key": "k2", "topic": "math"},
  ])
  examples = loaders.load_jsonl(path, question_field="q", answer_field="a", id_field="key",
                                keep_fields=["topic"])
  assert examples == [
      {"id": "k1", "question": "Capital of France?", "answer": "Paris", "topic": "geo"},
      {"id": "k2", "question": "2+2?", "answer": "4", "topic": "math"},
  ]
  task = get_task("jsonl")
  assert task.is_correct(examples[0], " Paris\n") and not task.is_correct(examples[0], "Rome")


# --- Malformed rows: the error names file, line and field ------------------------------------

GOOD_QA = {"question": "q?", "answer": "a"}


@pytest.mark.parametrize("loader,rows,match", [
    (loaders.load_jsonl, [GOOD_QA, {"question": "q?"}], r"line 2: missing field 'answer'"),
    (loaders.load_jsonl, [GOOD_QA, GOOD_QA, {"question": 3, "answer": "a"}],
     r"line 3: field 'question' must be a string, got int 3"),
    (loaders.load_jsonl, [{"question": "q?", "answer": "  "}], r"line 1: field 'answer' is empty"),
    (loaders.load_jsonl, [{"question": "q?", "answer": ["a"]}],
     r"line 1: field 'answer' must be a string, got list"),
    (loaders.load_jsonl, ['{"question": "q?",'], r"line 1: invalid JSON"),
    (loaders.load_jsonl, ['["q", "a"]'], r"line 1: expected a JSON object, got list"),
    (loaders.load_gsm8k, [{"question": "q?", "answer": "4"}],
     r"line 1: field 'answer' has no '#### <final answer>'"),
    (loaders.load_math, [math_row("1"), {**math_row("1"), "solution": "no box"}],
     r"line 2: field 'solution' has no \(non-empty\) \\boxed"),
    (loaders.load_math, [{**math_row("1"), "level": None}],
     r"line 1: field 'level' must be a string, got NoneType"),
    (loaders.load_prontoqa, [{"id": "1", "context": "c", "question": "q", "answer": "C",
                              "options": ["A) True", "B) False"]}],
     r"line 1: field 'answer' = 'C' is neither True/False"),
    (loaders.load_prontoqa, [{"context": "c", "question": "q", "answer": "True"}],
     r"line 1: missing field 'id'"),
    (loaders.load_mmlu, [mmlu_row("college_physics", answer=4)],
     r"line 1: field 'answer' = 4 is not a valid index into 4 choices"),
    (loaders.load_mmlu, [mmlu_row("college_physics", answer=True)],
     r"line 1: field 'answer' must be an integer, got bool"),
    (loaders.load_mmlu, [mmlu_row("college_physics", choices=("a", ""))],
     r"line 1: field 'choices' item 1 must be a non-empty string"),
    (loaders.load_mbpp, [{"task_id": 1, "text": "t", "code": "c", "test_list": []}],
     r"line 1: field 'test_list' is an empty list"),
    (loaders.load_mbpp, [{"task_id": "1", "text": "t", "code": "c", "test_list": ["a"]}],
     r"line 1: field 'task_id' must be an integer, got str"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, loader, rows, match):
  path = write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(DataError, match=match) as info:
    loader(path)
  assert str(info.value).startswith(str(path))


def test_malformed_parquet_and_json_name_the_row(tmp_path):
  path = write_parquet(tmp_path / "m.parquet", [math_row("1"), {**math_row("2"), "problem": ""}])
  with pytest.raises(DataError, match=r"m.parquet row 1: field 'problem' is empty"):
    loaders.load_math(path)
  (tmp_path / "p.json").write_text(json.dumps({"not": "a list"}))
  with pytest.raises(DataError, match=r"p.json: expected a top-level JSON list"):
    loaders.load_prontoqa(tmp_path / "p.json")


def test_duplicate_ids_and_missing_files(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD_QA, "k": "x"}, {**GOOD_QA, "k": "x"}])
  with pytest.raises(DataError, match=r"line 2: duplicate id 'x' \(first seen at .*line 1\)"):
    loaders.load_jsonl(path, id_field="k")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loaders.load_jsonl(tmp_path / "nope.jsonl")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .jsonl"):
    loaders.load_jsonl(tmp_path / "empty")
  with pytest.raises(ValueError, match="first_n must be >= 1"):
    loaders.load_jsonl(path, first_n=0)


# --- Tasks -----------------------------------------------------------------------------------

EXAMPLE = {"id": "e", "question": "What is 3 + 4?", "answer": "7"}


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n != "synthetic_addition"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_task_renders_in_every_family(name, family):
  task = get_task(name)
  for shots in range(len(task.exemplars) + 1):
    prompt = task.render(EXAMPLE, shots=shots, chat=family)
    assert prompt.count(EXAMPLE["question"]) == 1
    for shot in task.exemplars[:shots]:
      assert shot.question in prompt and shot.solution in prompt


def test_prompt_shapes():
  task = get_task("gsm8k")
  assert task.messages(EXAMPLE) == [{"role": "user",
                                     "content": task.instruction + "\n\nWhat is 3 + 4?"}]
  msgs = task.messages(EXAMPLE, shots=2)
  assert [m["role"] for m in msgs] == ["user", "assistant"] * 2 + ["user"]
  assert msgs[0]["content"].startswith(task.instruction)
  text = task.text(EXAMPLE, shots=1)
  assert text.endswith("\n\nQuestion: What is 3 + 4?\nAnswer:")
  assert task.exemplars[0].solution + "\n\n" in text
  assert get_task("jsonl").text(EXAMPLE) == "Question: What is 3 + 4?\nAnswer:"
  with pytest.raises(ValueError, match=r"shots=4 not in \[0, 3\]"):
    task.render(EXAMPLE, shots=4)


def test_get_task_overrides_and_errors():
  task = get_task("gsm8k", grader=grade_exact,
                  exemplars=[("Q1", "A1")], instruction="")
  assert task.exemplars == (Shot("Q1", "A1"),)
  assert task.is_correct(EXAMPLE, "7") and not task.is_correct(EXAMPLE, "#### 7")
  assert task.text(EXAMPLE, shots=1) == ("Question: Q1\nAnswer: A1\n\n"
                                         "Question: What is 3 + 4?\nAnswer:")
  assert get_task("gsm8k").is_correct(EXAMPLE, "3 + 4 = 7\n#### 7")
  with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
    get_task("gsm9k")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['grade'\]"):
    get_task("gsm8k", grade=None)
