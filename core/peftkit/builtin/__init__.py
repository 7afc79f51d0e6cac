"""Plugins that ship inside the core and are always registered."""
