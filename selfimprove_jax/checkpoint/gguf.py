"""GGUF files (llama.cpp's format) to Hugging Face checkpoint directories that ``load_hf`` reads.

  python -m selfimprove_jax.checkpoint.convert --from=gguf --to=hf MODEL.gguf OUT_DIR

Built on transformers' GGUF loader (the ``[gguf]`` extra: transformers, torch, gguf, accelerate):
it already maps each architecture's tensor names and rebuilds the tokenizer from the file's
metadata, which a second mapping here would only duplicate. Quantized tensors (Q4_K, Q4_1, ...)
are dequantized to float32: the directory holds the quantized model's values, not the original
full-precision weights. The chat template and special tokens stored in the file come along.
"""
from __future__ import annotations

import os
import pathlib
from collections import Counter

from selfimprove_jax.checkpoint import files

# GGUF architectures whose Hugging Face models this project's families cover (Mistral files use
# "llama").
ARCHITECTURES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "phi3")
_FLOAT_TYPES = ("F32", "F16", "BF16")


def describe(path: str | os.PathLike) -> tuple[str, Counter]:
  """(architecture, Counter of tensor storage types) of a GGUF file, from its header alone."""
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading GGUF needs the gguf package: pip install -e '.[gguf]'") from None
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # a truncated or foreign file
    raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
  field = reader.fields.get("general.architecture")
  if field is None:
    raise ValueError(f"{path}: no general.architecture in the GGUF metadata")
  architecture = bytes(field.parts[field.data[0]]).decode()
  return architecture, Counter(t.tensor_type.name for t in reader.tensors)


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 log=print) -> str:
  """Writes ``out_dir``: config.json, model.safetensors (float32), tokenizer files, the chat
  template and generation config from ``path``; returns ``out_dir``. Written atomically.

  Raises:
    ValueError: the file is not GGUF, or its architecture is not in ``ARCHITECTURES``.
  """
  path = pathlib.Path(path)
  architecture, types = describe(path)
  if architecture not in ARCHITECTURES:
    raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
                     f"{', '.join(ARCHITECTURES)}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("converting GGUF needs transformers and torch: pip install -e '.[gguf]'"
                      ) from None
  quantized = {t: n for t, n in types.items() if t not in _FLOAT_TYPES}
  log(f"{path.name}: {architecture}, {sum(types.values())} tensors; dequantizing "
      f"{sum(quantized.values())} quantized ones ({', '.join(f'{n} {t}' for t, n in sorted(quantized.items()))}) "
      "to float32")
  source = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(**source)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
  # The loaded model is flagged as quantized (and refuses to save): rebuild a plain one.
  config = loaded.config
  if hasattr(config, "quantization_config"):
    delattr(config, "quantization_config")
  model = type(loaded)(config)
  model.load_state_dict(loaded.state_dict())
  model.generation_config = loaded.generation_config
  out = files.as_path(out_dir)
  with files.atomic_dir(out, overwrite) as tmp:
    model.save_pretrained(os.fspath(tmp))
    tokenizer.save_pretrained(os.fspath(tmp))
  log(f"wrote {out} (float32 safetensors, tokenizer"
      f"{', chat template' if tokenizer.chat_template else ''})")
  return os.fspath(out)
