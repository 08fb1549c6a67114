"""An outside battery's hostile programs that the sandbox once let through (issue 19).

One test (or parametrized family) per item; each reproduced the escape before the fix. Parts that
need a layer this machine may lack (root for the uid drop, user namespaces) skip with the reason.
"""
import json
import os
import subprocess
import sys
import tempfile
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
  return [pid for uid in range(CFG.uid_base, CFG.uid_base + _sandbox_host.UID_SLOTS)
          for pid in _sandbox_host.processes_of(uid)] if _ROOT else []


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
  for pid in _live_sandbox_processes():
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
