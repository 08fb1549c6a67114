"""An outside battery's hostile programs that the sandbox once let through (issue 19, items 1-6).

One test (or parametrized family) per item; each reproduced the escape before the fix. Parts that
need a layer this machine may lack (root for the uid drop, user namespaces) skip with the reason.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from selfimprove_jax import verifiers as v
from selfimprove_jax.verifiers import _sandbox_host

CFG = v.SandboxConfig(timeout_s=5, memory_bytes=256 << 20, max_processes=12,
                      max_output_bytes=4096, file_size_bytes=1 << 20)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not _ROOT, reason="the uid drop and setuid need root")


def _live_sandbox_processes():
  # Only uids no run holds: concurrent runs (other test workers) own the others' processes.
  return _sandbox_host.idle_processes(CFG.uid_base) if _ROOT else []


# ------------------------------------------------------------------ 1. unix path sockets

@pytest.fixture
def unix_listeners():
  """A world-writable AF_UNIX stream and datagram listener under /tmp, like D-Bus or /dev/log."""
  directory = tempfile.mkdtemp(prefix="unix-listener-")
  os.chmod(directory, 0o755)
  stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  stream.bind(os.path.join(directory, "stream.sock"))
  stream.listen(8)
  stream.setblocking(False)
  dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
  dgram.bind(os.path.join(directory, "dgram.sock"))
  dgram.setblocking(False)
  for name in ("stream.sock", "dgram.sock"):
    os.chmod(os.path.join(directory, name), 0o777)
  yield directory, stream, dgram
  stream.close()
  dgram.close()
  for name in ("stream.sock", "dgram.sock"):
    os.remove(os.path.join(directory, name))
  os.rmdir(directory)


_UNIX_ATTACKS = {
    "socket_module": "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                     "s.connect(STREAM)",
    "raw_socket": "import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                  "s.connect(STREAM)",
    "ctypes_syscall": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "fd = libc.socket(1, 1, 0)\n"
                      "if fd < 0: raise OSError(ctypes.get_errno(), 'socket')\n"
                      "import _socket\ns = _socket.socket(fileno=fd)\ns.connect(STREAM)",
    "socketpair_sendto": "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                         "a.sendto(b'hello', DGRAM)",
}


@pytest.mark.parametrize("attack", sorted(_UNIX_ATTACKS))
def test_unix_path_sockets_of_the_host_are_unreachable(unix_listeners, attack):
  directory, stream, dgram = unix_listeners
  program = (f"import socket\nSTREAM = {os.path.join(directory, 'stream.sock')!r}\n"
             f"DGRAM = {os.path.join(directory, 'dgram.sock')!r}\n"
             f"try:\n{textwrap.indent(_UNIX_ATTACKS[attack], '  ')}\n  print('REACHED')\n"
             f"except OSError as e:\n  print('blocked', type(e).__name__)\n")
  result = v.run_program(program, CFG)
  assert result.status == "passed" and result.stdout.startswith("blocked"), result
  with pytest.raises(BlockingIOError):
    stream.accept()
  with pytest.raises(BlockingIOError):
    dgram.recv(64)


def test_a_connected_unix_stream_pair_still_works():
  """What the socket filter leaves: socket.socketpair() (asyncio's self-pipe), no path involved."""
  program = "import socket\na, b = socket.socketpair()\na.sendall(b'ping')\nprint(b.recv(4))"
  result = v.run_program(program, CFG)
  assert (result.status, result.stdout) == ("passed", "b'ping'\n"), result


# ------------------------------------------------------------------ 2. a deep directory tree

# Deeper than the recursion limit, paths longer than PATH_MAX, the bottom locked with mode 000.
# (The tree had ~3,000 levels; 1,100 breaks a recursive removal the same way, and every
# level costs milliseconds to remove on a filesystem mounted with discard.)
_DEEP_TREE = """
import os
for _ in range(1100):
  os.mkdir("level-00")
  os.chdir("level-00")
open("marker", "w").write("left behind")
os.chmod(".", 0)
"""


def test_a_deep_directory_tree_is_removed_and_keeps_the_verdict():
  result = v.run_program(_DEEP_TREE + "print('built')", CFG)
  assert (result.status, result.stdout) == ("passed", "built\n"), result
  assert not os.path.exists(result.workdir)
  assert _live_sandbox_processes() == []


def _deep_trees_left():
  tmp = tempfile.gettempdir()
  return {n for n in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, n, "level-00"))}


def test_a_deep_directory_tree_does_not_abort_an_mbpp_batch():
  before = _deep_trees_left()
  solution = "def add(a, b):\n  return a + b\n"
  got = v.mbpp_reward(CFG)(["p", "p"], [_DEEP_TREE + solution, solution],
                           test_list=[["assert add(1, 2) == 3"]] * 2)
  assert got == [1.0, 1.0]
  assert _deep_trees_left() - before == set()


# ------------------------------------------------------------------ 3. reward hacks

_TESTS = ["assert add(1, 2) == 3", "assert add(5, 5) == 10"]
REWARD_HACKS = {
    "os_exit_patched": "import os\nos._exit = lambda *a: None\ndef add(a, b):\n  return 0\n",
    "token_from_globals": textwrap.dedent("""
        import os, sys
        def add(a, b):
          return 0
        main = sys.modules["__main__"]
        for name in dir(main):
          value = getattr(main, name)
          if isinstance(value, bytes) and len(value) == 32:
            os.write(1, b"\\n" + value + b"\\n")
            os._exit(0)
        for fd in range(3, 32):  # and a forged completion on any channel the runner left open
          try:
            os.write(fd, b'{"pid": %d, "done": true}\\n' % os.getpid())
          except OSError:
            pass
        """),
    "always_equal": textwrap.dedent("""
        class Anything:
          def __eq__(self, other):
            return True
          __hash__ = object.__hash__
        def add(a, b):
          return Anything()
        """),
    "int_subclass_always_equal": textwrap.dedent("""
        class Int(int):
          def __eq__(self, other):
            return True
          __hash__ = int.__hash__
        def add(a, b):
          return Int(0)
        """),
    "tests_read_from_the_script": textwrap.dedent("""
        import gc, os, re, sys
        seen = []
        for name in os.listdir("."):
          try:
            seen.append(open(name, errors="replace").read())
          except OSError:
            pass
        seen.append(open("/proc/self/cmdline", "rb").read().decode(errors="replace"))
        for o in gc.get_objects():  # every string held in a container of this process
          items = list(o.items()) if isinstance(o, dict) else o if type(o) in (list, tuple) else ()
          seen += [str(x) for x in items if isinstance(x, (str, tuple))]
        table = {}
        for text in seen:
          for call, expected in re.findall(r"(add\\([^)]*\\))\\s*==\\s*(\\d+)", text):
            table[call.replace(" ", "")] = int(expected)
        def add(a, b):
          return table.get(f"add({a},{b})")
        """),
}


@pytest.mark.parametrize("hack", sorted(REWARD_HACKS))
def test_mbpp_reward_hacks_score_zero(hack):
  reward = v.mbpp_reward(CFG)
  got = reward(["p", "p"], [REWARD_HACKS[hack], "def add(a, b):\n  return a + b\n"],
               test_list=[_TESTS, _TESTS])
  assert got == [0.0, 1.0]


# ------------------------------------------------------------------ 4. two grading processes

_OTHER_GRADER = """
import json, sys
from selfimprove_jax import verifiers as v
program = "import os, time\\nprint(os.getuid(), flush=True)\\ntime.sleep(2.5)\\nprint('alive')"
r = v.run_program(program, v.SandboxConfig(timeout_s=20, workdir_parent=sys.argv[1]))
print(json.dumps([r.status, r.stdout]))
"""


def _runs_in(parent):
  """Whether a process of a sandbox uid works in a directory under ``parent`` (its HOME)."""
  for pid in (pid for uid in range(CFG.uid_base, CFG.uid_base + _sandbox_host.UID_SLOTS)
              for pid in _sandbox_host.processes_of(uid)):  # leased uids included
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        if f"HOME={parent}/".encode() in f.read():
          return True
    except OSError:
      pass
  return False


@needs_root
def test_two_grading_processes_do_not_share_a_uid():
  parent = tempfile.mkdtemp(prefix="other-grader-")
  os.chmod(parent, 0o755)
  other = subprocess.Popen([sys.executable, "-c", _OTHER_GRADER, parent], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    # Grade here while the other process's program runs (it sleeps 2.5 s under its uid).
    while not _runs_in(parent) and other.poll() is None:
      time.sleep(0.005)
    ours = [v.run_program("import os\nprint(os.getuid())", CFG) for _ in range(3)]
    out, err = other.communicate(timeout=60)
  finally:
    if other.poll() is None:
      other.kill()
      other.wait()
    os.rmdir(parent)
  status, stdout = json.loads(out.strip().splitlines()[-1])
  assert (status, stdout.split("\n")[1:]) == ("passed", ["alive", ""]), (out, err)
  assert all(r.passed for r in ours), ours
  assert ours[0].stdout.strip() != stdout.split()[0]  # the first ran while the other's did


# ------------------------------------------------------------------ 5. non-root with threads

_NON_ROOT_CALLER = """
import json, os, sys, threading
from selfimprove_jax import verifiers as v  # imported as root: the base interpreter is root-only
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(40)]
for t in threads:
  t.start()
program = ("import os\\nfor _ in range(4):\\n  if os.fork() == 0:\\n    os._exit(0)\\n"
           "  os.wait()\\nprint('forked')")
try:
  r = v.run_program(program, v.SandboxConfig(timeout_s=10))
  print(json.dumps([os.geteuid(), r.status, r.stdout]))
except Exception as e:
  print(json.dumps([os.geteuid(), type(e).__name__, str(e)]))
finally:
  stop.set()
"""


@needs_root
def test_a_non_root_caller_with_many_threads_can_run_programs():
  uid = 60_500  # not in the password database, not in the sandbox range
  out = subprocess.run([sys.executable, "-c", _NON_ROOT_CALLER, str(uid)], cwd=REPO, text=True,
                       capture_output=True, timeout=60, check=False)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == [uid, "passed", "forked\n"], out


# ------------------------------------------------------------------ 6. forged verdicts

@pytest.mark.parametrize("program,status", [
    ("import os\nos._exit(90)", "failed"),
    ("import os\nos._exit(91)", "failed"),
    ("import os\nos._exit(92)", "failed"),
    ("import os, signal\nos._exit(128 + signal.SIGXCPU)", "failed"),
    ("raise SystemExit(137)", "failed"),
    ("import errno\nraise OSError(errno.EFBIG, 'File too large')", "failed"),
    ("import errno\nraise BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')",
     "failed"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)", "killed"),
])
def test_program_controlled_exits_do_not_forge_limit_verdicts(program, status):
  result = v.run_program(program, CFG)
  assert (result.status, result.passed) == (status, False), result


def test_a_real_cpu_limit_hit_is_still_reported():
  config = dataclasses.replace(CFG, timeout_s=8, cpu_s=1)
  result = v.run_program("while True:\n  pass", config)
  assert result.status == "cpu_limit", result


def test_without_namespaces_the_socket_filter_and_the_verdicts_hold(unix_listeners):
  directory, stream, _ = unix_listeners
  config = dataclasses.replace(CFG, isolation="none")
  program = (f"import socket\ntry:\n  socket.socket(socket.AF_UNIX).connect("
             f"{os.path.join(directory, 'stream.sock')!r})\n  print('REACHED')\n"
             f"except OSError as e:\n  print('blocked', type(e).__name__)")
  result = v.run_program(program, config)
  assert (result.status, result.stdout) == ("passed", "blocked PermissionError\n"), result
  assert "socket_filter" in result.isolation and "pid_namespace" not in result.isolation
  with pytest.raises(BlockingIOError):
    stream.accept()
  assert v.run_program("import os\nos._exit(91)", config).status == "failed"
  assert v.run_program("import os, signal\nos.kill(os.getpid(), 9)", config).status == "killed"


# ------------------------------------------------------------------ FIFOs and files in host /tmp

_PROBE_HOST_PATHS = """
import json, os
seen = {}
for path in PATHS:
  if not os.path.lexists(path):
    seen[path] = "absent"
    continue
  try:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, b"MARKER from the sandbox\\n")
    os.close(fd)
    seen[path] = "written"
  except OSError as e:
    seen[path] = f"present, {type(e).__name__} {e.errno}"
print(json.dumps(seen))
"""


@pytest.fixture
def host_temp_objects():
  """World-writable FIFOs (read ends open, non-blocking) in the host's /tmp and /dev/shm and a
  world-writable regular file in /tmp, like the ones other host processes keep there."""
  tag = f"selfimprove-sandbox-probe-{os.getpid()}"
  fifos = [os.path.join(d, f"{tag}.fifo") for d in ("/tmp", "/dev/shm") if os.path.isdir(d)]
  marker = os.path.join("/tmp", f"{tag}.txt")
  readers = []
  try:
    for path in fifos:
      os.mkfifo(path)
      os.chmod(path, 0o666)
      readers.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    with open(marker, "w") as f:
      f.write("host file\n")
    os.chmod(marker, 0o666)
    yield fifos, readers, marker
  finally:
    for fd in readers:
      os.close(fd)
    for path in (*fifos, marker):
      if os.path.lexists(path):
        os.remove(path)


def test_fifos_and_files_in_the_hosts_temp_dirs_are_invisible(host_temp_objects):
  fifos, readers, marker = host_temp_objects
  result = v.run_program(_PROBE_HOST_PATHS.replace("PATHS", repr([*fifos, marker])), CFG)
  assert result.status == "passed", result
  if "user_namespace" not in result.isolation:
    pytest.skip("a private /tmp needs user namespaces (see sandbox.py's docstring)")
  assert json.loads(result.stdout) == {path: "absent" for path in (*fifos, marker)}, result
  assert "private_tmp" in result.isolation, result.isolation
  for fd in readers:
    assert os.read(fd, 100) == b""  # no writer ever came: nothing, not even the marker
  with open(marker) as f:
    assert f.read() == "host file\n"


def test_no_temp_dir_is_hidden_where_the_interpreter_or_a_symlink_would_vanish():
  from selfimprove_jax.verifiers import _sandbox_child
  hide = _sandbox_child._dirs_to_hide
  assert "/tmp" in hide("/tmp/sandbox-x", sys.executable)
  assert hide("/tmp/sandbox-x", "/tmp/venv/bin/python") == []  # the program could not start
  link = tempfile.mkdtemp()
  try:
    os.symlink(REPO, os.path.join(link, "to-repo"))
    assert hide(os.path.join(link, "to-repo"), sys.executable) == []  # the link itself vanishes
  finally:
    os.remove(os.path.join(link, "to-repo"))
    os.rmdir(link)
