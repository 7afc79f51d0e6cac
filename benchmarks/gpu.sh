#!/usr/bin/env bash
# The CUDA run: every package's CUDA test cases, then the benchmark suite on CUDA. Unattended, on a
# machine with an NVIDIA GPU and nothing but this repository and the package registries.
#
#   benchmarks/gpu.sh OUTDIR                    on a GPU machine: sized for under 8 minutes on one
#                                               H100/H200, the install aside
#   benchmarks/gpu.sh --rehearse-on-cpu OUTDIR  the same stages with cpu for cuda, to check the script
#                                               on a machine without a GPU
#   benchmarks/gpu.sh --no-install OUTDIR       on a machine that cannot install (no network): no venv,
#                                               no pip; the machine's python3 (or $PYTHON) runs our
#                                               packages from the checkout (combines with the above)
#
# Order: it looks for a GPU (nvidia-smi) before it installs anything; sets up .venv with ./dev.sh setup
# (pinned by constraints.txt; a stock Linux x86-64 pip gets torch's CUDA build; else point
# PIP_INDEX_URL or PIP_EXTRA_INDEX_URL at an index that has it); stops again unless torch sees the GPU;
# then runs the tests, one pytest per package folder (several at once), with --peftkit-device cuda and
# -k cuda: the conformance kit's cuda cases and the tests parametrized by device; then
# `python -m benchmarks.run --device cuda` into OUTDIR/benchmarks.md, a copy of docs/benchmarks.md, so
# its CUDA section can be copied back as it is.
#
# --no-install: the machine's python must have torch (seeing the GPU), transformers, pytest, hypothesis
# and the core's other dependencies (else exit 5, naming what is missing, before anything is written).
# Our packages go on PYTHONPATH, and benchmarks/no_install.py writes their entry-point metadata
# (<name>-<version>.dist-info from each pyproject.toml) into a temporary folder on PYTHONPATH, so the
# plugins and the conformance kit's pytest plugin are found as if installed. OUTDIR also gets
# packages.txt (what the python has, where our packages and their metadata came from) and methods.txt
# (`peftkit methods`).
# In either mode, test files that import at module level what the python lacks (PEFT, bitsandbytes, trl,
# AdapterHub's adapters, ...) are left out, a tests folder whose conftest.py does is skipped, the QLoRA
# section is skipped without bitsandbytes and the suite without PEFT: summary.txt lists each, and why.
#
# Each pytest and the suite run under `timeout`, so a hang ends the run rather than the machine's lease.
# OUTDIR gets: gpu.log (all it printed), summary.txt (each stage's status and time), nvidia-smi.txt,
# versions.txt, pip-freeze.txt, tests/<package>.log and .xml (junit) (and .left-out: the files left out,
# and why), benchmarks.log, benchmarks.md and benchmarks-cuda.svg.
# Exit status: 0 every stage passed; 1 a stage failed (summary.txt says which); 2 bad usage;
# 3 no GPU (nothing was installed or written); 4 torch, once installed, sees no GPU; 5 (--no-install)
# the python lacks a package the run needs (nothing was written).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="$ROOT/.venv/bin/python"
REHEARSAL=0
DEVICE=cuda

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

NO_INSTALL=0
while [[ "${1:-}" == --rehearse-on-cpu || "${1:-}" == --no-install ]]; do
    if [[ "$1" == --no-install ]]; then NO_INSTALL=1; else REHEARSAL=1 DEVICE=cpu; fi
    shift
done
[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || usage
OUT="$1"

refuse() { # CODE WHAT
    printf 'benchmarks/gpu.sh: %s\n' "$2" >&2
    printf '%s %s\n' "benchmarks/gpu.sh runs only the CUDA cases; without a GPU run ./dev.sh test" \
        "and python -m benchmarks.run." >&2
    exit "$1"
}
no_gpu() { refuse 3 "no GPU: $1"; }

# 1. A GPU, before anything is installed or written.
if [[ $REHEARSAL == 0 ]]; then
    command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not on PATH (no NVIDIA driver)"
    gpus="$(nvidia-smi -L 2>&1)" || no_gpu "nvidia-smi -L failed: $(head -n 1 <<<"$gpus")"
    grep -q '^GPU ' <<<"$gpus" || no_gpu "nvidia-smi -L lists no GPU"
fi

# 1b. --no-install: the machine's python, our packages from the checkout, every check before any write.
if [[ $NO_INSTALL == 1 ]]; then
    VPY="${PYTHON:-python3}"
    lacking() { # WHAT
        printf 'benchmarks/gpu.sh --no-install: %s\n' "$1" >&2
        printf '%s %s\n' "Nothing was written. This mode installs nothing: use a python that has torch," \
            "transformers, pytest and hypothesis (PYTHON=/path/to/python), or run without --no-install." >&2
        exit 5
    }
    command -v "$VPY" >/dev/null 2>&1 || lacking "no python: $VPY is not on PATH (set PYTHON=/path/to/python)"
    VPY="$(command -v "$VPY")"
    META="$(mktemp -d "${TMPDIR:-/tmp}/peftkit-metadata.XXXXXX")"
    trap 'rm -rf "$META"' EXIT
    pythonpath="$(cd "$ROOT" && env -u PYTHONPATH "$VPY" -m benchmarks.no_install metadata "$META")" ||
        lacking "benchmarks/no_install.py could not write the packages' metadata (above)"
    export PYTHONPATH="$pythonpath"
    packages="$(cd "$ROOT" && "$VPY" -m benchmarks.no_install check 2>&1)" ||
        lacking "$VPY lacks what the run needs:"$'\n'"$packages"
    if [[ $REHEARSAL == 0 ]] && ! "$VPY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        seen="$("$VPY" -c 'import torch as t; print(f"torch {t.__version__}, built for CUDA {t.version.cuda}")' \
            2>&1 || true)"
        refuse 4 "torch sees no GPU: nvidia-smi lists one, but $seen ($VPY) does not see it"
    fi
fi

mkdir -p "$OUT/tests"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu.log") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
[[ $NO_INSTALL == 1 ]] || unset PYTHONPATH
cd "$ROOT"

START=$SECONDS
say() { printf '\n==> %s  [%ss]\n' "$*" "$((SECONDS - START))"; }
FAILED=()
stage_done() { # NAME STATUS STARTED: one line of summary.txt
    local verdict=passed
    [[ "$2" -eq 0 ]] || { verdict="FAILED (exit $2)"; FAILED+=("$1"); }
    printf '%-12s %-18s %5ss\n' "$1" "$verdict" "$((SECONDS - $3))" >>"$OUT/summary.txt"
}
stage_skipped() { # NAME WHY
    printf '%-12s skipped: %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"
}
: >"$OUT/summary.txt"
if [[ $REHEARSAL == 1 ]]; then
    echo "rehearsal on cpu: every stage as on a GPU machine, with cpu for cuda" | tee -a "$OUT/summary.txt"
fi
if [[ $NO_INSTALL == 1 ]]; then
    echo "no install: $VPY, our packages from the checkout on PYTHONPATH (see packages.txt)" |
        tee -a "$OUT/summary.txt"
fi
[[ $REHEARSAL == 1 ]] || nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

# 2. The venv, then torch must see the GPU.
if [[ $NO_INSTALL == 1 ]]; then
    stage_skipped setup "--no-install: nothing installed"
    printf '%s\n' "$packages" >"$OUT/packages.txt"
    cat "$OUT/packages.txt"
    "$VPY" -m peftkit methods >"$OUT/methods.txt" 2>&1 || true
else
    say "setting up .venv (./dev.sh setup)"
    t=$SECONDS
    "$ROOT/dev.sh" setup || { echo "benchmarks/gpu.sh: ./dev.sh setup failed (above)" >&2; exit 1; }
    stage_done setup 0 "$t"
fi
if [[ $NO_INSTALL == 0 && $REHEARSAL == 0 ]] && ! "$VPY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    seen="$("$VPY" -c 'import torch as t; print(f"torch {t.__version__}, built for CUDA {t.version.cuda}")' \
        2>&1 || true)"
    refuse 4 "torch sees no GPU: nvidia-smi lists one, but $seen does not see it. A CPU build was \
installed, or the driver is too old for this build: point PIP_INDEX_URL or PIP_EXTRA_INDEX_URL at an index \
with torch's CUDA builds, then run PEFTKIT_REINSTALL=1 benchmarks/gpu.sh again"
fi
"$VPY" - >"$OUT/versions.txt" <<'EOF'
import importlib.metadata as md
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
for name in ("peft", "transformers", "bitsandbytes", "triton"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
cat "$OUT/versions.txt"
if [[ $NO_INSTALL == 1 ]]; then # its pip may be missing; importlib.metadata lists the same
    "$VPY" -c 'import importlib.metadata as md
names = {str(d.metadata["Name"]) + "==" + str(d.version) for d in md.distributions()}
print(*sorted(names, key=str.lower), sep="\n")' >"$OUT/pip-freeze.txt"
else
    "$VPY" -m pip freeze --disable-pip-version-check >"$OUT/pip-freeze.txt"
fi

# 3. The tests: each package folder's cases on $DEVICE, several pytest processes at once.
if [[ $DEVICE == cuda ]]; then select=cuda; else select="cpu and not cuda"; fi
package_tests() { # DIR NAME [--ignore=PATH ...]
    local status=0
    timeout 900 "$VPY" -m pytest -p no:cacheprovider --import-mode=importlib --color=no -q -rfEs \
        --durations=5 \
        --peftkit-device "$DEVICE" -k "$select" --junitxml "$OUT/tests/$2.xml" "${@:3}" "$1" \
        >"$OUT/tests/$2.log" 2>&1 || status=$?
    echo "$status" >"$OUT/tests/$2.status"
}
package_name() { # plugins/lora/tests -> lora, examples/third_party/vera/tests -> vera, tests -> peftkit
    local name="${1%/tests}"
    name="${name##*/}"
    [[ "$name" == tests ]] && name=peftkit
    echo "$name"
}
folders=()
for dir in tests plugins/*/tests examples/third_party/*/tests; do [[ -d "$dir" ]] && folders+=("$dir"); done
# the test files (FILE<TAB>modules) whose module-level imports this python cannot find: even .venv lacks
# AdapterHub's adapters, which only ./dev.sh's transformers 4 stage installs
unimportable="$("$VPY" -m benchmarks.no_install missing "${folders[@]}")" || {
    echo "benchmarks/gpu.sh: benchmarks/no_install.py could not read the test files (above)" >&2
    exit 1
}
left_out() { # DIR: --ignore=PATH per unimportable file (a conftest.py: its folder), with a note on stderr
    local file modules
    while IFS=$'\t' read -r file modules; do
        [[ -n "$file" && "$file" == "$1"/* ]] || continue
        [[ "$file" != */conftest.py ]] || file="${file%/conftest.py}"
        echo "--ignore=$file"
        echo "left out $file: it imports $modules, which $VPY lacks" >&2
    done <<<"$unimportable"
}
PARALLEL=$(($(nproc) / 2))
((PARALLEL <= 8)) || PARALLEL=8
((PARALLEL >= 1)) || PARALLEL=1
say "tests: ${#folders[@]} folders, their cases on $DEVICE (-k '$select'), $PARALLEL at a time;" \
    "logs in $OUT/tests/"
t=$SECONDS
pids=()
for dir in "${folders[@]}"; do
    name="$(package_name "$dir")"
    ignores=()
    while IFS= read -r line; do [[ -z "$line" ]] || ignores+=("$line"); done \
        < <(left_out "$dir" 2>"$OUT/tests/$name.left-out")
    [[ -s "$OUT/tests/$name.left-out" ]] || rm -f "$OUT/tests/$name.left-out"
    if [[ " ${ignores[*]} " == *" --ignore=$dir "* ]]; then
        echo skipped >"$OUT/tests/$name.status" # its conftest.py cannot be imported
        continue
    fi
    while (($(jobs -rp | wc -l) >= PARALLEL)); do wait -n || true; done
    OMP_NUM_THREADS=2 package_tests "$dir" "$name" "${ignores[@]}" &
    pids+=($!)
done
((${#pids[@]} == 0)) || wait "${pids[@]}" # by pid: a bare wait would also wait for the log's tee, which never ends
status=0
for dir in "${folders[@]}"; do
    name="$(package_name "$dir")"
    code="$(cat "$OUT/tests/$name.status" 2>/dev/null || echo missing)"
    note=""
    if [[ -f "$OUT/tests/$name.left-out" ]]; then
        if [[ "$code" == skipped ]]; then
            printf '  %-16s skipped: %s\n' "$name" "$(grep -m 1 -F "left out $dir:" "$OUT/tests/$name.left-out")" |
                tee -a "$OUT/summary.txt"
            continue
        fi
        note="$(printf '  %-16s and %s test files left out (tests/%s.left-out says which and why)' "" \
            "$(wc -l <"$OUT/tests/$name.left-out")" "$name")"
        [[ "$code" != 5 ]] || code=0 # what was left runs no case here: nothing failed
    fi
    closing="$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' \
        "$OUT/tests/$name.log" | tail -n 1 || true)"
    printf '  %-16s exit %-7s %s\n' "$name" "$code" "$closing" | tee -a "$OUT/summary.txt"
    [[ -z "$note" ]] || echo "$note" | tee -a "$OUT/summary.txt"
    [[ "$code" == 0 ]] || status=1 # pytest's 5 (nothing collected) fails too: every folder has such cases
done
stage_done tests "$status" "$t"

# 4. The benchmark suite on $DEVICE, into a copy of docs/benchmarks.md.
# Two cold compiles per library, and no graph-breaks section: its counts come from tracing, which the
# device hardly changes, and the kit's cuda cases already compile every method whole (fullgraph=True).
bench=(--device cuda --rounds 25 --compile-repeats 2 --skip graph-breaks)
[[ $REHEARSAL == 0 ]] || bench=(--device cpu --rounds 3 --compile-repeats 1 --skip graph-breaks)
lacks="$("$VPY" -m benchmarks.no_install missing benchmarks/run.py | cut -f2)"
if [[ -z "$lacks" ]] && ! "$VPY" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("bitsandbytes"))'; then
    bench+=(--skip quantized)
    printf '  %-16s skipped: it needs bitsandbytes, which %s lacks\n' quantized "$VPY" | tee -a "$OUT/summary.txt"
fi
if [[ -n "$lacks" ]]; then
    stage_skipped benchmarks "benchmarks/run.py imports $lacks, which $VPY lacks"
else
    say "benchmarks: python -m benchmarks.run --device $DEVICE"
    t=$SECONDS
    cp "$ROOT/docs/benchmarks.md" "$OUT/benchmarks.md"
    status=0
    timeout 1800 "$VPY" -m benchmarks.run "${bench[@]}" --output "$OUT/benchmarks.md" 2>&1 |
        tee "$OUT/benchmarks.log" || status=$?
    grep '^      done in\|^\[' "$OUT/benchmarks.log" >>"$OUT/summary.txt" || true
    stage_done benchmarks "$status" "$t"
fi

echo
cat "$OUT/summary.txt"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "benchmarks/gpu.sh: FAILED after $((SECONDS - START))s: ${FAILED[*]} (see $OUT)" >&2
    exit 1
fi
echo "benchmarks/gpu.sh: every stage passed in $((SECONDS - START))s; results in $OUT"
