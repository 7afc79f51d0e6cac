"""benchmarks/no_install.py: our packages' entry-point metadata without installing them, for gpu.sh --no-install."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# by its path: pytest's importlib mode, run as `pytest` (tox), does not put the repository on sys.path
_spec = importlib.util.spec_from_file_location("benchmarks_no_install", ROOT / "benchmarks" / "no_install.py")
no_install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(no_install)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def repo(tmp_path):
    """A core (code under core/) and one plugin, as their pyproject.toml files declare them."""
    root = tmp_path / "repo"
    _write(
        root / "pyproject.toml",
        '[project]\nname = "peftkit"\nversion = "9.8.7"\ndependencies = ["torch>=2.4"]\n'
        '[project.scripts]\npeftkit = "peftkit.cli:main"\n'
        '[project.entry-points.pytest11]\npeftkit = "peftkit.testing.pytest_plugin"\n'
        '[tool.setuptools]\npackage-dir = { "" = "core" }\n',
    )
    _write(
        root / "plugins" / "my_method" / "pyproject.toml",
        '[project]\nname = "peftkit-my-method"\nversion = "0.3.1"\n'
        '[project.entry-points.peftkit]\nmy_method = "peftkit_my_method.plugin"\n',
    )
    return root


def test_metadata_writes_a_dist_info_per_package_that_importlib_metadata_reads(repo, tmp_path):
    meta = tmp_path / "meta"
    path = no_install.metadata(meta, repo)
    # the metadata first: a package folder's stale *.egg-info must not win
    assert path == [meta, repo / "core", repo / "plugins" / "my_method"]
    found = {dist.metadata["Name"]: dist for dist in md.distributions(path=[str(meta)])}
    assert sorted(found) == ["peftkit", "peftkit-my-method"]
    assert found["peftkit"].version == "9.8.7"
    assert found["peftkit-my-method"].version == "0.3.1"
    assert (meta / "peftkit_my_method-0.3.1.dist-info").is_dir()
    assert {(ep.group, ep.name, ep.value) for ep in found["peftkit"].entry_points} == {
        ("pytest11", "peftkit", "peftkit.testing.pytest_plugin"),
        ("console_scripts", "peftkit", "peftkit.cli:main"),
    }
    (ep,) = found["peftkit-my-method"].entry_points
    assert (ep.group, ep.name, ep.value) == ("peftkit", "my_method", "peftkit_my_method.plugin")
    assert ep.dist.metadata["Name"] == "peftkit-my-method"  # what peftkit's discovery reports
    assert found["peftkit"].read_text("INSTALLER") == "benchmarks/no_install.py\n"


def test_the_generated_entry_points_are_the_ones_an_install_declares(tmp_path):
    """For every package of this repository: what .venv's (editable) install declares, the same."""
    meta = tmp_path / "meta"
    no_install.metadata(meta, ROOT)
    generated = {dist.metadata["Name"]: dist for dist in md.distributions(path=[str(meta)])}
    assert len(generated) == len(no_install.pyprojects(ROOT))
    for name, dist in generated.items():
        try:
            installed = md.distribution(name)
        except md.PackageNotFoundError:  # left out of this venv (.venv-tf4 has no peftkit-prefix-tuning)
            continue
        assert set(dist.entry_points) == set(installed.entry_points), name


def test_without_tomllib_or_tomli_it_says_what_it_needs(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # an import of either now fails, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(SystemExit, match=r"needs Python 3\.11 or newer \(tomllib\), or the tomli package"):
        no_install.read_project(ROOT / "pyproject.toml")


def test_missing_names_module_level_imports_this_python_lacks(tmp_path):
    _write(tmp_path / "helpers.py", "import not_here_in_a_helper\n")
    test = _write(
        tmp_path / "test_x.py",
        "import os\nimport not_here_a.sub\nfrom not_here_b import c\nimport helpers\n"
        "try:\n    import not_here_guarded\nexcept ImportError:\n    pass\n\n\n"
        "def test_it():\n    import not_here_in_a_function\n",
    )
    assert no_install.missing(test) == ["not_here_a", "not_here_b", "not_here_in_a_helper"]


def test_check_finds_this_repository_through_the_generated_metadata(tmp_path):
    """Even where .venv has editable installs and the package folders stale egg-infos."""
    path = no_install.metadata(tmp_path / "meta", ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.no_install", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    version = no_install.read_project(ROOT / "pyproject.toml")["version"]
    dist_info = tmp_path / "meta" / f"peftkit-{version}.dist-info"
    assert (
        f"peftkit {version}: metadata {dist_info}; peftkit from {ROOT / 'core' / 'peftkit'}" in result.stdout
    )
    assert "PROBLEM" not in result.stdout
