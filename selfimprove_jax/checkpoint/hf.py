"""Import and export of Hugging Face checkpoint directories (safetensors + config.json + tokenizer).

Import streams: headers are read and every name, shape and dtype is checked before any weight is
read; then tensors are read one at a time, converted, placed on their sharding and dropped, so host
memory holds about one tensor (two for a dtype conversion) beyond the placed parameters. Export
mirrors it: one parameter is gathered to the host at a time and written at its precomputed offset.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from selfimprove_jax import sharding as sh
from selfimprove_jax.checkpoint import files, hf_config, hf_special, hf_weights
from selfimprove_jax.checkpoint import safetensors_io as st
from selfimprove_jax.models.config import TransformerConfig
from selfimprove_jax.models.transformer import param_shardings
from selfimprove_jax.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _checkpoint_tensors(root) -> dict[str, st.TensorInfo]:
  """Every tensor of a single-file or index-sharded checkpoint, by name."""
  index = root / INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' object")
    infos: dict[str, st.TensorInfo] = {}
    for file_name in sorted(set(weight_map.values())):
      if not (root / file_name).exists():
        raise FileNotFoundError(f"{index} lists shard {file_name!r}, which is not in {root}")
      infos.update(st.read_header(root / file_name))
    listed_only = sorted(set(weight_map) - set(infos))
    if listed_only:
      raise ValueError(f"{index} maps tensors {listed_only[:8]} to shards that do not contain them")
    return infos
  if (root / SINGLE_FILE).exists():
    return st.read_header(root / SINGLE_FILE)
  other = [p.name for p in root.glob("*.bin")] if root.exists() else []
  hint = f" (found {other}: only safetensors checkpoints are supported)" if other else ""
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}{hint}")


def _text_prefix(layout: hf_config.HFLayout, names: set[str]) -> tuple[str, tuple[str, ...]]:
  if not layout.multimodal:
    return "model.", ()
  for prefix, ignored in hf_weights.GEMMA3_MULTIMODAL_PREFIXES:
    if f"{prefix}embed_tokens.weight" in names:
      return prefix, ignored
  known = [p for p, _ in hf_weights.GEMMA3_MULTIMODAL_PREFIXES]
  raise ValueError(f"Gemma3ForConditionalGeneration checkpoint without a text model under any of "
                   f"{known}: this multimodal layout is unsupported")


def _plan(root, config: TransformerConfig, layout: hf_config.HFLayout):
  """Matches the checkpoint's tensors to the specs; every error is raised before reading weights."""
  infos = _checkpoint_tensors(root)
  prefix, ignored = _text_prefix(layout, set(infos))
  specs = hf_weights.tensor_specs(config, prefix)
  wanted = {s.name for s in specs}
  missing = [s.name for s in specs if s.name not in infos]
  if missing:
    raise ValueError(f"checkpoint {root} is missing {len(missing)} tensor(s) the config needs: "
                     f"{missing[:8]}")
  extra = sorted(n for n in infos if n not in wanted and not hf_weights.ignorable(n, config, ignored))
  if extra:
    raise ValueError(f"checkpoint {root} has {len(extra)} unexpected tensor(s) the config does not "
                     f"use: {extra[:8]}")
  for spec in specs:
    info = infos[spec.name]
    if info.shape != spec.shape:
      raise ValueError(f"tensor {spec.name!r} has shape {info.shape} in the checkpoint, but the "
                       f"config needs {spec.shape}")
    if info.dtype not in st.FLOAT_CODES:
      raise ValueError(f"tensor {spec.name!r} has dtype {info.dtype}; only {st.FLOAT_CODES} "
                       "weights can be imported")
  return specs, infos


def load_hf(model_dir: str | os.PathLike, *, mesh: Mesh | None = None, rules: sh.Rules = sh.TRAIN_RULES,
            dtype: str = "float32", with_tokenizer: bool = True,
            progress: bool = False) -> files.LoadedModel:
  """Loads an HF checkpoint directory (local path or gs://) tensor by tensor onto ``mesh``.

  Args:
    model_dir: holds config.json, model.safetensors or model.safetensors.index.json + shards, and
      tokenizer files.
    mesh: parameters are placed on ``param_shardings(config, mesh, rules)``; None puts them on the
      first local device.
    dtype: "float32" or "bfloat16": parameter and activation dtype of the returned model.
    with_tokenizer: also load the tokenizer (an error if the directory has none).
    progress: show a progress bar over tensors.
  Returns:
    ``LoadedModel(config, params, tokenizer, chat_template)``.
  Raises:
    ValueError / FileNotFoundError naming the offending file, key or tensor: unknown architecture,
    missing / unexpected / mis-shaped tensors, non-float tensors, truncated files, bad dtype,
    missing tokenizer.
  """
  root = files.as_path(model_dir)
  if not (root / "config.json").exists():
    raise FileNotFoundError(f"no config.json in {root}")
  config, layout = hf_config.config_from_hf(json.loads((root / "config.json").read_text()), dtype=dtype)
  specs, infos = _plan(root, config, layout)
  tokenizer = files.load_dir_tokenizer(root) if with_tokenizer else None
  chat_template = files.read_chat_template(root)

  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    shardings = {p.path: device for s in specs for p in s.parts}
  else:
    shardings = hf_weights.flat_params(param_shardings(config, mesh, rules))
  target = np.dtype(jax.numpy.dtype(dtype))
  by_name = {s.name: s for s in specs}
  flat: dict[hf_weights.Path, jax.Array] = {}
  with tqdm.tqdm(total=len(specs), desc="import", unit="tensor", disable=not progress) as bar:
    for info, hf_array in st.read_tensors(infos[s.name] for s in specs):
      for part, ours in by_name[info.name].split(hf_array):
        host = ours.astype(target, copy=False)
        # Each device (or host) copies its own slice of the host array, which is then dropped.
        flat[part.path] = jax.make_array_from_callback(host.shape, shardings[part.path],
                                                       lambda index, a=host: a[index])
        del host, ours
      del hf_array
      bar.update()
  return files.LoadedModel(config, hf_weights.nest(flat), tokenizer, chat_template)


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _shards(plans: list[st.TensorPlan], max_bytes: int) -> list[list[st.TensorPlan]]:
  groups: list[list[st.TensorPlan]] = [[]]
  size = 0
  for plan in plans:
    if groups[-1] and size + plan.nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(plan)
    size += plan.nbytes
  return groups


def save_hf(config: TransformerConfig, params: Any, out_dir: str | os.PathLike, *,
            tokenizer: Tokenizer | str | os.PathLike | None = None, chat_template: str | None = None,
            source_dir: str | os.PathLike | None = None,
            merge_fn: Callable[[Any], Any] | None = None, dtype: str | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
            progress: bool = False) -> str:
  """Writes an HF checkpoint that ``transformers.AutoModelForCausalLM`` loads as the original family.

  Everything is written into a temporary sibling directory renamed to ``out_dir`` at the end: a
  failure half-way leaves ``out_dir`` untouched.

  Special ids: config.json always states ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``,
  each an id in [0, vocab_size), an EOS list, or null: from the tokenizer, else ``source_dir``, else
  the family's published ids (the rules are in ``hf_special``). generation_config.json, where
  ``generate`` reads its stop ids, is the tokenizer directory's, else (without a tokenizer)
  ``source_dir``'s, copied verbatim and unchecked; else it is written with the same three ids.

  Args:
    config, params: the model; params may be sharded (each tensor is gathered to the host in turn).
    out_dir: destination (local or gs://).
    tokenizer: a ``Tokenizer`` (saved with its own ``save``) or a directory whose tokenizer,
      chat-template and generation-config files are copied verbatim.
    chat_template: written as chat_template.jinja when given.
    source_dir: the HF checkpoint directory the params were imported from, if any: without a
      tokenizer, its config.json gives the special ids and its generation_config.json is copied.
    merge_fn: ``params -> params`` applied before writing, e.g. merging LoRA adapters into the base
      weights so the export is a plain model.
    dtype: stored dtype ("float32", "bfloat16", "float16"); default ``config.param_dtype``.
    max_shard_bytes: files larger than this are split, with model.safetensors.index.json.
    overwrite: replace an existing non-empty ``out_dir``.
  Returns:
    ``out_dir`` as a string.
  """
  dtype = dtype or config.param_dtype
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}: must be 'float32', 'bfloat16' or 'float16'")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: must be > 0")
  if merge_fn is not None:
    params = merge_fn(params)
  flat = hf_weights.check_params(config, params)
  tok_object = tokenizer if isinstance(tokenizer, Tokenizer) else None
  if tokenizer is not None and tok_object is None:
    # Copied files: still read them, so config.json gets the right special-token ids.
    tok_object = files.load_dir_tokenizer(files.as_path(tokenizer))
  source = files.as_path(source_dir) if source_dir is not None else None
  if source is not None and not (source / "config.json").exists():
    raise FileNotFoundError(f"source_dir={os.fspath(source_dir)!r} has no config.json")
  source_json = json.loads((source / "config.json").read_text()) if source is not None else None
  special = hf_special.resolve(config.family, config.vocab_size, tokenizer=tok_object, source=source_json)
  hf_json = hf_config.config_to_hf(config, dtype=dtype, special_ids=special)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  code = st.CODES[np_dtype]
  specs = {s.name: s for s in hf_weights.tensor_specs(config)}
  plans = [st.TensorPlan(name, code, s.shape) for name, s in specs.items()]
  groups = _shards(plans, max_shard_bytes)
  names = [SINGLE_FILE] if len(groups) == 1 else [
      f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

  def produce(plan: st.TensorPlan) -> np.ndarray:
    spec = specs[plan.name]
    return spec.join([_to_host(flat[p.path]) for p in spec.parts]).astype(np_dtype)

  out = files.as_path(out_dir)
  writer = jax.process_index() == 0
  bar = tqdm.tqdm(total=len(plans), desc="export", unit="tensor", disable=not progress)
  if not writer:  # other hosts join every gather and write nothing
    for group in groups:
      st.write_file(None, group, produce)
    return os.fspath(out_dir)
  with files.atomic_dir(out, overwrite) as tmp, bar:
    for name, group in zip(names, groups):
      st.write_file(tmp / name, group, produce, on_tensor=bar.update)
    if len(groups) > 1:
      index = {"metadata": {"total_size": sum(p.nbytes for p in plans)},
               "weight_map": {p.name: name for name, g in zip(names, groups) for p in g}}
      (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_json, indent=2) + "\n")
    if tokenizer is not None:
      files.write_tokenizer(tokenizer, chat_template, tmp)
    elif chat_template is not None:
      (tmp / "chat_template.jinja").write_text(chat_template)
    if not (tmp / "generation_config.json").exists():
      if tok_object is None and source is not None and (source / "generation_config.json").exists():
        (source / "generation_config.json").copy(tmp / "generation_config.json")
      else:
        (tmp / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
  return os.fspath(out_dir)
