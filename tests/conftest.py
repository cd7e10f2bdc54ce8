"""pytest set-up shared by the tests; helpers they import are in helpers.py."""


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
