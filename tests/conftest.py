"""Fixtures shared by the core's tests (the kit's, such as ``peftkit_one_thread``, come from its pytest plugin)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def load_example():
    """``load_example("adapter_fusion.py")``: that script of ``examples/`` imported as a module, registered in
    ``sys.modules`` first (its dataclasses look their module up there)."""

    def load(filename: str) -> ModuleType:
        name = Path(filename).stem + "_example"
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load
