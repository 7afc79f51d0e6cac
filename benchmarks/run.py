"""Run the whole benchmark suite and write docs/benchmarks.md (a table) and docs/benchmarks.svg (a chart).

    python -m benchmarks.run                      # CPU, 2 threads: the default
    python -m benchmarks.run --device cuda        # on a GPU: writes the CUDA rows beside the CPU ones
    python -m benchmarks.run --rounds 5 --output /tmp/bench.md   # a quicker look, elsewhere
    python -m benchmarks.run --skip graph-breaks --skip compiled-step  # without those sections

Every figure is a ratio of medians over interleaved rounds in this one run (see benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import peft
import peftkit
import torch
import transformers

from benchmarks import (
    compiled_hotswap,
    compiled_step,
    composition_serving,
    graph_breaks,
    injection,
    loading,
    merging,
    mixed_batch,
    quantized,
    report,
    training_step,
)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds per timing (default 25)")
    parser.add_argument(
        "--compile-repeats", type=int, default=3, help="cold compiles timed per library (default 3)"
    )
    parser.add_argument(
        "--skip", action="append", default=[], metavar="SECTION", help="leave a section out (repeatable)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")

    sections = {  # key (for --skip): (what the run prints, the section)
        "training-step": ("training step", lambda: training_step.run(args.device, args.rounds)),
        "compiled-step": (
            "compiled training step and first compile",
            lambda: compiled_step.run(args.device, args.rounds, args.compile_repeats),
        ),
        "graph-breaks": ("graph breaks of every method", lambda: graph_breaks.run(args.device)),
        "mixed-batch": ("mixed-adapter batch", lambda: mixed_batch.run(args.device, args.rounds)),
        # each round serves 8 × k rows three ways, seconds on a CPU: a fifth of the rounds
        "composition-serving": (
            "serving 8 adapters: BatchSplit and MultiTask",
            lambda: composition_serving.run(args.device, max(3, args.rounds // 5)),
        ),
        "injection": (
            "get_peft_model on a 7B meta model",
            lambda: injection.run(args.device, max(3, args.rounds // 3)),
        ),
        "merge-exactness": ("merge exactness", lambda: merging.exactness(args.device)),
        "merged-inference": ("merged inference", lambda: merging.merged_speed(args.device, args.rounds)),
        "loading": ("loading and hot-swap", lambda: loading.run(args.device, args.rounds)),
        "compiled-hotswap": ("compiled hot-swap", lambda: compiled_hotswap.run(args.device)),
        "quantized": ("QLoRA on 4-bit and 8-bit bases", lambda: quantized.run(args.device, args.rounds)),
    }
    unknown = sorted(set(args.skip) - set(sections))
    if unknown:
        raise SystemExit(
            f"--skip {', '.join(unknown)}: no such section; the sections are {', '.join(sections)}"
        )
    chosen = [(key, *sections[key]) for key in sections if key not in args.skip]
    rows = []
    for index, (key, name, section) in enumerate(chosen, 1):
        start = time.perf_counter()
        print(f"[{index}/{len(chosen)}] {name} ({key}) ...", flush=True)
        rows += section()
        print(f"      done in {time.perf_counter() - start:.0f} s", flush=True)

    machine = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'CPU'}, "
        f"{args.threads} threads"
    )
    setting = {
        "device": args.device,
        "machine": machine,
        "rounds": args.rounds,
        "skipped": [key for key in sections if key in args.skip],
        "date": datetime.date.today().isoformat(),
        "versions": f"peftkit {peftkit.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }
    report.write(args.output, rows, setting)
    print(report.table(rows))
    print(f"wrote {args.output} and {report.chart_path(args.output, args.device)}")


if __name__ == "__main__":
    main()
