"""The notebooks under notebooks/ run top to bottom in a fresh kernel.

Each notebook ends with a cell that asserts its key numbers (the NFNet's residual variance against
its beta schedule, the AGC clip fraction against lambda, the fine-tuned accuracy against chance), so
a notebook that runs through is a notebook whose claims still hold. The committed files carry no
outputs; they are executed here on a copy, in memory, with the working directory and TMPDIR inside
pytest's tmp_path so that nothing they write lands in the checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Notebooks that take more than about a minute on two CPU cores (they still run in CI).
SLOW = {"adaptive_gradient_clipping", "finetune_and_predict", "update_rounds"}
# Per cell; generous because a shared CI machine can be several times slower than an idle one.
CELL_TIMEOUT_S = 900


def _params():
    return [
        pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if path.stem in SLOW else [])
        for path in NOTEBOOKS
    ]


def _kernel_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The kernel imports this checkout's code even where the package is installed from elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["TMPDIR"] = str(tmp_path)
    # The kernel's own inline backend renders the figures; a non-interactive MPLBACKEND from the
    # caller's shell would make every plt.show() a warning and the notebook figure-less.
    env.pop("MPLBACKEND", None)
    return env


def test_the_three_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {
        "signal_propagation",
        "adaptive_gradient_clipping",
        "finetune_and_predict",
    }
    assert SLOW <= {p.stem for p in NOTEBOOKS}, "SLOW names a notebook that does not exist"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} cell {index} has stored outputs; clear them before committing: "
                "python notebooks/strip_outputs.py"
            )
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", path.name


@pytest.mark.parametrize("path", _params())
def test_notebook_runs_and_its_assertions_hold(path: Path, tmp_path: Path, monkeypatch):
    # A user-level "python3" kernelspec may point at another interpreter; with the user data dir moved
    # away, "python3" resolves to this environment's ipykernel, which Jupyter runs with sys.executable.
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    notebook = nbformat.read(path, as_version=4)
    # One extra cell, on this in-memory copy only, reports which environment the kernel ran in.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    # A failing cell raises CellExecutionError with the cell's source and traceback in the message.
    client.execute(env=_kernel_env(tmp_path))

    # sys.prefix, not sys.executable: a venv's python is a symlink to the base interpreter, so only
    # the prefix tells this environment from another one built on the same Python.
    kernel_prefix = notebook.cells[-1].outputs[0]["text"].strip()
    assert os.path.realpath(kernel_prefix) == os.path.realpath(sys.prefix), (
        f"the notebook's kernel ran in {kernel_prefix}, not in this environment ({sys.prefix})"
    )
    figures = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert figures, f"{path.name} drew no figure"

