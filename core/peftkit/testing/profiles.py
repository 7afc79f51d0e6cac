"""The hypothesis profiles of the conformance kit, and how a run picks one."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

DEFAULT_PROFILE = "peftkit-ci"
PROFILE_ENV = "PEFTKIT_HYPOTHESIS_PROFILE"
EXAMPLES_ENV = "PEFTKIT_EXAMPLES"

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

# peftkit-ci: few examples, a fixed seed per property (same draws on every run), no example database,
#   no shrinking (a failure is reported as drawn, every draw labelled: shrinking a model-building test
#   can take minutes).
# peftkit-dev: more examples, fresh draws each run, failures shrunk to a minimal example and
#   remembered in the example database.
# peftkit-thorough: a long hunt before a release.
PROFILES = {
    "peftkit-ci": dict(
        max_examples=5,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        phases=(Phase.explicit, Phase.generate),
    ),
    "peftkit-dev": dict(max_examples=25, deadline=None, print_blob=True),
    "peftkit-thorough": dict(max_examples=200, deadline=None, print_blob=True),
}


def register_profiles() -> None:
    """Register the kit's profiles with hypothesis (idempotent)."""
    for name, options in PROFILES.items():
        settings.register_profile(name, suppress_health_check=_SLOW_OK, **options)


def chosen_settings(profile: str | None = None, examples: int | None = None) -> settings:
    """The settings for one property: the named profile (else $PEFTKIT_HYPOTHESIS_PROFILE, else
    ``peftkit-ci``), with ``max_examples`` replaced by ``examples`` (else $PEFTKIT_EXAMPLES) when given."""
    register_profiles()
    name = profile or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    chosen = settings.get_profile(name)
    if examples is None and os.environ.get(EXAMPLES_ENV):
        examples = int(os.environ[EXAMPLES_ENV])
    if examples is not None:
        chosen = settings(chosen, max_examples=examples)
    return chosen
