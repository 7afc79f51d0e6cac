"""``peftkit new-method``: the package it writes installs, registers its method and passes its own tests.

The end-to-end test installs the generated package as a user would, but into a folder of its own
(``pip install --no-deps --target``) put on ``PYTHONPATH`` of subprocesses: its ``.dist-info`` carries
the entry point, so discovery finds it there and this environment stays untouched. Refusals run
in-process with click's runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from peftkit.cli import make_cli
from peftkit.discovery import ALLOW_ENV, BLOCK_ENV

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ALLOW_ENV, BLOCK_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{' '.join(args)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    return run.stdout


def test_generated_package_installs_registers_and_passes_its_tests(tmp_path: Path) -> None:
    out = _run([sys.executable, "-m", "peftkit", "new-method", "mymethod"], cwd=tmp_path)
    package = tmp_path / "peftkit-mymethod"
    assert f"Created {package.name}/" in out
    assert sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file()) == [
        "CHANGELOG.md",
        "README.md",
        "peftkit_mymethod/__init__.py",
        "peftkit_mymethod/config.py",
        "peftkit_mymethod/layer.py",
        "peftkit_mymethod/plugin.py",
        "pyproject.toml",
        "tests/test_conformance.py",
    ]
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    assert project["name"] == "peftkit-mymethod"
    assert project["entry-points"]["peftkit"] == {"mymethod": "peftkit_mymethod.plugin"}
    assert "peftkit>=0.2,<1" in project["dependencies"]
    assert any(dep.startswith("torch") for dep in project["dependencies"])
    assert "pytest>=8" in project["optional-dependencies"]["test"]

    site = tmp_path / "site"
    _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
         "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(package)],
        cwd=tmp_path,
    )  # fmt: skip
    env = _env(site)
    report = json.loads(_run([sys.executable, "-m", "peftkit", "methods", "--json"], cwd=tmp_path, env=env))
    ours = [row for row in report["methods"] if row["name"] == "mymethod"]
    assert ours, f"mymethod is not listed: {[row['name'] for row in report['methods']]}"
    assert ours[0]["peft_type"] == "MYMETHOD"
    assert ours[0]["family"] == "weight-delta"
    assert ours[0]["distribution"] == "peftkit-mymethod"
    assert ours[0]["version"] == "0.1.0"
    assert ours[0]["location"].startswith(str(site))
    assert report["broken"] == []
    # loading the plugin imports no torch, so listing stays fast; the package still exports its layer
    check = (
        "import sys, peftkit_mymethod.plugin\n"
        "print('torch' in sys.modules)\n"
        "from peftkit_mymethod import MymethodLayer\n"
        "print(MymethodLayer.__module__, 'torch' in sys.modules)\n"
    )
    assert _run([sys.executable, "-c", check], cwd=tmp_path, env=env).split() == [
        "False",
        "peftkit_mymethod.layer",
        "True",
    ]

    # the generated tests, as generated: the conformance kit (its CI profile) and the config's messages
    tests = _run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests"], cwd=package, env=env)
    suite = "tests/test_conformance.py::TestMymethodConformance"
    for prop in ("registered", "identity_at_init[cpu]", "merge[cpu]", "save_load[cpu]", "training_step[cpu]"):
        assert f"{suite}::test_{prop} PASSED" in tests, tests
    assert "tests/test_conformance.py::test_rank_must_be_a_positive_integer PASSED" in tests, tests


@pytest.mark.parametrize(
    ("name", "folder", "distribution", "peft_type", "config_class"),
    [
        ("My-Method", "peftkit-my-method", "peftkit-my-method", "MY_METHOD", "MyMethodConfig"),
        ("rank_two", "peftkit-rank-two", "peftkit-rank-two", "RANK_TWO", "RankTwoConfig"),
    ],
)
def test_names_are_normalised(tmp_path, name, folder, distribution, peft_type, config_class) -> None:
    result = CliRunner().invoke(make_cli(), ["new-method", name, "--directory", str(tmp_path)])
    assert result.exit_code == 0, result.output
    root = tmp_path / folder
    method = peft_type.lower()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == distribution
    assert project["entry-points"]["peftkit"] == {method: f"peftkit_{method}.plugin"}
    config = (root / f"peftkit_{method}" / "config.py").read_text()
    assert f"class {config_class}(PeftConfig):" in config
    assert f'peft_type: str = "{peft_type}"' in config
    assert f'method: ClassVar[str] = "{method}"' in config
    # every generated Python file is valid Python
    for path in root.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")


@pytest.mark.parametrize("name", ["1method", "my method", "my--method", "method-", "lo.ra", "é", ""])
def test_refuses_a_name_that_cannot_be_a_package(tmp_path: Path, name: str) -> None:
    result = CliRunner().invoke(make_cli(), ["new-method", name, "--directory", str(tmp_path)])
    assert result.exit_code == 2
    assert f"Error: {name!r} is not a valid method name: use letters, digits, '-' and '_'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_python_keyword(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_cli(), ["new-method", "lambda", "--directory", str(tmp_path)])
    assert result.exit_code == 2
    assert "Error: 'lambda' is not a valid method name: it is a Python keyword" in result.output


def test_refuses_an_existing_folder_and_leaves_it_alone(tmp_path: Path) -> None:
    existing = tmp_path / "peftkit-mymethod"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(make_cli(), ["new-method", "mymethod", "--directory", str(tmp_path)])
    assert result.exit_code == 2
    assert f"Error: {str(existing)!r} already exists: choose another name or remove it first" in result.output
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]


def test_refuses_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(make_cli(), ["new-method", "mymethod", "--directory", str(missing)])
    assert result.exit_code == 2
    assert f"Error: the directory {str(missing)!r} does not exist" in result.output


def test_is_a_built_in_command_listed_in_help() -> None:
    cli = make_cli()
    assert "new-method" in cli.builtin_commands
    result = CliRunner().invoke(cli, ["new-method", "--help"])
    assert result.exit_code == 0
    assert "Usage: peftkit new-method [OPTIONS] NAME" in result.output
    assert "--directory DIRECTORY" in result.output
