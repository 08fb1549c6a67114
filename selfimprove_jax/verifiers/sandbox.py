"""Runs untrusted Python programs (model-written code plus its test asserts) in a contained child.

Every program runs in its own child process tree, started in a new session, with:
  * resource limits set in the child before any user code: RLIMIT_CPU, RLIMIT_AS (memory),
    RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0 and RLIMIT_NPROC (processes of the child's uid that
    exist at launch plus ``max_processes``), and PR_SET_NO_NEW_PRIVS (setuid binaries gain nothing);
  * a wall-clock timeout after which the run's processes are killed with SIGKILL (the child's
    first process kills and reaps the rest, then its whole process group is killed);
  * stdout/stderr read through pipes, at most ``max_output_bytes`` each; more kills the run;
  * a scrubbed environment (PATH, LANG, LC_ALL, HOME and TMPDIR pointing at the work directory),
    ``python -I`` (no PYTHON* variables, no user site, no script directory on sys.path), stdin
    from /dev/null;
  * a fresh private work directory (mode 0700) holding ``main.py``, removed afterwards whatever
    happened (timeouts, trees thousands of levels deep, directories chmod'ed to 000). Removal never
    recurses and never raises; it first takes the directory back (owner: the caller, mode 0700),
    so if it fails (a RuntimeWarning) no later program can enter what is left;
  * ``socket.socket`` refusing AF_INET/AF_INET6 and ``create_connection``/``create_server``/
    ``getaddrinfo`` raising, before ``main.py`` runs (a guard, not a wall: ``_socket`` bypasses it).
When the parent runs as root (the case on this project's machines) the child also drops to a
dedicated unprivileged uid/gid (no supplementary groups), leased host-wide: an flock on one lease
file per uid (in /run/lock/selfimprove-sandbox-uids, else /tmp/...), so two grading processes on
one host (that share /run/lock) never share a uid. The uid drop is what makes RLIMIT_NPROC bite at all (the kernel exempts root), stops the child from
signalling or reading /proc/<pid>/environ of the caller's processes, from writing anywhere the
caller's files live, and lets the parent kill every leftover process of that uid after the run.
Where the kernel allows unprivileged user namespaces (``isolation="auto"`` uses them when it can,
``"require"`` refuses to run without them) the child also gets:
  * a network namespace: no interfaces but a down loopback, so no connection of any kind succeeds,
    raw ``_socket`` included;
  * a pid namespace with a fresh /proc: the caller's processes are invisible and unsignallable, and
    when the program's main process exits every process it left behind is killed by the kernel;
  * a mount namespace in which every mount is read-only except the work directory (/tmp and
    /dev/shm included), so nothing can be written outside it;
  * an IPC namespace (no shared System V objects with the host).
The layers in force are reported per run in ``SandboxResult.isolation``.

NOT guaranteed:
  * confidentiality of world-readable files: the program can read whatever any local user can
    (the system, this repository if its directories are world-readable);
  * disk: RLIMIT_FSIZE bounds each file, not their number, so until the timeout a program can write
    many files into its work directory (on the host's temp filesystem);
  * memory and CPU in total: RLIMIT_AS and RLIMIT_CPU are per process, so the bound is roughly
    (max_processes + 1) times each;
  * anything against kernel exploits;
  * without namespaces: the network guard above is all there is (``_socket`` or ctypes bypass it),
    writes to world-writable directories (/tmp, /dev/shm) succeed, and a process that calls
    setsid() escapes the group kill (as root the uid reaper still kills it; without root it lives
    on, throttled only by RLIMIT_CPU);
  * without root (no uid drop) and without a pid namespace: the program can signal the caller's
    processes and read their /proc/<pid>/environ, and write wherever the caller can.
``passed`` needs the program to run to its end and print the run's secret token, so ``exit(0)``
before the asserts is no pass; code that digs the token out of the runner's own frames can still
fake one: the sandbox contains code, it does not make a reward unhackable.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from selfimprove_jax.verifiers import _sandbox_child as child
from selfimprove_jax.verifiers import _sandbox_host as host
from selfimprove_jax.verifiers._sandbox_host import SandboxError

_CHILD_SOURCE = pathlib.Path(child.__file__).read_text(encoding="utf-8")
ISOLATION_MODES = ("auto", "require", "none")
STATUSES = ("passed", "failed", "timeout", "cpu_limit", "memory", "process_limit",
            "file_size_limit", "output_limit", "killed")
_EXIT_STATUS = {child.EXIT_MEMORY: "memory", child.EXIT_PROCESS_LIMIT: "process_limit",
                child.EXIT_FILE_SIZE: "file_size_limit"}


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits of one run. Sizes in bytes unless named otherwise; times in seconds.

  timeout_s: wall clock from launch (interpreter start-up included) to SIGKILL of the group.
  cpu_s: RLIMIT_CPU per process, soft (SIGXCPU) then hard one second later; None: ceil(timeout)+1.
  memory_bytes: RLIMIT_AS (address space) per process.
  file_size_bytes: RLIMIT_FSIZE, the largest file a process may write.
  max_processes: processes the child may add beyond those of its uid at launch (RLIMIT_NPROC).
  max_open_files: RLIMIT_NOFILE.
  max_output_bytes: captured bytes per stream; a program printing more is killed.
  isolation: "auto" (namespaces where the kernel allows them), "require" or "none".
  python: interpreter for the child (standard library only); None: the first of this
    interpreter's base executable and the system ``python3`` that the child's uid can execute.
  uid_base: first uid/gid of the dedicated range used when running as root (64 ids). None of them
    may exist in the password database.
  workdir_parent: where work directories are made (None: ``tempfile.gettempdir()``).
  """

  timeout_s: float = 5.0
  cpu_s: int | None = None
  memory_bytes: int = 512 << 20
  file_size_bytes: int = 16 << 20
  max_processes: int = 16
  max_open_files: int = 64
  max_output_bytes: int = 64 << 10
  isolation: str = "auto"
  python: str | None = None
  uid_base: int = 61_000
  workdir_parent: str | None = None

  def __post_init__(self):
    positive = dict(timeout_s=self.timeout_s, memory_bytes=self.memory_bytes,
                    file_size_bytes=self.file_size_bytes, max_output_bytes=self.max_output_bytes)
    for name, value in positive.items():
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"SandboxConfig.{name}={value!r} must be a positive number")
    for name in ("max_processes", "max_open_files", "uid_base"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 4:
        raise ValueError(f"SandboxConfig.{name}={value!r} must be an int >= 4")
    if self.cpu_s is not None and (not isinstance(self.cpu_s, int) or self.cpu_s < 1):
      raise ValueError(f"SandboxConfig.cpu_s={self.cpu_s!r} must be a positive int or None")
    if self.isolation not in ISOLATION_MODES:
      raise ValueError(f"SandboxConfig.isolation={self.isolation!r} is not one of "
                       f"{ISOLATION_MODES}")

  @property
  def cpu_limit_s(self) -> int:
    return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one program.

  passed: the program ran to its end and exited 0 (a ``sys.exit`` before the end is no pass).
  status: one of ``STATUSES``: "passed", "failed" (an exception, an assert, a non-zero exit),
    "timeout" (wall clock), "cpu_limit", "memory" (MemoryError under RLIMIT_AS), "process_limit"
    (fork refused by RLIMIT_NPROC), "file_size_limit", "output_limit", "killed" (other signal).
  returncode: exit code of the sandbox's first process (128 + n: signal n under a pid namespace;
    negative: killed by the parent).
  stdout, stderr: captured text (UTF-8, invalid bytes replaced), at most ``max_output_bytes``.
  runtime_s: wall seconds from launch to the end of the run.
  isolation: layers in force: "uid_drop", "user_namespace", "network_namespace", "pid_namespace",
    "read_only_filesystem" (the rlimits, timeout, scrubbed env and socket guard always apply).
  workdir: the (now removed) work directory.
  """

  passed: bool
  status: str
  returncode: int | None
  stdout: str
  stderr: str
  stdout_truncated: bool
  stderr_truncated: bool
  runtime_s: float
  isolation: tuple[str, ...]
  workdir: str


def _interpreter(config: SandboxConfig, dropping: bool) -> str:
  if config.python is not None:
    candidates = [config.python]
  else:
    candidates = [getattr(sys, "_base_executable", sys.executable), sys.executable]
    candidates += [c for c in (shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"),) if c]
  for c in candidates:
    real = os.path.realpath(c)
    if os.path.isfile(real) and (not dropping or host.others_can(real, stat.S_IXOTH)):
      return real
  raise SandboxError(f"no interpreter among {candidates} is executable by an unprivileged uid; "
                     f"set SandboxConfig.python to one that is")


# ------------------------------------------------------------------------------ one run

def _read_report(fd: int) -> dict | None:
  """The child's one-line JSON report, or None if it wrote none (every writer is gone by now)."""
  with os.fdopen(fd, "rb") as f:
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
      line = f.readline()
      return json.loads(line) if line and line.strip() else None
  return None


def _status(returncode: int, completed: bool, stopped: str | None) -> str:
  if stopped is not None:
    return stopped
  if returncode == 0 and completed:
    return "passed"
  if returncode in _EXIT_STATUS:
    return _EXIT_STATUS[returncode]
  sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else None
  if sig == signal.SIGXCPU:
    return "cpu_limit"
  return "killed" if sig is not None else "failed"


def run_program(program: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
  """Runs ``program`` (Python source, executed as ``main.py``) in the sandbox.

  Raises ``SandboxError`` when the sandbox cannot be set up (e.g. ``isolation="require"`` on a
  kernel without user namespaces); whatever the program does only changes the result.
  """
  if not isinstance(program, str):
    raise TypeError(f"run_program: program must be str, got {type(program).__name__}")
  dropping = os.geteuid() == 0
  python = _interpreter(config, dropping)
  with contextlib.ExitStack() as stack:
    uid = stack.enter_context(host.lease_uid(config.uid_base)) if dropping else None
    if uid is not None:
      host.check_uid_unused(uid)
      host.reap_uid(uid, python)  # leftovers of an earlier, crashed caller
    workdir = tempfile.mkdtemp(prefix="sandbox-", dir=config.workdir_parent)
    stack.callback(host.remove_tree, workdir)  # never raises: the verdict stands
    if uid is not None and not host.others_can(os.path.dirname(workdir), 0):
      raise SandboxError(f"work directory parent {os.path.dirname(workdir)!r} is not traversable "
                         f"by the sandbox uid; set SandboxConfig.workdir_parent")
    pathlib.Path(workdir, "main.py").write_text(program, encoding="utf-8")
    if uid is not None:
      for path in (workdir, os.path.join(workdir, "main.py")):
        os.chown(path, uid, uid)
    return _launch(config, python, uid, workdir)


def _launch(config: SandboxConfig, python: str, uid: int | None, workdir: str) -> SandboxResult:
  token = secrets.token_hex(16).encode()
  report_r, report_w = os.pipe()
  child_cfg = dict(cpu_s=config.cpu_limit_s, memory_bytes=config.memory_bytes,
                   file_size_bytes=config.file_size_bytes, max_open_files=config.max_open_files,
                   max_processes=config.max_processes, isolation=config.isolation, python=python,
                   workdir=workdir, report_fd=report_w)
  env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
         "HOME": workdir, "TMPDIR": workdir}
  ids = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
  start = time.monotonic()
  try:
    proc = subprocess.Popen([python, "-I", "-c", _CHILD_SOURCE, json.dumps(child_cfg)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=workdir, env=env, start_new_session=True, pass_fds=(report_w,),
                            **ids)
  except BaseException:
    os.close(report_r)
    raise
  finally:
    os.close(report_w)
  try:
    with contextlib.suppress(BrokenPipeError):
      proc.stdin.write(token + b"\n")
      proc.stdin.close()
    marker = b"\n" + token + b"\n"
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    caps = {out_fd: config.max_output_bytes + len(marker), err_fd: config.max_output_bytes}
    bufs, over, stopped = host.collect(proc, start + config.timeout_s, caps)
  finally:
    host.stop(proc)
    proc.stdout.close()
    proc.stderr.close()
    if uid is not None:
      host.reap_uid(uid, python)
  runtime_s = time.monotonic() - start
  report = _read_report(report_r)
  out, err = bytes(bufs[out_fd]), bytes(bufs[err_fd])
  # The child reports before the program starts; no report (and no timeout) means it broke itself.
  if stopped is None and (report is None or "error" in report):
    detail = report["error"] if report else err.decode(errors="replace")[-2000:]
    raise SandboxError(f"sandbox setup failed (isolation={config.isolation!r}, exit status "
                       f"{proc.returncode}): {detail}")
  completed = out.endswith(marker)
  if completed:
    out = out[:-len(marker)]
  layers = (("uid_drop",) if uid is not None else ()) + tuple((report or {}).get("layers", ()))
  status = _status(proc.returncode, completed, stopped)
  return SandboxResult(
      passed=status == "passed", status=status, returncode=proc.returncode,
      stdout=out[:config.max_output_bytes].decode("utf-8", errors="replace"),
      stderr=err.decode("utf-8", errors="replace"),
      stdout_truncated=over[out_fd], stderr_truncated=over[err_fd], runtime_s=runtime_s,
      isolation=layers, workdir=workdir)


def run_programs(programs: Sequence[str], config: SandboxConfig = SandboxConfig(), *,
                 max_workers: int = 2) -> list[SandboxResult]:
  """``run_program`` over many programs, ``max_workers`` child trees at a time; results in order."""
  if max_workers < 1:
    raise ValueError(f"run_programs: max_workers={max_workers} must be >= 1")
  if not programs:
    return []
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_workers, len(programs))) as pool:
    return list(pool.map(lambda p: run_program(p, config), programs))
