"""Moderation of whole texts: OpenAI's Moderation API and LiteLLM's guardrail API use it.

A prompt is a conversation of one user turn. The workers read it with the query heads at the turn's end
and answer with a `prompt` verdict: its level under the workers' policy, and the top category with its
probability. The checkpoint scores one category a turn, so `category_scores` holds that category's
probability and 0 for the others.

A reply (LiteLLM's `input_type: response`) is a conversation of the prompt it answers, when known, and
the reply as an assistant turn; it is flagged when the turn alerts under the streaming debounce, as the
chat route would have cut it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError

from processor.events import Role, VerdictEvent
from processor.gateway.chat import prompt_flagged
from processor.gateway.services import GatewayServices

log = logging.getLogger(__name__)

# The checkpoint's categories that correspond to one of OpenAI's; the others have no OpenAI name.
OPENAI_CATEGORIES: dict[str, str] = {
    "Violent": "violence",
    "Sexual Content or Sexual Acts": "sexual",
    "Suicide & Self-Harm": "self-harm",
    "Non-violent Illegal Acts": "illicit",
}


class ModerationUnavailable(Exception):
    """A verdict did not come within --verdict-timeout under --fail closed, or Kafka is unreachable."""


@dataclass(frozen=True)
class TextVerdict:
    flagged: bool
    risk_level: str | None
    category: str | None
    category_prob: float | None
    error: str | None = None  # set when released unjudged under --fail open


async def moderate(services: GatewayServices, texts: list[str]) -> list[TextVerdict]:
    """One verdict per text, in order; the texts are judged concurrently."""
    return list(await asyncio.gather(*(_moderate_one(services, text) for text in texts)))


async def _moderate_one(services: GatewayServices, text: str) -> TextVerdict:
    if not text:
        return TextVerdict(False, "Safe", None, None)
    started = time.monotonic()
    verdicts = await _conversation_verdicts(services, [("user", text)], until=("prompt", "error"))
    if verdicts is None:
        return _unavailable(services, _timeout_problem(services))
    verdict = verdicts[-1]
    if verdict.kind == "error":
        return _unavailable(services, f"the worker could not judge the text: {verdict.error}")
    services.metrics.first_release.observe(time.monotonic() - started)
    flagged = prompt_flagged(verdict)
    if flagged:
        services.metrics.prompt_blocks.labels(category=verdict.category or "unknown").inc()
    return TextVerdict(flagged, verdict.risk_level, verdict.category, verdict.category_prob)


async def moderate_replies(
    services: GatewayServices, prompt: str | None, replies: list[str]
) -> list[TextVerdict]:
    """One verdict per reply, each judged after `prompt`, concurrently."""
    return list(await asyncio.gather(*(_moderate_reply(services, prompt, reply) for reply in replies)))


async def _moderate_reply(services: GatewayServices, prompt: str | None, reply: str) -> TextVerdict:
    if not reply:
        return TextVerdict(False, "Safe", None, None)
    turns: list[tuple[Role, str]] = [("user", prompt)] if prompt else []
    verdicts = await _conversation_verdicts(
        services, [*turns, ("assistant", reply)], until=("conversation_end", "error")
    )
    if verdicts is None:
        return _unavailable(services, _timeout_problem(services))
    errors = [verdict.error for verdict in verdicts if verdict.kind == "error"]
    if errors and services.settings.fail == "closed":
        raise ModerationUnavailable(f"the worker could not judge the text: {errors[0]}")
    alerts = [v for v in verdicts if v.alert and v.role == "assistant" and v.kind == "tokens"]
    if not alerts:
        return TextVerdict(False, "Safe", None, None)
    alert = alerts[0]
    services.metrics.cuts.labels(category=alert.category or "unknown").inc()
    return TextVerdict(True, alert.risk_level, alert.category, alert.category_prob)


async def _conversation_verdicts(
    services: GatewayServices, turns: list[tuple[Role, str]], until: tuple[str, ...]
) -> list[VerdictEvent] | None:
    """Send `turns` as a new conversation, the last one ending it, and collect its verdicts until one of
    a kind in `until`; None (counted) when that does not come within --verdict-timeout."""
    conversation_id = f"gs-mod-{uuid.uuid4().hex}"
    verdicts: list[VerdictEvent] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_verdict(verdict: VerdictEvent) -> None:
        verdicts.append(verdict)
        if verdict.kind in until and not done.done():
            done.set_result(None)

    services.router.register(conversation_id, on_verdict)  # a fresh uuid: never registered yet
    producer, settings = services.producer, services.settings
    try:
        try:
            for index, (role, text) in enumerate(turns):
                last = index == len(turns) - 1
                await producer.send_text(
                    conversation_id, role, text, end_of_turn=not last, end_of_conversation=last
                )
        except KafkaError as error:
            raise ModerationUnavailable(f"guardstream cannot reach Kafka: {error}") from error
        try:
            await asyncio.wait_for(done, timeout=settings.verdict_timeout)
        except TimeoutError:
            services.metrics.verdict_timeouts.labels(fail=settings.fail).inc()
            return None
        return verdicts
    finally:
        services.router.unregister(conversation_id)
        producer.forget(conversation_id)


def _timeout_problem(services: GatewayServices) -> str:
    return f"no verdict within --verdict-timeout {services.settings.verdict_timeout:g} s (a worker down)"


def _unavailable(services: GatewayServices, problem: str) -> TextVerdict:
    """--fail closed: the request fails saying why; open: the text passes, unjudged, with the reason."""
    if services.settings.fail == "closed":
        raise ModerationUnavailable(problem)
    return TextVerdict(False, None, None, None, error=problem)


def openai_result(verdict: TextVerdict, categories: tuple[str, ...]) -> dict[str, Any]:
    """One `results` entry of OpenAI's Moderation response: the checkpoint's category names, and
    OpenAI's names where one corresponds."""
    flags = {name: verdict.flagged and name == verdict.category for name in categories}
    scores = {
        name: (verdict.category_prob or 0.0) if name == verdict.category else 0.0 for name in categories
    }
    for name, openai_name in OPENAI_CATEGORIES.items():
        if name in flags:
            flags[openai_name] = flags[name]
            scores[openai_name] = scores[name]
    result: dict[str, Any] = {
        "flagged": verdict.flagged,
        "categories": flags,
        "category_scores": scores,
        "guardstream": {"risk_level": verdict.risk_level, "category": verdict.category},
    }
    if verdict.error is not None:
        result["guardstream"]["error"] = verdict.error
    return result
