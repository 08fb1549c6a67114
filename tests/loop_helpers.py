"""Helpers shared by the loop tests: method configs with overrides, and workdirs seeded with the
session's pretrained smoke base (the ``smoke_base`` fixture in conftest.py)."""
import importlib.util
import pathlib
import shutil

REPO = pathlib.Path(__file__).resolve().parents[1]


def method_config(name: str, variant: str = "smoke", **overrides):
  """``configs/NAME.py:variant`` with dotted-key ``overrides`` (e.g. ``**{"loop.num_rounds": 1}``)."""
  spec = importlib.util.spec_from_file_location(f"configs.{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def fresh_workdir(tmp_path, smoke_base, name="run") -> pathlib.Path:
  """A new workdir under ``tmp_path`` holding a copy of the pretrained smoke base."""
  workdir = tmp_path / name
  shutil.copytree(smoke_base, workdir / "base")
  return workdir


def leftovers(workdir: pathlib.Path) -> list[pathlib.Path]:
  """Temporaries a finished run must not leave: half-saved checkpoints (orbax's and ours),
  half-deleted ones, half-written files."""
  return [p for p in workdir.rglob("*") if ".orbax-checkpoint-tmp" in p.name
          or ".deleting-" in p.name or p.name.endswith(".tmp")]
