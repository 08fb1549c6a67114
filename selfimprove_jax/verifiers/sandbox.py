"""Runs untrusted Python programs in a contained child and judges them by what the host observed.

Every program runs in its own child process tree, started in a new session, with:
  * resource limits set in the child before any user code: RLIMIT_CPU, RLIMIT_AS (memory),
    RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0 and RLIMIT_NPROC (the threads of the child's uid
    that exist at launch plus ``max_processes``: the kernel counts threads, so a caller's own
    threads do not eat the allowance), and PR_SET_NO_NEW_PRIVS (setuid binaries gain nothing);
  * a socket filter (seccomp; x86_64 and aarch64): socket(2) fails with EACCES for every family,
    AF_UNIX included, socketpair(2) makes only connected AF_UNIX stream pairs, io_uring is refused
    and a syscall through another ABI kills the process. No socket of the host can be reached:
    not an IP port, not a path socket (D-Bus, /dev/log, a listener under /tmp), not an abstract
    one. ``socket.socketpair()`` (asyncio's self-pipe) still works;
  * a wall-clock timeout after which the run's processes are killed with SIGKILL (the child's
    first process kills and reaps the rest, then its whole process group is killed);
  * stdout/stderr read through pipes, at most ``max_output_bytes`` each, and the prelude's channel
    (``_sandbox_prelude``: completion, errors, step values), at most ``max_result_bytes``; more
    kills the run;
  * a scrubbed environment (PATH, LANG, LC_ALL, HOME and TMPDIR pointing at the work directory),
    ``python -I`` (no PYTHON* variables, no user site, no script directory on sys.path), stdin
    from /dev/null;
  * a fresh private work directory (mode 0700) holding ``main.py``, removed afterwards whatever
    happened (timeouts, trees thousands of levels deep, directories chmod'ed to 000). Removal never
    recurses and never raises; it first takes the directory back (owner: the caller, mode 0700),
    so if it fails (a RuntimeWarning) no later program can enter what is left.
When the parent runs as root (the case on this project's machines) the child also drops to a
dedicated unprivileged uid/gid (no supplementary groups), leased host-wide: an flock on one lease
file per uid (in /run/lock/selfimprove-sandbox-uids, else /tmp/...), so two grading processes on one
host (that share /run/lock) never share a uid. The uid drop is what makes RLIMIT_NPROC bite at all
(the kernel exempts root), stops the child from signalling or reading /proc/<pid>/environ of the
caller's processes and from writing anywhere the caller's files live, and lets the parent kill every
leftover process of that uid after the run. Where the kernel allows unprivileged user namespaces
(``isolation="auto"`` uses them when it can, ``"require"`` refuses to run without them or without
the socket filter) the child also gets:
  * network and IPC namespaces: no interfaces but a down loopback, no System V objects shared;
  * a pid namespace with a fresh /proc: the caller's processes are invisible and unsignallable, and
    when the program's main process exits every process it left behind is killed by the kernel;
  * a mount namespace, every mount read-only but the work directory, with an empty tmpfs over /tmp,
    /var/tmp, /run, /dev/shm and /dev/mqueue ("private_tmp"; the work directory stays at its path):
    nothing can be written outside it; host processes' FIFOs, sockets and files there are unseen;
The layers in force are reported per run in ``SandboxResult.isolation``.

Verdicts (``SandboxResult.status``) come from what the host observed, never from an exit code:
the host's own clock and caps (timeout, output_limit); the report of the program's parent (pid 1,
or stage 1 without namespaces: non-dumpable, holding a pipe the program never inherits) on how the
program's first process ended (its exit code or the signal that killed it, its CPU seconds, the
pids its namespace allocated); and the size of the largest file left in the work directory.
  cpu_limit        killed by SIGXCPU or SIGKILL (the host sent neither) after >= 90% of the CPU
                   limit (the kernel counts CPU in ticks when it enforces the limit);
  killed           any other death by signal (a program that signals itself is "killed");
  process_limit    an uncaught EAGAIN, and the pid namespace allocated >= max_processes pids;
  file_size_limit  an uncaught EFBIG, and a file of exactly file_size_bytes in the work directory
                   (both are evidence, not proof: a program can fork that often or write that
                   much, then raise the error itself);
  memory           an uncaught MemoryError: the program's own word (an RLIMIT_AS refusal leaves
                   no trace outside the process, so ``raise MemoryError`` reads the same);
  passed           the prelude ran main.py (and every step) to its end and the process exited 0;
  failed           anything else, whatever the exit code (90, 137, ...).
``passed`` is thus a claim of the program's own process: it stops accidents (``sys.exit(0)`` or
``os._exit(0)`` before the asserts is no pass), not a program that wants to pass, which can write
the completion line itself. Rewards do not rest on it: ``evaluate`` returns the values of test
expressions as plain data (None, bool, numbers, str, bytes, containers of those; see
``_sandbox_prelude``) that the caller compares on the host, where none of the program's code runs
(``code.py`` does this for MBPP, and never sends the program the expected values).

NOT guaranteed:
  * confidentiality of world-readable files: the program can read whatever any local user can
    (the system, this repository, a dataset file holding its own tests if world-readable);
  * FIFOs and device nodes: a world-writable FIFO of the host can be opened and written (read-only
    mounts do not stop that) outside the dirs "private_tmp" hides, or anywhere without that layer
    (no namespaces, the interpreter in a hidden dir, or a work directory path with a symlink);
  * disk: RLIMIT_FSIZE bounds each file, not their number, so until the timeout a program can write
    many files into its work directory (on the host's temp filesystem);
  * memory and CPU in total: RLIMIT_AS and RLIMIT_CPU are per process, so the bound is roughly
    (max_processes + 1) times each;
  * anything against kernel exploits;
  * on other machines than x86_64/aarch64 (no socket filter): sockets are limited by the network
    namespace (IP only; path sockets stay reachable) and a guard in the socket module;
  * without namespaces: writes to world-writable directories (/tmp, /dev/shm) succeed, a process
    that calls setsid() escapes the group kill (as root the uid reaper still kills it; without
    root it lives on, throttled only by RLIMIT_CPU), and process_limit is never observed;
  * without root (no uid drop) and without a pid namespace: the program can signal the caller's
    processes and read their /proc/<pid>/environ, and write wherever the caller can; without root,
    all runs share the caller's uid (a program can read the work directory of a run going on at
    the same time) and threads the caller starts during a run shrink that run's allowance.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from selfimprove_jax.verifiers import _sandbox_child as child
from selfimprove_jax.verifiers import _sandbox_host as host
from selfimprove_jax.verifiers import _sandbox_prelude as prelude
from selfimprove_jax.verifiers._sandbox_host import SandboxError

_CHILD_SOURCE = pathlib.Path(child.__file__).read_text(encoding="utf-8")
_PRELUDE_SOURCE = pathlib.Path(prelude.__file__).read_text(encoding="utf-8")
ISOLATION_MODES = ("auto", "require", "none")
STATUSES = ("passed", "failed", "timeout", "cpu_limit", "memory", "process_limit",
            "file_size_limit", "output_limit", "killed")
STEP_KINDS = ("exec", "eval")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits of one run. Sizes in bytes unless named otherwise; times in seconds.

  timeout_s: wall clock from launch (interpreter start-up included) to SIGKILL of the group.
  cpu_s: RLIMIT_CPU per process, soft (SIGXCPU) then hard one second later; None: ceil(timeout)+1.
  memory_bytes: RLIMIT_AS (address space) per process.
  file_size_bytes: RLIMIT_FSIZE, the largest file a process may write.
  max_processes: processes (threads) the child may add beyond those of its uid at launch.
  max_open_files: RLIMIT_NOFILE.
  max_output_bytes: captured bytes per stream; a program printing more is killed.
  max_result_bytes: bytes of the prelude's channel (the values of ``evaluate``'s steps).
  isolation: "auto" (namespaces and socket filter where the kernel allows them), "require" or
    "none" (no namespaces; the socket filter still applies where it can).
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
  max_result_bytes: int = 4 << 20
  isolation: str = "auto"
  python: str | None = None
  uid_base: int = 61_000
  workdir_parent: str | None = None

  def __post_init__(self):
    positive = dict(timeout_s=self.timeout_s, memory_bytes=self.memory_bytes,
                    file_size_bytes=self.file_size_bytes, max_output_bytes=self.max_output_bytes,
                    max_result_bytes=self.max_result_bytes)
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

  passed: status == "passed" (the program's own claim of completion; see the module docstring).
  status: one of ``STATUSES``, from what the host observed (see the module docstring).
  returncode: exit code of the program's first process as its parent saw it (-n: signal n);
    None when the run was stopped or ended without that report.
  stdout, stderr: captured text (UTF-8, invalid bytes replaced), at most ``max_output_bytes``.
  runtime_s: wall seconds from launch to the end of the run.
  isolation: layers in force: "uid_drop", "user_namespace", "network_namespace", "pid_namespace",
    "read_only_filesystem", "private_tmp", "socket_filter" (rlimits, timeout and env always apply).
  workdir: the (now removed) work directory.
  detail: what the status rests on, in words (the error, the signal and CPU seconds, ...).
  values: ``evaluate`` only: the plain value of each step that ran, in order (fewer than the
    steps when one raised); decoded on the host, so comparing them runs no program code.
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
  detail: str = ""
  values: tuple[Any, ...] = ()


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

def run_program(program: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
  """Runs ``program`` (Python source, executed as ``main.py``) in the sandbox.

  Raises ``SandboxError`` when the sandbox cannot be set up (e.g. ``isolation="require"`` on a
  kernel without user namespaces); whatever the program does only changes the result.
  """
  return evaluate(program, (), config)


def evaluate(module: str, steps: Sequence[tuple[str, str]],
             config: SandboxConfig = SandboxConfig()) -> SandboxResult:
  """Runs ``module`` as ``main.py``, then each step in its namespace, in order: ("exec",
  statement) or ("eval", expression). ``SandboxResult.values`` holds each step's value (None for
  "exec") as plain data; a step that raises, or whose value is not plain data, ends the run
  (usually "failed"; the error in ``detail``). The program can read the steps (they are in its work
  directory) and forge any value, so send it only what it may see: the inputs, not the answers.
  """
  if not isinstance(module, str):
    raise TypeError(f"the program must be str, got {type(module).__name__}")
  steps = [list(s) for s in steps]
  if not all(len(s) == 2 and s[0] in STEP_KINDS and isinstance(s[1], str) for s in steps):
    raise ValueError(f"evaluate: steps must be (kind, source) pairs with kind in {STEP_KINDS}")
  dropping = os.geteuid() == 0
  python = _interpreter(config, dropping)
  with contextlib.ExitStack() as stack:
    uid = stack.enter_context(host.lease_uid(config.uid_base)) if dropping else None
    if uid is not None:
      host.check_uid_unused(uid)
      host.reap_uid(uid, python)  # leftovers of an earlier, crashed caller
    workdir = tempfile.mkdtemp(prefix="sandbox-", dir=config.workdir_parent)
    try:
      if uid is not None and not host.others_can(os.path.dirname(workdir), 0):
        raise SandboxError(f"work directory parent {os.path.dirname(workdir)!r} is not "
                           f"traversable by the sandbox uid; set SandboxConfig.workdir_parent")
      files = {"main.py": module, **({"steps.json": json.dumps(steps)} if steps else {})}
      for name, text in files.items():
        pathlib.Path(workdir, name).write_text(text, encoding="utf-8")
      if uid is not None:
        for path in (workdir, *(os.path.join(workdir, name) for name in files)):
          os.chown(path, uid, uid)
      run = _launch(config, python, uid, workdir)
    finally:
      largest_file = host.remove_tree(workdir)
    return _result(config, run, len(steps), largest_file, workdir)


def _launch(config: SandboxConfig, python: str, uid: int | None, workdir: str) -> host.Run:
  report_r, report_w = os.pipe()
  channel_r, channel_w = os.pipe()
  child_cfg = dict(cpu_s=config.cpu_limit_s, memory_bytes=config.memory_bytes,
                   file_size_bytes=config.file_size_bytes, max_open_files=config.max_open_files,
                   max_processes=config.max_processes, isolation=config.isolation, python=python,
                   workdir=workdir, report_fd=report_w, channel_fd=channel_w,
                   prelude=_PRELUDE_SOURCE)
  env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
         "HOME": workdir, "TMPDIR": workdir}
  ids = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
  start = time.monotonic()
  try:
    proc = subprocess.Popen([python, "-I", "-c", _CHILD_SOURCE, json.dumps(child_cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=workdir, env=env, start_new_session=True,
                            pass_fds=(report_w, channel_w), **ids)
  except BaseException:
    os.close(report_r)
    os.close(channel_r)
    raise
  finally:
    os.close(report_w)
    os.close(channel_w)
  try:
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    caps = {out_fd: config.max_output_bytes, err_fd: config.max_output_bytes,
            channel_r: config.max_result_bytes}
    bufs, over, stopped = host.collect(proc, start + config.timeout_s, caps)
  finally:
    host.stop(proc)
    proc.stdout.close()
    proc.stderr.close()
    os.close(channel_r)
    if uid is not None:
      host.reap_uid(uid, python)
  runtime_s = time.monotonic() - start
  reports = []
  for line in host.read_lines(report_r):
    with contextlib.suppress(ValueError):  # a parent killed mid-line leaves half a line
      reports.append(json.loads(line))
  setup = reports[0] if reports else None
  # The child reports before the program starts; no report (and no timeout) means it broke itself.
  if stopped is None and (setup is None or "error" in setup):
    detail = setup["error"] if setup else bytes(bufs[err_fd]).decode(errors="replace")[-2000:]
    raise SandboxError(f"sandbox setup failed (isolation={config.isolation!r}, exit status "
                       f"{proc.returncode}): {detail}")
  end = next((r for r in reports[1:] if "signal" in r), None)
  layers = (("uid_drop",) if uid is not None else ()) + tuple((setup or {}).get("layers", ()))
  return host.Run(stopped=stopped, out=bytes(bufs[out_fd]), err=bytes(bufs[err_fd]),
                  channel=bytes(bufs[channel_r]).splitlines(), end=end, layers=layers,
                  over=(over[out_fd], over[err_fd], over[channel_r]), runtime_s=runtime_s)


def _result(config: SandboxConfig, run: host.Run, n_steps: int, largest_file: int,
            workdir: str) -> SandboxResult:
  pid = run.end["pid"] if run.end else None
  values, error, done = prelude.read_channel(run.channel, pid, n_steps)
  status, detail = host.verdict(config, run, error, done, largest_file)
  end = run.end or {}
  returncode = (end["exit"] if end.get("exit") is not None else
                -end["signal"] if end.get("signal") is not None else None)
  return SandboxResult(
      passed=status == "passed", status=status, returncode=None if run.stopped else returncode,
      stdout=run.out.decode("utf-8", errors="replace"),
      stderr=run.err.decode("utf-8", errors="replace"), stdout_truncated=run.over[0],
      stderr_truncated=run.over[1], runtime_s=run.runtime_s, isolation=run.layers,
      workdir=workdir, detail=detail, values=tuple(values))


def run_programs(programs: Sequence[str], config: SandboxConfig = SandboxConfig(), *,
                 max_workers: int = 2) -> list[SandboxResult]:
  """``run_program`` over many programs, ``max_workers`` child trees at a time; results in order."""
  return map_runs(lambda p: run_program(p, config), programs, max_workers=max_workers)


def map_runs(fn, items: Sequence[Any], *, max_workers: int = 2) -> list[Any]:
  """``fn`` over ``items`` on ``max_workers`` threads (each call runs its own child tree)."""
  if max_workers < 1:
    raise ValueError(f"max_workers={max_workers} must be >= 1")
  if not items:
    return []
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
    return list(pool.map(fn, items))
