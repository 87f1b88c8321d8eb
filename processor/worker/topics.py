"""How the worker's topics are replicated: a replication factor that follows the cluster, and the
in-sync replicas that an acks=all write then needs."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.errors import TopicAlreadyExistsError, for_code

# Three copies: with one broker down (maintenance, a crash) writes still reach two.
MAX_REPLICATION_FACTOR = 3
# With two in-sync replicas required, an acknowledged record is on two brokers: one may die without
# losing it. Writes stop (rather than lose that promise) when only one replica is left.
REPLICATED_MIN_INSYNC_REPLICAS = 2


@dataclass(frozen=True)
class TopicReplication:
    replication_factor: int
    min_insync_replicas: int

    def topic_configs(self) -> dict[str, str]:
        """Topic-level configs to create a topic with; none for a single copy (the broker default, 1)."""
        if self.replication_factor < 2:
            return {}
        return {"min.insync.replicas": str(self.min_insync_replicas)}


def replication_for(brokers: int, replication_factor: int | None = None) -> TopicReplication:
    """The replication of a new topic on a cluster of `brokers`: `replication_factor` when given, else
    as many copies as there are brokers, up to three. Two in-sync replicas whenever there are two
    copies or more."""
    if brokers < 1:
        raise ValueError(f"a Kafka cluster has at least one broker, got {brokers}")
    factor = replication_factor or min(MAX_REPLICATION_FACTOR, brokers)
    if factor > brokers:
        raise ValueError(
            f"replication factor {factor} needs {factor} brokers but the cluster has {brokers}; "
            "lower --replication-factor or leave it unset to follow the cluster"
        )
    return TopicReplication(factor, min(factor, REPLICATED_MIN_INSYNC_REPLICAS))


def raise_for_create_errors(topic_errors: list[tuple]) -> None:
    """Raise the first error of a CreateTopics response, which aiokafka returns rather than raises; a
    topic that exists already (another worker created it first) is no error."""
    for topic, code, *message in topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):
            detail = message[0] if message and message[0] else for_code(code).__name__
            raise RuntimeError(f"could not create topic {topic!r}: {detail}")
