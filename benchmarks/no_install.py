"""peftkit's packages on a Python that cannot install them, for ``benchmarks/gpu.sh --no-install``.

A lent GPU machine has torch, transformers, PEFT, pytest and hypothesis, no network, and no pip that can
install anything. Our packages run there from the checkout: their folders go on ``PYTHONPATH``, and the
entry points that find them (``peftkit`` for the plugins, ``pytest11`` for the conformance kit's pytest
plugin) come from minimal ``<name>-<version>.dist-info`` folders (``METADATA``, ``entry_points.txt``)
written from each ``pyproject.toml`` into a folder that goes on ``PYTHONPATH`` too. Stdlib only; it reads
TOML with ``tomllib`` (Python 3.11+) or, on 3.10, ``tomli``. Run it from the repository root:

    python -m benchmarks.no_install metadata DIR   write the dist-info folders into DIR; print the PYTHONPATH
                                                   (DIR, then the package folders) that finds our packages
    python -m benchmarks.no_install check          with that PYTHONPATH: what this Python has of what the
                                                   run needs; exit 1 if something needed is missing or one
                                                   of our packages is found anywhere but the checkout
    python -m benchmarks.no_install missing PATH...
                                                   for each test file and conftest.py under PATH (or each
                                                   file PATH), the modules its module-level imports name
                                                   that this Python cannot find: "FILE<TAB>a,b" lines
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLER = "benchmarks/no_install.py"  # the INSTALLER file of each dist-info written here
# what every stage needs beyond the core's own dependencies; then what some tests or sections need
NEEDED = ["pytest", "hypothesis"]
OPTIONAL = ["peft", "bitsandbytes", "accelerate", "datasets", "trl", "sentence_transformers", "diffusers"]


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise SystemExit(
                f"{INSTALLER}: reading pyproject.toml needs Python 3.11 or newer (tomllib), or the tomli "
                f"package; this is Python {platform.python_version()} without tomli. Point PYTHON at a newer "
                "Python."
            ) from None
    return tomllib


def pyprojects(root: Path = ROOT) -> list[Path]:
    """The core's pyproject.toml, then each plugin's and each third-party example's."""
    found = [root / "pyproject.toml"]
    for pattern in ("plugins/*/pyproject.toml", "examples/third_party/*/pyproject.toml"):
        found += sorted(root.glob(pattern))
    return [path for path in found if path.is_file()]


def read_project(pyproject: Path) -> dict:
    """name, version, entry_points ({group: {name: value}}) and the folder its packages are imported from."""
    data = _toml().loads(pyproject.read_text())
    project = data["project"]
    groups = {group: dict(eps) for group, eps in project.get("entry-points", {}).items()}
    if project.get("scripts"):
        groups["console_scripts"] = dict(project["scripts"])
    package_dir = data.get("tool", {}).get("setuptools", {}).get("package-dir", {}).get("", "")
    return {
        "name": project["name"],
        "version": project["version"],
        "entry_points": groups,
        "dependencies": project.get("dependencies", []),
        "optional_dependencies": project.get("optional-dependencies", {}),
        "folder": Path(os.path.abspath(pyproject.parent / package_dir)),
    }


def write_dist_info(project: dict, into: Path) -> Path:
    """A minimal ``<name>-<version>.dist-info`` that importlib.metadata reads: METADATA, entry_points.txt."""
    normalized = re.sub(r"[-_.]+", "_", project["name"]).lower()
    folder = into / f"{normalized}-{project['version']}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, eps in project["entry_points"].items():
        lines += [f"[{group}]", *(f"{name} = {value}" for name, value in eps.items()), ""]
    (folder / "entry_points.txt").write_text("\n".join(lines))
    (folder / "INSTALLER").write_text(INSTALLER + "\n")
    return folder


def metadata(into: Path, root: Path = ROOT) -> list[Path]:
    """Write every package's dist-info into ``into``; the PYTHONPATH entries: ``into``, then the package folders.

    ``into`` comes first: importlib.metadata takes the first distribution of a name on the path, and a
    package folder may hold an ``*.egg-info`` of an older version, left by an editable install.
    """
    into.mkdir(parents=True, exist_ok=True)
    folders = []
    for pyproject in pyprojects(root):
        project = read_project(pyproject)
        write_dist_info(project, into)
        folders.append(project["folder"])
    return [Path(os.path.abspath(into)), *folders]


def _module(requirement: str) -> str:
    """The module a requirement's distribution is imported as (ours and our dependencies: the same name)."""
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    return name.replace("-", "_").lower()


def _version(module: str) -> str:
    for name in (module, module.replace("_", "-")):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return "(version unknown)"


def check(root: Path = ROOT) -> int:
    """Print what this Python has of what the run needs, and where it finds our packages; 1 when lacking."""
    projects = [read_project(path) for path in pyprojects(root)]
    core = projects[0]
    needed = [_module(r) for r in core["dependencies"]] + NEEDED
    problems = []
    print(f"python {platform.python_version()} at {sys.executable}")
    for title, modules in (("needed", needed), ("optional", OPTIONAL)):
        found = []
        for module in dict.fromkeys(modules):
            if importlib.util.find_spec(module) is None:
                found.append(f"{module} MISSING" if title == "needed" else f"{module} missing")
                if title == "needed":
                    problems.append(f"{module} is not importable")
            else:
                found.append(f"{module} {_version(module)}")
        print(f"{title}: {', '.join(found)}")
    print("our packages (code from the checkout, metadata written by benchmarks/no_install.py):")
    for project in projects:
        try:
            dist = md.distribution(project["name"])
        except md.PackageNotFoundError:
            problems.append(f"{project['name']}: importlib.metadata finds no distribution")
            continue
        where = getattr(dist, "_path", None)
        if (dist.read_text("INSTALLER") or "").strip() != INSTALLER:
            problems.append(f"{project['name']}: importlib.metadata finds another install of it, at {where}")
        tops = {
            ep.split(":")[0].split(".")[0] for eps in project["entry_points"].values() for ep in eps.values()
        }
        codes = []
        for top in sorted(tops):
            spec = importlib.util.find_spec(top)
            origin = Path(os.path.abspath(spec.origin)) if spec and spec.origin else None  # links kept
            if origin is None or not origin.is_relative_to(project["folder"]):
                problems.append(
                    f"{project['name']}: {top} is imported from {origin}, not {project['folder']}"
                )
            codes.append(f"{top} from {origin.parent if origin else None}")
        print(f"  {dist.metadata['Name']} {dist.version}: metadata {where}; {', '.join(codes)}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def _imported(path: Path, seen: set[Path]) -> list[str]:
    """Module names the file imports at module level, following imports of its package's modules or siblings."""
    if path in seen:
        return []
    seen.add(path)
    names = []
    package = path.parent.name if (path.parent / "__init__.py").is_file() else None
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == package:  # from benchmarks import training_step: read training_step.py too
                modules += [f"{package}.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if (
                package
                and parts[0] == package
                and len(parts) == 2
                and (path.parent / f"{parts[1]}.py").is_file()
            ):
                names += _imported(path.parent / f"{parts[1]}.py", seen)
            elif not package and (path.parent / f"{parts[0]}.py").is_file():
                # a helper beside a test (its conftest.py puts the folder on sys.path): read it too
                names += _imported(path.parent / f"{parts[0]}.py", seen)
            else:
                names.append(parts[0])
    return names


def missing(path: Path) -> list[str]:
    """The modules that the file's module-level imports (and its siblings') name and this Python lacks."""
    return sorted({name for name in _imported(path, set()) if importlib.util.find_spec(name) is None})


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*.py")
        if p.name == "conftest.py" or p.name.startswith("test_") or p.stem.endswith("_test")
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "metadata":
        print(os.pathsep.join(str(path) for path in metadata(Path(args[1]))))
        return 0
    if args == ["check"]:
        return check()
    if len(args) >= 2 and args[0] == "missing":
        for arg in args[1:]:
            for path in _files(Path(arg)):
                lacking = missing(path)
                if lacking:
                    print(f"{path}\t{','.join(lacking)}")
        return 0
    print(__doc__.split("\n\n", 2)[2].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
