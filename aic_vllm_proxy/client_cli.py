"""Command-line client commands (status, switch, stop, logs, plugins)."""

import click


def register(group: click.Group) -> None:
    """Add the client commands to the main command group."""
