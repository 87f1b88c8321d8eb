"""Starting a worker: the model, engine, Redis, topics, Kafka clients and health server, then the loop."""

from __future__ import annotations

import asyncio
import logging
import os

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.engine import AsyncGuardEngine, EngineConfig, GuardEngine
from processor.heap import long_lived_heap_frozen
from processor.model import GuardModel, load_guard_model
from processor.worker.http import HealthServer
from processor.worker.metrics import WorkerMetrics
from processor.worker.pipeline import SettledHistory, StepChain
from processor.worker.rebalance import RebalanceListener
from processor.worker.session_store import SessionStore
from processor.worker.settings import WorkerSettings
from processor.worker.topics import raise_for_create_errors, replication_for
from processor.worker.worker import Worker

log = logging.getLogger(__name__)

# A step's verdicts for one partition usually fit one produce batch (aiokafka's default is 16 KiB);
# the broker's default limit on a batch is 1 MiB.
PRODUCER_BATCH_BYTES = 512 * 1024


async def ensure_topics(settings: WorkerSettings) -> None:
    """Create the topics that are missing, replicated as `replication_for` decides from the brokers the
    cluster lists now; existing topics are never altered (an operator's own configs stay)."""
    admin = AIOKafkaAdminClient(**settings.kafka_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [settings.tokens_topic, settings.verdicts_topic, settings.dlq_topic]
        missing = [name for name in names if name not in existing]
        if not missing:
            return
        brokers = len((await admin.describe_cluster())["brokers"])
        replication = replication_for(brokers, settings.replication_factor)
        response = await admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=settings.partitions,
                    replication_factor=replication.replication_factor,
                    topic_configs=replication.topic_configs(),
                )
                for name in missing
            ]
        )
        raise_for_create_errors(response.topic_errors)
        log.info(
            "created topics %s: %d partitions, replication factor %d, min.insync.replicas %d (%d brokers)",
            missing,
            settings.partitions,
            replication.replication_factor,
            replication.min_insync_replicas,
            brokers,
        )
    finally:
        await admin.close()


def engine_config(settings: WorkerSettings) -> EngineConfig:
    return EngineConfig(
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_cache_fraction=None if settings.kv_cache_bytes else settings.kv_cache_fraction,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_conversations=settings.max_batch_conversations,
        attention_backend=settings.attention_backend,
        kv_cache_dtype=settings.kv_cache_dtype,
        cuda_graphs=settings.cuda_graphs,
        cuda_graph_max_conversations=settings.cuda_graph_max_conversations,
        cuda_graph_max_tokens=settings.cuda_graph_max_tokens,
    )


async def serve(
    settings: WorkerSettings, model: GuardModel | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run a worker until `stop` is set (SIGTERM in the CLI): the step in flight finishes, publishes and
    commits, then everything is closed."""
    stop = stop or asyncio.Event()
    log.info("worker settings: %s", settings.redacted())
    if model is None:
        model = load_guard_model(settings.model, settings.device, settings.dtype)
    if model.device.type == "cpu":
        torch.set_num_threads(settings.cpu_threads or max(1, (os.cpu_count() or 2) // 2))
    metrics = WorkerMetrics()
    redis = settings.redis_client()
    store = SessionStore(
        redis,
        settings.redis_key_prefix,
        settings.session_ttl,
        settings.ended_session_ttl,
        settings.worker_id,
        settings.redis_wait_replicas,
        settings.redis_wait_timeout_ms,
    )
    chain = StepChain(settings.steps_in_flight)
    engine = GuardEngine(model, engine_config(settings))
    front = AsyncGuardEngine(engine, history=SettledHistory(store, chain))
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(
        **settings.kafka_options(),
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        **settings.kafka_options(),
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        max_batch_size=PRODUCER_BATCH_BYTES,
    )
    worker = Worker(settings, model, front, store, consumer, producer, metrics, chain)
    http = HealthServer(
        metrics.registry,
        lambda: worker.ready,
        stall=lambda: worker.health.stall(holds_partitions=bool(consumer.assignment())),
    )
    with long_lived_heap_frozen():  # the model's and libraries' objects: never walked again
        try:
            if settings.http_port:
                await http.start(settings.http_port)
            await producer.start()
            await consumer.start()
            consumer.subscribe([settings.tokens_topic], listener=RebalanceListener(worker))
            await worker.run(stop)
        finally:
            worker.ready = False
            # Leaving the group after the last commit: the partitions move without a redelivery.
            await consumer.stop()
            await producer.stop()
            await front.close()
            await redis.aclose()
            await http.stop()
