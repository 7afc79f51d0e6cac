"""Loading plugins for a command, with a plugin that fails to load reported on stderr as one plain line."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import click

from peftkit import plugins
from peftkit.discovery import PluginLoadWarning


@contextlib.contextmanager
def plugin_warnings_as_lines() -> Iterator[None]:
    """Within the block, a :class:`PluginLoadWarning` is printed as ``warning: ...``; other warnings as usual."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PluginLoadWarning)
            yield
    finally:
        for warning in caught:
            if issubclass(warning.category, PluginLoadWarning):
                click.echo(f"warning: {warning.message}", err=True)
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def plugin_host() -> plugins.PluginHost:
    """The process's plugin host, its plugins loaded; one that fails to load is a ``warning:`` line."""
    with plugin_warnings_as_lines():
        return plugins.host()
