"""Test session setup: 8 fake CPU devices, configured before anything imports jax."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory):
  """The smoke variants' base model, pretrained once per session (300 steps on one-digit sums);
  copy it into a workdir with ``tests.loop_helpers.fresh_workdir``."""
  from selfimprove_jax import loop  # pylint: disable=g-import-not-at-top
  from tests.loop_helpers import method_config  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("base_run")
  loop.Loop(method_config("sft_sharpening"), workdir, progress_bars=False).base_params
  return workdir / "base"
