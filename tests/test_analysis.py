"""Sharpening views against hand-computed numbers on a two-prompt, three-sample workdir, and the
report built from it: headline table first, every referenced figure a real PNG.

Hand computation: with n = 3 samples, the best-scored member of a random k-subset is rank j with
probability C(3-j, k-1)/C(3, k): k=1 (1/3, 1/3, 1/3), k=2 (2/3, 1/3, 0), k=3 (1, 0, 0).
"""
import json
import math

import numpy as np
import pytest

from selfimprove_jax import tables
from selfimprove_jax.analysis import (amortization_table, balance_by_round,
                                      expected_selected_value, lift_vs_n,
                                      logprob_histogram_data, plots, report, round_change,
                                      selector_lifts, sharpness)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(rnd, kind, pid, index, correct, extracted, base_logprob, length=1, mean=None, sc=0.0,
         model_logprob=-1.0):
  return {"round": rnd, "kind": kind, "prompt_id": pid, "sample_index": index,
          "temperature": 0.0 if kind == "greedy" else 1.0, "completion": f"answer {extracted}",
          "tokens": [5] * length, "length": length, "finish_reason": "stop",
          "sampler_logprob": model_logprob, "model_logprob": model_logprob,
          "sampler_logprobs": [model_logprob / length] * length, "extracted": extracted,
          "correct": correct, "base_logprob": base_logprob,
          "base_mean_logprob": base_logprob / length if mean is None else mean,
          "base_self_certainty": sc}


def _round0():
  """p0: greedy wrong; p1: greedy right. Columns: correct, answer, base lp, length, mean lp, SC,
  model lp."""
  g, s = "greedy", "sample"
  return [
      _row(0, g, "p0", 0, False, "1", -1.5, model_logprob=math.log(0.3)),
      _row(0, s, "p0", 0, True, "2", -3.0, 2, -1.5, 0.9, -2.0),
      _row(0, s, "p0", 1, False, "1", -2.0, 1, -2.0, 0.2, -1.0),
      _row(0, s, "p0", 2, True, "2", -1.0, 4, -0.25, 0.5, -3.0),
      _row(0, g, "p1", 0, True, "7", -0.5, model_logprob=math.log(0.8)),
      _row(0, s, "p1", 0, True, "7", -1.0, 1, -1.0, 0.1, -0.5),
      _row(0, s, "p1", 1, False, "8", -4.0, 2, -2.0, 0.3, -2.0),
      _row(0, s, "p1", 2, False, None, -6.0, 4, -1.5, 0.8, -1.5),
  ]


def _round1():
  g, s = "greedy", "sample"
  return [
      _row(1, g, "p0", 0, True, "2", -1.0, model_logprob=math.log(0.9)),
      _row(1, s, "p0", 0, True, "2", -1.0), _row(1, s, "p0", 1, True, "2", -1.0),
      _row(1, s, "p0", 2, True, "2", -3.0),
      _row(1, g, "p1", 0, True, "7", -1.0, model_logprob=math.log(0.95)),
      _row(1, s, "p1", 0, True, "7", -1.0), _row(1, s, "p1", 1, False, "8", -2.0),
      _row(1, s, "p1", 2, True, "7", -1.0),
  ]


# ------------------------------------------------------------------------------------- views

def test_selector_lifts_hand_values():
  view = selector_lifts(_round0(), ks=[1, 2, 3], num_resamples=200)
  assert view["num_prompts"] == 2 and view["num_samples"] == 3 and view["skipped"] == []
  assert view["greedy_acc"] == 0.5
  # Per-prompt values (p0, p1) from the rank weights in the module docstring:
  #   logprob       p0 ranks [T, F, T], p1 [T, F, F]
  #   mean_logprob  p0 [T, T, F],       p1 [T, F, F]
  #   self_cert.    p0 [T, T, F],       p1 [F, F, T]
  #   majority      p0 "2","1","2" (ties: earliest first answer); p1 "7","8",None
  #   pass@k        p0 c=2, p1 c=1
  expected = {"logprob": (0.5, 2 / 3, 1.0), "mean_logprob": (0.5, 5 / 6, 1.0),
              "self_certainty": (0.5, 0.5, 0.5), "majority": (0.5, 2 / 3, 1.0),
              "pass@k": (0.5, 5 / 6, 1.0)}
  assert list(view["selectors"]) == list(expected)
  for name, accs in expected.items():
    for k, acc in zip((1, 2, 3), accs):
      cell = view["selectors"][name][k]
      assert cell["acc"] == pytest.approx(acc), (name, k)
      assert cell["lift_pct"] == pytest.approx(100 * (acc - 0.5) / 0.5), (name, k)
      assert cell["low"] <= cell["acc"] + 1e-12 <= cell["high"] + 2e-12
      assert cell["lift_low"] <= cell["lift_pct"] + 1e-9 <= cell["lift_high"] + 2e-9
  assert view["selectors"]["logprob"][3]["lift_pct"] == pytest.approx(100.0)


def test_selector_lifts_default_ks_and_errors():
  assert selector_lifts(_round0(), num_resamples=10)["ks"] == [1, 2, 3]
  with pytest.raises(ValueError, match=r"ks contains 4"):
    selector_lifts(_round0(), ks=[4])
  with pytest.raises(ValueError, match=r"prompt_id='p0' has no kind='greedy'"):
    selector_lifts(_round0()[1:])
  with pytest.raises(ValueError, match=r"kind=None"):
    selector_lifts([{"prompt_id": "p0"}])
  rows = _round0()
  for r in rows:
    r["base_self_certainty"] = None
  assert selector_lifts(rows, ks=[1], num_resamples=10)["skipped"] == ["self_certainty"]
  with pytest.raises(ValueError, match=r"'self_certainty' needs column 'base_self_certainty', "
                                       r"which is None on every sample row"):
    selector_lifts(rows, ks=[1], selectors=["logprob", "self_certainty"])
  assert set(selector_lifts(rows, ks=[1], selectors=["majority"], num_resamples=10)["selectors"]
             ) == {"majority"}
  with pytest.raises(ValueError, match=r"unknown \['best'\]"):
    selector_lifts(rows, ks=[1], selectors=["best"])


@pytest.mark.parametrize("column", ["extracted", "base_mean_logprob", "correct"])
def test_selector_lifts_missing_column_is_named(column):
  """A table without a column the selectors read is refused, never read as 0 or skipped."""
  rows = _round0()
  for r in rows:
    del r[column]
  with pytest.raises(tables.SchemaError, match=rf"selector_lifts: row 0 has no column '{column}'"):
    selector_lifts(rows, ks=[1])


def test_round_change_hand_values():
  change = round_change(_round0(), _round1(), num_resamples=200)
  assert change["greedy"]["base"] == 0.5 and change["greedy"]["value"] == 1.0
  assert change["greedy"]["change"] == 0.5 and change["greedy"]["high"] == 1.0
  np.testing.assert_allclose([change["t1"][k] for k in ("change", "low", "high")], [1 / 3] * 3)
  assert change["bon_n"]["change"] == 0.0
  with pytest.raises(ValueError, match="share no prompt_id"):
    round_change(_round0(), [dict(r, prompt_id="q" + r["prompt_id"]) for r in _round1()])


def test_lift_vs_n_hand_values():
  view = lift_vs_n(_round0(), ks=[1, 2, 3], num_resamples=200)
  assert view["ks"] == [1, 2, 3]
  np.testing.assert_allclose(view["acc"], [0.5, 2 / 3, 1.0])
  np.testing.assert_allclose(view["lift_pct"], [0.0, 100 / 3, 100.0])
  np.testing.assert_allclose(view["pass_at_k"], [0.5, 5 / 6, 1.0])
  # Sorted base log-probs: p0 (-1, -2, -3), p1 (-1, -4, -6).
  # k=1: (-2 + -11/3)/2; k=2: (2/3*-1 + 1/3*-2 + 2/3*-1 + 1/3*-4)/2; k=3: -1.
  np.testing.assert_allclose(view["selected_logprob"], [-17 / 6, -5 / 3, -1.0])
  assert view["greedy_logprob"] == -1.0 and view["greedy_acc"] == 0.5
  assert expected_selected_value([-1.0, -4.0, -6.0], [10.0, 20.0, 30.0], 2) == pytest.approx(
      2 / 3 * 10 + 1 / 3 * 20)


def test_logprob_histogram_data():
  view = logprob_histogram_data(_round0())
  np.testing.assert_array_equal(np.sort(view["correct"]), [-3.0, -1.0, -1.0])
  np.testing.assert_array_equal(np.sort(view["wrong"]), [-6.0, -4.0, -2.0])
  assert view["num_missing"] == 0


def test_amortization_table_hand_values():
  rows = amortization_table({"N=3": {0: _round0(), 1: _round1()}})
  assert len(rows) == 1
  row = rows[0]
  assert (row["run"], row["round"]) == ("N=3", 1)
  assert row["greedy_acc"] == 1.0 and row["base_greedy_acc"] == 0.5
  assert row["t1_acc"] == pytest.approx(5 / 6)
  assert row["greedy_lift_pct"] == pytest.approx(100.0)
  assert row["t1_lift_pct"] == pytest.approx(200 / 3)
  assert row["base_loglik_t1"] == pytest.approx(-17 / 6)
  assert row["loglik_t1"] == pytest.approx(-1.5)
  assert row["loglik_lift"] == pytest.approx(4 / 3)
  assert row["loglik_lift_pct"] == pytest.approx(800 / 17)
  assert amortization_table({0: _round0(), 1: _round1()})[0]["run"] == "run"
  with pytest.raises(ValueError, match=r"round 0 \(the base model\) is needed"):
    amortization_table({"a": {1: _round1()}})


def test_sharpness_hand_values():
  s = sharpness(_round0())
  assert s["greedy_mass_mean"] == pytest.approx(0.55)
  assert s["greedy_mass_quantiles"][0.5] == pytest.approx(0.55)
  assert s["frac_greedy_mass_over_half"] == 0.5
  # p0: 6 nats over 7 tokens; p1: 4 nats over 7 tokens.
  assert s["entropy_per_token"] == pytest.approx(5 / 7)
  # p0: majority "2" != greedy "1"; p1: "7" ties "8", earliest wins, == greedy "7".
  assert s["greedy_eq_majority"] == 0.5
  # max base log-prob per prompt over greedy and samples: -1 and -0.5.
  assert s["coverage"] == pytest.approx((math.e + math.exp(0.5)) / 2)
  assert s["log_coverage"] == pytest.approx(math.log((math.e + math.exp(0.5)) / 2))
  assert s["t1_acc"] == 0.5 and s["bon_n_acc"] == 1.0
  assert s["gv_gap"] == 0.5 and s["gv_gap_rel"] == 1.0


def test_sharpness_coverage_is_stable_for_long_responses():
  rows = _round0()
  for r in rows:
    r["base_logprob"] -= 1000.0
  s = sharpness(rows)
  assert s["log_coverage"] == pytest.approx(1000 + math.log((math.e + math.exp(0.5)) / 2))
  assert s["coverage"] == math.inf


def test_balance_by_round():
  records = [{"round": 1, "stage": "select", "step": 0, "balance_score": 0.1, "temperature": 0.5,
              "threshold": 0.0},
             {"round": 1, "stage": "train", "step": 1, "loss": 2.0},
             {"round": 2, "stage": "select", "step": 4, "num_selected": 3},
             {"round": 1, "stage": "select", "step": 0, "balance_score": 0.42,
              "temperature": 0.7, "threshold": 0.5}]
  assert balance_by_round(records) == {1: {"balance_score": 0.42, "temperature": 0.7,
                                           "threshold": 0.5}}
  assert balance_by_round(records[1:3]) == {}


# ------------------------------------------------------------------------------------ report

def _write_workdir(root, rounds=(0, 1)):
  evals = {0: {"greedy_acc": 0.5, "t1_acc": 0.5, "mean_base_logprob_t1": -17 / 6,
               "pass": {"1": 0.5, "3": 1.0}, "bon_logprob": {"1": 0.5, "3": 1.0}},
           1: {"greedy_acc": 1.0, "t1_acc": 5 / 6, "mean_base_logprob_t1": -1.5,
               "pass": {"1": 5 / 6, "3": 1.0}, "bon_logprob": {"1": 5 / 6, "3": 1.0}}}
  for r, rows in ((0, _round0()), (1, _round1())):
    if r not in rounds:
      continue
    d = root / f"round_{r:03d}"
    d.mkdir(parents=True)
    (d / "eval_samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (d / "eval.json").write_text(json.dumps(evals[r]))
  if 1 in rounds:
    (root / "round_001" / "samples.jsonl").write_text("")
  (root / "config.json").write_text("{}")
  (root / "metrics.jsonl").write_text(
      json.dumps({"round": 1, "stage": "select", "step": 0, "balance_score": 0.42,
                  "temperature": 0.7, "threshold": 0.5}) + "\n"
      + '{"round": 1, "stage": "train", "st')  # a killed writer's truncated last line


def test_report(tmp_path):
  _write_workdir(tmp_path / "wd")
  path = report.write_report(tmp_path / "wd")
  assert path == tmp_path / "wd" / "report" / "report.md"
  lines = path.read_text().splitlines()
  assert lines[0] == "# Sharpening report: base (round 0) vs round 1"
  assert lines[2:9] == [
      "| metric | base (round 0) | round 1 | change |",
      "|---|---|---|---|",
      "| greedy_acc | 0.500 | 1.000 | +0.500 |",
      "| t1_acc | 0.500 | 0.833 | +0.333 |",
      "| mean_base_logprob_t1 | -2.83 | -1.50 | +1.33 |",
      "| bon_logprob@1 | 0.500 | 0.833 | +0.333 |",
      "| bon_logprob@3 | 1.000 | 1.000 | +0.000 |"]
  text = "\n".join(lines)
  for heading in ("## Selector lifts", "## Amortization", "## Sharpness", "## B-STaR balance"):
    assert heading in text
  assert "| 1 | 1.000 | 0.833 | +100.0 | +66.7 | -1.50 | +1.33 | +47.1 |" in text
  # Findings: sentences from the same numbers (both prompts move T=1 by +1/3: a zero-width CI).
  assert ("- After round 1, T=1 accuracy improved: 0.500 -> 0.833 (+0.333, 95% CI [+0.333, "
          "+0.333], paired by prompt).") in lines
  assert ("- After round 1, best-of-N by base log-prob did not change beyond noise: 1.000 -> "
          "1.000 (+0.000, 95% CI [+0.000, +0.000], paired by prompt).") in lines
  assert any(line.startswith("- Best-of-3 by logprob: 1.000 [1.000, 1.000], +0.500 vs greedy: it ")
             for line in lines)
  assert "| 1 | 0.420 | 0.70 | 0.500 |" in text
  figures = [line.split("](")[1].rstrip(")") for line in lines if line.startswith("![")]
  assert sorted(figures) == sorted(f"{kind}_r{r:03d}.png" for r in (0, 1)
                                   for kind in ("selector_lifts", "lift_vs_n", "logprob_hist"))
  for name in figures:
    data = (path.parent / name).read_bytes()
    assert data[:8] == PNG_SIGNATURE, name
    assert len(data) > 10_000, name
  assert not list(path.parent.glob(".*.tmp"))


def test_report_cli_and_out_dir_base_only(tmp_path, capsys):
  _write_workdir(tmp_path / "wd", rounds=(0,))
  report.main([str(tmp_path / "wd"), "--out_dir", str(tmp_path / "out")])
  assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.md")
  text = (tmp_path / "out" / "report.md").read_text()
  assert "| metric | base (round 0) | round 0 | change |" in text
  assert "## Amortization" not in text and "## B-STaR balance" in text
  assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
      "lift_vs_n_r000.png", "logprob_hist_r000.png", "selector_lifts_r000.png"]
  with pytest.raises(FileNotFoundError, match=r"has no round_RRR/eval_samples.jsonl"):
    report.write_report(tmp_path / "out")


def test_plots_degenerate_inputs(tmp_path):
  rows = _round0()
  for r in rows:
    r["correct"] = r["kind"] == "sample"  # greedy accuracy 0: lifts undefined, accuracy drawn
  for name, view, fn in (
      ("lifts.png", selector_lifts(rows, ks=[1, 3], num_resamples=10), plots.plot_selector_lifts),
      ("curve.png", lift_vs_n(rows, num_resamples=10), plots.plot_lift_vs_n),
      ("hist.png", logprob_histogram_data(rows), plots.plot_logprob_histogram)):
    assert fn(view, tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
  empty = {"correct": np.zeros(0), "wrong": np.zeros(0), "num_missing": 0}
  assert plots.plot_logprob_histogram(empty, tmp_path / "e.png").read_bytes()[:8] == PNG_SIGNATURE
