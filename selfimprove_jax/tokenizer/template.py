"""A checkpoint's own chat template, rendered the way transformers' ``apply_chat_template`` does.

Instruct checkpoints carry their prompt format as a Jinja template (``chat_template.jinja``, or
``chat_template`` in ``tokenizer_config.json``); fine-tunes often change it (SmolLM2 speaks ChatML
on a Llama architecture). ``ChatTemplate`` renders it in a sandboxed Jinja environment with what
transformers provides: ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps non-ASCII text, the
``loopcontrols`` extension and a pass-through ``{% generation %}`` block; tools are absent. Extra
keyword arguments (``enable_thinking=False``) are template variables too. The text it returns
contains the template's own BOS where it writes one: encode it with ``add_bos=False``.

The family renderers of ``chat.py`` remain for checkpoints without a template and to override one.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
from etils import epath
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from selfimprove_jax.tokenizer.hf_tokenizer import special_tokens


def read_template(model_dir: str | os.PathLike) -> tuple[str, str] | None:
  """(template text, the file it came from) of a checkpoint directory, local or ``scheme://``:
  ``chat_template.jinja`` (transformers 5), else the ``chat_template`` entry of
  ``tokenizer_config.json`` (a string, or a list of named templates of which "default" is used);
  None when neither holds one."""
  model_dir = epath.Path(model_dir)
  jinja = model_dir / "chat_template.jinja"
  if jinja.exists():
    return jinja.read_text(), os.fspath(jinja)
  config_path = model_dir / "tokenizer_config.json"
  if not config_path.exists():
    return None
  template = json.loads(config_path.read_text()).get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is not None and not isinstance(template, str):
    raise ChatTemplateError(f"{config_path}: chat_template={template!r} is neither a string nor "
                            "a list of {name, template} entries with a 'default'")
  return None if template is None else (template, os.fspath(config_path))


class ChatTemplateError(ValueError):
  """A chat template that does not parse, or that raised while rendering (its own message)."""


class _GenerationBlock(jinja2.ext.Extension):
  """``{% generation %} ... {% endgeneration %}``: marks assistant text for masks in transformers;
  here it renders its body unchanged."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.Scope(body, lineno=lineno)


def _raise(message: str):
  raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


class ChatTemplate:
  """A compiled chat template and the special-token strings it may write.

  Args:
    source: the Jinja template text.
    bos_token, eos_token: the tokenizer's BOS / EOS strings (None where it has none).
    origin: where the template came from, for error messages (a file path).
  """

  def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None,
               origin: str = "<chat template>"):
    if not isinstance(source, str) or not source.strip():
      raise ChatTemplateError(f"chat template {origin} is empty")
    self.source, self.origin = source, origin
    self.bos_token, self.eos_token = bos_token, eos_token
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ChatTemplateError(f"chat template {origin} does not parse: {e.message} (template "
                              f"line {e.lineno})") from None

  @classmethod
  def from_model_dir(cls, model_dir: str | os.PathLike) -> ChatTemplate | None:
    """The template of a checkpoint directory (``read_template``) with its special tokens; None
    when it ships none."""
    found = read_template(model_dir)
    if found is None:
      return None
    source, origin = found
    tokens = special_tokens(model_dir)
    return cls(source, bos_token=tokens.get("bos_token"), eos_token=tokens.get("eos_token"),
               origin=origin)

  def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
             **variables: Any) -> str:
    """The conversation as the template writes it; ``variables`` are extra template variables.

    Raises:
      ChatTemplateError: the template raised (``raise_exception`` or a Jinja error), with its
        message and ``origin``.
    """
    try:
      return self._template.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   **variables)
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f"chat template {self.origin} raised: {e}") from None

  def __repr__(self) -> str:
    return f"ChatTemplate(origin={self.origin!r})"
