"""pytest set-up shared by the tests; helpers they import are in helpers.py.

Tests marked `slow` (a minute or more on a 2-core CPU) are skipped unless
pytest gets --run-slow; CI passes it (`make test PYTEST_ARGS=--run-slow`)."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
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
