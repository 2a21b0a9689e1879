"""The code base stays ruff-clean (lint and format), its imports go one way without cycles and its files stay
short; drift fails the test run."""

import ast
import graphlib
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
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


PUBLISHING = ("tipcap.card", "tipcap.hub")
"""The modules that save, describe and publish models; they import the model, never the other way."""

MAX_LINES = 500
"""The most lines a file of the package may have."""

TOY, GRID, DEMO, APP, CLI = "tipcap.toy", "tipcap.grid", "tipcap.demo", "tipcap.app", "tipcap.cli"


@dataclass(frozen=True)
class Import:
    """One import statement's target: the deepest tipcap module it names, and whether it runs (an import
    under ``if TYPE_CHECKING:`` never does)."""

    module: str
    runs: bool


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in sorted((ROOT / "tipcap").rglob("*.py"))}


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def tipcap_imports(module: str) -> set[Import]:
    """The tipcap modules ``module`` imports, at module level or inside functions, relative imports
    resolved; ``from tipcap.x import y`` names ``tipcap.x.y`` when that is a module. The package root
    itself is left out: Python runs it before any of its submodules, so importing it starts nothing."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[Import] = set()

    def visit(node: ast.AST, runs: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        found.update(Import(name, runs) for name in names if name.startswith("tipcap."))
        for child in ast.iter_child_nodes(node):
            visit(child, runs and not is_type_checking(node))

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


IMPORTS = {module: tipcap_imports(module) for module in MODULES}


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imports_of(importers: Iterable[str], forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    """Each (importer, imported) pair from one of ``importers`` to a module in a ``forbidden`` package."""
    return sorted(
        (module, target.module)
        for module in importers
        for target in IMPORTS[module]
        if within(target.module, *forbidden)
    )


def modules_in(*packages: str) -> list[str]:
    return [module for module in MODULES if within(module, *packages)]


def test_every_import_names_a_module_of_the_package():
    """The graph below is only as good as its resolution of import statements."""
    unknown = [(m, i.module) for m, targets in IMPORTS.items() for i in targets if i.module not in MODULES]
    assert not unknown, unknown


def test_io_is_the_ground_floor():
    assert {i.module for i in IMPORTS["tipcap.io"]} <= {"tipcap.errors"}


def test_library_imports_no_upper_tier():
    """The library (every module but the toy wing, the grid, the demo, the app and the command line) knows
    none of them; worlds plug their scorers and prompt sources into the library's registries."""
    library = [m for m in MODULES if not within(m, TOY, GRID, DEMO, APP, CLI)]
    assert not imports_of(library, (TOY, GRID, DEMO, APP, CLI))


def test_toy_wing_and_grid_do_not_know_each_other():
    """Both stand on the library alone, side by side; the demo and the app put them together."""
    assert not imports_of(modules_in(TOY), (GRID, DEMO, APP, CLI))
    assert not imports_of(modules_in(GRID), (TOY, DEMO, APP, CLI))


def test_only_the_command_line_imports_the_command_line():
    assert not imports_of(modules_in(DEMO, APP), (CLI,))


def test_model_does_not_import_publishing():
    """Saving, model cards and the hub sit above the model."""
    assert not imports_of(modules_in("tipcap.model"), PUBLISHING)


def test_imports_have_no_cycle():
    """No chain of imports that run (at module level or inside functions) leads from a module back to
    itself; imports for type checking only never run and are left out."""
    graph = {module: {i.module for i in targets if i.runs} for module, targets in IMPORTS.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_no_file_is_over_the_line_limit():
    """Every file of the package (sources, page assets, resources) stays short enough to read whole."""
    files = [p for p in (ROOT / "tipcap").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    lengths = {p.relative_to(ROOT).as_posix(): p.read_bytes().count(b"\n") for p in files}
    too_long = {path: n for path, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines: {too_long}"


def test_the_model_class_reads_in_one_sitting():
    """`TIPCap` is the module alone (captioning, folders and publishing live beside it): under 250 lines."""
    tree = ast.parse((ROOT / "tipcap" / "model.py").read_text(encoding="utf-8"))
    (model,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "TIPCap"]
    assert model.end_lineno - model.lineno + 1 < 250
