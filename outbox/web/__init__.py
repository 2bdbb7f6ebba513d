"""The operator's dashboard: ``outbox web`` (needs the ``web`` extra: Starlette, uvicorn, Jinja2).

One outbox database, seen as an operator needs it during an incident: state counts, the oldest
pending age and a live chart of the last hour; the dead events with their errors and payloads,
replayed (when started with ``--write``) after a dry-run count; a search that shows an event's
whole life. Every read and write goes through :mod:`outbox.admin`; :mod:`.security` says who may
see it and what a request may do.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from .app import create_app
from .security import Credentials, WebConfigError, WebOptions
from .views import database_label

__all__ = ["Credentials", "WebConfigError", "WebOptions", "create_app", "serve"]

log = logging.getLogger("outbox.web")


def serve(engine: sa.Engine, table: sa.Table, options: WebOptions) -> None:
    """Serve the dashboard of ``table`` until SIGINT or SIGTERM."""
    import uvicorn

    app = create_app(engine, table, options)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_config=None,  # our logging (the CLI's format and level), not uvicorn's own
        server_header=False,
        proxy_headers=False,  # a client's address is the peer's, not a header anyone can send
        lifespan="off",
        timeout_graceful_shutdown=5,  # SIGTERM ends it promptly, open keep-alives or not
    )
    log.info(
        "dashboard for %s on http://%s:%d (%s; credentials: %s)",
        database_label(engine.url),
        options.host,
        options.port,
        "write access" if options.write else "read-only",
        options.credentials.kinds,
    )
    uvicorn.Server(config).run()
