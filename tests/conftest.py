"""Fixtures shared by every test folder: real Kafka and Redis, and per-test names inside them.

Service fixtures (session-scoped, started lazily on first use, stopped at session end):
    kafka_bootstrap -> "host:port"        redis_url -> "redis://host:port/0"
    redis_cluster_url -> "redis://host:port/0", a node of a Redis Cluster (3 primaries, a replica each)
Where they come from, per service: GUARDSTREAM_TEST_KAFKA / GUARDSTREAM_TEST_REDIS /
GUARDSTREAM_TEST_REDIS_CLUSTER if set, else a testcontainers container if a Docker engine answers (not
for the cluster), else local processes (processor.local).

Per-test names (function-scoped), so tests share one broker and one Redis without seeing each other:
    topic_prefix -> "gs-test.<test>.<nanos>"     unique_topic("events") -> "<topic_prefix>.events"
    redis_prefix -> "gs-test:<test>:<nanos>:"

Folder-specific fixtures belong in that folder's own conftest.py, not here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from processor.local.testing import kafka_endpoint, redis_cluster_endpoint, redis_endpoint, unique_name

SERVICE_FIXTURES = {"kafka_bootstrap", "redis_url", "redis_cluster_url"}


@pytest.fixture(scope="session")
def _local_services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-services")


@pytest.fixture(scope="session")
def kafka_bootstrap(_local_services_dir: Path) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        yield kafka_endpoint(stack, _local_services_dir)


@pytest.fixture(scope="session")
def redis_url(_local_services_dir: Path) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        yield redis_endpoint(stack, _local_services_dir)


@pytest.fixture(scope="session")
def redis_cluster_url(_local_services_dir: Path) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        yield redis_cluster_endpoint(stack, _local_services_dir)


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    return unique_name("gs-test", request.node.name)


@pytest.fixture
def unique_topic(topic_prefix: str) -> Callable[[str], str]:
    return lambda name: f"{topic_prefix}.{name}"


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    return unique_name("gs-test", request.node.name).replace(".", ":") + ":"


# Random-weight checkpoints in the official layout (processor.model.testmodel), shared by the model,
# engine and worker tests; written once per session.
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from processor.model.testmodel import write_test_model

    return write_test_model(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from processor.model.testmodel import write_test_model

    return write_test_model(tmp_path_factory.mktemp("small-model"), size="small", seed=0)


def pytest_configure(config: pytest.Config) -> None:
    # Tests share the cores with Kafka, Redis and worker processes; one torch thread avoids OpenMP
    # threads spinning on a descheduled peer, which slows engine steps many times over.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `make test-fast` deselects `integration`: a test that starts Kafka or Redis must carry the mark.
    for item in items:
        uses = SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses and item.get_closest_marker("integration") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {', '.join(sorted(uses))}: mark it integration")
