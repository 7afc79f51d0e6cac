"""The suite's results as a markdown table and an SVG chart, one section per device in docs/benchmarks.md.

A run replaces its own device's section between ``<!-- results:DEVICE -->`` markers and keeps the
rest of the page (the prose above, another device's results), so CPU and CUDA runs add up.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

GOAL_X, ROW_HEIGHT, LABEL_WIDTH = 260, 26, 500


def met(row: dict) -> bool | None:
    """None for a row without a goal; a row without a figure (not measured: its detail says why) misses it."""
    if row["goal"] is None:
        return None
    return row["figure"] is not None and row["figure"] <= row["goal"]


def _figure(row: dict) -> str:
    if row["figure"] is None:
        return "n/a"
    if row["against"] == "count":
        return f"{row['figure']:,}"
    if row["against"] == "bytes":
        return f"{row['figure']:.2f} B"
    return f"{row['figure']:.2f} ×"


def _goal(row: dict) -> str:
    if row["goal"] is None:
        return "(for reference)"
    if row["against"] in ("count", "bytes"):
        return f"≤ {row['goal']:g}" + (" B" if row["against"] == "bytes" else "")
    return f"≤ {row['goal']:g} × {row['against']}"


def table(rows: list[dict]) -> str:
    lines = ["| what | figure | goal | met | measured |", "| --- | ---: | --- | :---: | --- |"]
    for row in rows:
        verdict = {True: "yes", False: "**no**", None: ""}[met(row)]
        bare = row["against"] in ("count", "bytes") or row["figure"] is None
        against = "" if bare else f" {row['against']}"
        lines.append(
            f"| {row['what']} | {_figure(row)}{against} | {_goal(row)} | {verdict} | {row['detail']} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict], title: str) -> str:
    """Each goal-bearing ratio as a bar, the goal as the vertical line: a bar left of it meets the goal."""
    shown = [row for row in rows if row["goal"] and row["figure"] is not None]
    height = 40 + ROW_HEIGHT * len(shown)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_WIDTH + 2 * GOAL_X + 80}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="4" y="16" font-weight="bold">{html.escape(title)}</text>',
    ]
    for index, row in enumerate(shown):
        y = 30 + index * ROW_HEIGHT
        width = min(row["figure"] / row["goal"], 2.0) * GOAL_X
        colour = "#2e7d32" if met(row) else "#c62828"
        parts += [
            f'<text x="4" y="{y + 15}">{html.escape(row["what"])} (against {html.escape(row["against"])})</text>',
            f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{width:.1f}" height="16" fill="{colour}"/>',
            f'<text x="{LABEL_WIDTH + width + 4:.1f}" y="{y + 15}">{html.escape(_figure(row))}</text>',
        ]
    parts += [
        f'<line x1="{LABEL_WIDTH + GOAL_X}" y1="26" x2="{LABEL_WIDTH + GOAL_X}" y2="{height}" stroke="black" '
        'stroke-dasharray="4 3"/>',
        f'<text x="{LABEL_WIDTH + GOAL_X + 4}" y="{height - 4}">goal</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def section(rows: list[dict], setting: dict, svg_name: str) -> str:
    device = setting["device"]
    skipped = f" Sections not run: {', '.join(setting['skipped'])}." if setting.get("skipped") else ""
    return (
        f"<!-- results:{device} -->\n"
        f"## Results on {device.upper()}\n\n"
        f"{setting['machine']}; {setting['rounds']} interleaved rounds per timing; {setting['date']}; "
        f"{setting['versions']}.{skipped}\n\n"
        f"{table(rows)}\n\n"
        f"![{device} results against their goals]({svg_name})\n"
        f"<!-- /results:{device} -->\n"
    )


PAGE_HEAD = """# Benchmarks

Written by `python -m benchmarks.run` (see `benchmarks/`); do not edit the results by hand.
"""


def chart_path(output: Path, device: str) -> Path:
    return output.with_name(f"{output.stem}-{device}.svg")


def write(output: Path, rows: list[dict], setting: dict) -> None:
    device = setting["device"]
    svg = chart_path(output, device)
    svg.write_text(chart(rows, f"peftkit on {device}: figure against goal (bars left of the line meet it)"))
    new = section(rows, setting, svg.name)
    page = output.read_text() if output.exists() else PAGE_HEAD
    pattern = re.compile(rf"<!-- results:{re.escape(device)} -->.*?<!-- /results:{re.escape(device)} -->\n", re.S)
    page = pattern.sub(lambda _: new, page) if pattern.search(page) else page.rstrip("\n") + "\n\n" + new
    staging = output.with_name(output.name + ".tmp")
    staging.write_text(page)
    staging.replace(output)
