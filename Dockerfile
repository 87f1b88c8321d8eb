# The worker image: `docker compose up --scale worker=N` runs N of these against one Kafka and Redis.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler, so that a CPU worker builds its paged-attention kernel on first start as it does outside
# Docker. The kernel is built for the CPU it runs on (-march=native), so it cannot be built ahead here.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

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
