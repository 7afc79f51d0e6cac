"""The core's modules import each other in layers: no circle at module level, and the command line on top.

Read from the source with ``ast``, nothing imported: an edge A -> B is an import of B that runs when A is
imported (at module level, including under ``if``/``try``, but not under ``if TYPE_CHECKING``).
``from peftkit import x`` is an edge to ``peftkit.x`` when x is a submodule, and to the module that
defines x when x is one of the names ``peftkit`` exports lazily (``_EXPORTS``).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import peftkit
import pytest

CORE = Path(peftkit.__file__).parent
CLI = "peftkit.cli"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for handler in node.handlers:
                    walk(handler.body)
                walk(node.orelse)
                walk(node.finalbody)
            elif isinstance(node, ast.With):
                walk(node.body)

    walk(tree.body)
    return found


def lazy_exports(modules: dict[str, Path], package: str) -> dict[str, str]:
    """``_EXPORTS`` of the package's ``__init__``: name -> the module that defines it."""
    for node in ast.parse(modules[package].read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "_EXPORTS" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    return {}


def imported_modules(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path], exports: dict
) -> set[str]:
    """The package's modules an import statement in ``module`` imports."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:  # relative: from the module's package, up level - 1
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    found = {base} if base in modules else set()
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            found.add(f"{base}.{alias.name}")
        elif alias.name in exports.get(base, {}):
            found.add(exports[base][alias.name])
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    modules = module_files(root)
    exports = {root.name: lazy_exports(modules, root.name)}
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in module_level_imports(tree):
            edges |= imported_modules(node, module, path.name == "__init__.py", modules, exports)
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as ``[a, b, ..., a]``; None when the graph is acyclic."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions, TYPE_CHECKING ones too."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


# --- the core --------------------------------------------------------------------------------------
def test_the_cores_module_level_imports_have_no_circle():
    cycle = find_cycle(import_graph(CORE))
    assert cycle is None, "module-level import circle in the core: " + " -> ".join(cycle)


def test_no_core_module_outside_the_command_line_imports_it():
    modules = module_files(CORE)
    exports = {"peftkit": lazy_exports(modules, "peftkit")}
    importers = {}
    for module, path in modules.items():
        if module == CLI or module.startswith(CLI + ".") or module == "peftkit.__main__":
            continue  # the CLI itself, and `python -m peftkit`, which only runs it
        for node in all_imports(ast.parse(path.read_text())):
            found = imported_modules(node, module, path.name == "__init__.py", modules, exports)
            if any(name == CLI or name.startswith(CLI + ".") for name in found):
                importers[module] = node.lineno
    assert importers == {}, f"core modules that import {CLI} (module: line): {importers}"


def test_the_command_lines_deferred_imports_each_say_why():
    """An import inside a function of peftkit.cli is there only to keep `peftkit --help` light, and says so."""
    silent = []
    for module, path in module_files(CORE).items():
        if not (module == CLI or module.startswith(CLI + ".")):
            continue
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in line and not above.startswith("#"):
                        silent.append(f"{module}:{node.lineno}")
    assert silent == [], f"deferred imports without a comment saying why: {silent}"


# --- the checker itself ------------------------------------------------------------------------------
def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return package


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        (  # a direct circle through `from pkg import x`, x a submodule
            {"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "import pkg.a\n"},
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        (  # through a relative import and a lazily exported name
            {
                "__init__.py": '_EXPORTS = {"Thing": "pkg.c"}\n',
                "a.py": "from .b import helper\n",
                "b.py": "from pkg import Thing\n",
                "c.py": "from pkg.a import x\n",
            },
            ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ),
        (  # a package's __init__ imports its modules, and one imports a sibling: no circle
            {
                "__init__.py": "",
                "sub/__init__.py": "from pkg.sub import leaf, user\n",
                "sub/leaf.py": "",
                "sub/user.py": "from pkg.sub.leaf import x\n",
            },
            None,
        ),
        (  # ... but a module that takes a name from its package's __init__ closes a circle
            {
                "__init__.py": "",
                "sub/__init__.py": "from pkg.sub import user\nhelper = 1\n",
                "sub/user.py": "from pkg.sub import helper\n",
            },
            ["pkg.sub", "pkg.sub.user", "pkg.sub"],
        ),
        (  # under TYPE_CHECKING and inside a function: no edge
            {
                "__init__.py": "",
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
                "b.py": "import pkg.a\ndef f():\n    from pkg import a\n",
            },
            None,
        ),
        (  # inside try/if at module level: an edge
            {
                "__init__.py": "",
                "a.py": "try:\n    import pkg.b\nexcept ImportError:\n    pass\n",
                "b.py": "import sys\nif sys.platform:\n    from pkg import a\n",
            },
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
    ],
)
def test_the_checker_finds_a_circle_and_only_a_circle(tmp_path, files, cycle):
    assert find_cycle(import_graph(_package(tmp_path, files))) == cycle
