"""The code base stays ruff-clean (lint and format) and its imports go one way; drift fails the test run."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is part of the test extra: pip install -e '.[test]'"
    result = subprocess.run(
        [ruff, *command, "tipcap", "tests", "benchmarks", "tools"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def tipcap_imports(path: Path) -> set[str]:
    """The tipcap modules a file imports, those imported inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] == "tipcap"}


def layer(module: str) -> int:
    """0 for the library, then 1 for the grid, 2 for the demo that runs one and the web app that serves its
    models, 3 for the command line."""
    upper = (("tipcap.grid",), ("tipcap.demo", "tipcap.app"), ("tipcap.cli",))
    inside = (module + ".").startswith
    return next((rank for rank, tops in enumerate(upper, 1) if any(inside(t + ".") for t in tops)), 0)


def test_imports_go_one_way():
    """io is the ground floor; no module imports one of a higher layer (the toy world knows no grid)."""
    imports = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): tipcap_imports(path)
        for path in (ROOT / "tipcap").rglob("*.py")
    }
    assert imports["tipcap.io"] <= {"tipcap.errors"}
    upward = [(m, i) for m, names in imports.items() for i in names if layer(i) > layer(m)]
    assert not upward, upward
