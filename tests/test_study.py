"""Studies: the arms of one config side by side, one shared base, one summary and report."""
import json
import shutil

import pytest

from selfimprove_jax import loop, synthetic_regime
from selfimprove_jax.analysis import compare
from selfimprove_jax.loop import context, study
from tests.loop_helpers import method_config


def _study_config(**arms):
  config = method_config("sft_sharpening", **{"loop.num_rounds": 1, "loop.report": True})
  with config.unlocked():
    config.study.arms = arms
    config.study.order = tuple(arms)
  return config


def test_arm_builds_nested_overrides_from_dotted_keys():
  assert study.arm("train.loss", "dpo", "select.kind", "best_worst", "seed", 3) == {
      "train": {"loss": "dpo"}, "select": {"kind": "best_worst"}, "seed": 3}
  with pytest.raises(ValueError, match="key, value pairs"):
    study.arm("train.loss")


@pytest.mark.parametrize("arms,match", [
    ({"x": study.arm("sample.bogus", 1)}, r"config.study.arms.x.sample.bogus: not a config key"),
    ({"x": study.arm("sample.num_samples.deep", 1)},
     r"config.study.arms.x.sample.num_samples: .* is a value, not a section"),
    ({"x": study.arm("select.kind", "nope")}, r"config.study.arms.x: config.select.kind='nope'"),
])
def test_bad_arms_are_named(arms, match):
  with pytest.raises(ValueError, match=match):
    study.arm_configs(_study_config(**arms))


def test_a_study_shares_one_base_and_writes_one_report(tmp_path, smoke_base, monkeypatch):
  monkeypatch.setattr(synthetic_regime, "pretrain", lambda *a, **k: pytest.fail("pretrained"))
  config = _study_config(n2=study.arm("sample.num_samples", 2),
                         n4=study.arm("sample.num_samples", 4))
  root = tmp_path / "study"
  shutil.copytree(smoke_base, root / "n2" / "base")  # the first arm's base, as if pretrained
  loop.run_study(config, root, progress_bars=False)

  base_files = lambda arm: {p.relative_to(root / arm): p.read_bytes()
                            for p in (root / arm / "base").rglob("*") if p.is_file()}
  assert base_files("n4") == base_files("n2")  # copied, not pretrained again
  arms = study.arm_configs(config)
  assert [arms[a].sample.num_samples for a in arms] == [2, 4] and not arms["n2"].study.arms
  rows = loop.read_table(root / "n4" / "round_001" / "samples.jsonl")
  assert max(r["sample_index"] for r in rows) == 3  # the arm's own N

  summary = json.loads((root / "summary.json").read_text())
  assert list(summary["arms"]) == ["n2", "n4"] and summary["runtime_s"] > 0
  for name in ("n2", "n4"):
    assert summary["arms"][name]["heldout"] == json.loads(
        (root / name / "summary.json").read_text())["heldout"]
    assert "greedy_acc" in summary["arms"][name]["heldout"]["sharpened"]
  report = (root / "report" / "report.md").read_text()
  assert "| n2 | 1 |" in report and "| n4 | 1 |" in report
  assert "### n4" in report and (root / "report" / compare.FIGURE).stat().st_size > 10_000

  before = (root / "summary.json").read_text()
  loop.run_study(config, root, progress_bars=False)  # rerun: every arm is done, nothing redone
  assert (root / "summary.json").read_text() == before


def test_compare_cli_names_a_bad_argument(capsys):
  with pytest.raises(SystemExit) as e:
    compare.main(["out", "no_equals_sign"])
  assert e.value.code == 2
  assert "'no_equals_sign' is not a new NAME=WORKDIR" in capsys.readouterr().err


def test_the_demo_is_a_study_of_three_regimes_at_smoke_size(tmp_path, smoke_base, monkeypatch):
  monkeypatch.setattr(synthetic_regime, "pretrain", lambda *a, **k: pytest.fail("pretrained"))
  config = method_config("demo")
  assert config.study.order == ("random", "carry_fork", "drop_carry")
  with pytest.raises(ValueError, match=r"config.study.arms=.*use loop.run_study"):
    loop.Loop(config, tmp_path / "single")
  root = tmp_path / "demo"
  shutil.copytree(smoke_base, root / "random" / "base")
  results = loop.run_study(config, root, progress_bars=False)
  assert list(results) == ["random", "carry_fork", "drop_carry"]
  for arm, marker in zip(results, "abc"):  # each arm's prompts are its own regime's
    ctx = context.build(study.arm_configs(config)[arm], root / arm, progress_bars=False)
    assert {e["question"][0] for e in ctx.eval_examples} == {marker}
  summary = json.loads((root / "summary.json").read_text())
  assert set(summary["arms"]) == set(results)


def test_the_sharpening_algorithms_run_side_by_side_at_smoke_size(tmp_path, smoke_base):
  config = method_config("sharpening_algorithms", **{"loop.num_rounds": 1, "loop.report": True})
  arms = study.arm_configs(config)
  assert list(arms) == ["sft", "rlhf", "xpo", "grpo"]
  assert [arms[a].train.loss for a in arms] == ["sft", "sharpen", "xpo", "policy_gradient"]
  assert {arms[a].score.reward for a in arms} == {"logprob"}  # self-reward only
  root = tmp_path / "algorithms"
  shutil.copytree(smoke_base, root / "sft" / "base")
  loop.run_study(config, root, progress_bars=False)
  report = (root / "report" / "report.md").read_text()
  assert all(f"| {a} | 1 |" in report for a in arms)


def test_the_n_ablation_varies_only_n_and_adaptivity_on_the_greedy_fails_regime():
  arms = study.arm_configs(method_config("n_ablation", ""))
  assert [a.sample.num_samples for a in arms.values()] == [4, 8, 16, 16]  # adaptive: at most 16
  assert [a.sample.adaptive.chunk for a in arms.values()] == [0, 0, 0, 2]
  assert {a.task.regime for a in arms.values()} == {"carry_fork"}
  assert len({json.dumps(a.model.to_dict(), sort_keys=True) for a in arms.values()}) == 1  # one base
