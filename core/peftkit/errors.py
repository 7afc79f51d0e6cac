"""The exceptions peftkit raises. Each names what is wrong and what would be right."""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class of every peftkit error."""


class ConfigError(PeftkitError, ValueError):
    """A config field holds a value the method does not allow."""


class TargetModulesError(PeftkitError, ValueError):
    """A config's target_modules matched no module of the model."""


class AdapterLoadError(PeftkitError, ValueError):
    """An adapter on disk is missing, corrupt, or does not fit the base model."""


class UnknownMethodError(PeftkitError, KeyError):
    """No installed plugin provides the method or peft_type asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MergeNotSupportedError(PeftkitError, TypeError):
    """The method cannot fold its adapter into the base weights."""


class PluginConflictError(PeftkitError, RuntimeError):
    """Two plugins claim the same method name or peft_type."""


class AdapterNameError(PeftkitError, ValueError):
    """An adapter name that does not exist, or already exists, was given."""
