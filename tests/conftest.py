"""Loads the shared fixtures for every test, unit and integration (see tests/fixtures)."""

pytest_plugins = [
    "tests.fixtures.site",
    "tests.fixtures.clamav",
    "tests.fixtures.media",
    "tests.fixtures.daemon",
]
