"""Fixtures: placeholder until written."""
