"""benchmarks/gpu.sh: valid bash, and without a GPU it stops with its message before it installs anything.

Each run uses a copy of the script in a stand-in repository whose ``dev.sh`` only notes that it was
called, with a PATH of stand-in commands (python, pip, nvidia-smi) that note their calls too, so a
script that went on past its checks is caught without installing or running anything. The --no-install
mode is rehearsed on a stand-in for a lent machine's python (.venv's libraries without our packages) and
a small stand-in repository, so it runs a few tests and no benchmark.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
BASH = shutil.which("bash")
TOOLS = ["dirname", "sed", "head", "grep", "mkdir", "tee", "cat", "nproc", "wc", "cp", "env"]


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _noting(name: str, then: str = "exit 1") -> str:
    return f'#!/bin/sh\necho "{name} $*" >>"$CALLS"\n{then}\n'


@pytest.fixture
def stand_in(tmp_path):
    """A repository holding a copy of gpu.sh, and a bin folder of real tools and noting stand-ins."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu.sh")
    _executable(repo / "dev.sh", _noting("dev.sh"))
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name in ("python", "python3", "pip", "pip3"):
        _executable(bin_dir / name, _noting(name))
    return repo, bin_dir, tmp_path / "calls"


def _run(repo: Path, bin_dir: Path, calls: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(bin_dir), "CALLS": str(calls), "HOME": str(repo)}
    return subprocess.run(
        [BASH, str(repo / "benchmarks" / "gpu.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_script_is_valid_bash():
    result = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_without_an_outdir_it_shows_its_usage(stand_in):
    repo, bin_dir, calls = stand_in
    result = _run(repo, bin_dir, calls)
    assert result.returncode == 2
    assert "benchmarks/gpu.sh OUTDIR" in result.stderr
    assert not calls.exists()


@pytest.mark.parametrize(
    "nvidia_smi, reason",
    [
        (None, "nvidia-smi is not on PATH (no NVIDIA driver)"),
        (
            _noting(
                "nvidia-smi",
                'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the driver"; exit 9',
            ),
            "nvidia-smi -L failed: NVIDIA-SMI has failed because it couldn't communicate with the driver",
        ),
        (_noting("nvidia-smi", "exit 0"), "nvidia-smi -L lists no GPU"),
    ],
    ids=["no-driver", "driver-fails", "no-gpu-listed"],
)
def test_without_a_gpu_it_stops_before_installing_or_writing_anything(stand_in, nvidia_smi, reason):
    repo, bin_dir, calls = stand_in
    if nvidia_smi is not None:
        _executable(bin_dir / "nvidia-smi", nvidia_smi)
    out = repo.parent / "out"
    result = _run(repo, bin_dir, calls, str(out))
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"benchmarks/gpu.sh: no GPU: {reason}\n" in result.stderr
    assert "without a GPU run ./dev.sh test and python -m benchmarks.run" in result.stderr
    noted = calls.read_text().splitlines() if calls.exists() else []
    assert all(line.startswith("nvidia-smi") for line in noted), noted  # no dev.sh, python or pip
    assert not out.exists()


def test_when_torch_sees_no_gpu_it_stops_after_the_setup_and_before_any_test(stand_in):
    """nvidia-smi lists a GPU, but the installed torch is a CPU build: exit 4, having run only its checks."""
    repo, bin_dir, calls = stand_in
    _executable(
        bin_dir / "nvidia-smi", _noting("nvidia-smi", 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"')
    )
    venv_python = repo / ".venv" / "bin" / "python"
    torch_says = (
        'case "$*" in *is_available*) exit 1;; '
        '*version.cuda*) echo "torch 2.13.0+cpu, built for CUDA None";; esac'
    )
    _executable(repo / "dev.sh", _noting("dev.sh", "exit 0"))
    _executable(venv_python, _noting("venv-python", torch_says))
    out = repo.parent / "out"
    result = _run(repo, bin_dir, calls, str(out))
    assert result.returncode == 4, result.stdout + result.stderr
    message = (
        "benchmarks/gpu.sh: torch sees no GPU: nvidia-smi lists one, but torch 2.13.0+cpu, built for "
        "CUDA None does not see it."
    )
    assert message in result.stdout  # stderr goes to the log from the setup on, and on to stdout
    assert message in (out / "gpu.log").read_text()
    noted = calls.read_text().splitlines()
    assert [line.split()[0] for line in noted if not line.startswith("nvidia-smi")] == [
        "dev.sh",
        "venv-python",
        "venv-python",
    ], noted
    assert noted[0] == "nvidia-smi -L"  # the GPU check came first
    assert not list((out / "tests").iterdir())


def _machine_python(tmp_path: Path, leave_out: tuple[str, ...]) -> Path:
    """A stand-in for a lent GPU machine's python: .venv's libraries without ours (and without leave_out).

    A fresh venv (no pip) whose site-packages holds one .pth line naming a folder of links to .venv's
    site-packages entries, less every peftkit distribution, editable-install hook and .pth file, and less
    the named packages: peftkit and its plugins can only come from the checkout and the generated metadata.
    """
    import sys
    import sysconfig

    machine = tmp_path / "machine"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(machine)], check=True, timeout=60)
    libs = tmp_path / "machine-libs"
    libs.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith(("peftkit", "__editable__", *leave_out)) or name.endswith(".pth"):
            continue
        (libs / entry.name).symlink_to(entry)
    (site,) = machine.glob("lib/python3*/site-packages")
    (site / "machine-libs.pth").write_text(f"{libs}\n")
    return machine / "bin" / "python"


def _link(path: Path, to: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(to)


def test_no_install_rehearsal_finds_our_packages_through_the_generated_metadata(tmp_path):
    """--no-install --rehearse-on-cpu on a python without our packages, PEFT or a made-up module.

    The stand-in repository holds the real core and LoRA packages (an out-of-date egg-info of LoRA beside
    them, as an editable install leaves), a core test folder with a test that checks where our packages
    come from and one that imports PEFT, a plugin test folder whose conftest.py imports a missing module,
    and the real benchmarks. pytest accepting --peftkit-device proves the kit's pytest11 entry point was
    found; the test inside proves the rest; summary.txt must name everything left out.
    """
    python = _machine_python(tmp_path, leave_out=("peft",))
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('peftkit') is not None)"
    assert subprocess.run([str(python), "-c", check]).returncode == 0  # nothing of ours is installed there

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "benchmarks", repo / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    _link(repo / "core" / "peftkit", ROOT / "core" / "peftkit")
    lora = repo / "plugins" / "lora"
    _link(lora / "pyproject.toml", ROOT / "plugins" / "lora" / "pyproject.toml")
    _link(lora / "peftkit_lora", ROOT / "plugins" / "lora" / "peftkit_lora")
    stale = lora / "peftkit_lora.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: peftkit-lora\nVersion: 0.0.1\n")
    (stale / "entry_points.txt").write_text("[peftkit]\nlora = peftkit_lora.plugin\n")
    lora_version = importlib_version_in(ROOT / "plugins" / "lora" / "pyproject.toml")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_where_from.py").write_text(
        f"""
import importlib.metadata as md
import importlib.util
from pathlib import Path

import peftkit


def test_on_cpu_our_packages_come_from_the_checkout_and_the_generated_metadata():
    assert Path(peftkit.__file__).resolve().is_relative_to({str(ROOT / "core")!r})
    for name in ("peftkit", "peftkit-lora"):
        assert md.distribution(name).read_text("INSTALLER") == "benchmarks/no_install.py\\n", name
    assert md.version("peftkit-lora") == {lora_version!r}  # not the stale egg-info's 0.0.1
    (lora,) = [ep for ep in md.entry_points(group="peftkit") if ep.name == "lora"]
    assert lora.dist.read_text("INSTALLER") == "benchmarks/no_install.py\\n"
    (kit,) = [ep for ep in md.entry_points(group="pytest11") if ep.name == "peftkit"]
    assert kit.dist.metadata["Name"] == "peftkit"
    assert kit.dist.read_text("INSTALLER") == "benchmarks/no_install.py\\n"
    assert importlib.util.find_spec("peft") is None  # the stand-in machine has no PEFT
"""
    )
    (repo / "tests" / "test_with_peft.py").write_text("import peft\n\n\ndef test_on_cpu():\n    pass\n")
    ghost = repo / "plugins" / "ghost" / "tests"
    ghost.mkdir(parents=True)
    (ghost / "conftest.py").write_text("import not_on_this_machine  # noqa: F401\n")
    (ghost / "test_ghost.py").write_text("def test_on_cpu():\n    pass\n")
    (repo / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", repo / "docs" / "benchmarks.md")

    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHON"] = str(python)
    result = subprocess.run(
        [BASH, str(repo / "benchmarks" / "gpu.sh"), "--no-install", "--rehearse-on-cpu", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    assert f"no install: {python}" in summary
    assert "setup        skipped: --no-install: nothing installed" in summary
    assert (
        "                   and 1 test files left out (tests/peftkit.left-out says which and why)" in summary
    )
    assert "tests/test_with_peft.py: it imports peft" in (out / "tests" / "peftkit.left-out").read_text()
    assert "  peftkit          exit 0       1 passed" in summary, summary
    assert (
        f"  ghost            skipped: left out plugins/ghost/tests: it imports not_on_this_machine, which "
        f"{python} lacks" in summary
    )
    assert f"benchmarks   skipped: benchmarks/run.py imports peft, which {python} lacks" in summary
    assert "FAILED" not in summary
    packages = (out / "packages.txt").read_text()
    assert f"peftkit-lora {lora_version}: metadata " in packages
    assert f"peftkit_lora-{lora_version}.dist-info" in packages
    assert "peft missing" in packages
    methods = (out / "methods.txt").read_text()
    assert re.search(rf"^lora .* peftkit-lora +{re.escape(lora_version)}\b", methods, re.M), methods


def importlib_version_in(pyproject: Path) -> str:
    return re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M).group(1)


def test_no_install_without_a_gpu_stops_before_touching_python(stand_in):
    repo, bin_dir, calls = stand_in
    out = repo.parent / "out"
    result = _run(repo, bin_dir, calls, "--no-install", str(out))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "benchmarks/gpu.sh: no GPU: nvidia-smi is not on PATH" in result.stderr
    assert not calls.exists()  # no python, pip or dev.sh
    assert not out.exists()


def test_no_install_on_a_python_without_hypothesis_says_so_and_writes_nothing(tmp_path):
    python = _machine_python(tmp_path, leave_out=("hypothesis",))
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "benchmarks", repo / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    _link(repo / "core" / "peftkit", ROOT / "core" / "peftkit")
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHON"] = str(python)
    result = subprocess.run(
        [BASH, str(repo / "benchmarks" / "gpu.sh"), "--rehearse-on-cpu", "--no-install", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 5, result.stdout + result.stderr
    assert f"benchmarks/gpu.sh --no-install: {python} lacks what the run needs:" in result.stderr
    assert "hypothesis MISSING" in result.stderr
    assert "PROBLEM: hypothesis is not importable" in result.stderr
    assert "Nothing was written. This mode installs nothing" in result.stderr
    assert not out.exists()
