"""The ``peftkit`` command line: installed methods, adapter folders, and the commands plugins add.

Kept light at import: click and the core's plugin facade only. Plugins (and through them torch) load
when a command needs them; ``peftkit --version`` and ``peftkit <built-in> --help`` load nothing.
Plugins add subcommands through the ``peftkit_register_commands`` hook, called once per CLI run, the
first time the CLI has to know a command that is not built in (or list them all, as ``--help`` does).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import click

from peftkit import __version__, plugins
from peftkit.discovery import ALLOW_ENV, BLOCK_ENV, PluginLoadWarning
from peftkit.errors import AdapterLoadError, PeftkitError

CORE_PLUGIN_PREFIX = "peftkit.builtin."


class AdapterFolderError(click.ClickException):
    """An adapter folder that cannot be inspected: missing, not an adapter, or corrupt. Exit code 2."""

    exit_code = 2


# --- plugin loading, with warnings shown as one plain line -------------------------------------------
def _plugin_host() -> plugins.PluginHost:
    """The process's plugin host; a plugin that fails to load is reported on stderr as ``warning: ...``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PluginLoadWarning)
        host = plugins.host()
    for warning in caught:
        if issubclass(warning.category, PluginLoadWarning):
            click.echo(f"warning: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return host


class PeftkitGroup(click.Group):
    """The top-level group: built-in commands, plus those plugins add, loaded only when needed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugin_commands_loaded = False
        self.builtin_commands: frozenset[str] = frozenset()

    def load_plugin_commands(self) -> None:
        """Let every plugin add its subcommands (once). A built-in command is never replaced."""
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        builtins = {name: self.commands[name] for name in self.builtin_commands}
        _plugin_host()
        try:
            plugins.register_commands(self)
        except Exception as exc:  # one plugin's bad command must not take the CLI down
            click.echo(
                f"warning: a plugin failed to add its commands and they are skipped: "
                f"{type(exc).__name__}: {exc}",
                err=True,
            )
        for name, command in builtins.items():
            if self.commands.get(name) is not command:
                click.echo(
                    f"warning: a plugin's command {name!r} is ignored: it would replace the built-in command",
                    err=True,
                )
                self.commands[name] = command

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.builtin_commands:
            self.load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PeftkitError as exc:  # a plugin conflict, or a plugin command's own error: no traceback
            raise click.ClickException(str(exc)) from exc


# --- peftkit methods ---------------------------------------------------------------------------------
def _location(host: plugins.PluginHost, plugin_name: str) -> str | None:
    origin = host.origins.get(plugin_name)
    if origin is not None and origin.location:
        return origin.location
    plugin = host.pm.get_plugin(plugin_name)
    if plugin is None:
        return None
    module = plugin if hasattr(plugin, "__file__") else sys.modules.get(type(plugin).__module__)
    return getattr(module, "__file__", None)


def _plugin_facts(host: plugins.PluginHost, plugin_name: str) -> dict[str, Any]:
    origin = host.origins.get(plugin_name)
    return {
        "plugin": plugin_name,
        "distribution": origin.distribution if origin else None,
        "version": origin.version if origin else None,
        "hooks": host.hooks_of(plugin_name),
        "location": _location(host, plugin_name),
    }


def methods_report() -> dict[str, Any]:
    """What ``peftkit methods --json`` prints: methods, other (non-core) plugins, and broken plugins."""
    host = _plugin_host()
    methods = host.methods  # raises PluginConflictError when two plugins claim a name
    method_rows = []
    for name in sorted(methods):
        spec = methods[name]
        facts = _plugin_facts(host, host.plugin_of(name))
        method_rows.append(
            {
                "name": spec.name,
                "peft_type": spec.peft_type,
                "family": spec.family,
                "capabilities": spec.capabilities(),
                "distribution": spec.distribution or facts["distribution"],
                "version": spec.version or facts["version"],
                "plugin": facts["plugin"],
                "hooks": facts["hooks"],
                "location": facts["location"],
            }
        )
    owners = {row["plugin"] for row in method_rows}
    other_plugins = [
        _plugin_facts(host, name)
        for name, _ in sorted(host.pm.list_name_plugin())
        if name not in owners and not name.startswith(CORE_PLUGIN_PREFIX)
    ]
    broken = [
        {
            "name": origin.name,
            "distribution": origin.distribution,
            "version": origin.version,
            "entry_point": origin.location,
            "error": origin.error,
            "traceback": origin.traceback,
        }
        for origin in host.broken
    ]
    return {"methods": method_rows, "plugins": other_plugins, "broken": broken}


def _table(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    ]


def _wrapped(label: str, text: str) -> list[str]:
    prefix = f"    {label:<10}"
    return textwrap.wrap(text, width=100, initial_indent=prefix, subsequent_indent=" " * len(prefix)) or [
        prefix.rstrip()
    ]


def _dist_label(distribution: str | None, version: str | None) -> str:
    if not distribution:
        return "registered directly, no distribution"
    return f"{distribution} {version}" if version else distribution


def format_methods(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if report["methods"]:
        rows = []
        for row in report["methods"]:
            capabilities = [key.replace("_", "-") for key, value in row["capabilities"].items() if value]
            rows.append(
                [
                    row["name"],
                    row["peft_type"],
                    row["family"],
                    ", ".join(capabilities) or "-",
                    row["distribution"] or "-",
                    row["version"] or "-",
                ]
            )
        lines += _table(["METHOD", "PEFT_TYPE", "FAMILY", "CAPABILITIES", "DISTRIBUTION", "VERSION"], rows)
        lines += ["", "Plugins:"]
        for row in report["methods"]:
            lines.append(
                f"  {row['name']}: plugin {row['plugin']!r} "
                f"({_dist_label(row['distribution'], row['version'])})"
            )
            lines += _wrapped("hooks:", ", ".join(row["hooks"]) or "-")
            lines += _wrapped("location:", row["location"] or "-")
    else:
        lines.append("No methods installed. Install a method plugin, for example: pip install peftkit-lora")
    if report["plugins"]:
        lines += ["", f"Other plugins ({len(report['plugins'])}), providing no method:"]
        for row in report["plugins"]:
            lines.append(f"  {row['plugin']} ({_dist_label(row['distribution'], row['version'])})")
            lines += _wrapped("hooks:", ", ".join(row["hooks"]) or "-")
            lines += _wrapped("location:", row["location"] or "-")
    if report["broken"]:
        lines += ["", f"Broken plugins ({len(report['broken'])}), skipped:"]
        for row in report["broken"]:
            lines.append(
                f"  {row['name']} ({_dist_label(row['distribution'], row['version'])}): {row['error']}"
            )
            lines += _wrapped("entry:", row["entry_point"] or "-")
    for env in (ALLOW_ENV, BLOCK_ENV):
        if env in os.environ:
            lines += ["", f"note: {env}={os.environ[env]!r} limits which plugins load"]
    return "\n".join(lines)


@click.command("methods", short_help="List installed methods and broken plugins.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
def methods_command(as_json: bool) -> None:
    """List installed methods (type, capabilities, plugin, hooks, location) and broken plugins."""
    report = methods_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_methods(report))


# --- peftkit inspect ---------------------------------------------------------------------------------
def human_size(size: int) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``12.0 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _method_facts(peft_type: str, metadata: dict[str, str]) -> dict[str, Any]:
    from peftkit.errors import UnknownMethodError

    try:
        spec = plugins.method_for_peft_type(peft_type)
    except UnknownMethodError:
        # the plugin that wrote the file (peftkit's metadata) is the surest advice; else the naming rule
        install = metadata.get("peftkit.plugin") or plugins.package_for_peft_type(peft_type)
        return {"method": None, "plugin": None, "distribution": None, "version": None, "install": install}
    host = plugins.host()
    plugin_name = host.plugin_of(spec.name)
    origin = host.origins.get(plugin_name)
    return {
        "method": spec.name,
        "plugin": plugin_name,
        "distribution": spec.distribution or (origin.distribution if origin else None),
        "version": spec.version or (origin.version if origin else None),
        "install": None,
    }


def inspect_adapter(folder: Path, name: str) -> dict[str, Any]:
    """One adapter folder as ``peftkit inspect --json`` reports it; reads only its config and tensor file."""
    from peftkit import serialization
    from peftkit.config import read_config_dict

    config = read_config_dict(folder)
    tensors = serialization.read_tensors(folder)
    weights = folder / serialization.WEIGHTS_NAME
    if not weights.is_file():
        weights = folder / serialization.LEGACY_WEIGHTS_NAME
    metadata = serialization.read_metadata(folder) if weights.name == serialization.WEIGHTS_NAME else {}
    tensor_rows = [
        {
            "name": key,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "parameters": tensor.numel(),
        }
        for key, tensor in sorted(tensors.items())
    ]
    size = weights.stat().st_size
    return {
        "name": name,
        "path": str(folder),
        "peft_type": str(config["peft_type"]),
        **_method_facts(str(config["peft_type"]), metadata),
        "config": config,
        "file": weights.name,
        "size_bytes": size,
        "size": human_size(size),
        "parameters": sum(row["parameters"] for row in tensor_rows),
        "tensors": tensor_rows,
        "metadata": metadata,
    }


def inspect_report(path: Path) -> dict[str, Any]:
    """The folder's own adapter ("default") and the adapters PEFT saves in sub-folders of their name."""
    from peftkit.config import CONFIG_NAME, read_config_dict

    nested = []
    if path.is_dir():
        nested = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())
    adapters = []
    if (path / CONFIG_NAME).is_file() or not nested:
        read_config_dict(path)  # the clear error for a missing folder or one that is no adapter
        adapters.append(inspect_adapter(path, "default"))
    adapters += [inspect_adapter(sub, sub.name) for sub in nested]
    return {"path": str(path), "adapters": adapters}


def _method_line(adapter: dict[str, Any]) -> str:
    if adapter["method"] is None:
        return f"{adapter['peft_type']} (not installed: install {adapter['install']})"
    source = _dist_label(adapter["distribution"], adapter["version"])
    return f"{adapter['peft_type']}, method {adapter['method']!r} of plugin {adapter['plugin']!r} ({source})"


def format_inspect(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for adapter in report["adapters"]:
        if lines:
            lines.append("")
        lines.append(f"Adapter {adapter['name']!r} at {adapter['path']}")
        facts = [
            ["method", _method_line(adapter)],
            ["file", f"{adapter['file']}, {adapter['size_bytes']:,} bytes ({adapter['size']})"],
            ["parameters", f"{adapter['parameters']:,} in {len(adapter['tensors'])} tensors"],
        ]
        lines += [f"  {label + ':':<12}{value}" for label, value in facts]
        lines.append("  metadata:" if adapter["metadata"] else "  metadata:   none")
        meta = [[key, value] for key, value in sorted(adapter["metadata"].items())]
        lines += _table(["KEY", "VALUE"], meta, indent="    ") if meta else []
        lines.append("  config:")
        config = [[key, json.dumps(value)] for key, value in sorted(adapter["config"].items())]
        lines += _table(["FIELD", "VALUE"], config, indent="    ")
        lines.append("  tensors:")
        rows = [
            [t["name"], "(" + ", ".join(map(str, t["shape"])) + ")", t["dtype"], f"{t['parameters']:,}"]
            for t in adapter["tensors"]
        ]
        lines += _table(["NAME", "SHAPE", "DTYPE", "PARAMETERS"], rows, indent="    ")
    return "\n".join(lines)


@click.command("inspect", short_help="Show an adapter folder: method, config, tensors, size.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
def inspect_command(path: Path, as_json: bool) -> None:
    """Show an adapter folder: method, config, tensors (shape, dtype), parameter count, size, metadata.

    Reads adapter_config.json and the tensor file only; no base model is needed. Adapters PEFT saved in
    sub-folders (PATH/<name>/) are shown too.
    """
    try:
        report = inspect_report(path)
    except AdapterLoadError as exc:
        raise AdapterFolderError(str(exc)) from exc
    click.echo(json.dumps(report, indent=2) if as_json else format_inspect(report))


# --- the group ---------------------------------------------------------------------------------------
def make_cli() -> PeftkitGroup:
    """A fresh ``peftkit`` group: the built-in commands; plugins' commands join when first needed."""

    @click.group("peftkit", cls=PeftkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "--version", prog_name="peftkit", message="%(prog)s %(version)s")
    def cli() -> None:
        """peftkit: parameter-efficient fine-tuning with methods as plugins."""

    for command in (methods_command, inspect_command):
        cli.add_command(command)
    from peftkit.model_commands import COMMANDS as MODEL_COMMANDS  # targets, plan, merge

    for command in MODEL_COMMANDS:
        cli.add_command(command)
    from peftkit.scaffold import new_method_command  # imported here: `peftkit --help` stays light

    cli.add_command(new_method_command)
    cli.builtin_commands = frozenset(cli.commands)
    return cli


def main(args: list[str] | None = None) -> None:
    """The ``peftkit`` console script."""
    make_cli().main(args=args, prog_name="peftkit")


if __name__ == "__main__":
    main()
