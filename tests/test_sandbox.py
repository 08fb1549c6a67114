"""The code sandbox against hostile programs, one attack per test, plus MBPP-style judging.

Every attack must be contained: no pass, the right status, the work directory gone, no process of
the sandbox uids left, and this test process unharmed. Parts that rely on an isolation layer the
machine does not provide (see ``sandbox.py``: uid drop needs root, namespaces need unprivileged
user namespaces) are skipped with that reason; on this project's machines all layers are in force.
"""
import dataclasses
import os
import socket
import time

import pytest

from selfimprove_jax import verifiers as v
from selfimprove_jax.verifiers import _sandbox_host

CFG = v.SandboxConfig(timeout_s=1.5, memory_bytes=256 << 20, max_processes=12,
                      max_output_bytes=4096, file_size_bytes=1 << 20)
ALL_LAYERS = ("uid_drop", "user_namespace", "network_namespace", "pid_namespace",
              "read_only_filesystem", "private_tmp", "socket_filter")


@pytest.fixture(scope="module")
def layers():
  result = v.run_program("print('ok')", CFG)
  assert result.passed and result.stdout == "ok\n", result
  return set(result.isolation)


def _require(layers, *needed):
  if not any(layer in layers for layer in needed):
    pytest.skip(f"needs one of the isolation layers {needed}; this machine gives {sorted(layers)}")


def _live_sandbox_processes():
  if os.geteuid() != 0:
    return []  # no dedicated uids without root: the pid namespace is what cleans up
  # Only uids no run holds: concurrent runs (other test workers) own the others' processes.
  return _sandbox_host.idle_processes(CFG.uid_base)


def _run_contained(program, config=CFG, *, status, passed=False):
  result = v.run_program(program, config)
  assert (result.status, result.passed) == (status, passed), result
  assert not os.path.exists(result.workdir), result.workdir
  assert _live_sandbox_processes() == []
  return result


def test_every_layer_is_in_force_here(layers):
  """Documents what this machine enforces; skipped (not failed) elsewhere, e.g. without root."""
  _require(layers, "uid_drop")
  assert layers == set(ALL_LAYERS)


def test_passing_program_output_and_cleanup():
  result = _run_contained("print('hello')\nassert 1 + 1 == 2", status="passed", passed=True)
  assert (result.stdout, result.stderr, result.returncode) == ("hello\n", "", 0)
  assert result.runtime_s < CFG.timeout_s


def test_failing_assert():
  result = _run_contained("assert 1 + 1 == 3, 'arithmetic'", status="failed")
  assert "AssertionError: arithmetic" in result.stderr


@pytest.mark.parametrize("early_exit", ["import sys; sys.exit(0)", "import os; os._exit(0)",
                                        "raise SystemExit"])
def test_exit_before_the_asserts_is_no_pass(early_exit):
  result = _run_contained(f"{early_exit}\nassert False", status="failed")
  assert result.returncode == 0  # a clean exit code alone does not make a pass


def test_infinite_loop_times_out():
  result = _run_contained("while True:\n  pass", status="timeout")
  assert CFG.timeout_s <= result.runtime_s < CFG.timeout_s + 1.5


def test_sleep_past_the_timeout():
  result = _run_contained("import time\nprint('start', flush=True)\ntime.sleep(30)",
                          status="timeout")
  assert result.stdout == "start\n" and result.runtime_s < CFG.timeout_s + 1.5


def test_cpu_limit():
  config = v.SandboxConfig(timeout_s=8, cpu_s=1, memory_bytes=256 << 20)
  result = _run_contained("while True:\n  pass", config, status="cpu_limit")
  assert result.runtime_s < config.timeout_s  # CPU seconds ran out before the wall clock did


def test_fork_bomb_hits_the_process_limit():
  _run_contained("import os\nwhile True:\n  os.fork()", status="process_limit")


def test_fork_bomb_that_survives_errors_is_bounded_and_cleaned_up():
  # Children park in sleep; the parent counts successful forks until refused, then keeps trying.
  program = """
import os, time
n = 0
deadline = time.time() + 0.8
while time.time() < deadline:
  try:
    if os.fork() == 0:
      time.sleep(600)
      os._exit(0)
    n += 1
  except BlockingIOError:
    pass
print(n, flush=True)
time.sleep(600)
"""
  # A wall clock well past the 0.8 s of forking, so a loaded machine still reaches the print.
  result = _run_contained(program, dataclasses.replace(CFG, timeout_s=6), status="timeout")
  assert 0 < int(result.stdout) <= CFG.max_processes


@pytest.mark.parametrize("program", ["x = bytearray(1 << 30)",
                                     "chunks = []\nwhile True:\n  chunks.append(b'x' * (1 << 20))"])
def test_memory_hog(program):
  # A generous wall clock: filling 256 MB a chunk at a time can take seconds on a loaded machine,
  # and the verdict must come from the memory limit, not the timeout.
  result = _run_contained(program, dataclasses.replace(CFG, timeout_s=10), status="memory")
  assert "MemoryError" in result.stderr


def test_huge_output_is_capped():
  result = _run_contained("while True:\n  print('x' * 1000)", status="output_limit")
  assert result.stdout_truncated and len(result.stdout) == CFG.max_output_bytes
  assert result.runtime_s < CFG.timeout_s


def test_a_flooded_channel_is_capped():
  # The prelude's channel fd is the program's argv[1] (see _sandbox_prelude); flooding it is a
  # forgery attempt the host caps like stdout.
  program = ("import os\nfd = int(open('/proc/self/cmdline', 'rb').read().split(b'\\0')[4])\n"
             "while True:\n  os.write(fd, b'x' * 65536)")
  config = dataclasses.replace(CFG, max_result_bytes=1 << 20)
  result = _run_contained(program, config, status="output_limit")
  assert "channel" in result.detail and not result.stdout_truncated


def test_file_size_limit():
  result = _run_contained("open('big', 'wb').write(b'x' * (2 << 20))", status="file_size_limit")
  assert "File too large" in result.stderr


def _write_attempt(path):
  return f"""
try:
  with open({path!r}, "w") as f:
    f.write("escaped")
  print("WROTE")
except OSError as e:
  print("blocked", type(e).__name__, e.errno)
"""


def test_writing_into_the_callers_directory_is_blocked(layers, tmp_path):
  _require(layers, "uid_drop", "read_only_filesystem")
  target = tmp_path / "escaped.txt"
  result = _run_contained(_write_attempt(str(target)), status="passed", passed=True)
  assert result.stdout.startswith("blocked") and not target.exists()


def test_writing_to_tmp_is_blocked(layers):
  # /tmp is world-writable, so only the read-only mount namespace stops this.
  _require(layers, "read_only_filesystem")
  target = f"/tmp/selfimprove-sandbox-escape-{os.getpid()}"
  try:
    result = _run_contained(_write_attempt(target) + "\nopen('inside.txt', 'w').write('ok')\n"
                            "print(open('inside.txt').read())", status="passed", passed=True)
    assert result.stdout == "blocked OSError 30\nok\n"  # EROFS outside, writable inside
    assert not os.path.exists(target)
  finally:
    if os.path.exists(target):
      os.remove(target)


def test_the_callers_environment_is_invisible(layers, monkeypatch):
  secret = f"s3cret-{os.getpid()}-{time.time_ns()}"
  monkeypatch.setenv("SELFIMPROVE_TEST_SECRET", secret)
  program = f"""
import os
print(sorted(os.environ))
for pid in ({os.getpid()}, {os.getppid()}):
  try:
    print(open(f"/proc/{{pid}}/environ", "rb").read())
  except OSError as e:
    print("blocked", type(e).__name__)
"""
  result = _run_contained(program, status="passed", passed=True)
  lines = result.stdout.splitlines()
  assert lines[0] == str(sorted(["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]))
  assert secret not in result.stdout + result.stderr
  if layers & {"uid_drop", "pid_namespace"}:
    assert all(line.startswith("blocked") for line in lines[1:]), lines


@pytest.fixture
def listener():
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  server.setblocking(False)
  yield server
  server.close()


def _assert_nobody_connected(server):
  with pytest.raises(BlockingIOError):
    server.accept()


def test_network_connection_through_socket_module_fails(listener):
  port = listener.getsockname()[1]
  program = f"""
import socket
for attempt in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1),
                lambda: socket.socket().connect(("127.0.0.1", {port}))):
  try:
    attempt()
    print("CONNECTED")
  except OSError as e:
    print("blocked", type(e).__name__)
"""
  result = _run_contained(program, status="passed", passed=True)
  assert result.stdout == "blocked PermissionError\nblocked PermissionError\n"
  _assert_nobody_connected(listener)


def test_network_connection_bypassing_the_guard_fails(layers, listener):
  _require(layers, "network_namespace")
  port = listener.getsockname()[1]
  program = f"""
import _socket
try:
  s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
  s.settimeout(1)
  s.connect(("127.0.0.1", {port}))
  print("CONNECTED")
except OSError as e:
  print("blocked", type(e).__name__)
"""
  result = _run_contained(program, status="passed", passed=True)
  assert result.stdout.startswith("blocked")
  _assert_nobody_connected(listener)


@pytest.mark.parametrize("attack", [
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.kill(0, signal.SIGKILL)",
    "os.kill(-1, signal.SIGKILL)",
])
def test_killing_the_parent_or_its_group_is_contained(attack):
  result = v.run_program(f"import os, signal\n{attack}\nimport time\ntime.sleep(30)", CFG)
  assert not result.passed and result.status in ("killed", "failed", "timeout"), result
  assert not os.path.exists(result.workdir) and _live_sandbox_processes() == []
  assert v.run_program("print(1)", CFG).passed  # this process and the sandbox still work


@pytest.mark.parametrize("attack", ["os.kill({pid}, signal.SIGKILL)",
                                    "os.killpg(os.getpgid({pid}), signal.SIGKILL)"])
def test_signalling_the_caller_by_pid_fails(layers, attack):
  _require(layers, "uid_drop", "pid_namespace")
  program = f"import os, signal\n{attack.format(pid=os.getpid())}"
  result = _run_contained(program, status="failed")
  assert "PermissionError" in result.stderr or "ProcessLookupError" in result.stderr


def test_run_programs_keeps_order_in_parallel():
  programs = [f"print({i})" if i % 3 else f"assert {i} < 0" for i in range(7)]
  results = v.run_programs(programs, CFG, max_workers=2)
  assert [r.passed for r in results] == [bool(i % 3) for i in range(7)]
  assert [r.stdout for r in results if r.passed] == [f"{i}\n" for i in range(7) if i % 3]


@pytest.mark.parametrize("field,value", [("timeout_s", 0), ("memory_bytes", -1),
                                         ("max_processes", 2), ("isolation", "chroot"),
                                         ("cpu_s", 0)])
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"SandboxConfig.{field}={value!r}"):
    v.SandboxConfig(**{field: value})


def test_setup_failure_raises_instead_of_judging():
  with pytest.raises(v.SandboxError, match="no interpreter"):
    v.run_program("print(1)", v.SandboxConfig(python="/nonexistent/python3"))


def test_returncode_and_detail_are_what_the_parent_saw():
  result = _run_contained("import os\nos._exit(3)", status="failed")
  assert (result.returncode, result.detail) == (3, "exit status 3 before its end")
  result = _run_contained("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
                          status="killed")
  assert result.returncode == -15 and result.detail.startswith("killed by SIGTERM")
  assert set(v.STATUSES) >= {"passed", "failed", "killed", "cpu_limit"}


# ------------------------------------------------------------------------------ MBPP-style

# (tests, correct solution, plausible wrong solution), written in the MBPP format.
MBPP = [
    (["assert max_of_three(1, 2, 3) == 3", "assert max_of_three(3, 2, 1) == 3",
      "assert max_of_three(2, 9, 4) == 9"],
     "def max_of_three(a, b, c):\n  return max(a, b, c)",
     "def max_of_three(a, b, c):\n  return a if a > b else b"),
    (["assert is_prime(2)", "assert not is_prime(1)", "assert is_prime(13)",
      "assert not is_prime(9)"],
     "def is_prime(n):\n  return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
     "def is_prime(n):\n  return all(n % d for d in range(2, n))"),
    (["assert reverse_words('a b c') == 'c b a'", "assert reverse_words('hi') == 'hi'"],
     "def reverse_words(s):\n  return ' '.join(s.split()[::-1])",
     "def reverse_words(s):\n  return s[::-1]"),
    (["assert count_vowels('Apple') == 2", "assert count_vowels('xyz') == 0"],
     "def count_vowels(s):\n  return sum(c in 'aeiouAEIOU' for c in s)",
     "def count_vowels(s):\n  return sum(c in 'aeiou' for c in s)"),
    (["assert fibonacci(1) == 1", "assert fibonacci(2) == 1", "assert fibonacci(10) == 55"],
     "def fibonacci(n):\n  a, b = 0, 1\n  for _ in range(n):\n    a, b = b, a + b\n  return a",
     "def fibonacci(n):\n  a, b = 0, 1\n  for _ in range(n + 1):\n    a, b = b, a + b\n  return a"),
    (["assert remove_duplicates([3, 1, 3, 2]) == [3, 1, 2]", "assert remove_duplicates([]) == []"],
     "def remove_duplicates(xs):\n  return list(dict.fromkeys(xs))",
     "def remove_duplicates(xs):\n  return sorted(set(xs))"),
    (["assert sum_digits(345) == 12", "assert sum_digits(0) == 0"],
     "def sum_digits(n):\n  return sum(int(d) for d in str(n))",
     "def sum_digits(n):\n  return n % 10"),
    (["assert is_palindrome('Level')", "assert not is_palindrome('abc')"],
     "def is_palindrome(s):\n  s = s.lower()\n  return s == s[::-1]",
     "def is_palindrome(s):\n  return s == s[::-1]"),
    (["assert second_smallest([1, 1, 2, 3]) == 2", "assert second_smallest([5, 4]) == 5"],
     "def second_smallest(xs):\n  return sorted(set(xs))[1]",
     "def second_smallest(xs):\n  return sorted(xs)[1]"),
    (["assert flatten([1, [2, [3, [4]]]]) == [1, 2, 3, 4]", "assert flatten([]) == []"],
     "def flatten(xs):\n  out = []\n  for x in xs:\n    out += flatten(x) if isinstance(x, list) "
     "else [x]\n  return out",
     "def flatten(xs):\n  out = []\n  for x in xs:\n    out += x if isinstance(x, list) else [x]\n"
     "  return out"),
]


def test_mbpp_reward_judges_ten_problems_right_and_wrong():
  completions, tests = [], []
  for i, (asserts, right, wrong) in enumerate(MBPP):
    # Three completion styles: a fenced block inside prose, MBPP's [BEGIN]/[DONE], bare code.
    dressed = (f"Here is my solution:\n```python\n{right}\n```\nIt works." if i % 3 == 0 else
               f"[BEGIN]\n{right}\n[DONE]" if i % 3 == 1 else right)
    completions += [dressed, wrong]
    tests += [asserts, asserts]
  completions.append("def f():\n  while True:\n    pass\nf()")  # a hang scores 0, like a failure
  tests.append(["assert f() is None"])
  completions.append("anything")  # a row without tests is not judged
  tests.append(None)
  # 5 s per program: on a loaded machine 1.5 s can time out a correct solution.
  reward = v.mbpp_reward(dataclasses.replace(CFG, timeout_s=5), max_workers=2)
  got = reward(["prompt"] * len(completions), completions, test_list=tests)
  assert got == [1.0, 0.0] * len(MBPP) + [0.0, None]
  assert _live_sandbox_processes() == []


def test_mbpp_setup_code_runs_first():
  reward = v.mbpp_reward(CFG)
  got = reward(["p", "p"], ["def g():\n  return K", "def g():\n  return K"],
               test_list=[["assert g() == 7"]] * 2, test_setup_code=["K = 7", "K = 8"])
  assert got == [1.0, 0.0]


@pytest.mark.parametrize("completion,code", [
    ("```python\nx = 1\n```", "x = 1\n"),
    ("Intro\n```py\ny = 2\n```\n```python\nz = 3\n```", "y = 2\n"),  # the first block
    ("```\nbare = True\n```", "bare = True\n"),
    ("[BEGIN]\n'def f():\n  return 1'\n[DONE]", "def f():\n  return 1"),
    ("[BEGIN]\nunfinished = 1", "unfinished = 1"),
    ("plain = 4", "plain = 4"),
])
def test_extract_code(completion, code):
  assert v.extract_code(completion) == code


def test_mbpp_program_and_reward_refuse_bad_columns():
  with pytest.raises(ValueError, match="non-empty list"):
    v.mbpp_program("x = 1", "assert x == 1")
  with pytest.raises(ValueError, match="needs the column 'test_list'"):
    v.mbpp_reward(CFG)(["p"], ["x = 1"], tests=[["assert x == 1"]])
