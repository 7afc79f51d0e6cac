"""peftkit's conformance kit: properties every method must satisfy, for our plugins and third parties'.

A method package runs the whole kit with a few lines in one of its test files::

    from hypothesis import strategies as st
    from peftkit.testing import ConformanceSuite
    from peftkit_lora import LoraConfig

    class TestLoraConformance(ConformanceSuite):
        method = "lora"

        def make_config(self, draw, case):
            targets = draw(st.sets(st.sampled_from(case.linear_targets), min_size=1), label="targets")
            return LoraConfig(r=draw(st.integers(1, 8), label="r"), target_modules=sorted(targets))

See :class:`ConformanceSuite` for what a suite may declare (model kinds, dtypes, identity at init,
tolerances) and :data:`PROPERTIES` for what is checked. Importing this package loads nothing heavy;
names resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConformanceSuite": "peftkit.testing.suite",
    "Example": "peftkit.testing.suite",
    "PROPERTIES": "peftkit.testing.suite",
    "adapter_parameters": "peftkit.testing.suite",
    "ModelCase": "peftkit.testing.cases",
    "ModelKind": "peftkit.testing.cases",
    "MODEL_KINDS": "peftkit.testing.cases",
    "supported_dtypes": "peftkit.testing.cases",
    "Tolerance": "peftkit.testing.checks",
    "DEFAULT_TOLERANCES": "peftkit.testing.checks",
    "ConformanceError": "peftkit.testing.checks",
    "leftovers": "peftkit.testing.checks",
    "PROFILES": "peftkit.testing.profiles",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'peftkit.testing' has no attribute {name!r}")
