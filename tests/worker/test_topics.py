"""The replication of the worker's topics follows the cluster it finds, unless set."""

from __future__ import annotations

import pytest

from processor.worker.settings import WorkerSettings
from processor.worker.topics import TopicReplication, raise_for_create_errors, replication_for


@pytest.mark.parametrize(
    ("brokers", "expected"),
    [
        (1, TopicReplication(1, 1)),
        (2, TopicReplication(2, 2)),
        (3, TopicReplication(3, 2)),
        (5, TopicReplication(3, 2)),
    ],
)
def test_unset_replication_follows_the_brokers_up_to_three(brokers: int, expected: TopicReplication) -> None:
    assert replication_for(brokers) == expected


def test_a_set_replication_factor_wins_over_the_broker_count() -> None:
    assert replication_for(5, replication_factor=1) == TopicReplication(1, 1)
    assert replication_for(5, replication_factor=5) == TopicReplication(5, 2)
    assert replication_for(3, replication_factor=2) == TopicReplication(2, 2)


def test_one_copy_adds_no_topic_config_and_more_ask_for_two_in_sync() -> None:
    assert replication_for(1).topic_configs() == {}
    assert replication_for(3).topic_configs() == {"min.insync.replicas": "2"}


def test_more_copies_than_brokers_is_refused_with_the_way_out() -> None:
    with pytest.raises(ValueError, match="lower --replication-factor or leave it unset"):
        replication_for(2, replication_factor=3)
    with pytest.raises(ValueError, match="at least one broker"):
        replication_for(0)


def test_the_worker_follows_the_cluster_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUARDSTREAM_REPLICATION_FACTOR", raising=False)
    assert WorkerSettings().replication_factor is None
    monkeypatch.setenv("GUARDSTREAM_REPLICATION_FACTOR", "2")
    assert WorkerSettings().replication_factor == 2


def test_a_create_error_is_raised_and_an_existing_topic_is_not_one() -> None:
    raise_for_create_errors([("tokens", 0, None), ("verdicts", 36, "Topic 'verdicts' already exists.")])
    with pytest.raises(RuntimeError, match="could not create topic 'dlq': Replication factor: 3 larger"):
        raise_for_create_errors([("dlq", 38, "Replication factor: 3 larger than available brokers: 1.")])
    with pytest.raises(RuntimeError, match="'dlq': InvalidPartitionsError"):
        raise_for_create_errors([("dlq", 37, None)])
