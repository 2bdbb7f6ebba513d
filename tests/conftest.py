"""Fixtures live in tests/plugins/, one module per concern (databases, test server, soketi)."""

pytest_plugins = [
    "tests.plugins.sockudo_server",
    "tests.plugins.soketi",
    "tests.plugins.databases",
]
