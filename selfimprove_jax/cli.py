"""Command-line flags: every entry point of the package takes absl flags, like ``main.py``.

``parse`` defines a module's flags on a ``FlagValues`` of its own, so modules imported together
never clash over a flag name, and parses ``argv``: flags and positional arguments may interleave,
and ``--flag value`` works like ``--flag=value``. A bad flag or a wrong number of positional
arguments prints one line naming it and exits with status 2; ``--help`` prints the flags.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags


def usage_error(prog: str, message: str) -> SystemExit:
  """Prints ``prog: error: message`` to stderr; returns the ``SystemExit(2)`` to raise."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  return SystemExit(2)


def parse(argv: Sequence[str], define: Callable[[flags.FlagValues], None], *, prog: str,
          positional: Sequence[str] = ()) -> tuple[flags.FlagValues, list[str]]:
  """(parsed flags, positional arguments) of ``argv`` (without the program name).

  Args:
    argv: the command line after the program name.
    define: defines the flags on the ``FlagValues`` it is given.
    prog: the program's name for messages, e.g. ``python -m selfimprove_jax.analysis.report``.
    positional: the names of the required positional arguments, e.g. ("SRC", "DST").
  """
  values = flags.FlagValues()
  define(values)
  usage = f"usage: {prog} [flags] {' '.join(positional)}".rstrip()
  if "--help" in argv or "-h" in argv:
    print(f"{usage}\n\n{values.module_help(sys.modules[define.__module__]).strip()}")
    raise SystemExit(0)
  try:
    rest = values([prog, *argv])[1:]
  except flags.Error as e:
    raise usage_error(prog, str(e)) from None
  if len(rest) != len(positional):
    raise usage_error(prog, f"expected {len(positional)} positional argument(s) "
                            f"{' '.join(positional) or '(none)'}, got {rest}; {usage}")
  return values, rest
