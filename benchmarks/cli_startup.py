"""How long the ``peftkit`` command takes to answer, as ratios to ``python -c "import click"``.

    python benchmarks/cli_startup.py              # 15 interleaved rounds
    python benchmarks/cli_startup.py --rounds 31

Each contender is a fresh process, so every figure includes the interpreter's start; the baseline, a
process that imports only click (which the CLI needs anyway), includes it too. The contenders run one
after another in each round, in an order that rotates every round, so machine load falls on all of them
alike; the figures are ratios of medians from this one run. Written by hand into docs/cli.md.
Standard library only: this script imports neither torch nor peftkit itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASELINE = "python -c 'import click'"


def _peftkit() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m peftkit``."""
    script = Path(sys.executable).with_name("peftkit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "peftkit"]


def contenders() -> dict[str, list[str]]:
    peftkit = _peftkit()
    return {
        BASELINE: [sys.executable, "-c", "import click"],
        "peftkit --version": [*peftkit, "--version"],
        "peftkit --help": [*peftkit, "--help"],
        "peftkit methods": [*peftkit, "methods"],
    }


def _machine() -> str:
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def measure(commands: dict[str, list[str]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each command, per round; a command that fails stops the run."""
    # the user's own plugin selection would change what `methods` loads: measure the installed set
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTKIT_PLUGINS", "PEFTKIT_BLOCK_PLUGINS")}
    names = list(commands)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            run = subprocess.run(commands[name], capture_output=True, text=True, env=env)
            elapsed = time.perf_counter() - start
            if run.returncode != 0:
                raise SystemExit(f"{name!r} failed ({run.returncode}):\n{run.stderr}")
            if round_index >= warmup:
                seconds[name].append(elapsed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args()
    if shutil.which("peftkit") is None and not Path(sys.executable).with_name("peftkit").is_file():
        print("note: no `peftkit` console script found; timing `python -m peftkit`", file=sys.stderr)
    seconds = measure(contenders(), args.rounds)
    baseline = statistics.median(seconds[BASELINE])
    print(f"machine: {_machine()}; {args.rounds} interleaved rounds, medians")
    print(f"{'command':<28}{'median':>10}{'ratio':>9}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<28}{median * 1000:>8.0f} ms{median / baseline:>8.1f}x")


if __name__ == "__main__":
    main()
