"""Every notebook in colabs/ runs top to bottom in a fresh Jupyter kernel at smoke size.

The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH, so nothing is
installed globally) with SELFIMPROVE_SMOKE=1, one CPU device and a temporary working directory;
it imports selfimprove_jax from this checkout. A failing cell fails the test with its traceback.
"""
import ast
import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
KERNEL = "selfimprove-colab-test"
CELL_TIMEOUT_S = 300
COLAB_GUARD = "'google.colab' in sys.modules"
# What a notebook may import besides the standard library: the package, what it depends on for
# arrays and figures, and IPython's display helpers (present in Colab and in any Jupyter kernel).
ALLOWED_IMPORTS = {"selfimprove_jax", "jax", "numpy", "matplotlib", "IPython"}


def _code_cells(path: pathlib.Path) -> list[str]:
  return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
  """A kernelspec that launches sys.executable (a global "python3" spec may launch another
  interpreter), with its connection file and IPython profile in tmp_path."""
  spec = tmp_path / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  env = {"SELFIMPROVE_SMOKE": "1", "JAX_PLATFORMS": "cpu",
         # One device: the 8 fake devices of conftest.py only slow the notebooks down.
         "XLA_FLAGS": "",
         "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
         "IPYTHONDIR": str(tmp_path / "ipython")}
  spec.joinpath("kernel.json").write_text(json.dumps({
      # Plain tracebacks: a failing cell's error is read in a CI log, not a terminal.
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
               "--InteractiveShell.colors=nocolor"],
      "display_name": "selfimprove_jax test kernel", "language": "python", "env": env}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  return KERNEL


def _check_install_cell(path: pathlib.Path) -> None:
  """The first code cell pip-installs the package inside `if 'google.colab' in sys.modules:` and
  nowhere else, so it does nothing outside Colab."""
  cells = _code_cells(path)
  assert cells, f"{path.name} has no code cell"
  source = cells[0]
  try:
    body = ast.parse(source).body
  except SyntaxError:
    pytest.fail(f"{path.name}: the first code cell must be plain Python guarded by "
                f"`if {COLAB_GUARD}:` (a `!pip` line would also install outside Colab):\n{source}")
  guarded = [n for n in body if isinstance(n, ast.If) and ast.unparse(n.test) == COLAB_GUARD]
  assert guarded and "pip" in ast.unparse(guarded[0]), (
      f"{path.name}: the first code cell does not pip-install inside `if {COLAB_GUARD}:`:\n{source}")
  unguarded = [ast.unparse(n) for n in body if n is not guarded[0] and "pip" in ast.unparse(n)]
  assert not unguarded, f"{path.name}: pip outside the Colab guard: {unguarded}"


def _check_imports(path: pathlib.Path) -> None:
  """Colab has the package and its dependencies, not this repository's other folders."""
  found = set()
  for source in _code_cells(path):
    lines = [l for l in source.splitlines() if not l.lstrip().startswith(("!", "%"))]
    for node in ast.walk(ast.parse("\n".join(lines))):
      if isinstance(node, ast.Import):
        found.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        found.add(node.module.split(".")[0])
  extra = found - ALLOWED_IMPORTS - set(sys.stdlib_module_names)
  assert not extra, f"{path.name} imports {sorted(extra)}; notebooks import only {ALLOWED_IMPORTS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook(path, kernel_name, tmp_path):
  # Checked before any cell runs: an unguarded install cell would pip-install into this venv.
  _check_install_cell(path)
  _check_imports(path)
  nb = nbformat.read(path, as_version=4)
  # A last cell reports which interpreter and which selfimprove_jax the notebook actually used.
  nb.cells.append(nbformat.v4.new_code_cell(
      "import sys, selfimprove_jax\nprint(sys.executable)\nprint(selfimprove_jax.__file__)"))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(cwd)}}).execute()
  printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).splitlines()
  assert printed == [sys.executable, str(ROOT / "selfimprove_jax" / "__init__.py")]
