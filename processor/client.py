"""Python client for guardstream: send token events (seq numbered per conversation), read verdicts.

async with GuardProducer("localhost:9092") as producer:
    await producer.send_text("conv-1", "user", "How do I bake bread?", end_of_turn=True)
    for token_id in generated_ids:
        await producer.send_tokens("conv-1", "assistant", [token_id])
    await producer.end_conversation("conv-1")

async for verdict in read_verdicts("localhost:9092", conversation_ids={"conv-1"}):
    if verdict.alert:
        stop_generation(verdict.alert_position)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from processor.events import (
    DEFAULT_TOKENS_TOPIC,
    DEFAULT_VERDICTS_TOPIC,
    Role,
    TokenEvent,
    VerdictEvent,
    parse_verdict,
)


class GuardProducer:
    """Numbers each conversation's events from 0 (or from `resume`'s seq) and sends them keyed by
    conversation id, so a conversation stays in one partition and in order."""

    def __init__(
        self, bootstrap_servers: str, topic: str = DEFAULT_TOKENS_TOPIC, **kafka_options: Any
    ) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
            **kafka_options,
        )
        self._next_seq: dict[str, int] = {}

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> GuardProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def resume(self, conversation_id: str, next_seq: int) -> None:
        """Continue a conversation another process started."""
        self._next_seq[conversation_id] = next_seq

    def forget(self, conversation_id: str) -> None:
        """Drop an ended conversation's counter, so a long-running producer's memory stays bounded."""
        self._next_seq.pop(conversation_id, None)

    async def send_tokens(
        self,
        conversation_id: str,
        role: Role,
        token_ids: Sequence[int],
        *,
        end_of_turn: bool = False,
        end_of_conversation: bool = False,
        wait: bool = False,
    ) -> int:
        return await self._send(
            conversation_id, role, {"token_ids": list(token_ids)}, end_of_turn, end_of_conversation, wait
        )

    async def send_text(
        self,
        conversation_id: str,
        role: Role,
        text: str,
        *,
        end_of_turn: bool = False,
        end_of_conversation: bool = False,
        wait: bool = False,
    ) -> int:
        return await self._send(conversation_id, role, {"text": text}, end_of_turn, end_of_conversation, wait)

    async def end_turn(self, conversation_id: str, role: Role, *, wait: bool = False) -> int:
        return await self.send_tokens(conversation_id, role, [], end_of_turn=True, wait=wait)

    async def end_conversation(
        self, conversation_id: str, role: Role = "assistant", *, wait: bool = False
    ) -> int:
        return await self.send_tokens(conversation_id, role, [], end_of_conversation=True, wait=wait)

    async def flush(self) -> None:
        await self._producer.flush()

    async def _send(
        self,
        conversation_id: str,
        role: Role,
        payload: dict[str, Any],
        end_of_turn: bool,
        end_of_conversation: bool,
        wait: bool,
    ) -> int:
        seq = self._next_seq.get(conversation_id, 0)
        event = TokenEvent(
            conversation_id=conversation_id,
            seq=seq,
            role=role,
            end_of_turn=end_of_turn,
            end_of_conversation=end_of_conversation,
            ts=time.time(),
            **payload,
        )
        value = event.model_dump_json(exclude_none=True).encode()
        # Taken before the first await, so concurrent sends for one conversation never share a seq.
        self._next_seq[conversation_id] = seq + 1
        sent = await self._producer.send(self.topic, value, key=conversation_id.encode())
        if wait:
            await sent
        return seq


async def read_verdicts(
    bootstrap_servers: str,
    topic: str = DEFAULT_VERDICTS_TOPIC,
    *,
    conversation_ids: Collection[str] | None = None,
    from_beginning: bool = True,
    **kafka_options: Any,
) -> AsyncIterator[VerdictEvent]:
    """Verdict events as they arrive (no consumer group: every reader sees every verdict)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        **kafka_options,
    )
    wanted = {conversation_id.encode() for conversation_id in conversation_ids} if conversation_ids else None
    await consumer.start()
    try:
        async for record in consumer:
            if wanted is not None and record.key not in wanted:
                continue
            yield parse_verdict(record.value)
    finally:
        await consumer.stop()
