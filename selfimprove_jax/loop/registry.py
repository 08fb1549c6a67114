"""Named entries a config key selects (rewards, selection rules), and what config checks share.

A registry maps a name to an entry; ``add`` registers one (a taken name is refused), and ``get``
fails naming the config key, the bad value and the registered names, in the format of every other
config check (``check``). ``scheduled`` reads a per-round schedule. Nothing here imports the loop.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def check(key: str, value: Any, ok: bool, why: str) -> None:
  """Raises ``ValueError("config.KEY=VALUE: WHY")`` unless ``ok``."""
  if not ok:
    raise ValueError(f"config.{key}={value!r}: {why}")


class Registry(Generic[T]):
  """Entries by name for the config key ``key`` (e.g. ``"score.reward"``)."""

  def __init__(self, key: str):
    self.key = key
    self._entries: dict[str, T] = {}

  def add(self, name: str, entry: T) -> T:
    if name in self._entries:
      raise ValueError(f"{self.key}: {name!r} is already registered")
    self._entries[name] = entry
    return entry

  def remove(self, name: str) -> None:
    """Drops ``name`` (tests and notebooks that register a throwaway entry clean up with it)."""
    del self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def get(self, name: str) -> T:
    check(self.key, name, name in self._entries, f"must be one of {self.names()}")
    return self._entries[name]

  def decorator(self, name: str, wrap: Callable[[Callable], T]) -> Callable[[Callable], Callable]:
    """``@registry.decorator(name, wrap)``: registers ``wrap(fn)`` and returns ``fn`` unchanged."""
    def register(fn: Callable) -> Callable:
      self.add(name, wrap(fn))
      return fn
    return register


def scheduled(schedule: Any, round_index: int, default: float) -> float:
  """Entry ``round_index`` (1-based) of a per-round schedule, the last repeating; ``default``
  when the schedule is empty."""
  schedule = tuple(schedule)
  return float(schedule[min(round_index, len(schedule)) - 1]) if schedule else float(default)
