"""The commands that work on a model: ``peftkit targets``, ``peftkit plan`` and ``peftkit merge``.

Light at import (click, the CLI's helpers and :mod:`peftkit.planning`): torch and transformers load when a
command runs. The work itself is in :mod:`peftkit.planning` and :mod:`peftkit.merge_folder`; this module
parses arguments and prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from peftkit import planning
from peftkit.cli.plugin_loading import plugin_host
from peftkit.cli.tables import byte_size, human_size, table
from peftkit.errors import PeftkitError

DTYPE_CHOICES = ["fp32", "fp16", "bf16"]


class InputError(click.ClickException):
    """A bad model folder, method, option or output folder: the message, no traceback, exit code 2."""

    exit_code = 2


def _run(work: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``work``; peftkit's errors about the user's input become an :class:`InputError`."""
    try:
        plugin_host()  # load plugins first, so one that fails is reported as one plain warning line
        return work(*args, **kwargs)
    except PeftkitError as exc:
        raise InputError(str(exc)) from exc


method_option = click.option(
    "--method", "-m", metavar="NAME", help="A method's name, as `peftkit methods` lists."
)
option_option = click.option(
    "--option",
    "-o",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help='A field of the method\'s config; the value is JSON when it parses (16, true, ["q_proj"]), else a string. '
    "Repeatable.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
)
model_argument = click.argument("model", type=click.Path(path_type=Path))


# --- peftkit targets ---------------------------------------------------------------------------
def format_targets(report: dict[str, Any]) -> str:
    lines = [f"{report['model_class']} ({report['model_type']}) from {report['model']}", ""]
    method = report.get("method")
    header = ["PATTERN", "NAME", "TYPE", "KIND", "SHAPE", "COUNT"] + (["TARGETED"] if method else [])
    rows = []
    for group in report["groups"]:
        shape = (
            "mixed" if group["in_features"] is None else f"{group['in_features']}->{group['out_features']}"
        )
        row = [group["pattern"], group["name"], group["type"], group["kind"], shape, str(group["count"])]
        rows.append(row + ([str(group["targeted"])] if method else []))
    lines += table(header, rows)
    lines += ["", f"{report['targetable']} modules in {len(report['groups'])} groups can be targeted."]
    if report.get("parameters"):
        lines += ["", "Parameters of other modules, which target_parameters can adapt:"]
        lines += table(
            ["PATTERN", "TYPE", "SHAPE", "COUNT", "PARAMS"],
            [
                [
                    g["pattern"],
                    g["type"],
                    "x".join(map(str, g["shape"])),
                    str(g["count"]),
                    f"{g['parameters']:,}",
                ]
                for g in report["parameters"]
            ],
            indent="  ",
        )
    if method:
        names = method["target_modules"]
        resolved = names if isinstance(names, str) else ", ".join(names) or "[]"
        lines.append(
            f"{method['summary']} matches {method['matched_count']} of them (target_modules: {resolved})."
        )
        if method.get("parameters"):
            lines += ["", "Parameters it adapts (target_parameters):"]
            lines += parameter_table(method["parameters"])
    return "\n".join(lines)


def parameter_table(groups: list[dict[str, Any]]) -> list[str]:
    """Parameters adapted as parameters (LoRA's target_parameters): shape, count, base and adapter sizes."""
    header = ["PATTERN", "TYPE", "SHAPE", "COUNT", "PARAMS", "ADAPTER_PARAMS"]
    rows = [
        [
            group["pattern"],
            group["type"],
            "x".join(str(size) for size in group["shape"]),
            str(group["count"]),
            f"{group['parameters']:,}",
            f"{group['adapter_parameters']:,}",
        ]
        for group in groups
    ]
    return table(header, rows, indent="  ")


@click.command("targets", short_help="List the modules of a model a method can target.")
@model_argument
@method_option
@option_option
@json_option
def targets_command(model: Path, method: str | None, options: tuple[str, ...], as_json: bool) -> None:
    """List MODEL's layers that adapters can target, grouped by name pattern and layer type.

    MODEL is a transformers model folder with a config.json (or the config.json itself); the model is
    built on the meta device, so no weights are read. With --method (and its config fields as --option
    KEY=VALUE), also show which modules that config's target_modules matches.
    """
    parsed = _run(planning.parse_options, options)
    if parsed and not method:
        raise InputError("--option needs --method: options are fields of a method's config")
    report = _run(planning.targets_report, model, method, parsed)
    click.echo(json.dumps(report, indent=2) if as_json else format_targets(report))


# --- peftkit plan ------------------------------------------------------------------------------
def format_plan(report: dict[str, Any]) -> str:
    memory = report["memory"]
    facts = [
        ["model", f"{report['model_class']} ({report['model_type']}) from {report['model']}"],
        ["method", f"{report['method']}: {report['summary']}"],
        ["adapted", f"{report['adapted_modules']} modules ({', '.join(report['adapted_names']) or '-'})"],
        ["trainable", f"{report['trainable_params']:,} parameters ({report['trainable_percent']:.4f}%)"],
        ["total", f"{report['total_params']:,} parameters"],
        [
            "adapter",
            f"{byte_size(report['adapter_bytes'])} in {report['adapter_tensors']} tensors "
            f"({', '.join(report['adapter_dtypes']) or '-'})",
        ],
    ]
    lines = [f"{label + ':':<11}{value}" for label, value in facts]
    if report.get("adapted_parameters"):
        lines += ["", "Parameters adapted (target_parameters):"]
        lines += parameter_table(report["adapted_parameters"])
    lines += [
        "",
        f"Training memory estimate ({memory['dtype']} base, batch size {memory['batch_size']}, "
        f"sequence length {memory['seq_len']}, AdamW):",
    ]
    parts = [
        ("base weights", "base_weights_bytes"),
        ("adapter weights", "adapter_weights_bytes"),
        ("gradients", "gradients_bytes"),
        ("AdamW states", "optimizer_bytes"),
        ("activations", "activations_bytes"),
        ("total", "total_bytes"),
    ]
    rows = [
        [
            label,
            "-" if memory[key] is None else f"{memory[key]:,}",
            "-" if memory[key] is None else human_size(memory[key]),
        ]
        for label, key in parts
    ]
    lines += table(["PART", "BYTES", "SIZE"], rows, indent="  ")
    if memory["activations_bytes"] is None:
        lines.append(
            "  (activations not estimated: the config lacks hidden size, heads, layers or vocabulary)"
        )
    lines.append(f"  activations per layer: {memory['formula']['per_layer_elements']} elements")
    return "\n".join(lines)


@click.command("plan", short_help="Parameters, adapter size and training memory of a method.")
@model_argument
@click.option(
    "--method", "-m", metavar="NAME", required=True, help="A method's name, as `peftkit methods` lists."
)
@option_option
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES, case_sensitive=False),
    default="bf16",
    show_default=True,
    help="The base weights' dtype during training.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Sequences per training step.",
)
@click.option(
    "--seq-len", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per sequence."
)
@json_option
def plan_command(
    model: Path,
    method: str,
    options: tuple[str, ...],
    dtype: str,
    batch_size: int,
    seq_len: int,
    as_json: bool,
) -> None:
    """Plan an adapter of --method on MODEL before training: trainable and total parameters, the adapter
    file's size, and an estimate of training memory.

    MODEL is a transformers model folder with a config.json (or the config.json itself); the model and
    the adapter are built on the meta device, so no weights are read and no memory is used. The estimate
    counts the base weights at --dtype, the adapter's weights, gradients and AdamW states at the
    adapter's dtype, and the activations of one training step (formula: `peftkit plan --json`, under
    memory.formula, and the CLI reference).
    """
    parsed = _run(planning.parse_options, options)
    report = _run(planning.plan_report, model, method, parsed, dtype, batch_size, seq_len)
    click.echo(json.dumps(report, indent=2) if as_json else format_plan(report))


# --- peftkit merge -----------------------------------------------------------------------------
def format_merge(report: dict[str, Any]) -> str:
    lines = [
        f"Merged {report['peft_type']} adapter {report['adapter']} into {report['model_class']} "
        f"from {report['base']} ({report['dtype']}{', dequantized' if report['dequantized'] else ''}).",
        f"Wrote {report['out']}: {byte_size(report['bytes'])}",
    ]
    lines += [f"  {name}" for name in report["files"]]
    return "\n".join(lines)


@click.command("merge", short_help="Merge an adapter into its base and save a model folder.")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES, case_sensitive=False),
    default=None,
    help="Load the base (and so write the merged model) in this dtype; default: as saved.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: when it is a terminal).",
)
@json_option
def merge_command(
    base: Path,
    adapter: Path,
    out: Path,
    dtype: str | None,
    overwrite: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Merge the adapter in ADAPTER into the base model in BASE and write the result to OUT.

    BASE is a transformers model folder, read offline; ADAPTER an adapter folder (peftkit's or PEFT's).
    OUT becomes a standard transformers model folder (config.json, model.safetensors, and BASE's tokenizer
    files), which loads with AutoModel*.from_pretrained and needs no peftkit. It is written to a temporary
    folder beside OUT and renamed into place. A quantized base (bitsandbytes) is dequantized as it is
    merged, so OUT holds full-precision weights (in --dtype if given).
    """
    from peftkit.merge_folder import merge_to_folder  # imports torch: here, so `peftkit --help` stays light

    show = sys.stderr.isatty() if progress is None else progress
    report = _run(
        merge_to_folder,
        base,
        adapter,
        out,
        dtype=dtype.lower() if dtype else None,
        overwrite=overwrite,
        progressbar=show,
        status=lambda message: click.echo(message, err=True) if show else None,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_merge(report))


COMMANDS = (targets_command, plan_command, merge_command)
