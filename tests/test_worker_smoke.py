import asyncio

import sqlalchemy as sa

from outbox import enqueue, outbox_table
from outbox.settings import Settings
from outbox.worker import Worker


def test_commit_delivered_once_rollback_never(engine, database_url, sockudo_server):
    with engine.begin() as conn:
        for i in range(250):
            enqueue(conn, "orders", "created", {"n": i})
    with engine.connect() as conn, conn.begin() as tx:
        enqueue(conn, "orders", "rolled-back", "x")
        tx.rollback()
    settings = Settings(
        database_url=database_url, sockudo_url=sockudo_server.url, poll_interval=0.1
    )
    worker = Worker(settings, engine=engine)
    asyncio.run(worker.run(once=True))
    delivered = sockudo_server.deliveries("orders")
    assert sorted(d.data for d in delivered) == sorted(f'{{"n":{i}}}' for i in range(250))
    assert not sockudo_server.duplicates()
    with engine.connect() as conn:
        t = outbox_table()
        rows = conn.execute(sa.select(t.c.status, t.c.acknowledgement_id)).all()
    assert {r.status for r in rows} == {"published"}
    assert all(r.acknowledgement_id for r in rows)
