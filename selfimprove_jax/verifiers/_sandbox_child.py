"""The child side of the code sandbox; ``sandbox.py`` ships this file's source to ``python -I -c``.

Standard library only, and nothing from the package: the child runs a system interpreter as an
unprivileged user that may not be able to read the package (or the virtualenv) at all.

Process tree of one run (``sandbox.py`` starts stage 1 as the leader of a new session):

  stage 1  setrlimit, no_new_privs, unshare(user, net, pid, mount, ipc), uid/gid maps; waits.
  pid 1    first process of the new pid namespace: private mounts, a fresh /proc, an empty tmpfs
           over each host temp dir (/tmp, /run, ...), everything read-only except the work
           directory; the socket filter; reports the layers in force; starts the program,
           waits for it and reports how it ended. When pid 1 exits the kernel
           kills every process left in the namespace (daemonized or setsid'd ones too).
  program  ``python -I`` running the prelude (``_sandbox_prelude.py``) on main.py.

Without namespaces (``isolation="none"``, or "auto" where the kernel refuses them) stage 1 starts
the program itself (no pid 1, no read-only mounts); it still stands between caller and program.
Whichever process starts the program (pid 1 or stage 1, "the parent") makes itself non-dumpable
and holds the report pipe, which the program never inherits: the program can neither write the
report nor reach it through ptrace or /proc/<parent>/fd (same uid, but no capability).

Stopping a run: the caller sends SIGUSR1 to stage 1, which SIGKILLs pid 1 and reaps it, so nothing
is left for the host's init to reap; the caller then SIGKILLs stage 1's process group. pid 1 and
the program live in a second process group, out of reach of the program's ``kill(0, ...)``.

Protocol: argv[1] is a JSON config. Fd ``report_fd`` receives JSON lines from the parent only:
{"layers": [...], "nproc_limit": n} before the program starts (or {"error": "..."} when the sandbox
could not be set up; exit status 125), then {"pid": p, "exit": code | null, "signal": n | null,
"cpu_s": s, "pids": n | null} once the program's process has ended (cpu_s: its user + system CPU
seconds with its reaped children's; pids: pids the namespace ever allocated). Fd ``channel_fd``
goes to the program as the prelude's channel.
"""
import ctypes
import json
import os
import resource
import signal
import sys

SETUP_FAILED = 125

_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (unified syscall table)
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38

# The socket filter (seccomp): audit arch, socket and socketpair numbers per machine.
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41, 53), "aarch64": (0xC00000B7, 198, 199)}
_SYS_IO_URING_SETUP = 425  # unified table; io_uring could open sockets without socket(2)
_AF_UNIX, _SOCK_STREAM, _EACCES = 1, 1, 13


class SetupError(Exception):
  pass


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
  if ret != 0:
    err = ctypes.get_errno()
    raise SetupError(f"{what} failed: {os.strerror(err)} (errno {err})")


def _tasks_of(uid):
  """Threads of every process whose real uid is ``uid``: what RLIMIT_NPROC counts."""
  count = 0
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/status") as f:
          for line in f:  # Uid: comes before Threads:
            if line.startswith("Uid:") and int(line.split()[1]) != uid:
              break
            if line.startswith("Threads:"):
              count += int(line.split()[1])
              break
      except (OSError, ValueError):
        pass  # exited meanwhile
  return count


def _set_limits(cfg):
  cpu = cfg["cpu_s"]
  # The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL for code that ignores it.
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  memory = cfg["memory_bytes"]
  resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
  resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_size_bytes"],) * 2)
  resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_open_files"],) * 2)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  # RLIMIT_NPROC counts every thread of this (real) uid system-wide, so the limit is what exists
  # now plus the allowance (which also covers pid 1 and the program itself).
  nproc = _tasks_of(os.getuid()) + cfg["max_processes"]
  resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
  return nproc


def _enter_namespaces(libc):
  uid, gid = os.geteuid(), os.getegid()
  flags = _CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC
  _check(libc.unshare(flags), "unshare(user, net, pid, mount, ipc)")
  # Map our own ids onto themselves: not root inside, so execve drops the namespace capabilities.
  with open("/proc/self/setgroups", "w") as f:
    f.write("deny")
  with open("/proc/self/uid_map", "w") as f:
    f.write(f"{uid} {uid} 1")
  with open("/proc/self/gid_map", "w") as f:
    f.write(f"{gid} {gid} 1")


class _MountAttr(ctypes.Structure):
  _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
              ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _setattr(libc, path, flags, attr_set, attr_clr):
  attr = _MountAttr(attr_set, attr_clr, 0, 0)
  ret = libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                     ctypes.sizeof(attr))
  _check(ret, f"mount_setattr({path})")


# Where host processes keep FIFOs, sockets and files (world-writable); each gets an empty tmpfs.
_HOST_TEMP_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm", "/dev/mqueue")
_PRIVATE_TMP_OPTIONS = b"size=64k,nr_inodes=256,mode=755"


def _under(path, directory):
  return path == directory or path.startswith(directory + "/")


def _dirs_to_hide(workdir, python):
  """The host temp dirs present as real directories (a symlink such as /var/run -> /run is left to
  its target); none at all where the interpreter lives in one (it would vanish) or the work
  directory's path is not canonical (a symlink on it could lie in a hidden dir)."""
  dirs = [d for d in _HOST_TEMP_DIRS if os.path.isdir(d) and not os.path.islink(d)]
  python = os.path.realpath(python)
  if os.path.realpath(workdir) != workdir or any(_under(python, d) for d in dirs):
    return []
  return dirs


def _lock_filesystem(libc, workdir, python):
  """Private mounts, a fresh /proc, an empty tmpfs over each host temp dir (the work directory, if
  it lies in one, bound back at its own path), then everything read-only but the work directory.
  Returns whether the host temp dirs are hidden."""
  mount = libc.mount
  mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                    ctypes.c_char_p]
  _check(mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
  _check(mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None),
         "mounting a fresh /proc")
  hidden = _dirs_to_hide(workdir, python)
  workdir_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)  # reaches it once /tmp is covered
  try:
    for d in hidden:
      _check(mount(b"tmpfs", d.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   _PRIVATE_TMP_OPTIONS), f"mounting an empty tmpfs over {d}")
    if any(_under(workdir, d) for d in hidden):
      os.makedirs(workdir, mode=0o755, exist_ok=True)
    _check(mount(f"/proc/self/fd/{workdir_fd}".encode(), workdir.encode(), None,
                 _MS_BIND | _MS_REC, None), "bind-mounting the work directory")
  finally:
    os.close(workdir_fd)
  # Read-only too: the new tmpfs mounts (nothing can be written outside the work directory).
  _setattr(libc, "/", _AT_RECURSIVE, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0)
  _setattr(libc, workdir, 0, 0, _MOUNT_ATTR_RDONLY)
  os.chdir(workdir)  # onto the writable bind mount, not the read-only directory beneath it
  return bool(hidden)


class _SockFilter(ctypes.Structure):
  _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
              ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _install_socket_filter(libc):
  """seccomp: socket(2) and io_uring_setup(2) fail with EACCES, socketpair(2) only makes AF_UNIX
  stream pairs (a datagram pair could sendto() any path), other ABIs kill the process. Inherited
  by every descendant and kept across execve."""
  machine = os.uname().machine
  if machine not in _SECCOMP_ARCHES:
    raise SetupError(f"no socket filter for machine {machine!r}")
  arch, nr_socket, nr_socketpair = _SECCOMP_ARCHES[machine]
  ld, jeq, jge, and_, ret = 0x20, 0x15, 0x35, 0x54, 0x06
  allow, deny, kill = 0x7FFF0000, 0x00050000 | _EACCES, 0x80000000
  # (code, jump-if-true label, jump-if-false label, k); labels are indices into this list.
  prog = [(ld, None, None, 4),                       # 0  A = arch
          (jeq, 3, 2, arch),                         # 1
          (ret, None, None, kill),                   # 2  a foreign ABI (int 0x80, ...)
          (ld, None, None, 0),                       # 3  A = syscall number
          (jge, 14, 5, 0x40000000),                  # 4  x32 ABI
          (jeq, 14, 6, nr_socket),                   # 5
          (jeq, 14, 7, _SYS_IO_URING_SETUP),         # 6
          (jeq, 8, 13, nr_socketpair),               # 7
          (ld, None, None, 16),                      # 8  A = low word of args[0] (domain)
          (jeq, 10, 14, _AF_UNIX),                   # 9
          (ld, None, None, 24),                      # 10 A = low word of args[1] (type | flags)
          (and_, None, None, 0xF),                   # 11
          (jeq, 13, 14, _SOCK_STREAM),               # 12
          (ret, None, None, allow),                  # 13
          (ret, None, None, deny)]                   # 14
  cells = (_SockFilter * len(prog))(*[
      _SockFilter(code, 0 if jt is None else jt - i - 1, 0 if jf is None else jf - i - 1, k)
      for i, (code, jt, jf, k) in enumerate(prog)])
  fprog = _SockFprog(len(prog), cells)
  _check(libc.prctl(_PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0), "seccomp(socket filter)")


def _start_program(cfg, libc, layers):
  """In the parent-to-be: the socket filter, the layer report, then fork + exec the program."""
  try:
    _install_socket_filter(libc)
    layers.append("socket_filter")
  except (SetupError, OSError) as e:
    if cfg["isolation"] == "require":
      _report(cfg["report_fd"], {"error": f"{type(e).__name__}: {e}"})
      os._exit(SETUP_FAILED)
  libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
  _report(cfg["report_fd"], {"layers": layers, "nproc_limit": cfg["nproc"]}, close=False)
  program = os.fork()
  if program == 0:
    os.close(cfg["report_fd"])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    fd = cfg["channel_fd"]
    os.set_inheritable(fd, True)
    flags = ["socket_filter"] if "socket_filter" in layers else []
    os.execv(cfg["python"], [cfg["python"], "-I", "-c", cfg["prelude"], str(fd), *flags])
  os.close(cfg["channel_fd"])
  return program


def _report(fd, payload, close=True):
  os.write(fd, (json.dumps(payload) + "\n").encode())
  if close:
    os.close(fd)


def _wait_and_report(cfg, program, in_pid_ns):
  """Reaps the program, reports how it ended (the kernel's word, not the program's), exits."""
  _, status, usage = os.wait4(program, 0)
  pids = None
  if in_pid_ns:
    try:
      with open("/proc/sys/kernel/ns_last_pid") as f:
        pids = int(f.read())
    except (OSError, ValueError):
      pass
  end = {"pid": program, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
         "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
         "cpu_s": usage.ru_utime + usage.ru_stime, "pids": pids}
  _report(cfg["report_fd"], end)
  os._exit(0)


def _stop_on_sigusr1(child):
  """The parent stops a run with SIGUSR1 to stage 1, which kills its child (pid 1, and with it the
  namespace) and reaps it: no process of the run is orphaned to the host's init."""
  def stop(signum, frame):
    os.kill(child, signal.SIGKILL)
  signal.signal(signal.SIGUSR1, stop)


def _wait_and_exit(pid):
  _, status = os.waitpid(pid, 0)
  code = os.waitstatus_to_exitcode(status)
  os._exit(code if code >= 0 else 128 - code)


def main():
  signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # until pid 1 exists to be killed
  cfg = json.loads(sys.argv[1])
  report_fd = cfg["report_fd"]
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  os.close(devnull)
  libc = _libc()
  layers = []
  try:
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    cfg["nproc"] = _set_limits(cfg)
    if cfg["isolation"] != "none":
      try:
        _enter_namespaces(libc)
        layers = ["user_namespace", "network_namespace", "pid_namespace"]
      except (SetupError, OSError) as e:
        if cfg["isolation"] == "require":
          raise SetupError(f"namespaces unavailable: {e}") from e
  except (SetupError, OSError, ValueError) as e:
    _report(report_fd, {"error": f"{type(e).__name__}: {e}"})
    os._exit(SETUP_FAILED)

  if not layers:
    # Stage 1 stays between the caller and the program, so the program's parent is never the caller.
    program = _start_program(cfg, libc, layers)
    _stop_on_sigusr1(program)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    _wait_and_report(cfg, program, in_pid_ns=False)

  pid1 = os.fork()
  if pid1:
    os.close(report_fd)
    os.close(cfg["channel_fd"])
    _stop_on_sigusr1(pid1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    _wait_and_exit(pid1)
  # pid 1: a process group of its own, so the program's kill(0, ...) cannot reach stage 1.
  os.setpgid(0, 0)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # stage 1 killed -> the namespace goes too
  try:
    hidden = _lock_filesystem(libc, cfg["workdir"], cfg["python"])
    layers += ["read_only_filesystem", "private_tmp"] if hidden else ["read_only_filesystem"]
  except (SetupError, OSError) as e:
    if cfg["isolation"] == "require":
      _report(report_fd, {"error": f"{type(e).__name__}: {e}"})
      os._exit(SETUP_FAILED)
  program = _start_program(cfg, libc, layers)
  _wait_and_report(cfg, program, in_pid_ns=True)


if __name__ == "__main__":
  main()
