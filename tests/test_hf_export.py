"""Special token ids of HF exports: every family, with and without a tokenizer, loads in
``transformers`` with the ids ``save_hf`` states (no config-class default fills in), and its greedy
``generate`` stops where our sampler stops (torch CPU, tiny random models)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from selfimprove_jax import families
from selfimprove_jax.checkpoint import config_to_hf, hf_special, load_hf, save_hf
from selfimprove_jax.models import PRESETS, Transformer, param_shapes, tiny_config
from selfimprove_jax.sampling import SamplingParams, generate
from selfimprove_jax.tokenizer import train_hf_bpe

FAMILIES = sorted(families.FAMILIES)
VOCAB = 300  # <= 32000: Phi3Config's default pad id 32000 would not fit (the original assertion)
PROMPT, NEW, MAX_STOPS = 6, 8, 4
KEYS = hf_special.KEYS
# What an export without tokenizer states for a 300-id vocabulary: the family's published ids that
# fit, null for the rest (hf_special's range rule).
WITHOUT_TOKENIZER = {
    "gemma2": (2, [1, 107], 0), "gemma3": (2, [1, 106], 0), "llama3": (None, None, None),
    "mistral": (1, 2, None), "phi3": (1, None, None), "qwen2": (None, None, None),
    "qwen3": (None, None, None)}
HF_CLASSES = {"gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig,
              "llama3": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "phi3": transformers.Phi3Config, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config}


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
  """(family, config, params, prompt, our greedy tokens without stop ids)."""
  family = request.param
  config = tiny_config(family, vocab_size=VOCAB, num_layers=2)
  rng = np.random.default_rng(FAMILIES.index(family))
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype),
                        param_shapes(config))
  prompt = rng.integers(3, VOCAB, (1, PROMPT)).astype(np.int32)
  return family, config, params, prompt, _our_greedy(config, params, prompt, [])


def _our_greedy(config, params, prompt, stop_ids):
  stops = np.full(MAX_STOPS, -1, np.int32)  # one stop-array shape: one compile per family
  stops[:len(stop_ids)] = stop_ids  # -1 is never sampled
  out = generate(Transformer(config), params, jnp.asarray(prompt), jnp.ones(prompt.shape, bool),
                 jax.random.key(0), SamplingParams.make(1, temperature=0.0), jnp.asarray(stops),
                 max_new_tokens=NEW, num_samples=1)
  return np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()


def _tokenizer(family):
  """A trained BPE tokenizer; Qwen-like (no BOS) for the Qwen families."""
  texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs"] * 4
  return train_hf_bpe(texts, vocab_size=VOCAB,
                      bos_token=None if family.startswith("qwen") else "<|begin_of_text|>")


def _as_list(eos):
  return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["no_tokenizer", "tokenizer"])
def test_export_states_special_ids_and_generates_like_our_sampler(model, with_tokenizer, tmp_path):
  family, config, params, prompt, unstopped = model
  if with_tokenizer:
    # Stop on a token our greedy run emits (random tiny models often repeat one), so transformers
    # must read the stop ids from the export to end where we end, before the length limit.
    tok = _tokenizer(family)
    stop_at = next((t for t in unstopped[2:] if 5 <= t < tok.vocab_size), None)
    assert stop_at is not None, f"no usable stop token in {unstopped}"
    tok.set_stop_ids([tok.eos_id, stop_at])
    want = dict(zip(KEYS, (tok.bos_id, [tok.eos_id, stop_at], tok.pad_id)))
  else:
    tok = None
    want = dict(zip(KEYS, WITHOUT_TOKENIZER[family]))
  out = save_hf(config, params, tmp_path / "export", tokenizer=tok)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert {k: getattr(hf.config, k) for k in KEYS} == want  # no class default filled in
  for name in ("config.json", "generation_config.json"):
    written = json.loads((tmp_path / "export" / name).read_text())
    assert {k: written.get(k, "absent") for k in KEYS} == want, name  # null written, not omitted
  assert {k: getattr(hf.generation_config, k) for k in KEYS} == want
  with torch.no_grad():
    ref = hf.generate(torch.from_numpy(prompt.astype(np.int64)), attention_mask=torch.ones(
        prompt.shape, dtype=torch.long), do_sample=False, max_new_tokens=NEW)
  stops = _as_list(want["eos_token_id"])
  assert _our_greedy(config, params, prompt, stops) == ref[0, PROMPT:].tolist()
  if with_tokenizer:
    assert ref.shape[1] < PROMPT + NEW and ref[0, -1] == stop_at, "the stop id never ended generation"
    assert load_hf(out).tokenizer.stop_ids == tuple(stops)


def test_every_family_has_published_ids_and_class_defaults():
  """A family added to ``families.FAMILIES`` but not to hf_special's tables would fail its export."""
  assert (sorted(hf_special.FAMILY_IDS) == sorted(hf_special.HF_CLASS_DEFAULTS)
          == sorted(HF_CLASSES) == FAMILIES)


def test_class_defaults_match_transformers():
  """``HF_CLASS_DEFAULTS`` is what each config class assumes for a key config.json omits."""
  for family, cls in HF_CLASSES.items():
    defaults = cls()
    assert tuple(getattr(defaults, k) for k in KEYS) == hf_special.HF_CLASS_DEFAULTS[family], family


# What exports of the real-vocabulary presets state without a tokenizer: every family id fits, the
# EOS list being the end-of-text id then the chat end-of-turn id (the instruct checkpoints' stops).
PUBLISHED_IDS = {
    "gemma2_2b": (2, [1, 107], 0), "gemma3_1b": (2, [1, 106], 0),
    "llama3_2_1b": (128000, [128001, 128009], None), "mistral_7b_v0_3": (1, 2, None),
    "phi3_mini": (1, [32000, 32007], 32000), "qwen2_5_0_5b": (151643, [151643, 151645], None),
    "qwen3_0_6b": (151643, [151643, 151645], None)}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_IDS))
def test_real_vocabularies_keep_every_family_id(preset):
  hf = config_to_hf(PRESETS[preset])
  assert tuple(hf[k] for k in KEYS) == PUBLISHED_IDS[preset]


def _random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), param_shapes(config))


def test_ids_come_from_the_source_checkpoint(tmp_path):
  """Without a tokenizer, an export of imported params keeps the source's ids: the ones its
  config.json states, the class default for one it omits (null when out of range), and its
  generation_config.json."""
  for family, stated, want in [
      ("llama3", {"bos_token_id": 5, "eos_token_id": [6, 7]}, (5, [6, 7], None)),
      ("phi3", {"eos_token_id": 4, "pad_token_id": 999}, (1, 4, None)),
      ("gemma3", {k: None for k in KEYS}, (None, None, None))]:
    config = tiny_config(family, vocab_size=VOCAB, num_layers=1)
    src = tmp_path / f"src_{family}"
    save_hf(config, _random_params(config), src)
    hf = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if k not in KEYS}
    (src / "config.json").write_text(json.dumps({**hf, **stated}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [6], "top_p": 0.5}))
    loaded = load_hf(src, with_tokenizer=False)
    out = save_hf(loaded.config, loaded.params, tmp_path / f"out_{family}", source_dir=src)
    written = json.loads((tmp_path / f"out_{family}" / "config.json").read_text())
    assert tuple(written[k] for k in KEYS) == want, family
    assert (tmp_path / f"out_{family}" / "generation_config.json").read_text() == (
        src / "generation_config.json").read_text()
    read = transformers.AutoConfig.from_pretrained(out)
    assert tuple(getattr(read, k) for k in KEYS) == want, family  # null stays None, no default


def test_tokenizer_outside_the_vocabulary_is_refused(tmp_path):
  config = tiny_config("mistral", vocab_size=280, num_layers=1)
  tok = _tokenizer("mistral")
  tok.set_stop_ids([tok.eos_id, 290])
  with pytest.raises(ValueError, match=r"eos_token_id=\[\d+, 290\] is outside .*\[0, 280\)"):
    save_hf(config, _random_params(config), tmp_path / "out", tokenizer=tok)
  assert not (tmp_path / "out").exists()


def test_source_ids_of_a_multimodal_gemma3_config():
  """Top-level keys win, then ``text_config``'s, then the class default."""
  hf = {"model_type": "gemma3", "pad_token_id": 0, "text_config": {"eos_token_id": [1, 106],
                                                                   "pad_token_id": 5}}
  assert hf_special.from_source(hf, "gemma3", VOCAB) == {
      "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
  assert hf_special.from_source(hf, "gemma3", 100)["eos_token_id"] == 1  # 106 is out of range
