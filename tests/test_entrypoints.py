"""The user-facing entry points: the CLI smoke and the local launcher (notebooks: test_colabs.py)."""
import pathlib
import subprocess

import pytest

from configs import smoke as smoke_config
from selfimprove_jax import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_decodes_with_cache_on_a_mesh():
  config = smoke_config.get_config()
  with config.unlocked():
    config.model = "tiny_qwen3"
    config.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    config.max_new_tokens = 6
  summary = main.smoke(config)
  assert summary["agreement"] == 1.0
  assert 1 <= summary["new_tokens"] <= 6


def test_smoke_config_is_locked_against_typos():
  config = smoke_config.get_config()
  with pytest.raises(AttributeError, match="modle"):
    config.modle = "tiny_llama3"


def test_local_launcher_dry_run_prints_the_command():
  out = subprocess.run([str(ROOT / "launch/local.sh"), "--devices", "4", "--dry-run", "configs/smoke.py",
                        "--config.seed=3"], capture_output=True, text=True, check=True).stdout
  assert out.strip() == ("env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
                         "python -m selfimprove_jax.main --config=configs/smoke.py --config.seed=3")
  bad = subprocess.run([str(ROOT / "launch/local.sh"), "--devices", "x", "configs/smoke.py"],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "--devices must be a positive integer, got 'x'" in bad.stderr
