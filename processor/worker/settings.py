"""Every worker setting in one object: GUARDSTREAM_* environment variables, overridden by CLI flags."""

from __future__ import annotations

import secrets
import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from processor.engine import EngineConfig
from processor.engine.kv_cache import DEFAULT_CPU_CACHE_BYTES
from processor.events import (
    CONVERSATION_ID_MAX_LENGTH,
    DEFAULT_TOKENS_TOPIC,
    DEFAULT_VERDICTS_TOPIC,
    EventLimits,
)
from processor.kafka_connection import KafkaConnection
from processor.model.labels import Policy

# processor.engine.kv_cache.KV_CACHE_DTYPES and "auto", as a type that lists the flag's choices.
KvCacheDtype = Literal["auto", "float32", "float16", "bfloat16"]


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class WorkerSettings(KafkaConnection):
    """A default that belongs to the engine (EngineConfig) or to event decoding (EventLimits) is read
    from there, not restated."""

    model_config = SettingsConfigDict(env_prefix="GUARDSTREAM_", extra="ignore")

    # Where things are (Kafka's connection settings: KafkaConnection).
    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="redis:// or rediss:// URL (a password goes here).",
        repr=False,  # it may hold a password; redacted() shows it masked
    )
    model: str = Field(default="", description="Checkpoint directory (or hub id when it can be fetched).")
    device: str | None = Field(
        default=None, description="torch device: cuda, cuda:1, cpu (default: cuda when present, else cpu)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        default=None, description="default: bfloat16 on GPU, float32 on CPU"
    )

    # Topics and group.
    tokens_topic: str = DEFAULT_TOKENS_TOPIC
    verdicts_topic: str = DEFAULT_VERDICTS_TOPIC
    dlq_topic: str = "guard.dlq"
    group_id: str = "guardstream"
    partitions: int = Field(default=12, ge=1, description="Partitions of topics the worker creates.")
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Replication of topics the worker creates (default: the cluster's brokers, up to 3; "
        "min.insync.replicas 2 from 2 copies up).",
    )

    # What the worker does.
    template: Literal["chat", "raw"] = Field(
        default="chat", description="chat: the worker inserts the Qwen3 chat template; raw: ids fed as sent."
    )
    policy: Policy = Policy.STRICT
    verdicts: Literal["tokens", "changes", "turns"] = Field(
        default="tokens",
        description="tokens: every event; changes: level changes; turns: prompt/alerts/ends.",
    )

    # Redis session state.
    session_ttl: int = Field(default=86_400, ge=1, description="Seconds an idle session is kept.")
    ended_session_ttl: int = Field(default=300, ge=1, description="Seconds an ended session is kept.")
    redis_key_prefix: str = "guardstream:"
    redis_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a Redis call may hang before it is retried (hung server)."
    )
    redis_cluster: bool = Field(
        default=False, description="redis_url names a node of a Redis Cluster (any one: it finds the rest)."
    )
    redis_wait_replicas: int = Field(
        default=0,
        ge=0,
        description="Before a step's offsets are committed, wait until this many replicas hold its "
        "session writes (Redis WAIT), so that a failover cannot lose them; 0: do not wait.",
    )
    redis_wait_timeout_ms: int = Field(
        default=100, ge=1, description="How long one WAIT may take; short of replicas, the save is retried."
    )

    # Serving.
    http_port: int = Field(
        default=8080, ge=0, le=65535, description="/metrics, /healthz, /readyz; 0 disables."
    )
    stall_seconds: float = Field(
        default=60,
        gt=0,
        description="/healthz fails when a step has been under way this long with none finishing, or the "
        "consumer has not fetched for this long while holding partitions.",
    )
    worker_id: str = Field(
        default_factory=_default_worker_id,
        description="Names this worker in its Kafka client id, dead letters and session ownership "
        "(default: the host name and a random suffix).",
    )
    kv_cache_bytes: int | None = Field(
        default=EngineConfig.kv_cache_bytes,
        ge=1,
        description="KV cache size in bytes; overrides the fraction "
        f"(CPU default: {DEFAULT_CPU_CACHE_BYTES >> 30} GiB).",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads on a CPU device (default: half the cores). The worker's Kafka and Redis "
        "I/O runs on the same cores, and torch threads on all of them contend with it.",
    )
    kv_cache_fraction: float = Field(
        default=EngineConfig.kv_cache_fraction,
        gt=0,
        le=1,
        description="Share of free GPU memory for the KV cache after the model loads.",
    )
    attention_backend: Literal["auto", "sdpa", "flex", "paged_cpu", "triton"] = Field(
        default=EngineConfig.attention_backend,
        description="auto: the C paged-attention kernel on a CPU in float32 (built with the machine's "
        "C compiler on first start; SDPA without one), SDPA on a GPU. triton: our Triton paged-attention "
        "kernel (CUDA; opt-in until a GPU run has checked it).",
    )
    kv_cache_dtype: KvCacheDtype = Field(
        default=EngineConfig.kv_cache_dtype,
        description="How keys and values are stored. auto: float16 where the C kernel does the attention "
        "(halves the bytes it reads, each value rounded once), the model's dtype elsewhere; float32 is "
        "exact, and the C kernel cannot read bfloat16.",
    )
    max_batch_tokens: int = Field(
        default=EngineConfig.max_batch_tokens, ge=1, description="Tokens one engine step runs at most."
    )
    max_batch_conversations: int = Field(
        default=EngineConfig.max_batch_conversations,
        ge=1,
        description="Conversations one engine step runs at most.",
    )
    cuda_graphs: bool = Field(
        default=EngineConfig.cuda_graphs,
        description="Replay engine steps as CUDA graphs of the whole forward, captured at start for "
        "bucketed step shapes (CUDA, triton attention; auto then picks triton). Opt-in until a GPU run "
        "has checked it.",
    )
    cuda_graph_max_conversations: int = Field(
        default=EngineConfig.cuda_graph_max_conversations,
        ge=1,
        description="Largest step, in conversations, captured as a CUDA graph; larger steps run eagerly.",
    )
    cuda_graph_max_tokens: int = Field(
        default=EngineConfig.cuda_graph_max_tokens,
        ge=1,
        description="Largest step, in tokens, captured as a CUDA graph; larger steps run eagerly.",
    )
    poll_max_records: int = Field(default=2000, ge=1, description="Records per consumer poll (one step).")
    poll_timeout_ms: int = Field(default=5, ge=0)
    fresh_fetch_ms: int = Field(
        default=5,
        ge=0,
        description="After a poll, wait up to this long for the fetch its drain sets off, so that records "
        "that arrived during the last step join this one instead of waiting a step more. 0: one poll a step.",
    )
    step_interval_ms: int = Field(
        default=0,
        ge=0,
        description="Least time between the starts of two steps: at low load, fewer and larger steps, "
        "each paying a step's fixed cost once, for a few ms of latency. 0: a step starts as soon as "
        "anything waits.",
    )
    steps_in_flight: int = Field(
        default=3,
        ge=1,
        description="Steps publishing, saving and committing at most, counting the one just prepared. "
        "Under load a step's finish (broker acks, Redis, commit) outlasts the next step's preparation.",
    )

    # Limits on input: hostile input must not exhaust anything.
    max_record_bytes: int = Field(default=EventLimits.max_record_bytes, ge=64)
    max_tokens_per_event: int = Field(default=EventLimits.max_tokens_per_event, ge=1)
    max_text_chars: int = Field(default=EventLimits.max_text_chars, ge=1)
    max_conversation_id_length: int = Field(
        default=EventLimits.max_conversation_id_length, ge=1, le=CONVERSATION_ID_MAX_LENGTH
    )
    max_conversations: int = Field(default=100_000, ge=1, description="Open conversations one worker holds.")

    # Kafka security, passed through to aiokafka.
    def event_limits(
        self, vocab_size: int | None, text_allowed: bool, control_ids: frozenset[int] = frozenset()
    ) -> EventLimits:
        return EventLimits(
            max_record_bytes=self.max_record_bytes,
            max_tokens_per_event=self.max_tokens_per_event,
            max_text_chars=self.max_text_chars,
            max_conversation_id_length=self.max_conversation_id_length,
            vocab_size=vocab_size,
            text_allowed=text_allowed,
            control_ids=control_ids,
        )

    def redis_options(self) -> dict[str, object]:
        """Keyword arguments for `Redis.from_url(redis_url, ...)`; password and TLS come in the URL."""
        # Explicit: redis-py before 6 waits forever on a hung server, which would stall the worker
        # while /readyz still says ready. A timeout turns the hang into a retried outage.
        return {"socket_timeout": self.redis_timeout, "socket_connect_timeout": self.redis_timeout}

    def redis_client(self) -> Redis | RedisCluster:
        """A client for `redis_url`: a cluster client with `redis_cluster`."""
        client = RedisCluster if self.redis_cluster else Redis
        return client.from_url(self.redis_url, **self.redis_options())

    def kafka_client_id(self) -> str:
        return f"guardstream-{self.worker_id}"

    def redacted(self) -> dict[str, object]:
        """For the startup log line: secrets masked, and a password inside the Redis URL too."""
        values = self.model_dump(mode="json")
        values["redis_url"] = redact_url(self.redis_url)
        return values


def redact_url(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user, has_password, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if has_password else ''}@{host}"
