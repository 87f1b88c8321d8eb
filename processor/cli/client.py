"""`guardstream produce` and `guardstream verdicts`: a conversation onto the tokens topic, verdicts off
the verdicts topic."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
import uuid
from pathlib import Path

from processor.events import DEFAULT_TOKENS_TOPIC, DEFAULT_VERDICTS_TOPIC
from processor.worker.settings import WorkerSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    produce = subparsers.add_parser(
        "produce", help="stream a conversation from a messages file, like an LLM would, as token events"
    )
    produce.add_argument(
        "messages",
        type=Path,
        help='JSON {"messages": [{"role": "user"|"assistant", "content": str}]}, or the bare list',
    )
    produce.add_argument("--kafka-bootstrap", help="default: GUARDSTREAM_KAFKA_BOOTSTRAP or localhost:9092")
    produce.add_argument("--tokens-topic", help=f"default: {DEFAULT_TOKENS_TOPIC}")
    produce.add_argument("--model", help="checkpoint folder whose tokenizer turns content into ids")
    produce.add_argument("--conversation-id", default=None, help="default: a random id")
    produce.add_argument("--chunk", type=int, default=1, help="tokens (or with --text, characters) per event")
    produce.add_argument(
        "--rate", type=float, default=50.0, help="events per second (0: as fast as possible)"
    )
    produce.add_argument("--text", action="store_true", help="send text chunks; the worker tokenizes")
    produce.set_defaults(handler=produce_command)

    verdicts = subparsers.add_parser("verdicts", help="show verdict events, tokens colored by risk level")
    verdicts.add_argument("--kafka-bootstrap", help="default: GUARDSTREAM_KAFKA_BOOTSTRAP or localhost:9092")
    verdicts.add_argument("--verdicts-topic", help=f"default: {DEFAULT_VERDICTS_TOPIC}")
    verdicts.add_argument("--conversation-id", action="append", help="only these conversations (repeatable)")
    verdicts.add_argument("--model", help="checkpoint folder whose tokenizer shows token text")
    verdicts.add_argument("--follow", action="store_true", help="keep waiting for new verdicts")
    verdicts.add_argument("--from-latest", action="store_true", help="skip verdicts already on the topic")
    verdicts.add_argument("--json", action="store_true", help="print the raw verdict events")
    verdicts.set_defaults(handler=verdicts_command)


# -- produce ---------------------------------------------------------------------------------------


def produce_command(args: argparse.Namespace) -> int:
    document = json.loads(args.messages.read_text())
    # The same file `guardstream score --messages` takes, or a bare list of messages.
    messages = document["messages"] if isinstance(document, dict) else document
    if not args.text and not args.model:
        print("guardstream produce: token ids need --model (its tokenizer), or use --text", file=sys.stderr)
        return 2
    settings = WorkerSettings(model=args.model or "")
    bootstrap = args.kafka_bootstrap or settings.kafka_bootstrap
    topic = args.tokens_topic or settings.tokens_topic
    conversation_id = args.conversation_id or f"conv-{uuid.uuid4().hex[:12]}"
    encode = None
    if not args.text:
        from processor.model.tokenizer import content_token_ids, load_tokenizer

        encode = functools.partial(content_token_ids, load_tokenizer(args.model))
    asyncio.run(_produce(messages, bootstrap, topic, conversation_id, encode, args.chunk, args.rate))
    print(conversation_id)
    return 0


async def _produce(messages, bootstrap, topic, conversation_id, encode, chunk, rate) -> None:
    from processor.client import GuardProducer

    interval = 1.0 / rate if rate > 0 else 0.0
    async with GuardProducer(bootstrap, topic) as producer:
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            last_message = index == len(messages) - 1
            pieces = _chunks(encode(content) if encode else content, max(1, chunk)) or [[] if encode else ""]
            for number, piece in enumerate(pieces):
                end = number == len(pieces) - 1
                flags = {"end_of_turn": end and not last_message, "end_of_conversation": end and last_message}
                if encode:
                    await producer.send_tokens(conversation_id, role, piece, **flags)
                else:
                    await producer.send_text(conversation_id, role, piece, **flags)
                if interval:
                    await asyncio.sleep(interval)
        await producer.flush()


def _chunks(items, size):
    return [items[start : start + size] for start in range(0, len(items), size)]


# -- verdicts --------------------------------------------------------------------------------------

_COLORS = {"Safe": "\033[32m", "Controversial": "\033[33m", "Unsafe": "\033[31m"}
_BOLD, _RESET = "\033[1m", "\033[0m"


def verdicts_command(args: argparse.Namespace) -> int:
    settings = WorkerSettings(model=args.model or "")
    bootstrap = args.kafka_bootstrap or settings.kafka_bootstrap
    topic = args.verdicts_topic or settings.verdicts_topic
    decode = None
    if args.model:
        from processor.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        decode = lambda token_id: tokenizer.decode([token_id])  # noqa: E731
    color = sys.stdout.isatty()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_show_verdicts(args, bootstrap, topic, decode, color))
    return 0


async def _show_verdicts(args, bootstrap, topic, decode, color) -> None:
    from processor.client import read_verdicts
    from processor.events import VERDICT_EVENTS

    stream = read_verdicts(
        bootstrap, topic, conversation_ids=args.conversation_id, from_beginning=not args.from_latest
    ).__aiter__()
    # Without --follow, stop once the topic has been quiet for a while.
    idle_timeout = None if args.follow else 3.0
    while True:
        try:
            verdict = await asyncio.wait_for(stream.__anext__(), timeout=idle_timeout)
        except (StopAsyncIteration, TimeoutError):
            break
        shown = (
            VERDICT_EVENTS.dump_json(verdict).decode()
            if args.json
            else format_verdict(verdict, decode, color)
        )
        print(shown, flush=True)
    await stream.aclose()


def format_verdict(verdict, decode=None, color: bool = True) -> str:
    def paint(text: str, level: str | None, bold: bool = False) -> str:
        if not color:
            return text
        return f"{_BOLD if bold else ''}{_COLORS.get(level or '', '')}{text}{_RESET}"

    head = f"{verdict.conversation_id} #{verdict.seq} turn {verdict.turn} {verdict.role:9} {verdict.kind:16}"
    if verdict.kind == "error":
        return f"{head} {paint('ERROR', 'Unsafe', bold=True)} {verdict.error}"
    summary = verdict.risk_level or "-"
    if verdict.category:
        summary += f" ({verdict.category})"
    if verdict.alert:
        summary += f" ALERT at {verdict.alert_position}"
    line = f"{head} {paint(summary, verdict.risk_level, bold=verdict.alert)}"
    if verdict.tokens and verdict.kind == "tokens":
        shown = "".join(
            paint(decode(token.token_id) if decode else f"[{token.token_id}]", token.risk_level)
            for token in verdict.tokens
        )
        line += f" | {shown}"
    return line
