"""Text helpers the commands share: aligned tables, wrapped labelled lines, byte sizes, distribution labels."""

from __future__ import annotations

import textwrap


def table(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    """The header and rows as lines, each column left-aligned to its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    ]


def wrapped(label: str, text: str) -> list[str]:
    """``text`` after an indented label, wrapped at 100 columns under itself, at spaces only: a path or a
    name stays whole (one longer than the line, too), so it can be copied."""
    prefix = f"    {label:<10}"
    lines = textwrap.wrap(
        text,
        width=100,
        initial_indent=prefix,
        subsequent_indent=" " * len(prefix),
        break_on_hyphens=False,
        break_long_words=False,
    )
    return lines or [prefix.rstrip()]


def human_size(size: int) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``12.0 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def byte_size(size: int) -> str:
    """Exact and human: ``110,176 bytes (107.6 KiB)``."""
    return f"{size:,} bytes ({human_size(size)})"


def distribution_label(distribution: str | None, version: str | None) -> str:
    """Where a plugin comes from: ``peftkit-lora 0.3.0``, or that it was registered in-process."""
    if not distribution:
        return "registered directly, no distribution"
    return f"{distribution} {version}" if version else distribution
