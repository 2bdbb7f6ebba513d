# The outbox worker image: `docker compose up` builds it from this repository.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE alembic.ini worker.py ./
COPY outbox ./outbox
# With the web extra (the compose stack's dashboard service runs `outbox web` on this image) and
# the metrics extra (the worker serves /metrics on OUTBOX_METRICS_PORT).
RUN pip install ".[web,metrics]" && useradd --system --uid 10001 outbox
USER outbox

# SIGTERM drains in-flight batches and exits 0 (see README); give it the shutdown timeout.
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
