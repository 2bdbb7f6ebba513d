"""Fixtures live in tests/plugins/, one module per concern (the tiers, databases, test server,
soketi, child processes, the browser)."""

pytest_plugins = [
    # First: which tests this run runs (plain `pytest`, or `pytest --full`).
    "tests.plugins.tiers",
    "tests.plugins.sockudo_server",
    "tests.plugins.soketi",
    "tests.plugins.databases",
    "tests.plugins.processes",
    "tests.plugins.browser",
    "tests.plugins.dashboard",
    # Runs pytest inside a test, to prove what a plugin's fixture does to the tests that use it.
    "pytester",
]
