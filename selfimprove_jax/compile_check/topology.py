"""TPU slices that are not there: devices from ``jax.experimental.topologies`` for XLA:TPU to
compile for on any machine (libtpu ships the compiler; ``pip install -e '.[aot]'``), the chips'
HBM as that compiler sees it, and its refusals read as numbers.

Topology names are ``<chip>:<shape>``: ``v5e:2x4`` (8 chips), ``v5e:4x4``, ``v5p:2x2x1`` (4 chips,
a v5p-8), ``v6e:2x4``. Nothing here runs a program: a topology's devices can only compile.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)([BKMGT])"


def tpu_devices(name: str) -> list[Any]:
  """The devices of TPU topology ``name`` (compile-only); a clear error without libtpu."""
  # Compiling claims no chip, so several processes may load libtpu at once (it otherwise holds
  # a machine-wide lock file for the lifetime of the first).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # libtpu missing, or a name it does not know
    raise ValueError(f"topology={name!r}: no TPU compiler for it ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}). Names look like 'v5e:2x4' or 'v5p:2x2x1'; "
                     f"the compiler comes with libtpu: pip install -e '.[aot]'") from None


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit])


@functools.lru_cache(maxsize=8)
def _hbm_of(device_kind: str, devices: tuple[Any, ...]) -> int | None:
  del device_kind  # the cache key: every chip of a kind has the same HBM
  mesh = Mesh(np.array(devices[:1]), ("x",))
  # 2^36 float32 elements: a 256 GiB temporary, more than any chip has.
  big = jax.ShapeDtypeStruct((2**20, 2**16), jnp.float32,
                             sharding=NamedSharding(mesh, PartitionSpec()))
  try:
    jax.jit(lambda a: jnp.sort(a, axis=0) * 2).lower(big).compile()
  except Exception as e:  # pylint: disable=broad-except
    found = re.search(r"available HBM \(" + _SIZE + r"\)", str(e))
    return _bytes(*found.groups()) if found else None
  return None


def hbm_bytes(devices: Sequence[Any]) -> int | None:
  """Per-chip HBM as XLA:TPU reports it (v5e: 15.75 GiB), read from its refusal of a program
  that needs more; None where the compiler states no limit (CPU, GPU)."""
  if not devices or devices[0].platform != "tpu":
    return None
  return _hbm_of(devices[0].device_kind, tuple(devices))


def refusal(message: str) -> dict[str, int] | None:
  """The numbers of a compiler's out-of-memory refusal, e.g. "RESOURCE_EXHAUSTED: ... HLO
  temporaries (24.38G) exceeds available HBM (15.75G)": {"temp": ..., "hbm": ...} bytes; None
  for any other error."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  temp = re.search(r"temporaries \(" + _SIZE + r"\)", message)
  hbm = re.search(r"available HBM \(" + _SIZE + r"\)", message)
  return {"temp": _bytes(*temp.groups()) if temp else None,
          "hbm": _bytes(*hbm.groups()) if hbm else None}
