"""The house of docs/ARCHITECTURE.md, checked on the code: rooms import only downwards, the chain
of rooms from an entry point is short, the lower floors stay free of Lightning and Hydra, and
files keep to their sizes."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "nfnet"
ENTRIES = ("train.py", "eval.py", "predict.py", "export.py", "pack.py")

# The floor of each room (docs/ARCHITECTURE.md); a room imports from lower floors or itself.
FLOORS = {"errors": 0, "data": 1, "models": 1, "optim": 1, "inference": 2, "training": 3, "app": 4, "sweeps": 4,
          "entries": 5}
MAX_ROOM_LEVELS = 5
PLAIN_PYTORCH = ("data", "models", "optim", "inference", "errors")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "entries"


def _sources() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    for entry in ENTRIES:
        modules[entry.removesuffix(".py")] = ROOT / entry
    return modules


@lru_cache
def imports() -> dict[str, set[str]]:
    """Every module's imports of the package and of the frameworks, at any depth in the file."""
    found = {}
    for name, path in _sources().items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[name] = {n for n in names if n.split(".")[0] in ("nfnet", *FRAMEWORKS)}
    return found


def test_rooms_import_only_from_lower_floors():
    upward = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets
        if target.startswith("nfnet.") and FLOORS[room_of(target)] > FLOORS[room_of(module)]
    ]
    assert not upward, upward


def test_the_chain_of_rooms_from_an_entry_point_is_at_most_five_levels():
    edges: dict[str, set[str]] = {}
    for module, targets in imports().items():
        for target in targets:
            if target.startswith("nfnet.") and room_of(target) != room_of(module):
                edges.setdefault(room_of(module), set()).add(room_of(target))

    @lru_cache
    def depth(room: str) -> int:
        return max((1 + depth(lower) for lower in edges.get(room, ())), default=0)

    assert depth("entries") <= MAX_ROOM_LEVELS, edges


@pytest.mark.parametrize("room", PLAIN_PYTORCH)
def test_the_lower_floors_import_no_framework(room):
    # The datamodule is the one Lightning piece of data/ (DESIGN.md).
    found = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        if room_of(module) == room and module != "nfnet.data.datamodule"
        for target in targets
        if target.split(".")[0] in FRAMEWORKS
    ]
    assert not found, found


def test_inference_loads_and_runs_weights_without_lightning_or_hydra():
    # Transitively too: importing the inference room must not pull a framework in.
    code = (
        "import sys\n"
        "import nfnet.inference.classifier, nfnet.inference.evaluation, nfnet.inference.predict, nfnet.inference.export\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra', 'omegaconf'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_sizes_of_the_house():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 3, loose
    big = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big
    assert len((PACKAGE / "training" / "module.py").read_text().splitlines()) <= 220
