"""Helpers the tests share, written once: waiting for a condition, producer threads.

Plain functions and classes, imported where they are used; fixtures live in tests/plugins/, and
what the benchmark shares with the tests (scratch databases, worker processes) in outbox.testing.
"""
