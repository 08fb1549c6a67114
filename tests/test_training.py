"""The update step: golden values, overfitting, gradient accumulation, 8-device equality and
tracing, LoRA + GRPO on a mesh with a non-finite batch, and bfloat16 compute."""
import contextlib
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfimprove_jax import scoring, training
from selfimprove_jax import sharding as sh
from selfimprove_jax.models import Transformer, param_logical_names, param_shapes, tiny_config
from selfimprove_jax.training import lora

CFG = tiny_config("llama3", num_layers=2)  # two layers: per-layer paths, half the compile time
B, P, C = 8, 4, 8
LENGTHS = np.array([8, 1, 7, 2, 8, 1, 6, 3])  # even rows 29 tokens, odd rows 7
SCHEDULE = training.make_schedule("linear", 1e-2, total_steps=1000)
# Adam's first update is lr * g / (|g| + eps). With eps=1e-8 an entry whose gradient is ~1e-7 (an
# embedding row reached only through the softmax) turns reduction-order noise into 1e-5 parameter
# differences; eps=1e-3 bounds that gain by lr / eps, so equality tests compare gradients.
OPTIMIZER = training.make_optimizer(SCHEDULE, max_grad_norm=1.0, eps=1e-3)

# One SFT step from random_params(CFG, 0) on _batch(): measured, not derived.
GOLDEN_LOSS = 6.383016109466553
GOLDEN_GRAD_NORM = 2.47003173828125


def random_params(cfg, seed):
  """Seeded random params straight from the shapes, norms near 1 (no init compile: the models'
  threefry init costs more CPU to compile than a train step). Shared by the training tests."""
  rng = np.random.default_rng(seed)
  def leaf(path, s):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.asarray(1.0 + 0.1 * rng.normal(size=s.shape), s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) * s.shape[0] ** -0.5, s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, CFG.vocab_size, (B, P))
  prompt_mask = np.arange(P)[None] >= (np.arange(B) % 4)[:, None]  # left padding 0..3
  completion = rng.integers(1, CFG.vocab_size, (B, C))
  tokens, input_mask, loss_mask = scoring.completion_batch(prompt, prompt_mask, completion, LENGTHS)
  return {"tokens_BxL": np.asarray(tokens), "input_mask_BxL": np.asarray(input_mask),
          "loss_mask_BxL": np.asarray(loss_mask)}


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, 0)


@pytest.fixture(scope="module")
def sft_step():
  return training.make_update_step(Transformer(CFG), training.make_loss("sft"), OPTIMIZER,
                                   schedule=SCHEDULE)


def _fresh_state(params, **kw):
  return training.create_train_state(CFG, OPTIMIZER, jax.random.key(0), params=params, **kw)


def _assert_trees_close(a, b, atol, what):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def one_single_device_step(params, sft_step):
  state, metrics = training.run_step(sft_step, _fresh_state(params), _batch())
  return jax.device_get(state.params), metrics


def test_golden_sft_step(one_single_device_step):
  _, metrics = one_single_device_step
  note = ("golden SFT step changed: update GOLDEN_LOSS / GOLDEN_GRAD_NORM only when the model's "
          "init, the tiny llama3 config or the SFT loss definition changed on purpose")
  np.testing.assert_allclose(metrics["loss"], GOLDEN_LOSS, rtol=1e-5, err_msg=note)
  np.testing.assert_allclose(metrics["grad_norm"], GOLDEN_GRAD_NORM, rtol=1e-5, err_msg=note)
  np.testing.assert_allclose(metrics["learning_rate"], 1e-2, rtol=1e-6)


def test_short_run_overfits_eight_sequences(params, sft_step):
  state = _fresh_state(params)
  batch = _batch()
  for i in range(60):
    previous = state
    state, metrics = training.run_step(sft_step, state, batch)
    assert jax.tree.leaves(previous.params)[0].is_deleted()  # the step donated the old state
    np.testing.assert_allclose(metrics["learning_rate"], SCHEDULE(i), rtol=1e-6)
    if metrics["loss"] < 0.05:
      break
  assert metrics["loss"] < 0.05, f"loss {metrics['loss']} after {i + 1} steps"
  assert int(state.step) == i + 1


def test_two_rematerialized_microbatches_equal_one_step(params, one_single_device_step):
  """Token-mean SFT over micro-batches of 29 and 7 tokens equals the whole-batch step; remat (one
  compile for both options, to keep the suite fast) must not change the numbers either."""
  batch = _batch()
  scored = np.asarray(scoring.scored_mask(batch["input_mask_BxL"], batch["loss_mask_BxL"]))
  assert [scored[0::2].sum(), scored[1::2].sum()] == [29, 7]  # micro-batch k holds rows k::2
  step = training.make_update_step(Transformer(CFG), training.make_loss("sft"), OPTIMIZER,
                                   schedule=SCHEDULE, num_microbatches=2, remat="full")
  state, metrics = training.run_step(step, _fresh_state(params), batch)
  want_params, want = one_single_device_step
  np.testing.assert_allclose([metrics["loss"], metrics["grad_norm"]],
                             [want["loss"], want["grad_norm"]], rtol=1e-5)
  _assert_trees_close(state.params, want_params, 1e-5, "params")
  with pytest.raises(ValueError, match=r"num_microbatches=3: batch key \['input_mask_BxL'\] has"):
    training.make_update_step(Transformer(CFG), training.make_loss("sft"), OPTIMIZER,
                              schedule=SCHEDULE, num_microbatches=3)(state, batch, state.rng)


def _count_remats(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name.startswith("remat")  # jax.checkpoint's primitive ("remat2")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_remats(sub)
  return count


def test_remat_wraps_every_decoder_layer(params):
  loss = training.make_loss("sft")
  model = Transformer(CFG)
  batch = _batch()

  def remats(policy):
    def f(p):
      with training.remat.per_layer(policy) if policy else contextlib.nullcontext():
        return loss(p, batch, None, model=model)[0]
    return _count_remats(jax.make_jaxpr(f)(params).jaxpr)

  plain = remats(None)  # scoring's per-chunk checkpoint
  for policy in ("full", "dots"):
    assert remats(policy) == plain + CFG.num_layers, policy
  with pytest.raises(ValueError, match="remat='layers'"):
    training.make_update_step(model, loss, OPTIMIZER, schedule=SCHEDULE, remat="layers")


def test_sharded_step_equals_single_device_and_traces_once(params, one_single_device_step):
  mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = training.state_shardings(CFG, OPTIMIZER, mesh)
  state = training.create_train_state(CFG, OPTIMIZER, jax.random.key(0), mesh=mesh, params=params)
  sh.assert_sharded_as_rules(state.params, param_logical_names(CFG), mesh, sh.TRAIN_RULES)
  step = training.make_update_step(Transformer(CFG, mesh, sh.TRAIN_RULES),
                                   training.make_loss("sft"), OPTIMIZER, schedule=SCHEDULE,
                                   state_shardings=shardings)
  batch = _batch()
  state, metrics = training.run_step(step, state, batch)
  want_params, want = one_single_device_step
  np.testing.assert_allclose([metrics["loss"], metrics["grad_norm"]],
                             [want["loss"], want["grad_norm"]], rtol=1e-5)
  _assert_trees_close(jax.device_get(state.params), want_params, 1e-5, "params")
  sh.assert_sharded_as_rules(state.params, param_logical_names(CFG), mesh, sh.TRAIN_RULES)
  for _ in range(9):  # run_step blocks on every step (XLA:CPU collectives must not pile up)
    state, metrics = training.run_step(step, state, _batch(seed=1))
  assert int(state.step) == 10
  assert step.trace_count() == 1
  with pytest.raises(ValueError, match="state_shardings=None"):
    training.make_update_step(Transformer(CFG, mesh), training.make_loss("sft"), OPTIMIZER,
                              schedule=SCHEDULE)


def _pg_batch(seed=0):
  batch = _batch(seed)
  rewards = np.array([1, 0, 0, 1, 3, 1, 2, 0], np.float32)  # two prompts x four samples
  advantages, group_std = training.group_advantages(rewards, 4)
  return {**batch, "rewards_B": rewards, "advantages_B": np.asarray(advantages),
          "reward_group_std_B": np.asarray(group_std)}


def test_lora_grpo_on_mesh_trains_adapters_and_keeps_state_on_non_finite_loss(params):
  mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
  cfg = lora.LoraConfig(rank=4, alpha=8.0)
  shardings = training.state_shardings(CFG, OPTIMIZER, mesh, lora_config=cfg, frozen_keys=("base",))
  state = training.create_train_state(CFG, OPTIMIZER, jax.random.key(1), mesh=mesh, params=params,
                                      lora_config=cfg)
  q = state.params["layers_0"]["attn"]["q_proj"]
  assert q["lora_a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
  misplaced = optax.tree_map_params(
      OPTIMIZER, lambda moment, p: not moment.sharding.is_equivalent_to(p.sharding, p.ndim),
      state.opt_state, state.params, transform_non_params=lambda _: False)
  assert not any(jax.tree.leaves(misplaced)), "optimizer moments must be sharded like the adapters"
  base_before, adapters_before = jax.device_get((state.frozen["base"], state.params))
  loss = training.make_loss("policy_gradient", beta=0.04, reference="params", epsilon_high=0.28)
  step = training.make_update_step(Transformer(CFG, mesh, sh.TRAIN_RULES), loss, OPTIMIZER,
                                   schedule=SCHEDULE, state_shardings=shardings,
                                   num_microbatches=2, lora_config=cfg)
  state, first = training.run_step(step, state, _pg_batch())
  assert first["kl"] == 0.0  # B = 0: the merged policy is bitwise the base (the reference)
  state, second = training.run_step(step, state, _pg_batch(seed=1))
  assert second["kl"] > 0.0
  np.testing.assert_allclose(second["frac_reward_zero_std"], 0.0)
  # Only adapters move: every A and B (A from the second step, once B != 0); the base never.
  _assert_trees_close(jax.device_get(state.frozen["base"]), base_before, 0.0, "base")
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                       adapters_before)
  still = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(moved)[0]
           if v == 0]
  assert not still, f"adapters that did not move: {still}"

  before = jax.device_get((state.step, state.params, state.opt_state))
  poisoned = _pg_batch(seed=2)
  poisoned["advantages_B"] = poisoned["advantages_B"].copy()
  poisoned["advantages_B"][3] = np.nan
  with pytest.raises(FloatingPointError, match="at step 2") as caught:
    training.run_step(step, state, poisoned)
  assert isinstance(caught.value, training.NonFiniteLossError)
  kept = caught.value.state
  _assert_trees_close(jax.device_get((kept.step, kept.params, kept.opt_state)), before, 0.0,
                      "kept state")
  kept, metrics = training.run_step(step, kept, _pg_batch(seed=2))  # training goes on from it
  assert int(kept.step) == 3 and np.isfinite(metrics["loss"])
  assert step.trace_count() == 1


def test_bfloat16_compute_keeps_float32_master_weights(params):
  """Compile-free: the lowered step multiplies only bfloat16 operands (the vocabulary projection
  accumulates into float32 logits) and returns float32 params."""
  model = Transformer(CFG.replace(dtype="bfloat16"))
  step = training.make_update_step(model, training.make_loss("sft"), OPTIMIZER, schedule=SCHEDULE,
                                   compute_dtype="bfloat16")
  state = _fresh_state(params)
  lowered = step.jitted.lower(state.replace(frozen=None), None, _batch(), state.rng,
                              np.float32(1e-2))
  dots = re.findall(r"stablehlo.dot_general.*", lowered.as_text())
  assert len(dots) > 20  # forward and backward of two layers and the vocabulary projection
  operands = lambda d: d.split(" : ")[-1].split(" -> ")[0]
  not_bf16 = [d for d in dots if re.search(r"tensor<[0-9x]*f32>", operands(d))]
  assert not not_bf16, not_bf16[:2]
  f32_results = [d for d in dots if re.search(r"-> tensor<[0-9x]*f32>", d)]
  assert f32_results  # the logits
  out_state, _ = lowered.out_info
  assert {x.dtype for x in jax.tree.leaves(out_state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
