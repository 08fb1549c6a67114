"""Checkpoint chat templates render exactly as transformers' ``apply_chat_template`` renders them.

Fixtures: the official templates of five families' instruct checkpoints and SmolLM2's own, with
their public sources in ``fixtures/chat_templates/SOURCES.json``. A 3-turn conversation (a system
message where the template allows one, user, assistant, user; generation prompt on) must give the
same text and the same token ids both ways; the family renderers of ``tokenizer/chat.py`` agree
with the templates, except where their docstring says otherwise (checked here too).
"""
import datetime
import hashlib
import json
import pathlib

import pytest

from selfimprove_jax.tokenizer import render_chat, train_hf_bpe
from selfimprove_jax.tokenizer.template import ChatTemplate, ChatTemplateError

transformers = pytest.importorskip("transformers")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "chat_templates"
SOURCES = json.loads((FIXTURES / "SOURCES.json").read_text())["templates"]
# name: (bos, eos, the system message may open the conversation)
SPECIALS = {
    "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>", False),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", True),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>", True),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>", True),
    "Qwen-Qwen3-0.6B.jinja": (None, "<|im_end|>", True),
    "HuggingFaceTB-SmolLM2-135M-Instruct.jinja": ("<|im_start|>", "<|im_end|>", True),
}
SPECIAL_PIECES = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>",
                  "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<s>", "</s>",
                  "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Where a family renderer differs from its checkpoint's template, on purpose (chat.py says why).
DOCUMENTED_DIFFERENCES = {
    "meta-llama-Llama-3.2-3B-Instruct.jinja":  # the Llama 3.0 format: no date preamble
        "Cutting Knowledge Date",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja":  # v0.3's "[INST] x" and stripped answers
        "[INST]What",
}


def conversation(system: bool) -> list[dict]:
  turns = [{"role": "user", "content": "What is 17 + 25?"},
           {"role": "assistant", "content": " 17 + 25 = 42. "},
           {"role": "user", "content": "And 42 * 2? Answer with the number only."}]
  return ([{"role": "system", "content": "You answer arithmetic questions."}] if system else []) + turns


@pytest.fixture(scope="module")
def tokenizer():
  """A byte-level BPE whose special tokens are every template's markers: one tokenizer for both
  sides, so matching text means matching ids and a marker split in two would show."""
  return train_hf_bpe(["arithmetic questions and answers 17 + 25 = 42"] * 20, vocab_size=400,
                      special_tokens=SPECIAL_PIECES, bos_token="<bos>", eos_token="<eos>")


def _hf(tokenizer, bos, eos):
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_tokenizer,
                                              bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_template_renders_like_transformers(name, tokenizer):
  source = (FIXTURES / name).read_text()
  assert hashlib.sha256(source.encode()).hexdigest() == SOURCES[name]["sha256"]
  bos, eos, system = SPECIALS[name]
  messages = conversation(system)
  ours = ChatTemplate(source, bos_token=bos, eos_token=eos, origin=name).render(messages)
  theirs = _hf(tokenizer, bos, eos).apply_chat_template(messages, chat_template=source,
                                                        tokenize=False, add_generation_prompt=True)
  assert ours == theirs
  ids = _hf(tokenizer, bos, eos).apply_chat_template(messages, chat_template=source,
                                                     tokenize=True, add_generation_prompt=True,
                                                     return_dict=False)
  assert tokenizer.encode(ours, add_bos=False) == list(ids)
  assert "What is 17 + 25?" in ours and ours.rstrip().endswith(
      ("model", "<|end_header_id|>", "<|assistant|>", "[/INST]", "assistant"))
  if name.startswith("meta-llama"):
    assert datetime.datetime.now().strftime("%d %b %Y") in ours  # strftime_now, as transformers


@pytest.mark.parametrize("name", sorted(n for n, m in SOURCES.items() if m["family"]))
def test_family_renderers_agree_or_the_difference_is_documented(name):
  bos, eos, system = SPECIALS[name]
  messages = conversation(system)
  template = ChatTemplate((FIXTURES / name).read_text(), bos_token=bos, eos_token=eos)
  ours = render_chat(SOURCES[name]["family"], messages)
  if name in DOCUMENTED_DIFFERENCES:
    assert ours != template.render(messages)
    assert DOCUMENTED_DIFFERENCES[name] in template.render(messages)
  else:
    assert ours == template.render(messages)


def test_template_errors_name_the_file_and_the_problem(tmp_path):
  gemma = (FIXTURES / "google-gemma-2-2b-it.jinja").read_text()
  with pytest.raises(ChatTemplateError, match=r"chat template gemma.jinja raised: System role not "
                                              r"supported"):
    ChatTemplate(gemma, bos_token="<bos>", origin="gemma.jinja").render(conversation(True))
  with pytest.raises(ChatTemplateError, match=r"chat template bad.jinja does not parse: .*line 1"):
    ChatTemplate("{% for m in messages %}{{ m }", origin="bad.jinja")
  assert ChatTemplate.from_model_dir(tmp_path) is None  # no template: nothing to render with
  # The sandbox: a template cannot reach Python internals.
  with pytest.raises(ChatTemplateError, match="raised"):
    ChatTemplate("{{ messages.__class__.__mro__ }}").render(conversation(False))


def test_loop_without_a_template_names_the_checkpoint(tmp_path, tokenizer):
  """task.chat_format='checkpoint' on a checkpoint that ships no template: a clear error naming
  the directory and the way out, before anything is sampled."""
  from selfimprove_jax.loop import context  # pylint: disable=g-import-not-at-top
  from tests.loop_helpers import method_config  # pylint: disable=g-import-not-at-top
  config = method_config("sft_sharpening", **{"task.chat": True, "task.chat_format": "checkpoint"})
  with pytest.raises(ValueError, match=rf"{tmp_path} has no chat template .*chat_format"):
    context._chat_format(config, tokenizer, None, str(tmp_path))
  (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}"
                                                "{{ m['content'] }}{% endfor %}")
  (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<bos>"}')
  found = context._chat_format(config, tokenizer, (tmp_path / "chat_template.jinja").read_text(),
                               str(tmp_path))
  assert found.render([{"role": "user", "content": "hi"}]) == "<bos>hi"
  config.task.chat_format = "gemma2"  # a family overrides the checkpoint's template
  assert context._chat_format(config, tokenizer, None, str(tmp_path)) == "gemma2"
