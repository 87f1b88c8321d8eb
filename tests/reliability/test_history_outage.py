"""A rebuild that meets a Redis outage must not close the conversation: the step fails and is redone.

The engine reads a conversation's token history from Redis when it must rebuild its KV cache (evicted,
new owner). A failed read looks to the engine like a missing history; only a history really gone from
Redis may close the conversation with an error verdict.
"""

from __future__ import annotations

import pytest

from processor.engine import AsyncGuardEngine, EngineConfig, GuardEngine
from processor.events import TokenEvent
from processor.worker.conversation import Incoming, plan_conversation
from processor.worker.metrics import WorkerMetrics
from processor.worker.session_store import Session, SessionStore
from processor.worker.settings import WorkerSettings
from processor.worker.template import TurnState
from processor.worker.worker import Worker

from .workers import free_port

pytestmark = [pytest.mark.timeout(60)]


def worker_with(model, redis_url: str, redis_prefix: str) -> Worker:
    settings = WorkerSettings(
        model="unused",
        device="cpu",
        dtype="float32",
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        redis_timeout=1.0,
    )
    redis = settings.redis_client()
    store = SessionStore(redis, redis_prefix, 60, 60, "w")
    front = AsyncGuardEngine(GuardEngine(model, EngineConfig(kv_cache_bytes=4 * 1024 * 1024)), history=store)
    return Worker(settings, model, front, store, None, None, WorkerMetrics())  # no Kafka needed here


def step_needing_rebuild(worker: Worker):
    """A conversation 5 tokens in, which this worker's engine has never seen: it must be rebuilt."""
    session = Session("c-1", stored=True, next_seq=1, length=5, turns=TurnState(turn=0, open_role="user"))
    event = TokenEvent(conversation_id="c-1", seq=1, role="user", token_ids=[1234])
    return plan_conversation(session, [Incoming(event, None)], worker.writer, worker.max_positions)


async def test_unreachable_redis_fails_the_step(model, redis_prefix):
    worker = worker_with(model, f"redis://127.0.0.1:{free_port()}/0", redis_prefix)  # nothing listens
    try:
        with pytest.raises(Exception, match="rebuild"):
            await worker.moderate([step_needing_rebuild(worker)])
    finally:
        await worker.front.close()


@pytest.mark.integration
async def test_history_gone_closes_the_conversation(model, redis_url, redis_prefix):
    worker = worker_with(model, redis_url, redis_prefix)  # Redis answers; the history is not there
    try:
        [outcome] = await worker.moderate([step_needing_rebuild(worker)])
    finally:
        await worker.front.close()
    assert outcome.session.status == "error"
    assert [verdict["kind"] for verdict in outcome.verdicts] == ["error"]
    assert "history is gone" in outcome.verdicts[0]["error"]
