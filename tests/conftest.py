"""Fixtures live in tests/plugins/, one module per concern (databases, test server, soketi,
child processes, the browser)."""

pytest_plugins = [
    "tests.plugins.sockudo_server",
    "tests.plugins.soketi",
    "tests.plugins.databases",
    "tests.plugins.processes",
    "tests.plugins.browser",
    "tests.plugins.dashboard",
    # Runs pytest inside a test, to prove what a plugin's fixture does to the tests that use it.
    "pytester",
]
