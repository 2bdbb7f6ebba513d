"""The orders example: a business change and its event in one transaction, seen live in a browser.

    python examples/orders/app.py [--host 127.0.0.1] [--port 8000]

Every change to an order and the event announcing it are written in ONE database transaction, with
``outbox.enqueue``. The app never talks to Sockudo: ``python worker.py`` publishes what was
committed, and the page (static/, pusher-js) receives it. ``?fail_after_enqueue=true`` makes a
request fail after its event was enqueued, so its transaction rolls back: no order, no event.

Settings are the worker's: ``OUTBOX_DATABASE_URL`` (default ``sqlite:///outbox.db``) and
``SOCKUDO_URL``, of which only the app key, host and port are given to the browser.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import outbox
from outbox.database import DEFAULT_DATABASE_URL, create_engine
from outbox.sockudo import Config

#: The worker's default SOCKUDO_URL: the compose stack's app, or `python -m outbox.testing.soketi`.
DEFAULT_SOCKUDO_URL = "http://app-key:app-secret@127.0.0.1:6001/apps/app-id"
CHANNEL = "orders"
STATIC = Path(__file__).resolve().parent / "static"
ROLLED_BACK = "simulated failure after enqueue: the transaction was rolled back, with its event"


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(sa.String(100))
    item: Mapped[str] = mapped_column(sa.String(100))
    status: Mapped[str] = mapped_column(sa.String(20), default="placed")
    # SQLAlchemy raises this on every UPDATE (optimistic locking). Events carry it, so a page that
    # receives them out of order or twice keeps the newest state (delivery is at-least-once, and
    # the order across batches is not guaranteed).
    version: Mapped[int] = mapped_column(default=1)

    __mapper_args__ = {"version_id_col": version}

    def as_event(self) -> dict[str, Any]:
        """The event's data: the order as written (flush first, so id and version are set)."""
        return {
            "id": self.id,
            "customer": self.customer,
            "item": self.item,
            "status": self.status,
            "version": self.version,
        }


class NotMigrated(RuntimeError):
    """The outbox table does not exist yet."""


class NewOrder(BaseModel):
    customer: str = Field(min_length=1, max_length=100)
    item: str = Field(min_length=1, max_length=100)


def create_app(database_url: str | None = None, sockudo_url: str | None = None) -> FastAPI:
    database_url = database_url or os.environ.get("OUTBOX_DATABASE_URL", DEFAULT_DATABASE_URL)
    sockudo = Config.from_url(sockudo_url or os.environ.get("SOCKUDO_URL", DEFAULT_SOCKUDO_URL))
    # outbox's engine factory reads the URLs the worker reads, and on SQLite waits for the
    # worker's writes (busy timeout) instead of failing with "database is locked".
    engine = create_engine(database_url)
    if not sa.inspect(engine).has_table(outbox.DEFAULT_TABLE_NAME):
        raise NotMigrated(
            f"no {outbox.DEFAULT_TABLE_NAME} table in the database: run `outbox migrate` first "
            "(with the same OUTBOX_DATABASE_URL)"
        )
    # The example's own table; a real application would create it with its own migrations.
    Base.metadata.create_all(engine)
    transaction = sessionmaker(engine).begin

    app = FastAPI(title="sockudo-outbox orders example")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/config")
    def browser_config() -> dict[str, Any]:
        """What pusher-js needs to subscribe: public values only, never the secret."""
        return {
            "key": sockudo.key,
            "wsHost": sockudo.host,
            "wsPort": sockudo.port,
            "forceTLS": sockudo.use_tls,
            "channel": CHANNEL,
        }

    @app.get("/api/orders")
    def list_orders() -> list[dict[str, Any]]:
        with transaction() as session:
            return [
                order.as_event() for order in session.scalars(sa.select(Order).order_by(Order.id))
            ]

    @app.post("/api/orders", status_code=201)
    def place_order(new: NewOrder, fail_after_enqueue: bool = False) -> dict[str, Any]:
        with transaction() as session:  # one transaction: the order and its event, or neither
            order = Order(customer=new.customer, item=new.item)
            session.add(order)
            session.flush()  # the event carries the id the database gives
            event = order.as_event()
            outbox.enqueue(session, CHANNEL, "order-placed", event)
            if fail_after_enqueue:
                raise HTTPException(500, ROLLED_BACK)  # leaving the block rolls back both
        return event

    @app.post("/api/orders/{order_id}/ship")
    def ship_order(order_id: int, fail_after_enqueue: bool = False) -> dict[str, Any]:
        with transaction() as session:
            order = session.get(Order, order_id)
            if order is None:
                raise HTTPException(404, f"no order {order_id}")
            if order.status == "shipped":
                raise HTTPException(409, f"order {order_id} is already shipped")
            order.status = "shipped"
            session.flush()  # writes the row and raises its version
            event = order.as_event()
            outbox.enqueue(session, CHANNEL, "order-shipped", event)
            if fail_after_enqueue:
                raise HTTPException(500, ROLLED_BACK)
        return event

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        app = create_app()
    except NotMigrated as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"orders example: open http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
