"""One chat completion through the gateway: the prompt to the workers, the upstream's reply to the workers
as it streams, and to the caller only what `--release` lets through.

`ChatRelay.run` yields what the caller gets, in order: `Released` text, then one `Finish`. It raises
`ChatFailed` when the request cannot be served (the upstream failed, Kafka is unreachable); the route
turns that into an HTTP error, or an error event once the stream has begun.

Everything a request waits on arrives on one queue: the upstream's deltas (a task reads the upstream)
and the conversation's verdicts (the router), so one loop decides, event by event, what is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaError

from processor.events import Role, VerdictEvent
from processor.gateway.release import HoldBack
from processor.gateway.reply import Reply
from processor.gateway.services import GatewayServices
from processor.gateway.upstream import Delta, Finished, UpstreamError
from processor.model.labels import SAFE, is_flagged

log = logging.getLogger(__name__)

# Largest events the gateway sends, well inside the workers' default limits (EventLimits); longer
# messages are split (the worker tokenizes text across events).
MAX_TEXT_EVENT_CHARS = 16_384
MAX_IDS_PER_EVENT = 1024


@dataclass(frozen=True, slots=True)
class Released:
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    finish_reason: str
    guardstream: dict[str, Any] | None = None  # set when the reply was filtered or could not be checked


class ChatFailed(Exception):
    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


@dataclass(frozen=True, slots=True)
class _UpstreamFailed:
    error: UpstreamError


def prompt_turns(messages: list[dict[str, Any]]) -> list[tuple[Role, str]]:
    """(role, text) of each message, as the workers read them.

    The wire has two roles. A system (or developer, or tool) message is sent as a user turn: the chat
    template renders it as its own `<|im_start|>system` block, which the model reads with the same query
    heads as a user turn. Empty messages are skipped; list content keeps its text parts."""
    turns: list[tuple[Role, str]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                part.get("text", "")
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        if not isinstance(content, str) or not content:
            continue
        role: Role = "assistant" if message.get("role") == "assistant" else "user"
        turns.append((role, content))
    return turns


def prompt_flagged(verdict: VerdictEvent) -> bool:
    return verdict.alert or (verdict.risk_level is not None and verdict.risk_level != SAFE)


@dataclass
class _Labels:
    """What a token's verdict said, kept to describe a cut."""

    position: int
    risk_level: str
    category: str | None


@dataclass
class ChatRelay:
    services: GatewayServices
    conversation_id: str
    request: dict[str, Any]
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.settings = self.services.settings
        self.metrics = self.services.metrics
        self.release_mode = self.settings.release
        self.queue: asyncio.Queue[VerdictEvent | Delta | Finished | _UpstreamFailed] = asyncio.Queue()
        self.reply = Reply(self.services.checkpoint.tokenizer)
        self.hold = HoldBack()
        self.spans: dict[int, tuple[int, int]] = {}  # assistant event seq -> (first token index, count)
        self.arrivals: list[float] = []  # per token: when its text arrived from the upstream
        self.labels: dict[int, _Labels] = {}  # per token index with a verdict
        self.seen: set[tuple[int, str]] = set()  # (seq, kind): a redelivered verdict is read once
        self.prompt_waiting: set[int] = set()  # seqs of the user turns whose prompt verdict is due
        self.prompt_sent_at = 0.0
        self.failed_open = False
        self.alert_summary: dict[str, Any] | None = None
        self.upstream_finish: str | None = None
        self.upstream_done = False
        self.ended = False  # the conversation's last event is sent
        self.released_any = False
        self._upstream_task: asyncio.Task | None = None

    # The request, top to bottom.

    async def run(self) -> AsyncIterator[Released | Finish]:
        router = self.services.router
        if not router.register(self.conversation_id, self.queue.put_nowait):
            raise ChatFailed(
                409,
                f"conversation {self.conversation_id} is in progress: send a new X-Conversation-Id "
                "per request",
                "invalid_request_error",
            )
        handed_off = False
        try:
            await self._send_prompt()
            # Audit adds no latency: a flagged prompt is recorded, never waited for.
            block = self.settings.prompt_check == "block" and self.release_mode != "audit"
            if block and self.prompt_waiting:
                blocked = await self._wait_for_prompt()
                if blocked is not None:
                    yield blocked
                    return
            if self.settings.prompt_check == "off":
                self.prompt_waiting.clear()
            if self.release_mode == "audit":
                handed_off = True  # the recorder task unregisters once the verdicts are in
                async for output in self._audit():
                    yield output
                return
            self._upstream_task = asyncio.create_task(self._read_upstream())
            async for output in self._moderate():
                yield output
        finally:
            if self._upstream_task is not None:
                self._upstream_task.cancel()  # a cut, a failure or a caller gone: stop generating
                with contextlib.suppress(asyncio.CancelledError):
                    await self._upstream_task
            if not handed_off:
                router.unregister(self.conversation_id)
            if not self.ended:
                # Cut, blocked, failed or left: end the conversation so the worker frees its state now.
                self.services.keep(asyncio.create_task(self._end_conversation()))
            else:
                self.services.producer.forget(self.conversation_id)

    async def _end_conversation(self) -> None:
        producer = self.services.producer
        try:
            await producer.end_conversation(self.conversation_id)
        except KafkaError as error:
            log.warning("conversation %s: could not send its end: %s", self.conversation_id, error)
        finally:
            producer.forget(self.conversation_id)

    async def _send_prompt(self) -> None:
        producer = self.services.producer
        self.prompt_sent_at = time.monotonic()
        try:
            for role, text in prompt_turns(self.request.get("messages") or []):
                pieces = [
                    text[i : i + MAX_TEXT_EVENT_CHARS] for i in range(0, len(text), MAX_TEXT_EVENT_CHARS)
                ]
                for number, piece in enumerate(pieces):
                    last = number == len(pieces) - 1
                    seq = await producer.send_text(self.conversation_id, role, piece, end_of_turn=last)
                    if last and role == "user":
                        self.prompt_waiting.add(seq)
        except KafkaError as error:
            raise ChatFailed(
                503, f"guardstream cannot reach Kafka: {error}", "service_unavailable"
            ) from error

    async def _wait_for_prompt(self) -> Finish | None:
        """--prompt-check block: wait for every user turn's verdict. A Finish when the request ends here."""
        while self.prompt_waiting:
            try:
                event = await self._next_event(self.prompt_sent_at + self.settings.verdict_timeout)
            except TimeoutError:
                return self._timed_out("prompt")
            if isinstance(event, VerdictEvent):
                finish = self._on_verdict(event)
                if finish is not None:
                    return finish
        return None

    async def _read_upstream(self) -> None:
        try:
            async for item in self.services.upstream.stream(self.request):
                self.queue.put_nowait(item)
        except UpstreamError as error:
            self.queue.put_nowait(_UpstreamFailed(error))

    async def _moderate(self) -> AsyncIterator[Released | Finish]:
        """hold and live: read deltas and verdicts until the reply is finished and judged, or cut."""
        while True:
            try:
                event = await self._next_event(self._deadline())
            except TimeoutError:
                finish = self._timed_out("prompt" if self.prompt_waiting else "reply")
                if finish is not None:
                    yield finish
                    return
                event = None
            finish = None
            if isinstance(event, Delta):
                await self._produce(self.reply.feed(event.text))
                if self.release_mode == "live":
                    self._mark_released()
                    yield Released(event.text)
            elif isinstance(event, Finished):
                self.upstream_finish, self.upstream_done = event.finish_reason, True
                await self._produce(self.reply.finish(), last=True)
                self.hold.finish()
            elif isinstance(event, _UpstreamFailed):
                self.metrics.upstream_errors.inc()
                raise ChatFailed(502, str(event.error), "upstream_error")
            elif isinstance(event, VerdictEvent):
                finish = self._on_verdict(event)
            if finish is not None:  # a flagged prompt or a failure: nothing more is released
                yield finish
                return
            if self.release_mode == "hold":
                text = self._release()
                if text:
                    yield Released(text)
            if self.hold.cut is not None:
                yield self._cut()
                return
            if self.hold.done and not self.prompt_waiting:
                yield Finish(self.upstream_finish or "stop")
                return
            if self.failed_open and self.upstream_done:
                yield Finish(self.upstream_finish or "stop")
                return

    async def _audit(self) -> AsyncIterator[Released | Finish]:
        """audit: the upstream's deltas pass at once; verdicts are recorded by a task of their own."""
        recorder = asyncio.create_task(self._record_verdicts())
        self.services.keep(recorder)
        try:
            async for item in self.services.upstream.stream(self.request):
                if isinstance(item, Delta):
                    self._mark_released()
                    yield Released(item.text)
                    await self._produce(self.reply.feed(item.text))
                else:
                    await self._produce(self.reply.finish(), last=True)
                    self.hold.finish()
                    self.upstream_done = True
                    yield Finish(item.finish_reason or "stop")
        except UpstreamError as error:
            recorder.cancel()
            self.metrics.upstream_errors.inc()
            raise ChatFailed(502, str(error), "upstream_error") from error
        except BaseException:
            if not self.upstream_done:  # the caller left mid-reply; after the end, the recorder goes on
                recorder.cancel()
            raise

    async def _record_verdicts(self) -> None:
        try:
            while not (self.hold.done and not self.prompt_waiting) and not self.failed_open:
                try:
                    event = await self._next_event(self._deadline())
                except TimeoutError:
                    self.metrics.verdict_timeouts.labels(fail="audit").inc()
                    log.warning(
                        "conversation %s: verdicts late past the timeout (audit)", self.conversation_id
                    )
                    return
                if isinstance(event, VerdictEvent) and self._on_verdict(event) is not None:
                    return
                if self.hold.cut is not None:
                    summary = self._cut_summary()
                    self.metrics.audit_alerts.labels(category=summary.get("category") or "unknown").inc()
                    log.info("conversation %s: alert (audit, not cut): %s", self.conversation_id, summary)
                    return
        finally:
            self.services.router.unregister(self.conversation_id)

    # Steps of the loop.

    async def _next_event(self, deadline: float | None) -> VerdictEvent | Delta | Finished | _UpstreamFailed:
        """The next queued event; TimeoutError once `deadline` (monotonic) passes with none queued. A queued
        event is taken at once: no timer or task per event, which a busy gateway pays per token."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if deadline is None:
            return await self.queue.get()
        async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
            return await self.queue.get()

    async def _produce(self, token_ids: list[int], last: bool = False) -> None:
        """Send the reply's newly settled ids; `last` ends the conversation (implies the turn's end)."""
        pieces = [token_ids[i : i + MAX_IDS_PER_EVENT] for i in range(0, len(token_ids), MAX_IDS_PER_EVENT)]
        if last and not pieces:
            pieces = [[]]
        for number, piece in enumerate(pieces):
            end = last and number == len(pieces) - 1
            try:
                seq = await self.services.producer.send_tokens(
                    self.conversation_id, "assistant", piece, end_of_conversation=end
                )
            except KafkaError as error:
                raise ChatFailed(
                    503, f"guardstream cannot reach Kafka: {error}", "service_unavailable"
                ) from error
            self.ended = self.ended or end
            if piece:
                self.spans[seq] = (self.hold.sent, len(piece))
                self.hold.add_tokens(len(piece))
                self.arrivals += [time.monotonic()] * len(piece)

    def _on_verdict(self, verdict: VerdictEvent) -> Finish | None:
        """Record one verdict; a Finish when it ends the request (a flagged prompt, a worker error)."""
        if (verdict.seq, verdict.kind) in self.seen:
            return None
        self.seen.add((verdict.seq, verdict.kind))
        if verdict.kind == "prompt":
            self.prompt_waiting.discard(verdict.seq)
            if prompt_flagged(verdict):
                return self._prompt_blocked(verdict)
        elif verdict.kind == "tokens" and verdict.seq in self.spans:
            return self._on_reply_tokens(verdict)
        elif verdict.kind == "error":
            self.metrics.worker_errors.inc()
            log.warning("conversation %s: worker error: %s", self.conversation_id, verdict.error)
            return self._verdicts_failed(
                "worker_error", f"the worker could not judge the reply: {verdict.error}"
            )
        return None

    def _on_reply_tokens(self, verdict: VerdictEvent) -> Finish | None:
        start, count = self.spans[verdict.seq]
        sent = self.reply.token_ids[start : start + count]
        if [token.token_id for token in verdict.tokens] != sent:
            # Another producer's events under this conversation id (an id reused across replicas):
            # these verdicts are not about the text this request holds.
            return self._verdicts_failed(
                "worker_error", f"the verdicts for event {verdict.seq} name other tokens than were sent"
            )
        policy = self.settings.policy
        by_position: dict[int, int] = {}
        for offset, token in enumerate(verdict.tokens):
            index = start + offset
            self.labels[index] = _Labels(token.position, token.risk_level, token.category)
            by_position[token.position] = index
            self.hold.record(index, is_flagged(token.risk_level, policy))
        if verdict.alert and verdict.alert_position in by_position:
            self.alert_summary = {"risk_level": verdict.risk_level, "category": verdict.category}
            self.hold.alert(by_position[verdict.alert_position])
        return None

    def _release(self) -> str:
        """hold: the text the verdicts now clear (all of it once failed open)."""
        if self.failed_open:
            count = len(self.reply.token_ids)
            self.metrics.fail_open_releases.inc(max(count - max(self.hold.verdicted, self.reply.released), 0))
        else:
            count = self.hold.releasable if not self.prompt_waiting else 0
        start = self.reply.released
        if count <= start:
            return ""
        now = time.monotonic()
        for arrival in self.arrivals[start:count]:
            self.metrics.hold_back.observe(now - arrival)
        text = self.reply.release(count)
        if text:
            self._mark_released()
        return text

    def _mark_released(self) -> None:
        if not self.released_any:
            self.released_any = True
            self.metrics.first_release.observe(time.monotonic() - self.arrived)

    def _deadline(self) -> float | None:
        """When the oldest awaited verdict is late; None when none is awaited (or failed open)."""
        if self.failed_open:
            return None
        deadlines = []
        if self.prompt_waiting:
            deadlines.append(self.prompt_sent_at + self.settings.verdict_timeout)
        waiting = self.hold.first_waiting
        if waiting is not None:
            deadlines.append(self.arrivals[waiting] + self.settings.verdict_timeout)
        return min(deadlines) if deadlines else None

    def _timed_out(self, what: str) -> Finish | None:
        message = (
            f"no verdict for the {what} within --verdict-timeout {self.settings.verdict_timeout:g} s "
            "(a worker down or lagging)"
        )
        log.warning("conversation %s: %s; --fail %s", self.conversation_id, message, self.settings.fail)
        self.metrics.verdict_timeouts.labels(fail=self.settings.fail).inc()
        return self._verdicts_failed("verdict_timeout", message)

    def _verdicts_failed(self, reason: str, message: str) -> Finish | None:
        """--fail closed: end with content_filter naming the reason; open: release without verdicts."""
        if self.settings.fail == "closed":
            return Finish("content_filter", {"reason": reason, "error": message, **self._ids()})
        self.failed_open = True
        self.prompt_waiting.clear()
        return None

    def _prompt_blocked(self, verdict: VerdictEvent) -> Finish | None:
        category = verdict.category or "unknown"
        if self.release_mode == "audit":
            self.metrics.audit_alerts.labels(category=category).inc()
            log.info("conversation %s: prompt flagged (audit, not blocked)", self.conversation_id)
            return None
        self.metrics.prompt_blocks.labels(category=category).inc()
        return Finish(
            "content_filter",
            {
                "reason": "prompt",
                "risk_level": verdict.risk_level,
                "category": verdict.category,
                "alert_position": verdict.alert_position,
                **self._ids(),
            },
        )

    def _cut_summary(self) -> dict[str, Any]:
        cut = self.hold.cut
        assert cut is not None
        second = self.labels.get(cut + 1)  # the alerting pair's second token: where the worker alerts
        summary: dict[str, Any] = {
            "risk_level": second.risk_level if second else None,
            "category": second.category if second else None,
            "alert_position": second.position if second else None,
        }
        if self.alert_summary is not None:
            summary |= self.alert_summary
        return summary

    def _cut(self) -> Finish:
        summary = self._cut_summary()
        self.metrics.cuts.labels(category=summary.get("category") or "unknown").inc()
        return Finish("content_filter", {"reason": "alert", **summary, **self._ids()})

    def _ids(self) -> dict[str, Any]:
        return {"conversation_id": self.conversation_id}
