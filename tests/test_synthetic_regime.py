"""The synthetic regime's plumbing: demonstration batches, and pretrain -> measure end to end."""
import numpy as np

from selfimprove_jax import synthetic_regime as sr
from selfimprove_jax.data import synthetic


def test_demonstration_batch_masks_the_target_only():
  tok = synthetic.CharTokenizer()
  examples = synthetic.make_examples(synthetic.AdditionConfig(), 3, seed=0)
  batch = sr.demonstration_batch(tok, examples)
  for row, ex in enumerate(examples):
    prompt, target = synthetic.encode_demonstration(tok, ex)
    n = len(prompt) + len(target)
    np.testing.assert_array_equal(batch["tokens_BxL"][row, :n], prompt + target)
    assert batch["input_mask_BxL"][row].sum() == n and batch["input_mask_BxL"][row, :n].all()
    assert batch["loss_mask_BxL"][row].tolist() == [len(prompt) <= i < n for i in range(sr.SEQ_LEN)]
    assert batch["tokens_BxL"][row, n - 1] == tok.eos_id


def test_pretrain_then_measure_runs_end_to_end():
  task = synthetic.AdditionConfig(corruption_rate=0.5)
  small = sr.MODEL.replace(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                           mlp_dim=64)  # the plumbing, not the size, is under test
  params, losses = sr.pretrain(task, model_config=small, steps=3, batch_size=8, seed=0,
                               progress=False)
  assert len(losses) == 3 and all(np.isfinite(losses))
  stats = sr.measure(params, synthetic.make_examples(task, 2, seed=1), model_config=small,
                     num_samples=2)
  assert stats.num_prompts == 2 and stats.num_samples == 2
  assert 0 <= stats.greedy_accuracy <= 1 and 0 <= stats.t1_accuracy <= 1
  assert stats.t1_logprob_wrong < 0  # an untrained model gets (nearly) everything wrong


def test_pretrain_mixes_regimes_in_equal_shares(monkeypatch):
  regimes = list(synthetic.parse_regimes("random:0.4,carry_fork:0.6,drop_carry:0.6").values())
  assert [r.marker for r in regimes] == ["a", "b", "c"]
  seen = []
  real = synthetic.make_mixture
  monkeypatch.setattr(synthetic, "make_mixture", lambda *a, **k: _record(seen, real(*a, **k)))
  small = sr.MODEL.replace(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                           mlp_dim=64)
  sr.pretrain(regimes, model_config=small, steps=2, batch_size=6, progress=False)
  assert [e["question"][0] for e in seen] == list("abc") * 4


def _record(seen, examples):
  seen.extend(examples)
  return examples
