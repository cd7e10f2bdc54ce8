"""pytest set-up shared by the tests; helpers they import are in helpers.py.

Tests marked `slow` (a minute or more on a 2-core CPU) are skipped unless
pytest gets --run-slow; CI passes it (`make test PYTEST_ARGS=--run-slow`).

The property tests (hypothesis) run under the profile "ci" unless pytest
gets --hypothesis-profile=long or the environment sets
DCNV2_HYPOTHESIS_PROFILE=long."""

import os

import pytest
from hypothesis import HealthCheck, settings

HYPOTHESIS_PROFILE_ENV = "DCNV2_HYPOTHESIS_PROFILE"
# The long profile's seed when pytest gets no --hypothesis-seed, so that a
# long run can be repeated.
LONG_PROFILE_SEED = 14
_HYPOTHESIS_COMMON = dict(
    deadline=None,  # a shared machine's pauses are not failures
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# CI: the same examples every run; the whole property file in 1 to 3 minutes on a 2-core CPU.
settings.register_profile("ci", max_examples=800, derandomize=True, **_HYPOTHESIS_COMMON)
settings.register_profile("long", max_examples=10_000, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV, "ci"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (CI does)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Gives the long profile its seed (before hypothesis's plugin reads it)."""
    profile = config.getoption("--hypothesis-profile") or os.environ.get(HYPOTHESIS_PROFILE_ENV, "ci")
    if profile == "long" and config.getoption("--hypothesis-seed") is None:
        config.option.hypothesis_seed = str(LONG_PROFILE_SEED)


def pytest_collection_modifyitems(config, items):
    from helpers import NEEDS_CUDA

    for item in items:
        if any(mark.kwargs.get("reason") == NEEDS_CUDA.kwargs["reason"] for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """Lists the max abs differences of exported models from PyTorch that
    the passed tests recorded (helpers.record_max_abs_diff)."""
    lines = [
        f"{what}: {diff:.3g}"
        for report in terminalreporter.stats.get("passed", [])
        for key, (what, diff) in report.user_properties
        if key == "max_abs_diff"
    ]
    if lines:
        terminalreporter.section("max abs difference of exported models from PyTorch")
        for line in lines:
            terminalreporter.write_line(line)
