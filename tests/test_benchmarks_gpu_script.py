"""benchmarks/gpu.sh: valid bash, and without a GPU it stops with its message before it installs anything.

Each run uses a copy of the script in a stand-in repository whose ``dev.sh`` only notes that it was
called, with a PATH of stand-in commands (python, pip, nvidia-smi) that note their calls too, so a
script that went on past its checks is caught without installing or running anything.
"""

from __future__ import annotations

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
