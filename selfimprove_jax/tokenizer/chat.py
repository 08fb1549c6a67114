"""Instruct-format chat rendering for each supported model family, as pure string functions.

A checkpoint's own template (``template.ChatTemplate``) is what real checkpoints are rendered with;
these renderers are the fallback for checkpoints without one and a way to override it. Their output
matches the official Hugging Face chat templates of these models for system / user / assistant
turns (tool calls and multimodal content are out of scope), except where the notes below say
(``tests/test_chat_templates.py`` checks both). Rendered text already
contains the family's BOS string where the template has one, so encode it with
``add_bos=False`` (``Tokenizer.encode(add_bos=True)`` also never doubles it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from selfimprove_jax.families import FAMILIES

if TYPE_CHECKING:
  from selfimprove_jax.tokenizer.base import Tokenizer
  from selfimprove_jax.tokenizer.template import ChatTemplate

ROLES = ("system", "user", "assistant")

# Strings that end an assistant turn; generation stops on any of them.
STOP_STRINGS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "gemma2": ("<end_of_turn>",),
    "gemma3": ("<end_of_turn>",),
    "llama3": ("<|eot_id|>",),
    "mistral": ("</s>",),
    "phi3": ("<|end|>",),
    "qwen2": ("<|im_end|>",),
    "qwen3": ("<|im_end|>",),
})

# The family-independent turn markers a tokenizer checks its vocabulary for. Mistral's "</s>" is
# left out: it is Mistral's EOS already, and in other vocabularies (Gemma's) it can be an ordinary
# HTML tag that must not stop generation.
END_OF_TURN_PIECES = ("<end_of_turn>", "<|eot_id|>", "<|end|>", "<|im_end|>")

QWEN2_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Keyword options each family accepts, with their defaults.
_OPTIONS: Mapping[str, Mapping[str, object]] = MappingProxyType({
    "qwen3": {"enable_thinking": True},
})

_Turns = list[tuple[str, str, dict]]  # (role, content, original message)


def render_chat(family: str | ChatTemplate, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = True, **options) -> str:
  """Render ``messages`` in ``family``'s instruct format, or with a checkpoint's own template.

  Args:
    family: one of ``FAMILIES``, or a ``template.ChatTemplate`` (a checkpoint's template, which
      then renders everything and takes ``options`` as template variables).
    messages: dicts with ``"role"`` (``"system"``, ``"user"`` or ``"assistant"``) and
      ``"content"`` (str). Qwen 3 assistant messages may also carry ``"reasoning_content"``.
    add_generation_prompt: end with the header that opens an assistant turn. Mistral has no
      such header (its prompt already ends with ``[/INST]``), so the flag changes nothing there.
    **options: family-specific; only qwen3 has one, ``enable_thinking`` (default True). When
      False the generation prompt is followed by an empty ``<think>`` block, which makes the
      model answer without reasoning.

  Family notes:
    gemma2/gemma3: "assistant" renders as ``model``; user/model contents are stripped; roles
      must alternate starting with user. gemma2 rejects system messages; gemma3 puts a leading
      system message (unstripped, as in the official template) in front of the first user turn
      as ``{system}\\n\\n{user}``. A system message anywhere else is rejected (the official
      templates let some through as an undocumented ``<start_of_turn>system`` turn).
    llama3: the Llama 3.0 template; contents are stripped. Llama 3.1+ templates also emit a
      system preamble with "Cutting Knowledge Date" and "Today Date" lines; not rendered here
      (the checkpoint's own template, ``template.ChatTemplate``, renders them).
    mistral: the v0.3 template. The leading system message is prepended to the last user
      message. The official template does so only when that user message is the final message
      and otherwise drops the system message; prepending regardless keeps a rendered prompt a
      prefix of the rendered prompt-plus-answer, which training on sampled answers relies on.
      Assistant contents are stripped, user contents are not. Later Mistral checkpoints (Nemo,
      with the Tekken tokenizer) write ``[INST]`` without the following space and keep assistant
      contents unstripped: render those with the checkpoint's own template.
    phi3: without a generation prompt the text ends with ``<|endoftext|>``.
    qwen2: a default system message is inserted when none is given.
    qwen3: like the official template, ``<think>...</think>`` is stripped from assistant turns
      before the last user message, and assistant turns after it are rendered with a (possibly
      empty) think block.

  Raises:
    ValueError: unknown family, role or option, empty messages, or a conversation the family's
      template rejects (gemma2 system message, non-alternating gemma/mistral roles).
  """
  if not isinstance(family, str):
    return family.render(messages, add_generation_prompt, **options)
  if family not in FAMILIES:
    raise ValueError(f"unknown chat family {family!r}; expected one of {FAMILIES}")
  allowed = _OPTIONS.get(family, {})
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"{family}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
  opts = {**allowed, **options}
  for name, value in opts.items():
    if type(value) is not type(allowed[name]):
      raise ValueError(f"{family}: option {name}={value!r} must be {type(allowed[name]).__name__}")
  turns = _validated_turns(family, messages)
  return _RENDERERS[family](family, turns, add_generation_prompt, **opts)


def stop_ids_for_family(tokenizer: Tokenizer, family: str) -> tuple[int, ...]:
  """``tokenizer.stop_ids`` plus the ids of ``family``'s stop strings found in its vocabulary.

  Stop strings that are not a single vocabulary piece are skipped (they cannot be matched as
  one sampled token).
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown chat family {family!r}; expected one of {FAMILIES}")
  ids = list(tokenizer.stop_ids)
  for piece in STOP_STRINGS[family]:
    try:
      i = tokenizer.token_to_id(piece)
    except KeyError:
      continue
    if i not in ids:
      ids.append(i)
  return tuple(ids)


def _validated_turns(family: str, messages: Sequence[Mapping[str, str]]) -> _Turns:
  if isinstance(messages, (str, Mapping)) or not messages:
    raise ValueError(f"{family}: messages must be a non-empty list of dicts, got {messages!r}")
  turns = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"{family}: message {i} must be a dict with 'role' and 'content': {m!r}")
    role, content = m["role"], m["content"]
    if role not in ROLES:
      raise ValueError(f"{family}: unknown role {role!r} in message {i}; allowed roles: {ROLES}")
    if not isinstance(content, str):
      raise ValueError(f"{family}: message {i} content must be str, got {type(content).__name__}")
    turns.append((role, content, m))
  return turns


def _split_system(family: str, turns: _Turns) -> tuple[str | None, _Turns]:
  """Pull off a leading system message; the rest must alternate user/assistant from user."""
  system = None
  if turns[0][0] == "system":
    system, turns = turns[0][1], turns[1:]
  if not turns:
    raise ValueError(f"{family}: a system message needs at least one user message after it")
  for i, (role, _, _) in enumerate(turns):
    expected = "user" if i % 2 == 0 else "assistant"
    if role != expected:
      raise ValueError(
          f"{family}: after the optional leading system message roles must alternate "
          f"user/assistant starting with user; message {i + (system is not None)} has role "
          f"{role!r}, expected {expected!r}")
  return system, turns


def _gemma(family: str, turns: _Turns, add_generation_prompt: bool) -> str:
  if family == "gemma2" and any(role == "system" for role, _, _ in turns):
    raise ValueError("gemma2 does not support a system message (its chat template rejects "
                     "it); put the instructions in the first user message or use gemma3")
  system, turns = _split_system(family, turns)
  # The official template strips user/model contents but keeps the system text as given.
  prefix = "" if system is None else system + "\n\n"
  parts = ["<bos>"]
  for i, (role, content, _) in enumerate(turns):
    speaker = "model" if role == "assistant" else role
    body = (prefix if i == 0 else "") + content.strip()
    parts.append(f"<start_of_turn>{speaker}\n{body}<end_of_turn>\n")
  if add_generation_prompt:
    parts.append("<start_of_turn>model\n")
  return "".join(parts)


def _llama3(family: str, turns: _Turns, add_generation_prompt: bool) -> str:
  del family
  parts = ["<|begin_of_text|>"]
  for role, content, _ in turns:
    parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>")
  if add_generation_prompt:
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
  return "".join(parts)


def _mistral(family: str, turns: _Turns, add_generation_prompt: bool) -> str:
  del add_generation_prompt
  system, turns = _split_system(family, turns)
  last_user = max(i for i, (role, _, _) in enumerate(turns) if role == "user")
  parts = ["<s>"]
  for i, (role, content, _) in enumerate(turns):
    if role == "user":
      if i == last_user and system is not None:
        content = f"{system}\n\n{content}"
      parts.append(f"[INST] {content}[/INST]")
    else:
      parts.append(f" {content.strip()}</s>")
  return "".join(parts)


def _phi3(family: str, turns: _Turns, add_generation_prompt: bool) -> str:
  del family
  parts = [f"<|{role}|>\n{content}<|end|>\n" for role, content, _ in turns]
  parts.append("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")
  return "".join(parts)


def _qwen2(family: str, turns: _Turns, add_generation_prompt: bool) -> str:
  del family
  if turns[0][0] != "system":
    turns = [("system", QWEN2_DEFAULT_SYSTEM, {}), *turns]
  parts = [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content, _ in turns]
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)


def _qwen3(family: str, turns: _Turns, add_generation_prompt: bool,
           enable_thinking: bool) -> str:
  del family
  users = [i for i, (role, _, _) in enumerate(turns) if role == "user"]
  last_query = users[-1] if users else len(turns) - 1
  parts = []
  for i, (role, content, message) in enumerate(turns):
    if role != "assistant":
      parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
      continue
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
      reasoning = ""
      if "</think>" in content:
        head, content = content.split("</think>")[0], content.split("</think>")[-1]
        reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.lstrip("\n")
    # As in the official template, only turns after the latest user query keep a think block;
    # older turns are shown as bare answers so long histories do not carry stale reasoning.
    if i > last_query and (i == len(turns) - 1 or reasoning):
      reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
      body = f"<think>\n{reasoning}\n</think>\n\n{content}"
    else:
      body = content
    parts.append(f"<|im_start|>assistant\n{body}<|im_end|>\n")
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
    if not enable_thinking:
      parts.append("<think>\n\n</think>\n\n")
  return "".join(parts)


_RENDERERS: Mapping[str, Callable[..., str]] = MappingProxyType({
    "gemma2": _gemma,
    "gemma3": _gemma,
    "llama3": _llama3,
    "mistral": _mistral,
    "phi3": _phi3,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
})
