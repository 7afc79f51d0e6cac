"""Every hook spec follows the one docstring template and is documented in docs/concepts.md."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from peftkit import hookspecs

SPECS = [
    (name, func)
    for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(func, "peftkit_spec")
]
CONCEPTS = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"


def test_there_is_a_hook_for_every_family_in_the_design():
    names = {name for name, _ in SPECS}
    assert {
        "peftkit_register_methods",
        "peftkit_inject_adapter",
        "peftkit_trainable_parameters",
        "peftkit_merge_adapter",
        "peftkit_unmerge_adapter",
        "peftkit_adapter_state_dict",
        "peftkit_load_adapter_state_dict",
        "peftkit_layer_features",
        "peftkit_read_weight",
        "peftkit_write_weight",
        "peftkit_register_commands",
    } <= names


@pytest.mark.parametrize(("name", "func"), SPECS, ids=[name for name, _ in SPECS])
def test_spec_is_typed_and_documented_in_the_template(name, func):
    assert name.startswith("peftkit_")
    signature = inspect.signature(func)
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
    assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
    doc = inspect.getdoc(func) or ""
    firstresult = func.peftkit_spec["firstresult"]
    assert ("firstresult" in doc) == firstresult, (
        f"{name}: the docstring must say whether the first answer wins"
    )
    if not firstresult:
        assert "All answers are gathered" in doc or "All implementations run" in doc
    assert ":return:" in doc, f"{name}: the docstring must say what returning None means"
    for param in signature.parameters:
        if param not in ("peft_model", "config", "adapter_name"):
            assert f":param {param}:" in doc, f"{name}: parameter {param} is not documented"


@pytest.mark.parametrize("name", [name for name, _ in SPECS])
def test_concepts_page_documents_every_hook(name):
    assert name in CONCEPTS.read_text(), f"{name} is missing from docs/concepts.md"
