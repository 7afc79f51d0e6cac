"""Plugin discovery: lazy, fault isolated, controlled by environment, conflicts named, direct registration.

Installed plugin distributions are faked without pip: a temporary folder holding
``<name>-<version>.dist-info/`` (METADATA, entry_points.txt) and the plugin module, put on ``sys.path``
(in-process) or on ``PYTHONPATH`` (subprocess).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import click
import peftkit
import pytest
import torch
from click.testing import CliRunner
from peftkit import MethodSpec, PeftConfig, hookimpl, plugins
from peftkit.cli import make_cli
from peftkit.discovery import ALLOW_ENV, BLOCK_ENV, PluginLoadWarning
from peftkit.errors import PluginConflictError, UnknownMethodError
from peftkit.testing.models import tiny_llama
from peftkit_lora import LoraConfig

TOY_PLUGIN = """
from dataclasses import dataclass
from typing import ClassVar

import click

from peftkit import MethodSpec, PeftConfig, hookimpl


@dataclass
class ToyConfig(PeftConfig):
    method: ClassVar[str] = "toy"
    peft_type: str = "TOY"


@hookimpl
def peftkit_register_methods():
    return [MethodSpec(name="toy", config_class=ToyConfig, peft_type="TOY", family="bias-only", mergeable=False)]
"""

# the toy distribution's commands: a module of their own, named in the peftkit.commands entry-point group
TOY_COMMANDS = '''
import click

from peftkit import hookimpl


@hookimpl
def peftkit_register_commands(cli):
    @cli.command("toy-hello")
    def toy_hello():
        """Say hello from the toy plugin."""
        click.echo("hello from toy")
'''

BROKEN_PLUGIN = "import peftkit_missing_dependency  # not installed anywhere\n"

FORK_PLUGIN = """
from peftkit import MethodSpec, hookimpl
from peftkit_lora import LoraConfig


@hookimpl
def peftkit_register_methods():
    return [MethodSpec(name="{name}", config_class=LoraConfig, peft_type="{peft_type}", family="weight-delta")]
"""

BROKEN_WARNING = (
    "peftkit plugin 'broken' (peftkit-broken) failed to load and is skipped: "
    "ModuleNotFoundError: No module named 'peftkit_missing_dependency'"
)


def fake_distribution(
    root: Path,
    dist: str,
    version: str,
    entry_name: str,
    module: str | None,
    source: str | None,
    commands: tuple[str, str] | None = None,
) -> None:
    """An installed-looking distribution ``dist`` whose ``peftkit`` entry point ``entry_name`` is ``module``,
    and whose ``peftkit.commands`` entry point of the same name is ``commands`` (module name, source)."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    groups = []
    for group, named in (("peftkit", (module, source) if module else None), ("peftkit.commands", commands)):
        if named is not None:
            groups.append(f"[{group}]\n{entry_name} = {named[0]}\n")
            (root / f"{named[0]}.py").write_text(textwrap.dedent(named[1]))
    (info / "entry_points.txt").write_text("\n".join(groups))


FAKES = {
    "toy": ("peftkit-toy", "0.3.0", "peftkit_toy_plugin", TOY_PLUGIN),
    "broken": ("peftkit-broken", "0.0.1", "peftkit_broken_plugin", BROKEN_PLUGIN),
    "lorafork": (
        "peftkit-lora-fork",
        "9.0.0",
        "peftkit_lorafork_plugin",
        FORK_PLUGIN.format(name="lora", peft_type="LORA_FORK"),
    ),
    "loratype": (
        "peftkit-lora-type",
        "1.0.0",
        "peftkit_loratype_plugin",
        FORK_PLUGIN.format(name="lora2", peft_type="LORA"),
    ),
}


@pytest.fixture
def site(tmp_path) -> Iterator[Path]:
    """A folder on sys.path to fake installed distributions in; global plugin state is restored after."""
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.path.remove(str(tmp_path))
    importlib.invalidate_caches()
    for _, _, module, _ in FAKES.values():
        sys.modules.pop(module, None)
    for module, _ in FAKE_COMMANDS.values():
        sys.modules.pop(module, None)
    plugins.reset()


# the fakes' commands modules, by the fake's name
FAKE_COMMANDS = {"toy": ("peftkit_toy_commands", TOY_COMMANDS)}


def install(root: Path, *names: str) -> None:
    for name in names:
        dist, version, module, source = FAKES[name]
        fake_distribution(root, dist, version, name, module, source, FAKE_COMMANDS.get(name))


@contextmanager
def plugin_env(block: str | None = None, allow: str | None = None) -> Iterator[None]:
    """Set (or unset) the two discovery variables for the duration of a block."""
    saved = {key: os.environ.get(key) for key in (BLOCK_ENV, ALLOW_ENV)}
    try:
        for key, value in ((BLOCK_ENV, block), (ALLOW_ENV, allow)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def discover(block: str | None = None, allow: str | None = None) -> plugins.PluginHost:
    with plugin_env(block, allow):
        return plugins.reset()


def loaded_names(host: plugins.PluginHost) -> set[str]:
    return set(host.origins)


# --- lazy --------------------------------------------------------------------------------------------
def test_importing_peftkit_loads_no_plugin_and_not_torch():
    script = (
        "import sys, peftkit, peftkit.cli\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peftkit_lora')]\n"
        "print(sorted(heavy), 'peftkit.plugins' in sys.modules and sys.modules['peftkit.plugins']._host)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] None"


# --- fault isolation -----------------------------------------------------------------------------------
def test_a_broken_plugin_is_reported_and_lora_still_works(site):
    install(site, "broken", "toy")
    with pytest.warns(PluginLoadWarning) as caught:
        host = discover(allow="broken,toy,lora")
    assert [str(w.message) for w in caught if w.category is PluginLoadWarning] == [BROKEN_WARNING]
    (broken,) = host.broken
    assert (broken.name, broken.distribution, broken.version) == ("broken", "peftkit-broken", "0.0.1")
    assert broken.location == "peftkit_broken_plugin"
    assert broken.error == "ModuleNotFoundError: No module named 'peftkit_missing_dependency'"
    assert "peftkit_broken_plugin.py" in broken.traceback
    assert {"lora", "toy"} <= set(plugins.methods())

    base = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = peftkit.get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        assert torch.equal(model(input_ids=ids).logits, expected)
    assert model.peft_config["default"].peft_type == "LORA"

    table = CliRunner().invoke(make_cli(), ["methods"])
    assert table.exit_code == 0
    assert "Broken plugins (1), skipped:" in table.stdout
    assert (
        "  broken (peftkit-broken 0.0.1): ModuleNotFoundError: No module named 'peftkit_missing_dependency'"
        in table.stdout
    )
    assert "    entry:    peftkit_broken_plugin" in table.stdout
    report = json.loads(CliRunner().invoke(make_cli(), ["methods", "--json"]).stdout)
    (entry,) = report["broken"]
    assert entry["error"] == "ModuleNotFoundError: No module named 'peftkit_missing_dependency'"
    assert entry["entry_point"] == "peftkit_broken_plugin"
    assert "Traceback" in entry["traceback"]


# `peftkit --help`, then which of the heavy or plugin modules that run imported
HELP_AND_MODULES = """
import sys
from peftkit.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
watched = ("torch", "transformers", "bitsandbytes", "peftkit_lora", "peftkit_toy_plugin",
           "peftkit_broken_plugin", "peftkit_toy_commands")
print("imported:", sorted(name for name in watched if name in sys.modules))
"""


def _fake_site_runs(root: Path) -> dict[str, subprocess.CompletedProcess]:
    # only the fakes and LoRA, whatever else this environment has installed
    env = {k: v for k, v in os.environ.items() if k != BLOCK_ENV}
    env[ALLOW_ENV] = "lora,toy,broken"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    commands = {
        "methods": ([sys.executable, "-m", "peftkit", "methods"], {}),
        "toy-hello": ([sys.executable, "-m", "peftkit", "toy-hello"], {}),
        "--help": ([sys.executable, "-c", HELP_AND_MODULES], {}),
        "--help, toy blocked": ([sys.executable, "-c", HELP_AND_MODULES], {BLOCK_ENV: "toy"}),
    }
    started = {
        name: (
            args,
            subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, **extra}
            ),
        )
        for name, (args, extra) in commands.items()
    }
    done = {}
    for name, (args, process) in started.items():
        out, err = process.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(args, process.returncode, out, err)
    return done


def test_installed_fake_plugins_in_a_fresh_process(site):
    """The real thing: entry points found on PYTHONPATH, the CLI's warning line, a plugin's subcommand."""
    install(site, "broken", "toy")
    runs = _fake_site_runs(site)

    methods = runs["methods"]
    assert methods.returncode == 0, methods.stderr
    assert f"warning: {BROKEN_WARNING}" in methods.stderr.splitlines()
    rows = {
        line.split()[0]: line.split() for line in methods.stdout.splitlines()[1:] if line and line[0] != " "
    }
    assert rows["toy"] == ["toy", "TOY", "bias-only", "supports-multiple-active", "peftkit-toy", "0.3.0"]
    assert rows["lora"][:3] == ["lora", "LORA", "weight-delta"]
    assert "  toy: plugin 'toy' (peftkit-toy 0.3.0)" in methods.stdout
    assert f"location: {site / 'peftkit_toy_plugin.py'}" in methods.stdout
    assert "Broken plugins (1), skipped:" in methods.stdout

    hello = runs["toy-hello"]
    assert (hello.returncode, hello.stdout) == (0, "hello from toy\n"), hello.stderr

    # --help lists the plugin's command, importing its commands module only: no method plugin, no torch
    helped = runs["--help"]
    assert (helped.returncode, helped.stderr) == (0, "")
    assert re.search(r"^  toy-hello +Say hello from the toy plugin\.$", helped.stdout, re.M), helped.stdout
    assert helped.stdout.splitlines()[-1] == "imported: ['peftkit_toy_commands']"
    blocked = runs["--help, toy blocked"]
    assert "toy-hello" not in blocked.stdout
    assert blocked.stdout.splitlines()[-1] == "imported: []"
    assert methods.stdout.rstrip().endswith(f"note: {ALLOW_ENV}='lora,toy,broken' limits which plugins load")


def test_a_commands_module_that_fails_to_import_is_reported_and_the_others_still_work(site):
    install(site, "toy")
    fake_distribution(
        site,
        "peftkit-badcmd",
        "0.1.0",
        "badcmd",
        None,
        None,
        commands=("peftkit_badcmd_commands", "import peftkit_missing_dependency\n"),
    )
    with plugin_env(allow="toy,badcmd"):
        plugins.reset()
        result = CliRunner().invoke(make_cli(), ["--help"])
    sys.modules.pop("peftkit_badcmd_commands", None)
    assert result.exit_code == 0
    assert result.stderr.strip() == (
        "warning: peftkit command plugin 'badcmd' (peftkit-badcmd) failed to load and is skipped: "
        "ModuleNotFoundError: No module named 'peftkit_missing_dependency'"
    )
    assert re.search(r"^  toy-hello +Say hello from the toy plugin\.$", result.stdout, re.M)
    assert re.search(r"^  methods +List installed methods", result.stdout, re.M)


def test_a_plugin_module_with_a_commands_hook_is_not_imported_for_commands(site):
    """Commands come from the peftkit.commands group: a method plugin's own module is never imported for them."""
    toy_with_hook = TOY_PLUGIN + TOY_COMMANDS.replace("toy-hello", "toy-inline")
    fake_distribution(site, "peftkit-toy", "0.3.0", "toy", "peftkit_toy_plugin", toy_with_hook)
    with plugin_env(allow="toy"):
        plugins._host = None  # a fresh process's state: no plugin loaded yet
        helped = CliRunner().invoke(make_cli(), ["--help"])
        assert "peftkit_toy_plugin" not in sys.modules
        assert "toy-inline" not in helped.stdout
        assert plugins.methods().keys() == {"toy"}  # the plugin itself loads, for what it is for
        # and once loaded it is still not asked: the rule does not depend on what ran before
        assert "toy-inline" not in CliRunner().invoke(make_cli(), ["--help"]).stdout


# --- environment control --------------------------------------------------------------------------------
def test_block_by_entry_point_or_distribution_name_never_imports_the_plugin(site):
    install(site, "broken", "toy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)  # the broken plugin must not even be tried
        host = discover(block="broken,peftkit-toy", allow="broken,toy,lora")
    assert host.broken == []
    assert "peftkit_broken_plugin" not in sys.modules and "peftkit_toy_plugin" not in sys.modules
    assert loaded_names(host) == {"lora"}
    assert discover(block="lora", allow="toy,lora").methods.keys() == {"toy"}
    assert discover(block="peftkit-lora", allow="toy,lora").methods.keys() == {"toy"}


def test_allow_list_limits_loading(site):
    install(site, "broken", "toy")
    assert loaded_names(discover(allow="toy")) == {"toy"}
    assert loaded_names(discover(allow="peftkit-lora")) == {"lora"}
    assert loaded_names(discover(allow=" toy , lora ")) == {"toy", "lora"}
    empty = discover(allow="")
    assert loaded_names(empty) == set() and empty.broken == [] and empty.methods == {}
    assert "peftkit_broken_plugin" not in sys.modules


def test_methods_says_when_the_environment_limits_plugins(site):
    install(site, "broken", "toy")
    with plugin_env(block="broken, peftkit-toy", allow="lora,toy,broken"):
        plugins.reset()
        result = CliRunner().invoke(make_cli(), ["methods"])
    assert result.exit_code == 0
    assert "toy" not in result.stdout.split() and "Broken plugins" not in result.stdout
    assert result.stdout.splitlines()[-3:] == [
        f"note: {ALLOW_ENV}='lora,toy,broken' limits which plugins load",
        "",
        f"note: {BLOCK_ENV}='broken, peftkit-toy' limits which plugins load",
    ]


def test_block_wins_over_allow(site):
    install(site, "toy")
    assert loaded_names(discover(allow="toy,lora", block="toy")) == {"lora"}


# --- conflicts ------------------------------------------------------------------------------------------
def test_two_plugins_claiming_one_method_name_is_an_error_naming_both(site):
    install(site, "lorafork")
    discover(allow="lora,lorafork")
    with pytest.raises(PluginConflictError) as error:
        plugins.methods()
    assert str(error.value) == (
        "plugins 'peftkit-lora' and 'peftkit-lora-fork' both provide the method name 'lora'; "
        "uninstall one, or block one with PEFTKIT_BLOCK_PLUGINS"
    )
    result = CliRunner().invoke(make_cli(), ["methods"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {error.value}"
    assert "Traceback" not in result.output
    # the advice works: block one and the other is the method
    assert (
        discover(allow="lora,lorafork", block="peftkit-lora-fork").methods["lora"].distribution
        == "peftkit-lora"
    )


def test_two_plugins_claiming_one_peft_type_is_an_error_naming_both(site):
    install(site, "loratype")
    discover(allow="lora,loratype")
    with pytest.raises(
        PluginConflictError,
        match=r"^plugins 'peftkit-lora' and 'peftkit-lora-type' both provide "
        r"the peft_type 'LORA'; uninstall one, or block one with PEFTKIT_BLOCK_PLUGINS$",
    ):
        plugins.methods()


# --- direct registration ----------------------------------------------------------------------------------
@dataclass
class GreetConfig(PeftConfig):
    method: ClassVar[str] = "greet"
    peft_type: str = "GREET"


class GreetPlugin:
    """A method and a command from one plugin object, registered without any distribution."""

    @hookimpl
    def peftkit_register_methods(self):
        return [
            MethodSpec(
                name="greet",
                config_class=GreetConfig,
                peft_type="GREET",
                family="prompt",
                needs_tokenizer=True,
            )
        ]

    @hookimpl
    def peftkit_register_commands(self, cli):
        @cli.command("greet")
        @click.argument("who")
        def greet(who):
            """Greet someone."""
            click.echo(f"hello, {who}")


@pytest.fixture
def fresh_host():
    plugins.reset()
    yield
    plugins.reset()


def test_a_directly_registered_plugin_provides_a_method_and_a_command(fresh_host):
    plugin = GreetPlugin()
    with plugins.registered(plugin, name="greeter"):
        spec = plugins.method_named("greet")
        assert (spec.peft_type, spec.family, spec.distribution) == ("GREET", "prompt", None)
        assert plugins.method_for_peft_type("GREET") is spec
        assert peftkit.GreetConfig is GreetConfig
        host = plugins.host()
        assert host.plugin_of("greet") == "greeter"
        assert host.plugin_of("lora") == "lora"
        assert host.hooks_of("greeter") == ["peftkit_register_commands", "peftkit_register_methods"]

        cli = make_cli()
        assert CliRunner().invoke(cli, ["greet", "world"]).stdout == "hello, world\n"
        helped = CliRunner().invoke(cli, ["--help"]).stdout
        assert re.search(r"^  greet +Greet someone\.$", helped, re.M), helped

        report = json.loads(CliRunner().invoke(make_cli(), ["methods", "--json"]).stdout)
        (greet,) = [m for m in report["methods"] if m["name"] == "greet"]
        assert greet["plugin"] == "greeter"
        assert greet["capabilities"]["needs_tokenizer"] is True
        assert greet["location"] == __file__
        assert greet["hooks"] == ["peftkit_register_commands", "peftkit_register_methods"]

    assert "greet" not in plugins.methods()
    gone = CliRunner().invoke(make_cli(), ["greet", "world"])
    assert gone.exit_code == 2
    assert "No such command 'greet'" in gone.stderr
    with pytest.raises(UnknownMethodError, match=r"^no installed plugin provides the method 'greet'$"):
        plugins.host().plugin_of("greet")


def test_reset_without_discovery_has_only_the_core(fresh_host):
    host = plugins.reset(discover=False)
    assert host.methods == {} and host.origins == {} and host.broken == []
    assert [name for name, _ in host.pm.list_name_plugin()] == ["peftkit.builtin.torch_layers"]
