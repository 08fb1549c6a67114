"""Symbolic equality of two answers in a worker process that can be killed on a timeout.

``sympy.simplify`` has no time bound (and ``10**10**10`` has no memory bound), and neither signals
(main thread only) nor threads can stop it, so comparisons run in one long-lived child process
(sympy and math-verify imported once, address space capped) that is killed and lazily restarted
when a comparison overruns. The worker answers two kinds of question:

  ``equal(a, b)``: restricted expression strings made by ``math_answers.latex_to_sympy`` (digits,
    single-letter symbols, + - * / ** ( ) and a few named functions; anything else is refused
    before it reaches ``sympify``, which evaluates its input), equal by ``simplify`` or numerically.
  ``verify_latex(answer, gold)``: math-verify's ``verify`` of two LaTeX answers, each parsed as
    the content of a ``\\boxed{}`` by its LaTeX extractor only (its plain-expression extractor
    hands text to sympy's ``parse_expr``, which evaluates it, so it is not used). math-verify's
    own timeouts are signal alarms that raise off the main thread; in the worker they are off and
    the host's kill is the only time bound, so a caller on any thread gets the same verdicts.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time

FUNCTIONS = ("sqrt", "pi", "sin", "cos", "tan", "log", "exp")
_SAFE_RE = re.compile(r"[0-9a-zA-Z()+\-*/ ]*")

_WORKER = r"""
import json, resource, string, sys
resource.setrlimit(resource.RLIMIT_AS, (%(memory)d, %(memory)d))
reply, sys.stdout = sys.stdout, sys.stderr  # library chatter must not reach the protocol pipe
import sympy
from math_verify import LatexExtractionConfig, parse, verify
names = {c: sympy.Symbol(c) for c in string.ascii_letters}
names.update(sqrt=sympy.sqrt, pi=sympy.pi, sin=sympy.sin, cos=sympy.cos, tan=sympy.tan,
             log=sympy.log, exp=sympy.exp)
def equal(a, b):
  x, y = sympy.sympify(a, locals=names), sympy.sympify(b, locals=names)
  if sympy.simplify(x - y) == 0:
    return True
  if x.free_symbols or y.free_symbols:
    return False
  u, v = complex(sympy.N(x, 30)), complex(sympy.N(y, 30))
  return abs(u - v) <= 1e-12 * max(1.0, abs(v))
def verify_latex(answer, gold):
  config = [LatexExtractionConfig()]
  g, a = (parse("\\boxed{" + s + "}", config, parsing_timeout=None) for s in (gold, answer))
  return bool(g and a and verify(g, a, timeout_seconds=None))
print("ready", file=reply, flush=True)
for line in sys.stdin:
  req = json.loads(line)
  try:
    if "gold" in req:
      out = {"equal": verify_latex(req["answer"], req["gold"])}
    else:
      out = {"equal": bool(equal(req["a"], req["b"]))}
  except Exception as e:
    out = {"equal": False, "error": type(e).__name__}
  print(json.dumps(out), file=reply, flush=True)
"""


def is_safe(expr: str) -> bool:
  """Whether ``expr`` uses only the characters and names the worker accepts."""
  names = re.findall(r"[a-zA-Z]+", expr)
  return bool(_SAFE_RE.fullmatch(expr)) and all(len(n) == 1 or n in FUNCTIONS for n in names)


class SympyChecker:
  """Compares answers in a worker process; thread-safe (one comparison at a time).

  timeout_s: wall seconds per comparison (worker start-up excluded); on overrun the worker is
    killed and the comparison counts as not equal (``timeouts`` counts these). Within a
    ``deadline`` block the comparisons of one thread also share that block's budget.
  memory_bytes: RLIMIT_AS of the worker.
  """

  def __init__(self, timeout_s: float = 2.0, memory_bytes: int = 2 << 30,
               startup_timeout_s: float = 60.0):
    if not timeout_s > 0 or not memory_bytes > 0:
      raise ValueError(f"SympyChecker: timeout_s={timeout_s}, memory_bytes={memory_bytes} "
                       f"must be positive")
    self.timeout_s = timeout_s
    self.memory_bytes = memory_bytes
    self.startup_timeout_s = startup_timeout_s
    self.timeouts = 0
    self._proc: subprocess.Popen | None = None
    self._lock = threading.Lock()
    self._local = threading.local()
    atexit.register(self.close)

  def _start(self) -> subprocess.Popen:
    # The parent's environment is kept on purpose: sympy must import from this interpreter's paths.
    proc = subprocess.Popen([sys.executable, "-c", _WORKER % dict(memory=self.memory_bytes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    if self._readline(proc, self.startup_timeout_s) != b"ready":
      self._kill(proc)
      raise RuntimeError(f"SympyChecker: the worker ({sys.executable}) did not start within "
                         f"{self.startup_timeout_s}s; are sympy and math-verify installed?")
    return proc

  @staticmethod
  def _readline(proc: subprocess.Popen, timeout_s: float) -> bytes | None:
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
      sel.register(fd, selectors.EVENT_READ)
      while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sel.select(remaining):
          return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
          return None
        buf += chunk
    return buf.strip()

  @staticmethod
  def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()

  def equal(self, a: str, b: str) -> bool:
    """Whether expressions ``a`` and ``b`` are equal (simplify(a - b) == 0, or numerically to 1e-12
    relative when both are constants). False on a timeout or a parse error in the worker."""
    for name, expr in (("a", a), ("b", b)):
      if not is_safe(expr):
        raise ValueError(f"SympyChecker.equal: {name}={expr!r} is not a restricted expression")
    return self._ask({"a": a, "b": b})

  def verify_latex(self, answer: str, gold: str) -> bool:
    """math-verify's verdict on two LaTeX answers (box contents, e.g. ``"\\frac{1}{2}"``): sets
    in any order, intervals, matrices, equations, percentages as hundredths, floats rounded to 6
    decimals (so "0.3333333" equals 1/3). False on a timeout or when either does not parse."""
    return self._ask({"answer": answer, "gold": gold})

  @contextlib.contextmanager
  def deadline(self, seconds: float):
    """Within the block, this thread's comparisons share one budget of ``seconds`` of waiting for
    the worker's answers (waiting for the lock and worker start-up are not counted, as for
    ``timeout_s``): each waits at most ``timeout_s`` and at most what is left (an overrun is
    killed and counted in ``timeouts``), and one asked once the budget is spent is not sent and
    counts as not equal (not counted). A block nested in another one keeps the outer budget."""
    if getattr(self._local, "budget", None) is not None:
      yield
      return
    self._local.budget = seconds
    try:
      yield
    finally:
      self._local.budget = None

  def _ask(self, request: dict) -> bool:
    budget = getattr(self._local, "budget", None)
    if budget is not None and budget <= 0:
      return False
    wait = self.timeout_s if budget is None else min(self.timeout_s, budget)
    with self._lock:
      if self._proc is None or self._proc.poll() is not None:
        self._proc = self._start()
      start = time.monotonic()
      try:
        self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        self._proc.stdin.flush()
        line = self._readline(self._proc, wait)
      except BrokenPipeError:
        line = None  # the worker died (e.g. out of memory): restart on the next call
      if budget is not None:
        self._local.budget = budget - (time.monotonic() - start)
      if line is None:
        self.timeouts += 1
        self._kill(self._proc)
        self._proc = None
        return False
      return bool(json.loads(line)["equal"])

  def close(self) -> None:
    with self._lock:
      if self._proc is not None:
        self._kill(self._proc)
        self._proc = None


_default: SympyChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> SympyChecker:
  """The process-wide checker the MATH grader uses unless given one (started on first use)."""
  global _default
  with _default_lock:
    if _default is None:
      _default = SympyChecker()
    return _default
