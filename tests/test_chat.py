"""Each family's chat format against literal strings, and the format errors."""
import pytest

from selfimprove_jax.tokenizer import FAMILIES, render_chat

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_gemma3_with_system():
  assert render_chat("gemma3", [SYSTEM, *TURNS]) == (
      "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
      "<start_of_turn>model\n4<end_of_turn>\n"
      "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
      "<start_of_turn>model\n")


def test_gemma2_strips_contents_and_has_no_prompt_when_asked():
  messages = [{"role": "user", "content": "  What is 2+2?\n"},
              {"role": "assistant", "content": "\n4  "}]
  assert render_chat("gemma2", messages, add_generation_prompt=False) == (
      "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
      "<start_of_turn>model\n4<end_of_turn>\n")


def test_llama3_with_system():
  messages = [SYSTEM, *TURNS[:2], {"role": "user", "content": " And 3+3? \n"}]
  assert render_chat("llama3", messages) == (
      "<|begin_of_text|>"
      "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert render_chat("llama3", TURNS[:2], add_generation_prompt=False) == (
      "<|begin_of_text|>"
      "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")


def test_mistral_system_goes_to_last_user_message():
  expected = ("<s>[INST] What is 2+2?[/INST] 4</s>"
              "[INST] You are terse.\n\nAnd 3+3?[/INST]")
  assert render_chat("mistral", [SYSTEM, *TURNS]) == expected
  # There is no generation header to add or leave out.
  assert render_chat("mistral", [SYSTEM, *TURNS], add_generation_prompt=False) == expected


def test_mistral_completion_extends_prompt():
  prompt = render_chat("mistral", [SYSTEM, TURNS[0]])
  full = render_chat("mistral", [SYSTEM, TURNS[0], {"role": "assistant", "content": " 4 \n"}],
                     add_generation_prompt=False)
  assert prompt == "<s>[INST] You are terse.\n\nWhat is 2+2?[/INST]"
  assert full == prompt + " 4</s>"


def test_phi3():
  assert render_chat("phi3", [SYSTEM, *TURNS]) == (
      "<|system|>\nYou are terse.<|end|>\n"
      "<|user|>\nWhat is 2+2?<|end|>\n"
      "<|assistant|>\n4<|end|>\n"
      "<|user|>\nAnd 3+3?<|end|>\n"
      "<|assistant|>\n")
  assert render_chat("phi3", TURNS[:2], add_generation_prompt=False) == (
      "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|endoftext|>")


def test_qwen2_default_and_explicit_system():
  assert render_chat("qwen2", TURNS[:1]) == (
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
      "<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert render_chat("qwen2", [SYSTEM, *TURNS[:2]], add_generation_prompt=False) == (
      "<|im_start|>system\nYou are terse.<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
      "<|im_start|>assistant\n4<|im_end|>\n")


def test_qwen3_thinking_switch():
  history = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
             "<|im_start|>assistant\n4<|im_end|>\n"
             "<|im_start|>user\nAnd 3+3?<|im_end|>\n")
  assert render_chat("qwen3", [SYSTEM, *TURNS]) == history + "<|im_start|>assistant\n"
  assert render_chat("qwen3", [SYSTEM, *TURNS], enable_thinking=False) == (
      history + "<|im_start|>assistant\n<think>\n\n</think>\n\n")
  # No default system message, unlike qwen2.
  assert render_chat("qwen3", TURNS[:1]) == (
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_reasoning_kept_only_after_last_user_message():
  messages = [
      {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "<think>\n2 and 2\n</think>\n\n4"},
      {"role": "user", "content": "And 3+3?"},
      {"role": "assistant", "content": "6"},
  ]
  assert render_chat("qwen3", messages, add_generation_prompt=False) == (
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
      "<|im_start|>assistant\n4<|im_end|>\n"
      "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
      "<|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>\n")


def test_unknown_family():
  with pytest.raises(ValueError, match=r"'gemma4'.*gemma2.*qwen3"):
    render_chat("gemma4", TURNS)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_role(family):
  with pytest.raises(ValueError, match=r"'tool'.*system.*user.*assistant"):
    render_chat(family, [TURNS[0], {"role": "tool", "content": "x"}])


def test_gemma2_rejects_system():
  with pytest.raises(ValueError, match="system"):
    render_chat("gemma2", [SYSTEM, *TURNS])


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("roles", [("user", "user"), ("assistant", "user"),
                                   ("user", "assistant", "assistant")])
def test_roles_must_alternate(family, roles):
  with pytest.raises(ValueError, match="alternate"):
    render_chat(family, [{"role": r, "content": "x"} for r in roles])


def test_bad_options_and_messages():
  with pytest.raises(ValueError, match="enable_thinking"):
    render_chat("qwen2", TURNS, enable_thinking=False)
  with pytest.raises(ValueError, match="bool"):
    render_chat("qwen3", TURNS, enable_thinking="no")
  with pytest.raises(ValueError, match="non-empty"):
    render_chat("llama3", [])
  with pytest.raises(ValueError, match="'content'"):
    render_chat("llama3", [{"role": "user"}])
