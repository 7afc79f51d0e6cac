"""Finding plugins: entry points in the ``peftkit`` group (and, for the command line, ``peftkit.commands``),
filtered by environment, loaded fault-isolated."""

from __future__ import annotations

import os
import traceback
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

ENTRY_POINT_GROUP = "peftkit"
# modules that implement only peftkit_register_commands: the CLI imports them, not the plugins, to list commands
COMMANDS_ENTRY_POINT_GROUP = "peftkit.commands"
BLOCK_ENV = "PEFTKIT_BLOCK_PLUGINS"  # comma-separated entry-point or distribution names never loaded
ALLOW_ENV = "PEFTKIT_PLUGINS"  # when set, only these entry-point or distribution names load ("" loads none)


class PluginLoadWarning(UserWarning):
    """A plugin failed to import; the others still work."""


@dataclass(frozen=True)
class PluginOrigin:
    """Where a loaded or broken plugin comes from."""

    name: str
    distribution: str | None
    version: str | None
    location: str | None = None
    error: str | None = None
    traceback: str | None = None


def _names(env_value: str) -> set[str]:
    return {part.strip() for part in env_value.split(",") if part.strip()}


def _distribution(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def selected_entry_points(group: str = ENTRY_POINT_GROUP) -> list[EntryPoint]:
    """The group's entry points that the environment lets load, in a stable order.

    Both variables name entry points or distributions, so a plugin and its commands (an entry point of
    the same name in ``peftkit.commands``) are blocked or allowed together.
    """
    blocked = _names(os.environ.get(BLOCK_ENV, ""))
    allowed = _names(os.environ[ALLOW_ENV]) if ALLOW_ENV in os.environ else None
    chosen = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        names = {ep.name, _distribution(ep)[0]}
        if names & blocked:
            continue
        if allowed is not None and not names & allowed:
            continue
        chosen.append(ep)
    return chosen


def load_entry_points(
    group: str = ENTRY_POINT_GROUP,
) -> tuple[list[tuple[object, PluginOrigin]], list[PluginOrigin]]:
    """Import each selected plugin of ``group``. A failure is recorded and warned about, never raised."""
    kind = "command plugin" if group == COMMANDS_ENTRY_POINT_GROUP else "plugin"
    loaded, broken = [], []
    for ep in selected_entry_points(group):
        dist_name, version = _distribution(ep)
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            origin = PluginOrigin(
                ep.name, dist_name, version, ep.value, f"{type(exc).__name__}: {exc}", traceback.format_exc()
            )
            broken.append(origin)
            warnings.warn(
                f"peftkit {kind} {ep.name!r} ({dist_name or 'unknown distribution'}) failed to load and is "
                f"skipped: {origin.error}",
                PluginLoadWarning,
                stacklevel=3,
            )
            continue
        location = getattr(plugin, "__file__", None) or ep.value
        loaded.append((plugin, PluginOrigin(ep.name, dist_name, version, location)))
    return loaded, broken
