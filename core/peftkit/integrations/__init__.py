"""Glue for training frameworks. Each module imports its framework only when it is itself imported."""
