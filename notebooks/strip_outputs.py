"""Clear outputs and execution counts from notebooks, in place, before they are committed.

    python notebooks/strip_outputs.py                 # every notebook in this folder
    python notebooks/strip_outputs.py path/to/x.ipynb # only these

The notebooks are executed by the test suite (tests/test_notebooks.py), so stored outputs would only
go stale and bloat the diff; that test also fails while a notebook still carries outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Clears `path` in place; returns whether anything changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
    if changed:
        nbformat.write(notebook, path)
    return changed


def main(argv: list[str]) -> None:
    paths = [Path(a) for a in argv] or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    for path in paths:
        print(f"{path}: {'cleared' if strip(path) else 'already clean'}")


if __name__ == "__main__":
    main(sys.argv[1:])
