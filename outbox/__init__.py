"""sockudo-outbox: a transactional outbox publisher for Sockudo."""

__version__ = "0.1.0"
