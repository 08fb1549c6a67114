"""Shape discipline: after its first round, a run compiles nothing new.

Counts XLA backend compiles (``jax.monitoring``'s backend-compile event) at the end of every
round of a 3-round smoke run. Round 1 compiles the sampler, scorer and update step; rounds 2 and 3
must reuse them, even with a decaying learning rate over rounds of different lengths (the learning
rate is data of the step) and completions of varying lengths (scorer buckets).
"""
import jax
import pytest

from selfimprove_jax import loop
from selfimprove_jax.loop import driver
from tests.loop_helpers import fresh_workdir, method_config

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compile_log():
  names = []

  def listen(event, secs, **kwargs):
    del secs
    if event == COMPILE_EVENT:
      names.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  yield names
  jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("method,overrides", [
    ("grpo", {"loop.num_rounds": 3}),
    # Every correct sample is kept, so rounds differ in length and a cosine schedule decays over a
    # different number of steps each round.
    ("sft_sharpening", {"loop.num_rounds": 3, "select.kind": "all_correct", "train.epochs": 2,
                        "train.batch_size": 8, "loop.prompts_per_round": 8,
                        "train.optimizer.schedule": "cosine"}),
])
def test_no_compile_after_round_1(method, overrides, tmp_path, smoke_base, compile_log,
                                  monkeypatch):
  after_round = {}
  run_stage = driver.Loop.run_stage

  def counting(self, r, stage):
    run_stage(self, r, stage)
    if stage == "eval":
      after_round[r] = list(compile_log)

  monkeypatch.setattr(driver.Loop, "run_stage", counting)
  loop.run(method_config(method, **overrides), fresh_workdir(tmp_path, smoke_base),
           progress_bars=False)
  assert sorted(after_round) == [0, 1, 2, 3]
  new = compile_log[len(after_round[1]):]
  assert not new, f"rounds 2-3 compiled {len(new)} more programs: {new}"
  if method == "sft_sharpening":
    import json  # pylint: disable=g-import-not-at-top
    steps = json.loads((tmp_path / "run" / "progress.json").read_text())["train_steps"]
    assert len(set(steps.values())) > 1, f"rounds of equal length do not test the schedule: {steps}"
