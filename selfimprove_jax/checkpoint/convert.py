"""Convert checkpoints between the Hugging Face and native (orbax) formats, and from GGUF.

  python -m selfimprove_jax.checkpoint.convert --from hf --to native SRC DST
  python -m selfimprove_jax.checkpoint.convert --from native --to hf SRC DST [--dtype bfloat16]
      [--max_shard_gb 5] [--overwrite] [--quiet]
  python -m selfimprove_jax.checkpoint.convert --from gguf --to hf MODEL.gguf DST   # [gguf] extra

A GGUF file (llama.cpp's format) becomes a Hugging Face directory with its quantized tensors
dequantized to float32 (``checkpoint/gguf.py``); ``--to native`` goes through that directory.

SRC and DST may be local paths or gs:// URLs. Tokenizer, chat-template and generation-config files
in SRC are copied to DST unchanged. Parameters stream through the first local device one tensor at a
time on import; the native format writes them from there.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile
from collections.abc import Sequence

from absl import flags

from selfimprove_jax import cli
from selfimprove_jax.checkpoint import files, gguf, hf, native

FORMATS = ("hf", "native", "gguf")
PROG = "python -m selfimprove_jax.checkpoint.convert"


def define_flags(values: flags.FlagValues) -> None:
  """The CLI's flags; SRC (the checkpoint directory) and DST (written atomically) are positional."""
  on = dict(flag_values=values)
  flags.DEFINE_enum("from", None, FORMATS, "Format of SRC.", **on)
  flags.DEFINE_enum("to", None, FORMATS[:2], "Format of DST.", **on)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype of DST (default: "
                    "float32 from hf, as stored from native).", **on)
  flags.DEFINE_float("max_shard_gb", hf.DEFAULT_MAX_SHARD_BYTES / 2**30,
                     "Largest safetensors file written by --to=hf, in GiB.", **on)
  flags.DEFINE_boolean("overwrite", False, "Replace a non-empty DST.", **on)
  flags.DEFINE_boolean("quiet", False, "No progress bar.", **on)
  flags.mark_flags_as_required(["from", "to"], flag_values=values)


def convert(src_format: str, dst_format: str, src: str, dst: str, *, dtype: str | None = None,
            max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
            progress: bool = True) -> str:
  """Converts SRC to DST; returns DST. Raises ValueError / FileNotFoundError on bad arguments."""
  if src_format not in FORMATS or dst_format not in FORMATS[:2]:
    raise ValueError(f"formats must be in {FORMATS} (to: {FORMATS[:2]}), got --from={src_format!r} "
                     f"--to={dst_format!r}")
  if src_format == "gguf":
    log = (lambda *_: None) if not progress else print
    if dst_format == "hf":
      return gguf.convert_gguf(src, dst, overwrite=overwrite, log=log)
    with tempfile.TemporaryDirectory() as tmp:
      hf_dir = gguf.convert_gguf(src, pathlib.Path(tmp) / "hf", log=log)
      return convert("hf", "native", hf_dir, dst, dtype=dtype, overwrite=overwrite,
                     progress=progress)
  src_path, dst_path = files.as_path(src), files.as_path(dst)
  if not src_path.is_dir():
    raise FileNotFoundError(f"SRC {src} is not a directory")
  local = "://" not in src + dst
  if (src_path.resolve() == dst_path.resolve()) if local else src.rstrip("/") == dst.rstrip("/"):
    raise ValueError(f"SRC and DST are the same directory ({src}); write to a new one")
  if dst_path.exists() and (not dst_path.is_dir() or any(dst_path.iterdir())) and not overwrite:
    raise FileExistsError(f"DST {dst} already exists and is not empty; pass --overwrite to replace it")
  if src_format == "hf" and native.is_native(src):
    raise ValueError(f"SRC {src} is a native checkpoint ({native.CONFIG_FILE}); use --from native")
  if src_format == "native" and not native.is_native(src):
    raise ValueError(f"SRC {src} has no {native.CONFIG_FILE}, so it is not a native checkpoint; "
                     "for an HF directory use --from hf")
  if src_format == "hf":
    loaded = hf.load_hf(src, dtype=dtype or "float32", with_tokenizer=False, progress=progress)
  else:
    loaded = native.load_native(src, dtype=dtype, with_tokenizer=False)
  # Tokenizer files are copied rather than re-saved, so nothing in them is lost in conversion.
  tokenizer = src if any((src_path / n).exists() for n in files.TOKENIZER_FILES) else None
  chat = None if tokenizer is not None else loaded.chat_template
  if dst_format == "hf":
    return hf.save_hf(loaded.config, loaded.params, dst, tokenizer=tokenizer, chat_template=chat,
                      max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
  return native.save_native(loaded.config, loaded.params, dst, tokenizer=tokenizer,
                            chat_template=chat, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  v, (src, dst) = cli.parse(sys.argv[1:] if argv is None else argv, define_flags, prog=PROG,
                            positional=("SRC", "DST"))
  if v.max_shard_gb <= 0:
    raise cli.usage_error(PROG, f"--max_shard_gb={v.max_shard_gb}: must be > 0")
  try:
    out = convert(v["from"].value, v.to, src, dst, dtype=v.dtype,
                  max_shard_bytes=int(v.max_shard_gb * 2**30), overwrite=v.overwrite,
                  progress=not v.quiet)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {v.to} checkpoint to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
