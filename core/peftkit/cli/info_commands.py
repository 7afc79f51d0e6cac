"""``peftkit methods`` and ``peftkit inspect``: what is installed, and what an adapter folder holds.

Neither needs a model. ``inspect`` reads an adapter's config and tensor file only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from peftkit import plugins
from peftkit.cli.plugin_loading import plugin_host
from peftkit.cli.tables import distribution_label, human_size, table, wrapped
from peftkit.config import CONFIG_NAME, read_config_dict
from peftkit.discovery import ALLOW_ENV, BLOCK_ENV
from peftkit.errors import AdapterLoadError, UnknownMethodError


class AdapterFolderError(click.ClickException):
    """An adapter folder that cannot be inspected: missing, not an adapter, or corrupt. Exit code 2."""

    exit_code = 2


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
    host = plugin_host()
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
        if name not in owners and not name.startswith(plugins.BUILTIN_PREFIX)
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
        lines += table(["METHOD", "PEFT_TYPE", "FAMILY", "CAPABILITIES", "DISTRIBUTION", "VERSION"], rows)
        lines += ["", "Plugins:"]
        for row in report["methods"]:
            lines.append(
                f"  {row['name']}: plugin {row['plugin']!r} "
                f"({distribution_label(row['distribution'], row['version'])})"
            )
            lines += wrapped("hooks:", ", ".join(row["hooks"]) or "-")
            lines += wrapped("location:", row["location"] or "-")
    else:
        lines.append("No methods installed. Install a method plugin, for example: pip install peftkit-lora")
    if report["plugins"]:
        lines += ["", f"Other plugins ({len(report['plugins'])}), providing no method:"]
        for row in report["plugins"]:
            lines.append(f"  {row['plugin']} ({distribution_label(row['distribution'], row['version'])})")
            lines += wrapped("hooks:", ", ".join(row["hooks"]) or "-")
            lines += wrapped("location:", row["location"] or "-")
    if report["broken"]:
        lines += ["", f"Broken plugins ({len(report['broken'])}), skipped:"]
        for row in report["broken"]:
            lines.append(
                f"  {row['name']} ({distribution_label(row['distribution'], row['version'])}): {row['error']}"
            )
            lines += wrapped("entry:", row["entry_point"] or "-")
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
def _method_facts(peft_type: str, metadata: dict[str, str]) -> dict[str, Any]:
    host = plugin_host()
    try:
        spec = plugins.method_for_peft_type(peft_type)
    except UnknownMethodError:
        # the plugin that wrote the file (peftkit's metadata) is the surest advice; else the naming rule
        install = metadata.get("peftkit.plugin") or plugins.package_for_peft_type(peft_type)
        return {"method": None, "plugin": None, "distribution": None, "version": None, "install": install}
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
    from peftkit import serialization  # imports torch: here, so that `peftkit --help` stays light

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
        "format": "peft",
    }


def _diffusers_lora_file(path: Path) -> Path | None:
    """The diffusers (or kohya) LoRA file ``path`` is or holds, where it is no PEFT adapter folder."""
    from peftkit.integrations import diffusers_format  # only `inspect` reads such files: `--help` stays light

    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if not path.is_dir() or (path / CONFIG_NAME).is_file():
        return None
    if (path / diffusers_format.WEIGHT_NAME).is_file():
        return path / diffusers_format.WEIGHT_NAME
    candidates = list(path.glob("*.safetensors"))
    if len(candidates) != 1:
        return None
    from safetensors import SafetensorError, safe_open  # not a dependency of `peftkit --help`

    try:
        with safe_open(str(candidates[0]), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return None  # not a LoRA file: the folder gets the error of a folder without an adapter
    return candidates[0] if diffusers_format.key_format(keys) is not None else None


def inspect_diffusers_file(file: Path) -> list[dict[str, Any]]:
    """A diffusers or kohya LoRA file as ``peftkit inspect --json`` reports it: one entry per pipeline
    component (``unet``, ``transformer``, ``text_encoder``...) that it holds tensors for."""
    from peftkit.integrations import diffusers_format  # only `inspect` reads such files: `--help` stays light

    facts = diffusers_format.describe(file)
    size = file.stat().st_size
    entries = []
    for component in facts["components"]:
        owned = sorted(
            diffusers_format.component_tensors(facts["tensors"], facts["format"], component).items()
        )
        tensor_rows = [
            {
                "name": key,
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "parameters": tensor.numel(),
            }
            for key, tensor in owned
        ]
        entries.append(
            {
                "name": component or "default",
                "path": str(file),
                "peft_type": facts["peft_type"],
                **_method_facts(facts["peft_type"], facts["metadata"]),
                "config": facts["config"].get(component, {}),
                "file": file.name,
                "size_bytes": size,
                "size": human_size(size),
                "parameters": sum(row["parameters"] for row in tensor_rows),
                "tensors": tensor_rows,
                "metadata": facts["metadata"],
                "format": facts["format"],
                "component": component or None,
                "config_source": facts["config_source"],
            }
        )
    return entries


def inspect_foreign_folder(path: Path) -> dict[str, Any] | None:
    """A folder in another library's format that an installed plugin reads (AdapterHub's, with
    peftkit-bottleneck), as ``peftkit inspect --json`` reports it; None for any other folder."""
    from peftkit.foreign_format import read_foreign_adapter  # asks the plugins: not for `--help`

    foreign = read_foreign_adapter(path)
    if foreign is None:
        return None
    spec = plugins.methods().get(foreign.method) if foreign.method else None
    peft_type = spec.peft_type if spec is not None else "-"
    tensor_rows = [
        {
            "name": key,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "parameters": tensor.numel(),
        }
        for key, tensor in sorted(foreign.source_tensors.items())
    ]
    size = foreign.file.stat().st_size
    return {
        "name": "default",
        "path": str(path),
        "peft_type": peft_type,
        **_method_facts(peft_type, {}),
        "config": foreign.source_config,
        "file": foreign.file.name,
        "size_bytes": size,
        "size": human_size(size),
        "parameters": sum(row["parameters"] for row in tensor_rows),
        "tensors": tensor_rows,
        "metadata": {},
        "format": foreign.format,
        "foreign": True,
        "notes": foreign.notes,
    }


def inspect_report(path: Path) -> dict[str, Any]:
    """The folder's own adapter ("default") and the adapters PEFT saves in sub-folders of their name; or,
    for a diffusers LoRA file (or a folder holding one), each pipeline component it holds a LoRA for; or a
    folder in another library's format that an installed plugin reads."""
    foreign = inspect_foreign_folder(path)
    if foreign is not None:
        return {"path": str(path), "adapters": [foreign]}
    lora_file = _diffusers_lora_file(path)
    if lora_file is not None:
        return {"path": str(path), "adapters": inspect_diffusers_file(lora_file)}
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
    source = distribution_label(adapter["distribution"], adapter["version"])
    return f"{adapter['peft_type']}, method {adapter['method']!r} of plugin {adapter['plugin']!r} ({source})"


def _format_line(adapter: dict[str, Any]) -> str:
    if adapter.get("foreign"):
        return (
            f"{adapter['format']} folder; PeftModel.from_pretrained loads it as a {adapter['method']} adapter"
            + "".join(f"; {note}" for note in adapter["notes"])
        )
    if adapter["format"] == "kohya":
        return (
            f"kohya LoRA file (lora_unet_... keys), component {adapter['component']!r}; "
            "diffusers converts its keys when loading"
        )
    if adapter["component"] is None:
        return "diffusers LoRA file of one model, keys without a component prefix (load_lora_adapter(prefix=None))"
    return (
        f"diffusers LoRA file, component {adapter['component']!r} "
        f"(pipeline.load_lora_weights, or load_lora_adapter(prefix={adapter['component']!r}))"
    )


def format_inspect(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for adapter in report["adapters"]:
        if lines:
            lines.append("")
        lines.append(f"Adapter {adapter['name']!r} at {adapter['path']}")
        facts = [
            ["method", _method_line(adapter)],
            *([["format", _format_line(adapter)]] if adapter["format"] != "peft" else []),
            ["file", f"{adapter['file']}, {adapter['size_bytes']:,} bytes ({adapter['size']})"],
            ["parameters", f"{adapter['parameters']:,} in {len(adapter['tensors'])} tensors"],
        ]
        lines += [f"  {label + ':':<12}{value}" for label, value in facts]
        lines.append("  metadata:" if adapter["metadata"] else "  metadata:   none")
        meta = [[key, value] for key, value in sorted(adapter["metadata"].items())]
        lines += table(["KEY", "VALUE"], meta, indent="    ") if meta else []
        lines.append(
            "  config:"
            if adapter.get("config_source") != "tensor shapes"
            else "  config:     none saved; read from the tensors:"
        )
        config = [[key, json.dumps(value)] for key, value in sorted(adapter["config"].items())]
        lines += table(["FIELD", "VALUE"], config, indent="    ")
        lines.append("  tensors:")
        rows = [
            [t["name"], "(" + ", ".join(map(str, t["shape"])) + ")", t["dtype"], f"{t['parameters']:,}"]
            for t in adapter["tensors"]
        ]
        lines += table(["NAME", "SHAPE", "DTYPE", "PARAMETERS"], rows, indent="    ")
    return "\n".join(lines)


@click.command("inspect", short_help="Show an adapter folder: method, config, tensors, size.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
def inspect_command(path: Path, as_json: bool) -> None:
    """Show an adapter folder: method, config, tensors (shape, dtype), parameter count, size, metadata.

    Reads adapter_config.json and the tensor file only; no base model is needed. Adapters PEFT saved in
    sub-folders (PATH/<name>/) are shown too. PATH may also be a diffusers LoRA file (diffusers' or kohya's
    keys), or a folder holding one (pytorch_lora_weights.safetensors): one entry per pipeline component; or a
    folder in another library's format that an installed plugin reads (AdapterHub's, with peftkit-bottleneck).
    """
    try:
        report = inspect_report(path)
    except AdapterLoadError as exc:
        raise AdapterFolderError(str(exc)) from exc
    click.echo(json.dumps(report, indent=2) if as_json else format_inspect(report))


COMMANDS = (methods_command, inspect_command)
