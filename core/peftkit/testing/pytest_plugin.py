"""pytest plugin of the conformance kit (entry point ``pytest11``). Kept light: imports nothing heavy.

Options (also settable through environment variables):

``--peftkit-device {all,cpu,cuda}`` ($PEFTKIT_DEVICE)
    devices the conformance properties run on; ``all`` (the default) runs ``cpu`` and ``cuda``,
    the cuda cases being skipped, with the reason, where torch sees no GPU.
``--peftkit-profile NAME`` ($PEFTKIT_HYPOTHESIS_PROFILE)
    the kit's hypothesis profile: ``peftkit-ci`` (default: few examples, the same draws every run),
    ``peftkit-dev`` (more, fresh draws) or ``peftkit-thorough``; or any profile you registered.
``--peftkit-examples N`` ($PEFTKIT_EXAMPLES)
    examples per property, whatever the profile says.

Fixtures for any test: ``peftkit_one_thread`` (module-scoped: torch runs one intra-op thread, as tiny
models gain nothing from more and on a busy machine their spin-waits cost seconds) and
``peftkit_fresh_dynamo`` (torch.compile's caches emptied before and after the test).
"""

from __future__ import annotations

import os

import pytest

DEVICE_CHOICES = ("all", "cpu", "cuda")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("peftkit", "peftkit conformance kit")
    group.addoption(
        "--peftkit-device",
        dest="peftkit_device",
        choices=DEVICE_CHOICES,
        default=None,
        help="devices the conformance properties run on (default: all; cuda is skipped without a GPU)",
    )
    group.addoption(
        "--peftkit-profile",
        dest="peftkit_profile",
        default=None,
        help="hypothesis profile of the conformance kit: peftkit-ci (default), peftkit-dev, peftkit-thorough",
    )
    group.addoption(
        "--peftkit-examples",
        dest="peftkit_examples",
        type=int,
        default=None,
        help="examples per conformance property, overriding the profile",
    )


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "peftkit_conformance: a property of peftkit's conformance kit")
    config.addinivalue_line("markers", "peftkit_compile: the conformance kit's torch.compile property")


def selected_devices(config) -> tuple[str, ...]:
    choice = config.getoption("peftkit_device", default=None) or os.environ.get("PEFTKIT_DEVICE") or "all"
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"PEFTKIT_DEVICE must be one of {DEVICE_CHOICES}, got {choice!r}")
    return ("cpu", "cuda") if choice == "all" else (choice,)


def pytest_collection_modifyitems(config, items) -> None:
    """Deselect the conformance cases of devices --peftkit-device leaves out."""
    devices = selected_devices(config)
    if len(devices) == 2:
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        device = callspec.params.get("device") if callspec is not None else None
        if device is not None and item.get_closest_marker("peftkit_conformance") and device not in devices:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="module")
def peftkit_one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def peftkit_fresh_dynamo():
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
