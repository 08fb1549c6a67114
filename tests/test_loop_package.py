"""The loop as a package: layered imports, small files, registries a researcher extends without
touching the loop, and the samples-table schema that writers and readers share."""
import ast
import json
import pathlib

import pytest

from selfimprove_jax import loop, select, tables
from selfimprove_jax.analysis import report, views
from selfimprove_jax.loop import config as loop_config
from selfimprove_jax.loop import context, rewards, selectors
from tests.loop_helpers import REPO, fresh_workdir, method_config

PACKAGE = REPO / "selfimprove_jax"
# Bottom to top: a module may import only modules of a lower layer.
LAYERS = (("registry",), ("rewards", "selectors"), ("config",), ("workdir",), ("context",),
          ("policies",), ("rollouts",), ("stages", "updates"), ("offline", "online"),
          ("driver",), ("study",))


def _loop_imports(path: pathlib.Path) -> set[str]:
  """The loop modules ``path`` imports (``from selfimprove_jax.loop import x`` or ``.x``)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == "selfimprove_jax.loop":
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfimprove_jax.loop."):
      names.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      names |= {a.name.split(".")[2] for a in node.names
                if a.name.startswith("selfimprove_jax.loop.")}
  return names


def test_loop_modules_import_each_other_in_layers_without_a_cycle():
  layer = {name: i for i, names in enumerate(LAYERS) for name in names}
  files = {p.stem for p in (PACKAGE / "loop").glob("*.py")} - {"__init__"}
  assert files == set(layer), f"unlayered loop modules: {files ^ set(layer)}"
  for name in files:
    for dep in _loop_imports(PACKAGE / "loop" / f"{name}.py"):
      assert layer[dep] < layer[name], f"loop/{name}.py imports loop/{dep}.py from above it"
  assert layer["context"] < layer["stages"] == layer["updates"] < layer["offline"] < layer["driver"]


def test_no_module_is_over_400_lines():
  sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
           for p in PACKAGE.rglob("*.py")}
  assert {p: n for p, n in sizes.items() if n > 400} == {}


def test_config_takes_its_names_from_the_registries():
  assert set(rewards.REWARDS.names()) == {"logprob", "mean_logprob", "self_certainty", "correct",
                                          "majority", "judge"}
  assert {n for n in selectors.SELECTORS.names() if selectors.SELECTORS.get(n).pairs} == {
      "best_worst", "base_pairs", "xpo_pairs"}
  config = method_config("sft_sharpening", **{"score.reward": "toy_unregistered"})
  with pytest.raises(ValueError, match=r"config.score.reward='toy_unregistered': must be one of "
                                       r"\('logprob', 'mean_logprob'"):
    loop_config.validate(config)
  with pytest.raises(ValueError, match="'top1' is already registered"):
    selectors.register("top1")(lambda x: None)
  with pytest.raises(ValueError, match=r"config.task.num_eval=0: must be >= 1"):
    loop_config.validate(method_config("sft_sharpening", **{"task.num_eval": 0}))


def test_a_regime_mixture_marks_its_prompts_and_bad_mixtures_are_named(tmp_path, smoke_base):
  mixture = {"model.synthetic.regimes": "random:0.4,carry_fork:0.6,drop_carry:0.6"}
  config = method_config("sft_sharpening", **mixture, **{"task.regime": "carry_fork"})
  ctx = context.build(config, fresh_workdir(tmp_path, smoke_base), progress_bars=False)
  assert {e["question"][0] for e in ctx.eval_examples + ctx.train_examples} == {"b"}
  for overrides, match in [
      ({**mixture, "task.regime": "flip"}, r"config.task.regime='flip': "
                                                      r"names the regime .* \('random', "),
      ({**mixture}, r"config.task.regime='': names the regime"),
      ({"model.synthetic.regimes": "random:0.4,random:0.5", "task.regime": "random"},
       r"config.model.synthetic.regimes='random:0.4,random:0.5': .*entry 'random:0.5'"),
      ({"model.synthetic.regimes": "carry_fork:1.5", "task.regime": "carry_fork"},
       r"entry 'carry_fork:1.5': corruption_rate must be in \[0, 1\], got 1.5"),
      ({"task.regime": "random"}, r"config.task.regime='random': needs "),
  ]:
    with pytest.raises(ValueError, match=match):
      loop_config.validate(method_config("sft_sharpening", **overrides))


@pytest.mark.parametrize("overrides,match", [
    ({"sample.adaptive.chunk": 9}, r"config.sample.adaptive.chunk=9: must be in \[1, "),
    ({"sample.adaptive.chunk": 2, "sample.adaptive.stop_inverse_prob": 0.5},
     r"config.sample.adaptive.stop_inverse_prob=0.5: must be >= 1"),
    ({"sample.adaptive.chunk": 2, "sample.adaptive.stop_inverse_prob": 4.0,
      "sample.model": "both"}, r"config.sample.model='both': adaptive sampling draws from one"),
])
def test_bad_adaptive_sampling_is_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    loop_config.validate(method_config("sft_sharpening", "", **overrides))


@pytest.fixture
def toy_registrations():
  """A toy reward (shorter is better) and a toy selector (the two best per prompt), registered
  the way a researcher would, and removed afterwards."""

  @rewards.register("toy_shortest")
  def toy_shortest(inputs: rewards.RewardInputs) -> list[float]:
    return [-float(row["length"]) for row in inputs.rows]

  @selectors.register("toy_best_two")
  def toy_best_two(x: selectors.SelectInputs) -> selectors.Selection:
    return selectors.Selection(select.top_k(x.group_R, x.reward_R, 2), info={"toy": 1.0})

  yield
  rewards.REWARDS.remove("toy_shortest")
  selectors.SELECTORS.remove("toy_best_two")


def test_a_toy_reward_and_selector_run_a_round_through_the_registries(tmp_path, smoke_base,
                                                                      toy_registrations):
  config = method_config("sft_sharpening", **{"loop.num_rounds": 1, "score.reward": "toy_shortest",
                                              "select.kind": "toy_best_two"})
  workdir = fresh_workdir(tmp_path, smoke_base)
  assert set(loop.run(config, workdir, progress_bars=False)) >= {"greedy_acc", "bon_logprob"}
  table = loop.read_table(workdir / "round_001" / "samples.jsonl")
  by_prompt = {}
  for row in table:
    assert row["reward"] == -row["length"]
    by_prompt.setdefault(row["prompt_id"], []).append(row)
  for rows in by_prompt.values():
    lengths = [r["length"] for r in rows]
    # The two shortest, ties to the earliest sample.
    want = sorted(range(len(rows)), key=lambda i: (lengths[i], i))[:2]
    assert [i for i, r in enumerate(rows) if r["selected"]] == sorted(want)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  select_record = next(r for r in records if r["stage"] == "select")
  assert select_record["num_selected"] == 2 * len(by_prompt) and select_record["toy"] == 1.0
  assert [r for r in records if r["stage"] == "train" and "loss" in r]


# ------------------------------------------------------------------------------ the schema

def _eval_row(**overrides):
  row = {"round": 0, "kind": "sample", "prompt_id": "p0", "sample_index": 0, "temperature": 1.0,
         "completion": "1+1=2", "tokens": [3, 4], "length": 2, "finish_reason": "stop",
         "sampler_logprob": -1.0, "model_logprob": -1.0, "sampler_logprobs": [-0.5, -0.5],
         "extracted": "2", "correct": True, "base_logprob": -1.0, "base_mean_logprob": -0.5,
         "base_self_certainty": 0.3}
  row.update(overrides)
  return row


def test_every_table_column_is_declared_with_a_writing_stage():
  for columns in (*tables.ROUND_COLUMNS.values(), tables.RL_COLUMNS, tables.EVAL_COLUMNS,
                  views.COLUMNS):
    assert set(columns) <= set(tables.COLUMNS)
  assert {c.stage for c in tables.COLUMNS.values()} <= {"sample", "score", "select", "train",
                                                         "eval"}


def test_write_and_read_check_the_schema(tmp_path):
  path = tmp_path / "eval_samples.jsonl"
  tables.write_table(path, [_eval_row(base_logprob=float("-inf"))], tables.EVAL_COLUMNS)
  assert tables.read_table(path, tables.EVAL_COLUMNS)[0]["base_logprob"] is None  # stored as null
  with pytest.raises(tables.SchemaError, match=r"row 0 has no column 'correct'"):
    tables.write_table(path, [{k: v for k, v in _eval_row().items() if k != "correct"}],
                       tables.EVAL_COLUMNS)
  with pytest.raises(tables.SchemaError, match=r"undeclared column\(s\) \['score2'\]"):
    tables.write_table(path, [_eval_row(score2=1.0)], tables.EVAL_COLUMNS)
  with pytest.raises(tables.SchemaError, match=r"column 'correct' = 'yes' is not bool"):
    tables.write_table(path, [_eval_row(correct="yes")], tables.EVAL_COLUMNS)
  path.write_text(json.dumps({k: v for k, v in _eval_row().items() if k != "length"}) + "\n")
  with pytest.raises(tables.SchemaError, match=r"eval_samples.jsonl: row 0 has no column 'length'"):
    tables.read_table(path, tables.EVAL_COLUMNS)


def test_analyses_name_a_missing_column():
  rows = [_eval_row(kind="greedy"), _eval_row(sample_index=0), _eval_row(sample_index=1)]
  assert views.sharpness(rows)["num_prompts"] == 1
  for row in rows:
    del row["base_mean_logprob"]
  with pytest.raises(tables.SchemaError, match=r"selector_lifts: row 0 has no column "
                                               r"'base_mean_logprob'"):
    views.selector_lifts(rows)


def test_report_names_a_missing_column(tmp_path):
  d = tmp_path / "run" / "round_000"
  d.mkdir(parents=True)
  rows = [_eval_row(kind="greedy"), _eval_row()]
  for row in rows:
    del row["model_logprob"]
  (d / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "eval.json").write_text(json.dumps({"bon_logprob": {"1": 1.0}}))
  with pytest.raises(tables.SchemaError, match=r"round_000/eval_samples.jsonl: row 0 has no "
                                               r"column 'model_logprob'"):
    report.write_report(tmp_path / "run")


def test_a_pair_rule_without_pairs_selects_nothing():
  """Equal rewards under a minimum margin make no (best, worst) pair: nothing is selected."""
  config = method_config("self_rewarding", **{"select.min_margin": 1.0})
  rows = [{"prompt_id": p, "reward": -1.0, "correct": True, "completion": "x", "extracted": "1"}
          for p in ("a", "a", "b", "b")]
  chosen = selectors.select(rows, config, 1)
  assert chosen.picked_S.size == 0 and chosen.pairs_Qx2.shape == (0, 2)
  rows[0]["reward"] = 1.0
  chosen = selectors.select(rows, config, 1)
  assert chosen.pairs_Qx2.tolist() == [[0, 1]] and chosen.picked_S.tolist() == [0, 1]
