"""The layers of the folder tree hold: core/ imports neither api/ nor worker/; api/ sends work
through core.broker and never imports worker/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imported_top_levels(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(("layer", "forbidden"), [("core", {"api", "worker", "uisps"}), ("api", {"worker", "uisps"})])
def test_a_layer_imports_nothing_above_it(layer: str, forbidden: set[str]) -> None:
    files = sorted((REPO / layer).rglob("*.py"))
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_top_levels(path) & forbidden)
        for path in files
        if _imported_top_levels(path) & forbidden
    }
    assert len(files) > 10 and not offenders


def test_importing_every_core_module_loads_no_module_of_a_layer_above() -> None:
    # Catches what the statements above cannot see: importlib.import_module, __import__, and
    # imports made through another package (migrations/, which core.db.migrate loads).
    code = (
        "import importlib, pkgutil, sys, core\n"
        "names = [m.name for m in pkgutil.walk_packages(core.__path__, 'core.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), sorted({m.split('.')[0] for m in sys.modules} & {'api', 'worker', 'uisps'}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    count, above = run.stdout.strip().split(" ", 1)
    assert int(count) > 10 and above == "[]"


def test_starting_the_api_loads_no_worker_module() -> None:
    code = "import sys, api.app\napi.app.create_app()\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'worker'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
