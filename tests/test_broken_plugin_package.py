"""A broken plugin, installed as a package: ``peftkit methods`` names it and its error, and every other
method keeps working in the same process.

The package's plugin module raises ImportError on import (as a plugin does whose own dependency is
missing). It is installed for real, with pip, into a folder of its own put on ``PYTHONPATH`` of the
subprocesses, so discovery meets it through its ``.dist-info`` entry point as on a user's machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peftkit.discovery import ALLOW_ENV, BLOCK_ENV

ERROR = "peftkit-broken-demo needs libfrobnicate>=2, which is not installed"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "peftkit-broken-demo"
version = "0.3.1"
dependencies = ["peftkit>=0.2,<1"]

[project.entry-points.peftkit]
broken_demo = "peftkit_broken_demo.plugin"

[tool.setuptools.packages.find]
include = ["peftkit_broken_demo*"]
"""

PLUGIN = f'''\
"""A plugin whose import fails, as one does when a dependency of its own is missing."""

raise ImportError({ERROR!r})
'''

# In one process: the table of `peftkit methods`, then a LoRA adapter that must change the outputs,
# merge, and leave the base model's outputs back when disabled.
SCRIPT = """\
import torch
from peftkit import get_peft_model
from peftkit.cli import make_cli
from peftkit.testing.models import tiny_llama
from peftkit_lora import LoraConfig

make_cli().main(args=["methods"], prog_name="peftkit", standalone_mode=False)

base = tiny_llama()
ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    reference = base(input_ids=ids).logits.clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, reference), "the LoRA adapter changed nothing"
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, reference), "disable_adapter is not the base model"
    merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-5), "merged outputs differ"
print("LORA FORWARD OK")
"""


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken-plugin")
    package = root / "peftkit-broken-demo"
    (package / "peftkit_broken_demo").mkdir(parents=True)
    (package / "pyproject.toml").write_text(PYPROJECT)
    (package / "peftkit_broken_demo" / "__init__.py").write_text('"""The broken demo plugin."""\n')
    (package / "peftkit_broken_demo" / "plugin.py").write_text(PLUGIN)
    site = root / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
         "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(package)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    assert (site / "peftkit_broken_demo-0.3.1.dist-info" / "entry_points.txt").is_file()
    return site


@pytest.fixture(scope="module")
def runs(broken_site: Path) -> dict[str, subprocess.CompletedProcess]:
    """The table plus a LoRA forward in one process, and ``peftkit methods --json`` in another, started together."""
    env = {k: v for k, v in os.environ.items() if k not in (ALLOW_ENV, BLOCK_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(broken_site), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    commands = {
        "table_and_lora": [sys.executable, "-c", SCRIPT],
        "json": [sys.executable, "-m", "peftkit", "methods", "--json"],
    }
    started = {
        name: subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, args in commands.items()
    }
    done = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(commands[name], process.returncode, out, err)
    return done


def test_table_lists_the_broken_plugin_with_its_error_and_lora_still_works(runs) -> None:
    run = runs["table_and_lora"]
    assert run.returncode == 0, run.stderr
    out = run.stdout
    # other broken plugins this environment may hold (a backend without its library) are listed too
    assert re.search(r"^Broken plugins \(\d+\), skipped:$", out, re.MULTILINE), out
    assert f"  broken_demo (peftkit-broken-demo 0.3.1): ImportError: {ERROR}" in out
    assert "entry:    peftkit_broken_demo.plugin" in out
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["METHOD", "PEFT_TYPE"]
    assert "lora" in [line.split()[0] for line in table[1:]]
    assert out.rstrip().endswith("LORA FORWARD OK")
    # the warning users see when any command loads plugins: one line, naming the plugin and the error
    warnings = [line for line in run.stderr.splitlines() if "broken_demo" in line]
    assert len(warnings) == 1, run.stderr
    assert warnings[0].startswith("warning: ") and warnings[0].endswith(f"ImportError: {ERROR}")


def test_json_lists_the_broken_plugin_apart_from_the_methods(runs) -> None:
    run = runs["json"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    ours = [row for row in report["broken"] if row["name"] == "broken_demo"]
    assert len(ours) == 1, report["broken"]
    broken = ours[0]
    assert broken["distribution"] == "peftkit-broken-demo"
    assert broken["version"] == "0.3.1"
    assert broken["entry_point"] == "peftkit_broken_demo.plugin"
    assert broken["error"] == f"ImportError: {ERROR}"
    assert f"ImportError: {ERROR}" in broken["traceback"]
    names = [row["name"] for row in report["methods"]]
    assert "lora" in names and "broken_demo" not in names
    assert all(row["plugin"] != "broken_demo" for row in report["plugins"])
