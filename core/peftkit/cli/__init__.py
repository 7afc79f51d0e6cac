"""The ``peftkit`` command line: the top-level group, its built-in commands, and the commands plugins add.

The command line is a layer of its own: it uses the core, and no other core module imports it. One
module per command group (:mod:`~peftkit.cli.info_commands`: methods, inspect;
:mod:`~peftkit.cli.model_commands`: targets, plan, merge; :mod:`~peftkit.cli.new_method`), and below
them :mod:`~peftkit.cli.tables` and :mod:`~peftkit.cli.plugin_loading`, which they share.

Kept light at import (click, pluggy and the core's torch-free modules): ``peftkit --help`` and
``peftkit --version`` import neither torch nor transformers. A command loads plugins (and through them
torch) when it runs. Plugins add commands through ``peftkit_register_commands``, implemented in a module
named in the ``peftkit.commands`` entry-point group: the CLI imports those modules, never the method
plugins, to know the commands, and only when it has to (an unknown command name, or ``--help``).
"""

from __future__ import annotations

from typing import Any

import click

from peftkit import __version__, plugins
from peftkit.cli import info_commands, model_commands, new_method
from peftkit.cli.plugin_loading import plugin_warnings_as_lines
from peftkit.errors import PeftkitError

BUILTIN_COMMANDS = (*info_commands.COMMANDS, *model_commands.COMMANDS, *new_method.COMMANDS)


class PeftkitGroup(click.Group):
    """The top-level group: built-in commands, plus those plugins add, loaded only when needed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugin_commands_loaded = False
        self.builtin_commands: frozenset[str] = frozenset()

    def load_plugin_commands(self) -> None:
        """Let every command plugin add its subcommands (once). A built-in command is never replaced."""
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        builtins = {name: self.commands[name] for name in self.builtin_commands}
        with plugin_warnings_as_lines():
            failures = plugins.register_commands(self)
        for plugin_name, exc in failures:
            click.echo(
                f"warning: plugin {plugin_name!r} failed to add its commands and they are skipped: "
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


def make_cli() -> PeftkitGroup:
    """A fresh ``peftkit`` group: the built-in commands; plugins' commands join when first needed."""

    @click.group("peftkit", cls=PeftkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "--version", prog_name="peftkit", message="%(prog)s %(version)s")
    def cli() -> None:
        """peftkit: parameter-efficient fine-tuning with methods as plugins."""

    for command in BUILTIN_COMMANDS:
        cli.add_command(command)
    cli.builtin_commands = frozenset(cli.commands)
    return cli


def main(args: list[str] | None = None) -> None:
    """The ``peftkit`` console script."""
    make_cli().main(args=args, prog_name="peftkit")
