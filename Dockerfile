# The worker image: `docker compose up --scale worker=N` runs N of these against one Kafka and Redis.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Metadata first, so a code-only change reuses the (large) dependency layer.
COPY pyproject.toml README.md ./
RUN mkdir -p processor && touch processor/__init__.py \
    && pip install . \
    && pip uninstall -y guardstream
COPY processor ./processor
COPY schemas ./schemas
RUN pip install --no-deps .

CMD ["guardstream", "worker"]
