"""Host-side helpers of the sandbox: uid leases, what an unprivileged uid can reach, reading a
run's pipes, reaping, verdicts and removal. Used by ``sandbox.py`` only."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import pathlib
import pwd
import selectors
import signal
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator

UID_SLOTS = 64
# Lease files live in the first of these that exists (the same choice in every process of a host).
LEASE_PARENTS = ("/run/lock", "/tmp")
LEASE_DIRNAME = "selfimprove-sandbox-uids"
_EXIT_GRACE_S = 0.5  # how long output may keep flowing after stage 1 exited
_STOP_GRACE_S = 1.0  # how long stage 1 gets to kill and reap pid 1 before it is SIGKILLed
# The kernel enforces RLIMIT_CPU on its tick-sampled CPU time; the parent reports the precise one,
# which can be a few percent lower when the limit fires.
_CPU_LIMIT_SEEN = 0.9


class SandboxError(RuntimeError):
  """The sandbox itself could not be set up (the program never ran); never a verdict."""


# ------------------------------------------------------------------------------ uids

def _lease_dir() -> str:
  parent = next((p for p in LEASE_PARENTS if os.path.isdir(p)), None)
  if parent is None:
    raise SandboxError(f"none of {LEASE_PARENTS} exists to hold the sandbox uid leases")
  path = os.path.join(parent, LEASE_DIRNAME)
  with contextlib.suppress(FileExistsError):
    os.mkdir(path, 0o700)
  st = os.lstat(path)
  if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
    raise SandboxError(f"{path} must be a directory of uid {os.geteuid()} that nobody else can "
                       f"write (mode {stat.filemode(st.st_mode)}, uid {st.st_uid})")
  return path


@contextlib.contextmanager
def lease_uid(base: int) -> Iterator[int]:
  """Holds one of the uids ``base .. base + UID_SLOTS - 1`` that no other run on this host holds:
  an exclusive flock on its lease file, across processes and threads alike (each attempt opens
  its own file description). The kernel drops the lock when the holder dies, so a crashed
  caller's uid is free again (its leftover processes are reaped by the next holder)."""
  directory = _lease_dir()
  while True:
    for uid in range(base, base + UID_SLOTS):
      fd = _try_lease(directory, uid)
      if fd is None:
        continue
      try:
        yield uid
      finally:
        os.close(fd)
      return
    time.sleep(0.01)  # all leased: wait for one


def _try_lease(directory: str, uid: int) -> int | None:
  """An fd holding the lease of ``uid`` (close it to let go), or None when another holds it."""
  fd = os.open(os.path.join(directory, f"uid-{uid}.lock"),
               os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  return fd


def idle_processes(base: int) -> list[int]:
  """Processes of the uids ``base .. base + UID_SLOTS - 1`` that no run holds, each uid checked
  while holding its lease. None should exist: a run reaps its uid before it lets the lease go
  (a crashed caller's leftovers are reaped by the next holder). Uids in use are not looked at."""
  directory, pids = _lease_dir(), []
  for uid in range(base, base + UID_SLOTS):
    fd = _try_lease(directory, uid)
    if fd is not None:
      try:
        pids += processes_of(uid)
      finally:
        os.close(fd)
  return pids


def check_uid_unused(uid: int) -> None:
  try:
    entry = pwd.getpwuid(uid)
  except KeyError:
    return
  raise SandboxError(f"sandbox uid {uid} belongs to user {entry.pw_name!r}; choose a "
                     f"SandboxConfig.uid_base whose {UID_SLOTS} ids hold no real user")


def others_can(path: str, mode: int) -> bool:
  """Whether a uid that owns nothing here can reach ``path`` with ``mode`` bits (of S_IRWXO)."""
  p = pathlib.Path(os.path.realpath(path))
  for parent in reversed(p.parents):
    if not os.stat(parent).st_mode & stat.S_IXOTH:
      return False
  return (os.stat(p).st_mode & mode) == mode


def processes_of(uid: int) -> list[int]:
  """Live (non-zombie) processes with ``uid`` as real, effective or saved uid. Read from
  /proc/<pid>/status: the owner of /proc/<pid> turns to root when a process makes itself
  non-dumpable, which would hide it."""
  pids = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    with contextlib.suppress(OSError):
      with open(f"/proc/{name}/status", "rb") as f:
        fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
      alive = fields[b"State"].split()[0] not in (b"Z", b"X")
      if alive and uid in map(int, fields[b"Uid"].split()[:3]):
        pids.append(int(name))
  return pids


def reap_uid(uid: int, python: str) -> None:
  """Kills every process of the dedicated ``uid`` (those that escaped the process group)."""
  deadline = time.monotonic() + 5.0
  while processes_of(uid):
    if time.monotonic() > deadline:
      raise SandboxError(f"processes {processes_of(uid)} of sandbox uid {uid} survive SIGKILL")
    # kill(-1) from a process of that uid reaches exactly the processes of that uid, with no race
    # against pid reuse (a scan-then-kill from here could hit a recycled pid).
    subprocess.run([python, "-I", "-S", "-c", "import os; os.kill(-1, 9)"], user=uid, group=uid,
                   extra_groups=[], env={}, cwd="/", stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    time.sleep(0.01)


# ------------------------------------------------------------------------------ one run's pipes

def exited(pid: int) -> bool:
  """Whether ``pid`` has exited, without reaping it (a zombie leader keeps its pgid reserved)."""
  return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def collect(proc: subprocess.Popen, deadline: float, caps: dict[int, int]):
  """Reads the pipes in ``caps`` until all close, the deadline passes, stage 1 has been gone for
  a grace period, or a pipe exceeds its cap. Returns (bytes per fd, over cap per fd, stop)."""
  bufs = {fd: bytearray() for fd in caps}
  over = {fd: False for fd in caps}
  sel = selectors.DefaultSelector()
  for fd in caps:
    sel.register(fd, selectors.EVENT_READ)
  stop, exit_deadline = None, None
  with sel:
    while sel.get_map() and stop is None:
      now = time.monotonic()
      if now >= deadline:
        stop = "timeout"
        break
      if exit_deadline is None and exited(proc.pid):
        exit_deadline = now + _EXIT_GRACE_S
      if exit_deadline is not None and now >= exit_deadline:
        break
      for key, _ in sel.select(min(0.05, deadline - now)):
        chunk = os.read(key.fd, 1 << 16)
        if not chunk:
          sel.unregister(key.fd)
          continue
        room = caps[key.fd] - len(bufs[key.fd])
        bufs[key.fd] += chunk[:room]
        if len(chunk) > room:
          over[key.fd] = True
          stop = "output_limit"
  return bufs, over, stop


def stop(proc: subprocess.Popen) -> None:
  """Ends a run and reaps stage 1 (see ``_sandbox_child``: SIGUSR1 first, then SIGKILL)."""
  if not exited(proc.pid):
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + _STOP_GRACE_S
    while not exited(proc.pid) and time.monotonic() < deadline:
      time.sleep(0.002)
  with contextlib.suppress(ProcessLookupError):
    os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet, so this pgid is still ours
  proc.wait()


def read_lines(fd: int, limit: int = 1 << 20) -> list[bytes]:
  """What is left in a pipe whose writers are all gone, as lines (at most ``limit`` bytes)."""
  data = bytearray()
  os.set_blocking(fd, False)
  with contextlib.suppress(BlockingIOError):
    while len(data) < limit:
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        break
      data += chunk
  os.close(fd)
  return bytes(data[:limit]).splitlines()


# ------------------------------------------------------------------------------ verdicts

@dataclasses.dataclass
class Run:
  """What the host observed of one run (see ``_launch`` in ``sandbox.py``)."""
  stopped: str | None
  out: bytes
  err: bytes
  channel: list[bytes]
  over: tuple[bool, bool, bool]  # stdout, stderr, channel past their caps
  end: dict | None
  layers: tuple[str, ...]
  runtime_s: float


def verdict(config, run: Run, error: dict | None, done: bool,
            largest_file: int) -> tuple[str, str]:
  """(status, detail) of a run from what the host observed; ``config`` is the run's
  ``SandboxConfig`` (see the verdict table in ``sandbox.py``)."""
  if run.stopped == "timeout":
    return "timeout", f"still running after {config.timeout_s} s of wall clock"
  if run.stopped == "output_limit":
    return "output_limit", (f"wrote more than max_result_bytes={config.max_result_bytes} to the "
                            f"channel" if run.over[2] else
                            f"printed more than max_output_bytes={config.max_output_bytes}")
  end = run.end
  if end is None:
    return "killed", "the program's parent ended without reporting (killed from outside?)"
  if end["signal"] is not None:
    sig, cpu = end["signal"], end["cpu_s"]
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    what = f"killed by {name} after {cpu:.2f} CPU s (limit {config.cpu_limit_s} s)"
    limit_hit = (sig in (signal.SIGXCPU, signal.SIGKILL)
                 and cpu >= _CPU_LIMIT_SEEN * config.cpu_limit_s)
    return ("cpu_limit" if limit_hit else "killed"), what
  if end["exit"] == 0 and done:
    return "passed", ""
  if error is None:
    return "failed", f"exit status {end['exit']}" + ("" if done else " before its end")
  said = str(error.get("error", "")).rstrip(": ")
  if error.get("type") == "MemoryError":
    return "memory", f"{said} (the program's report)"
  pids = end.get("pids")
  if error.get("errno") == errno.EAGAIN and pids is not None and pids >= config.max_processes:
    return "process_limit", f"{said}; its pid namespace allocated {pids} pids"
  if error.get("errno") == errno.EFBIG and largest_file >= config.file_size_bytes:
    return "file_size_limit", f"{said}; a file reached {largest_file} bytes"
  return "failed", said


# ------------------------------------------------------------------------------ removal

def remove_tree(path: str) -> int:
  """Removes the work directory ``path`` and everything in it; returns the size of its largest
  regular file. Never recurses and never raises (a failure is a RuntimeWarning): the directory
  is first taken back (owner: this process, mode 0700, so a sandbox uid loses access even if
  removal fails); then every directory inside it is emptied one at a time, its subdirectories
  renamed up into ``path`` itself, so depth and path length never matter."""
  largest = 0
  try:
    top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
  except FileNotFoundError:
    return 0
  except OSError as e:
    warnings.warn(f"sandbox: could not remove work directory {path}: {e}", RuntimeWarning)
    return 0
  try:
    os.fchown(top, os.geteuid(), os.getegid())
    os.fchmod(top, 0o700)
    moved = 0
    while True:
      with os.scandir(top) as it:
        names = [entry.name for entry in it]
      if not names:
        break
      taken = set(names)
      for name in names:
        st = os.stat(name, dir_fd=top, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
          if stat.S_ISREG(st.st_mode):
            largest = max(largest, st.st_size)
          os.unlink(name, dir_fd=top)
          continue
        os.chmod(name, 0o700, dir_fd=top)  # the program may have locked its own directories
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
        try:
          with os.scandir(sub) as it:
            inner = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
          for child, is_dir in inner:
            if is_dir:
              while f".removing-{moved}" in taken:
                moved += 1
              taken.add(f".removing-{moved}")
              os.rename(child, f".removing-{moved}", src_dir_fd=sub, dst_dir_fd=top)
            else:
              st = os.stat(child, dir_fd=sub, follow_symlinks=False)
              if stat.S_ISREG(st.st_mode):
                largest = max(largest, st.st_size)
              os.unlink(child, dir_fd=sub)
        finally:
          os.close(sub)
        os.rmdir(name, dir_fd=top)
    os.rmdir(path)
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f"sandbox: could not remove work directory {path}: {type(e).__name__}: {e}",
                  RuntimeWarning)
  finally:
    os.close(top)
  return largest
