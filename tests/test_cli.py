"""The ``peftkit`` command line: methods and inspect, as tables and JSON, and their error messages.

End-to-end runs go through a subprocess (``python -m peftkit.cli`` / ``python -m peftkit``); they start
together, since most pay for importing torch. Error paths and plugin interplay run in-process with
click's runner on a fresh CLI.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import click
import peft
import peftkit
import pytest
import torch
from click.testing import CliRunner
from peftkit import MethodSpec, PeftConfig, hookimpl, plugins
from peftkit.cli import make_cli
from peftkit.cli.tables import human_size, wrapped
from peftkit.testing.models import tiny_llama
from peftkit_lora import LoraConfig
from safetensors.torch import save_file

# the installed version, as discovery must report it
LORA_VERSION = importlib.metadata.version("peftkit-lora")
LORA_HOOKS = [
    "peftkit_adapter_state_dict",
    "peftkit_initialize_from_data",
    "peftkit_inject_adapter",
    "peftkit_load_adapter_state_dict",
    "peftkit_model_methods",
    "peftkit_prepare_compiled_hotswap",
    "peftkit_read_foreign_adapter",
    "peftkit_register_methods",
    "peftkit_save_foreign_adapter",
    "peftkit_trainable_parameters",
]


@pytest.fixture(autouse=True)
def fresh_plugins():
    """Every test starts and ends with the installed plugins only."""
    plugins.reset()
    yield
    plugins.reset()


# --- adapters on disk --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    model.save_pretrained(root / "kit")
    peft_model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    peft_model.save_pretrained(str(root / "peft"))
    return {"kit": root / "kit", "peft": root / "peft"}


def _plugin_env() -> dict[str, str]:
    """The environment without the plugin selection variables: every installed plugin loads."""
    return {k: v for k, v in os.environ.items() if k not in ("PEFTKIT_PLUGINS", "PEFTKIT_BLOCK_PLUGINS")}


def _run_together(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    env = _plugin_env()
    started = {
        name: (
            args,
            subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
        )
        for name, args in commands.items()
    }
    done = {}
    for name, (args, process) in started.items():
        out, err = process.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(args, process.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def runs(adapters) -> dict[str, subprocess.CompletedProcess]:
    cli = [sys.executable, "-m", "peftkit.cli"]
    return _run_together(
        {
            "methods": [*cli, "methods"],
            "methods --json": [*cli, "methods", "--json"],
            "inspect kit": [*cli, "inspect", str(adapters["kit"])],
            "inspect kit --json": [*cli, "inspect", str(adapters["kit"]), "--json"],
            "inspect peft --json": [
                sys.executable,
                "-m",
                "peftkit",
                "inspect",
                "--json",
                str(adapters["peft"]),
            ],
            "-m peftkit --version": [sys.executable, "-m", "peftkit", "--version"],
        }
    )


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr
    return run.stdout


def invoke(*args: str):
    return CliRunner().invoke(make_cli(), list(args), prog_name="peftkit")


# --- version, help, imports ------------------------------------------------------------------------
HEAVY = ("torch", "transformers", "bitsandbytes")

# Prepended to a fresh interpreter's script: records, for each heavy module, the chain of peftkit modules
# (name:line, outermost first) that imported it first, in ``heavy_importers``.
WATCH_HEAVY_IMPORTS = f"""\
import sys

heavy_importers = {{}}


class _WatchHeavyImports:
    def find_spec(self, name, path=None, target=None):
        if name in {HEAVY!r} and name not in heavy_importers:
            chain, frame = [], sys._getframe(1)
            while frame is not None:
                module = frame.f_globals.get("__name__", "")
                if module.split(".")[0].startswith("peftkit"):
                    chain.append(f"{{module}}:{{frame.f_lineno}}")
                frame = frame.f_back
            heavy_importers[name] = " -> ".join(reversed(chain)) or "outside peftkit"
        return None


sys.meta_path.insert(0, _WatchHeavyImports())
"""


def _modules_after(args: list[str]) -> tuple[subprocess.CompletedProcess, dict[str, bool], dict[str, str]]:
    """Run the CLI with ``args`` in a fresh interpreter: which heavy modules (and LoRA's plugin) it imported,
    and for each heavy one, the chain of peftkit modules that imported it."""
    watched = (*HEAVY, "peftkit_lora")
    script = WATCH_HEAVY_IMPORTS + (
        "import json\n"
        "from peftkit.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        f"print(json.dumps([{{name: name in sys.modules for name in {watched!r}}}, heavy_importers]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, env=_plugin_env()
    )
    assert run.returncode == 0, run.stderr
    imported, importers = json.loads(run.stdout.splitlines()[-1])
    return run, imported, importers


def _heavy_imports_of_each_plugin() -> list[str]:
    """Each installed plugin's entry-point module imported alone, in a fresh interpreter: a line for each
    heavy module one imports, naming the plugin and the chain of modules that did it."""
    found = []
    for ep in sorted(importlib.metadata.entry_points(group="peftkit"), key=lambda ep: ep.name):
        script = WATCH_HEAVY_IMPORTS + (
            f"import importlib, json\nimportlib.import_module({ep.module!r})\nprint(json.dumps(heavy_importers))\n"
        )
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            found.append(f"{ep.name} ({ep.module}) fails to import: {run.stderr.strip().splitlines()[-1:]}")
            continue
        for name, chain in json.loads(run.stdout.splitlines()[-1]).items():
            found.append(f"{ep.name} ({ep.module}) imports {name}: {chain}")
    return found


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"]])
def test_help_and_version_import_neither_torch_nor_transformers_nor_bitsandbytes(args):
    run, imported, importers = _modules_after(args)
    nothing = {"torch": False, "transformers": False, "bitsandbytes": False, "peftkit_lora": False}
    assert imported == nothing, importers
    assert run.stderr == ""  # nothing on stderr: no warning of anyone's
    if args == ["--version"]:
        assert run.stdout.splitlines()[0] == f"peftkit {peftkit.__version__}"
    elif args == ["--help"]:
        assert re.search(r"^  methods +List installed methods", run.stdout, re.M)
    else:
        assert "Usage: peftkit inspect [OPTIONS] PATH" in run.stdout


def test_methods_loads_every_plugin_but_neither_torch_nor_transformers_nor_bitsandbytes():
    """Listing needs each plugin's hooks and config class, not torch, a model library or a backend's library:
    every plugin module defers those imports to the hooks that compute."""
    run, imported, importers = _modules_after(["methods", "--json"])
    report = json.loads("\n".join(run.stdout.splitlines()[:-1]))
    assert report["broken"] == []
    listed = {row["plugin"] for row in report["methods"] + report["plugins"]}
    installed = {ep.name for ep in importlib.metadata.entry_points(group="peftkit")}
    assert installed <= listed, f"installed plugins not listed: {sorted(installed - listed)}"
    assert "lora" in {row["name"] for row in report["methods"]} and imported["peftkit_lora"]
    heavy = [name for name in HEAVY if imported[name]]
    if heavy:
        culprits = _heavy_imports_of_each_plugin() or ["none on its own: the core's plugin loading does"]
        pytest.fail(
            f"`peftkit methods` imported {', '.join(heavy)} (first through {importers}); plugin modules "
            "that import a heavy module when loaded:\n  " + "\n  ".join(culprits)
        )
    assert run.stderr == ""


def test_python_dash_m_peftkit(runs):
    assert ok(runs["-m peftkit --version"]).strip() == f"peftkit {peftkit.__version__}"


def test_commands_print_no_warning(runs):
    """Every run above (methods, inspect, --version) leaves stderr empty: no third-party warning."""
    assert {name: run.stderr for name, run in runs.items()} == {name: "" for name in runs}


def test_help_lists_the_builtin_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert re.search(r"^\s+inspect\s+Show an adapter folder", result.stdout, re.M)
    assert re.search(r"^\s+methods\s+List installed methods and broken plugins", result.stdout, re.M)


# --- peftkit methods ---------------------------------------------------------------------------------
def test_methods_table(runs):
    lines = ok(runs["methods"]).splitlines()
    header = lines[0]
    assert header.split() == ["METHOD", "PEFT_TYPE", "FAMILY", "CAPABILITIES", "DISTRIBUTION", "VERSION"]
    lora = next(line for line in lines[1:] if line.startswith("lora "))
    # aligned columns: each value starts under its heading
    for heading, value in [
        ("PEFT_TYPE", "LORA"),
        ("FAMILY", "weight-delta"),
        ("DISTRIBUTION", "peftkit-lora"),
    ]:
        assert lora.index(value) == header.index(heading)
    assert "mergeable, supports-multiple-active" in lora
    assert lora.split()[-1] == LORA_VERSION
    text = "\n".join(lines)
    assert f"  lora: plugin 'lora' (peftkit-lora {LORA_VERSION})" in text
    lora_block = text[text.index("  lora: plugin") :]
    hooks = re.search(r"hooks:\s+(.*?)\n\s+location:", lora_block, re.S).group(1)
    assert re.split(r",\s+", hooks.strip()) == LORA_HOOKS
    assert re.search(r"location:\s+\S+peftkit_lora[/\\]plugin\.py$", lora_block, re.M)


def test_listed_paths_and_names_are_wrapped_at_spaces_only_so_they_stay_whole():
    path = "/tmp/pytest-of-root/pytest-79/popen-gw0/" + "a-long-folder-name/" * 5 + "peftkit_toy_plugin.py"
    assert wrapped("location:", path) == [f"    location: {path}"]
    hooks = ", ".join(f"peftkit_hook_number_{index}" for index in range(8))
    lines = wrapped("hooks:", hooks)
    assert len(lines) > 1 and all(len(line) <= 100 for line in lines)
    assert " ".join(" ".join(lines).split()[1:]) == hooks  # every hook name whole, after the label


def test_methods_json(runs):
    report = json.loads(ok(runs["methods --json"]))
    assert set(report) == {"methods", "plugins", "broken"}
    (lora,) = [m for m in report["methods"] if m["name"] == "lora"]
    assert lora["peft_type"] == "LORA"
    assert lora["family"] == "weight-delta"
    assert lora["capabilities"] == {
        "mergeable": True,
        "supports_multiple_active": True,
        "needs_tokenizer": False,
    }
    assert (lora["distribution"], lora["version"], lora["plugin"]) == ("peftkit-lora", LORA_VERSION, "lora")
    assert lora["hooks"] == LORA_HOOKS
    assert Path(lora["location"]).parts[-2:] == ("peftkit_lora", "plugin.py")
    assert "lora" not in [b["name"] for b in report["broken"]]


def test_methods_reports_a_plugin_without_methods():
    class Backend:
        @hookimpl
        def peftkit_read_weight(self, layer):
            return None

    with plugins.registered(Backend(), name="toy-backend"):
        result = invoke("methods")
        report = json.loads(invoke("methods", "--json").stdout)
    assert result.exit_code == 0
    assert re.search(r"^Other plugins \(\d+\), providing no method:$", result.stdout, re.M)
    assert "  toy-backend (registered directly, no distribution)" in result.stdout
    (backend,) = [p for p in report["plugins"] if p["plugin"] == "toy-backend"]
    assert backend["plugin"] == "toy-backend"
    assert backend["hooks"] == ["peftkit_read_weight"]
    assert backend["location"] == __file__


def test_methods_with_no_method_installed():
    plugins.reset(discover=False)
    result = invoke("methods")
    assert result.exit_code == 0
    assert result.stdout.strip() == (
        "No methods installed. Install a method plugin, for example: pip install peftkit-lora"
    )
    assert json.loads(invoke("methods", "--json").stdout) == {"methods": [], "plugins": [], "broken": []}


def test_methods_plugin_conflict_is_a_clear_error():
    class FakeLora:
        @hookimpl
        def peftkit_register_methods(self):
            return [
                MethodSpec(name="lora", config_class=LoraConfig, peft_type="LORA_TWO", family="weight-delta")
            ]

    with plugins.registered(FakeLora(), name="fake-lora"):
        result = invoke("methods")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: plugins 'peftkit-lora' and 'fake-lora' both provide the method name 'lora'; "
        "uninstall one, or block one with PEFTKIT_BLOCK_PLUGINS"
    )
    assert "Traceback" not in result.output


# --- plugin commands -----------------------------------------------------------------------------------
def test_a_plugin_command_error_is_a_clear_error():
    class Failing:
        @hookimpl
        def peftkit_register_commands(self, cli):
            @cli.command("fail")
            def fail():
                raise peftkit.ConfigError("ToyConfig.r must be an integer >= 1, got 0")

    with plugins.registered(Failing(), name="failing"):
        result = invoke("fail")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: ToyConfig.r must be an integer >= 1, got 0"


def test_a_plugin_that_fails_to_add_commands_is_reported_and_skipped():
    class Broken:
        @hookimpl
        def peftkit_register_commands(self, cli):
            raise RuntimeError("click is too old")

    with plugins.registered(Broken(), name="broken-commands"):
        result = invoke("--help")
    assert result.exit_code == 0
    assert result.stderr.strip() == (
        "warning: plugin 'broken-commands' failed to add its commands and they are skipped: "
        "RuntimeError: click is too old"
    )
    assert "methods" in result.stdout and "inspect" in result.stdout


def test_a_plugin_cannot_replace_a_builtin_command():
    class Shadow:
        @hookimpl
        def peftkit_register_commands(self, cli):
            @cli.command("inspect")
            def fake_inspect():
                click.echo("hijacked")

            @cli.command("shadow-extra")
            def extra():
                click.echo("extra")

    with plugins.registered(Shadow(), name="shadow"):
        cli = make_cli()
        helped = CliRunner().invoke(cli, ["--help"])
        extra = CliRunner().invoke(cli, ["shadow-extra"])
        inspected = CliRunner().invoke(cli, ["inspect", "/nonexistent/adapter"])
    assert helped.stderr.strip() == (
        "warning: a plugin's command 'inspect' is ignored: it would replace the built-in command"
    )
    assert extra.stdout == "extra\n"
    assert "hijacked" not in inspected.output
    assert inspected.exit_code == 2


# --- peftkit inspect -------------------------------------------------------------------------------------
def test_inspect_peftkit_adapter_table(runs, adapters):
    text = ok(runs["inspect kit"])
    default, other = text.split("\n\n")
    size = (adapters["kit"] / "adapter_model.safetensors").stat().st_size
    assert default.splitlines()[:4] == [
        f"Adapter 'default' at {adapters['kit']}",
        f"  method:     LORA, method 'lora' of plugin 'lora' (peftkit-lora {LORA_VERSION})",
        f"  file:       adapter_model.safetensors, {size:,} bytes ({human_size(size)})",
        "  parameters: 896 in 8 tensors",
    ]
    assert re.search(r"^    peftkit\.plugin\s+peftkit-lora$", default, re.M)
    assert re.search(r"^    peftkit\.plugin_version\s+" + re.escape(LORA_VERSION) + "$", default, re.M)
    assert re.search(r"^    target_modules\s+\[\"q_proj\", \"v_proj\"\]$", default, re.M)
    assert re.search(r"^    r\s+4$", default, re.M)
    assert re.search(
        r"^    base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_B\.weight\s+\(16, 4\)\s+float32\s+64$",
        default,
        re.M,
    )
    assert other.splitlines()[0] == f"Adapter 'other' at {adapters['kit'] / 'other'}"
    assert "  parameters: 192 in 4 tensors" in other


def test_inspect_peftkit_adapter_json(runs, adapters):
    report = json.loads(ok(runs["inspect kit --json"]))
    assert report["path"] == str(adapters["kit"])
    default, other = report["adapters"]
    assert (default["name"], other["name"]) == ("default", "other")
    assert default["path"] == str(adapters["kit"])
    assert other["path"] == str(adapters["kit"] / "other")
    assert (default["peft_type"], default["method"], default["plugin"]) == ("LORA", "lora", "lora")
    assert (default["distribution"], default["version"], default["install"]) == (
        "peftkit-lora",
        LORA_VERSION,
        None,
    )
    assert default["config"] == json.loads((adapters["kit"] / "adapter_config.json").read_text())
    assert default["file"] == "adapter_model.safetensors"
    assert default["size_bytes"] == (adapters["kit"] / "adapter_model.safetensors").stat().st_size
    assert default["size"] == human_size(default["size_bytes"])
    assert default["metadata"] == {
        "format": "pt",
        "peftkit.method": "lora",
        "peftkit.plugin": "peftkit-lora",
        "peftkit.plugin_version": LORA_VERSION,
        "peftkit.version": peftkit.__version__,
    }
    tensors = {t["name"]: t for t in default["tensors"]}
    assert len(tensors) == 8
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] == {
        "name": "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "shape": [4, 32],
        "dtype": "float32",
        "parameters": 128,
    }
    assert default["parameters"] == 896 == sum(t["parameters"] for t in default["tensors"])
    assert other["config"]["r"] == 2
    assert other["parameters"] == 192


def test_inspect_peft_adapter_json(runs, adapters):
    report = json.loads(ok(runs["inspect peft --json"]))
    (adapter,) = report["adapters"]
    assert (adapter["peft_type"], adapter["method"], adapter["distribution"]) == (
        "LORA",
        "lora",
        "peftkit-lora",
    )
    assert adapter["config"]["peft_version"] == peft.__version__
    assert adapter["metadata"] == {"format": "pt"}
    assert sorted(t["name"] for t in adapter["tensors"]) == [
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    ]
    assert adapter["parameters"] == 2 * (2 * 32 + 32 * 2)


def test_inspect_peft_adapter_table(adapters):
    result = invoke("inspect", str(adapters["peft"]))
    assert result.exit_code == 0, result.output
    assert (
        f"  method:     LORA, method 'lora' of plugin 'lora' (peftkit-lora {LORA_VERSION})" in result.stdout
    )
    assert "  parameters: 256 in 4 tensors" in result.stdout
    assert re.search(r"^    format\s+pt$", result.stdout, re.M)
    assert re.search(r"^    peft_version\s+\"" + re.escape(peft.__version__) + '"$', result.stdout, re.M)


def _write_adapter(folder: Path, config: dict, tensors: dict, metadata: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata)
    return folder


def test_inspect_unknown_method_names_the_package_to_install(tmp_path):
    folder = _write_adapter(
        tmp_path / "a", {"peft_type": "FOURIERFT", "r": 4}, {"w": torch.zeros(2, 3, dtype=torch.bfloat16)}
    )
    result = invoke("inspect", str(folder))
    assert result.exit_code == 0, result.output
    assert "  method:     FOURIERFT (not installed: install peftkit-fourierft)" in result.stdout
    assert re.search(r"^    w\s+\(2, 3\)\s+bfloat16\s+6$", result.stdout, re.M)
    assert "  metadata:   none" in result.stdout
    report = json.loads(invoke("inspect", "--json", str(folder)).stdout)
    assert report["adapters"][0]["install"] == "peftkit-fourierft"
    assert report["adapters"][0]["method"] is None


def test_inspect_unknown_method_prefers_the_plugin_named_in_the_metadata(tmp_path):
    folder = _write_adapter(
        tmp_path / "a",
        {"peft_type": "SHIRA"},
        {"w": torch.zeros(1)},
        {"peftkit.plugin": "peftkit-shira-plus"},
    )
    result = invoke("inspect", str(folder))
    assert "  method:     SHIRA (not installed: install peftkit-shira-plus)" in result.stdout


def test_inspect_folder_with_only_named_adapters(tmp_path):
    _write_adapter(tmp_path / "b", {"peft_type": "LORA", "r": 1}, {"x": torch.zeros(1, 4)})
    report = json.loads(invoke("inspect", "--json", str(tmp_path)).stdout)
    assert [a["name"] for a in report["adapters"]] == ["b"]
    assert report["adapters"][0]["parameters"] == 4


def test_inspect_legacy_bin_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    torch.save({"x.lora_A.weight": torch.zeros(2, 5, dtype=torch.float16)}, tmp_path / "adapter_model.bin")
    report = json.loads(invoke("inspect", "--json", str(tmp_path)).stdout)
    (adapter,) = report["adapters"]
    assert adapter["file"] == "adapter_model.bin"
    assert adapter["metadata"] == {}
    assert adapter["tensors"] == [
        {"name": "x.lora_A.weight", "shape": [2, 5], "dtype": "float16", "parameters": 10}
    ]


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr.strip()


def test_inspect_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    assert _error(invoke("inspect", str(missing))) == f"Error: adapter folder {str(missing)!r} does not exist"


def test_inspect_folder_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not an adapter")
    assert _error(invoke("inspect", str(tmp_path))) == (
        f"Error: {str(tmp_path)!r} has no adapter_config.json: it is not an adapter folder"
    )


def test_inspect_config_that_is_not_json(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{peft_type: LORA")
    message = _error(invoke("inspect", str(tmp_path)))
    assert message.startswith(f"Error: {str(tmp_path / 'adapter_config.json')!r} is not valid JSON: ")


def test_inspect_config_without_peft_type(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    assert _error(invoke("inspect", str(tmp_path))) == (
        f"Error: {str(tmp_path / 'adapter_config.json')!r} has no 'peft_type': it is not an adapter config"
    )


def test_inspect_corrupt_safetensors(tmp_path):
    folder = _write_adapter(tmp_path / "a", {"peft_type": "LORA"}, {"w": torch.ones(64, 64)})
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    message = _error(invoke("inspect", str(folder)))
    assert message.startswith(f"Error: {str(weights)!r} is not a readable safetensors file (")
    assert message.endswith("); it may be truncated or corrupt")


def test_inspect_folder_without_tensors(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert _error(invoke("inspect", str(tmp_path))) == (
        f"Error: {str(tmp_path)!r} has no adapter_model.safetensors (nor a legacy adapter_model.bin)"
    )


def test_inspect_corrupt_named_adapter_is_an_error(tmp_path):
    _write_adapter(tmp_path / "ok", {"peft_type": "LORA"}, {"w": torch.ones(2)})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    message = _error(invoke("inspect", str(tmp_path)))
    assert message.startswith(
        f"Error: {str(bad / 'adapter_model.safetensors')!r} is not a readable safetensors file"
    )


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**5, "3072.0 TiB"),
    ],
)
def test_human_size(size, text):
    assert human_size(size) == text


# --- a directly registered method plugin's config works with the CLI's inspect -------------------------
@dataclass
class _ToyConfig(PeftConfig):
    method: ClassVar[str] = "toy"
    peft_type: str = "TOY"


class _ToyPlugin:
    @hookimpl
    def peftkit_register_methods(self):
        return [
            MethodSpec(
                name="toy", config_class=_ToyConfig, peft_type="TOY", family="bias-only", mergeable=False
            )
        ]


def test_inspect_names_a_directly_registered_plugin(tmp_path):
    folder = _write_adapter(tmp_path / "a", {"peft_type": "TOY"}, {"w": torch.ones(3)})
    with plugins.registered(_ToyPlugin(), name="toy-direct"):
        result = invoke("inspect", str(folder))
    assert (
        "  method:     TOY, method 'toy' of plugin 'toy-direct' (registered directly, no distribution)"
        in (result.stdout)
    )
