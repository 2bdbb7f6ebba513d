"""``python -m outbox``: the ``outbox`` command (``python -m outbox worker`` runs the worker)."""

from .cli import main

raise SystemExit(main())
