"""LoRA training on 2 CPU processes (gloo) gives the adapter of one process that sees the whole batch.

examples/train_ddp.py runs under torchrun with DistributedDataParallel, under torchrun with FSDP2
(fully_shard), and under accelerate launch. The three launches start together (each is mostly
interpreter start-up) and each test waits for its own; the reference run is in this process.
"""

from __future__ import annotations

import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), *flags]


def accelerate_launch(*flags: str) -> list[str]:
    # accelerate's --cpu runs one process (several need MPI); --multi_gpu goes through torchrun, and the
    # script's Accelerator(cpu=True) then joins a gloo group of the 2 processes
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), str(SCRIPT), *flags]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    commands = {
        "ddp": torchrun("--output", str(folder / "ddp")),
        "fsdp": torchrun("--fsdp", "--output", str(folder / "fsdp")),
    }
    if _has_accelerate():
        commands["accelerate"] = accelerate_launch("--accelerate", "--output", str(folder / "accelerate"))
    # each launch is its own process group with its output in a file: on a timeout the whole group
    # (launcher and workers) is killed, and no worker can keep a pipe open that the test waits on
    processes = {}
    for name, command in commands.items():
        with open(folder / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the reference: one process, the whole global batch, same seed and data
        argv = sys.argv
        sys.argv = [str(SCRIPT), "--output", str(folder / "single")]
        threads = torch.get_num_threads()
        try:
            runpy.run_path(str(SCRIPT), run_name="__main__")
        finally:
            sys.argv = argv
            torch.set_num_threads(threads)
        yield folder, processes
    finally:
        for process in processes.values():
            kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has already exited
        pass
    process.wait()


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def finished(runs, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder, processes = runs
    try:
        processes[name].wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(processes[name])
        pytest.fail(f"the {name} launch did not finish in {TIMEOUT_S} s:\n{log_tail(folder, name)}")
    output = log_tail(folder, name)
    assert processes[name].returncode == 0, output
    assert "trained on 2 process(es)" in output, output
    single = load_file(str(folder / "single" / "adapter_model.safetensors"))
    return single, load_file(str(folder / name / "adapter_model.safetensors"))


def log_tail(folder: Path, name: str) -> str:
    return (folder / f"{name}.log").read_text(errors="replace")[-4000:]


def assert_same_adapter(actual, expected):
    assert actual.keys() == expected.keys() and any("lora_A" in key for key in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
    # training moved the adapter (lora_B starts at zero), so the comparison is not between two inits
    assert any("lora_B" in key and value.abs().max() > 1e-3 for key, value in expected.items())


def test_ddp_on_two_processes_matches_one_process(runs):
    single, ddp = finished(runs, "ddp")
    assert_same_adapter(ddp, single)


def test_fsdp2_on_two_processes_matches_one_process(runs):
    single, fsdp = finished(runs, "fsdp")
    assert_same_adapter(fsdp, single)


def test_accelerate_launch_on_two_processes_matches_one_process(runs):
    if "accelerate" not in runs[1]:
        pytest.skip("accelerate is not installed")
    single, accelerated = finished(runs, "accelerate")
    assert_same_adapter(accelerated, single)
