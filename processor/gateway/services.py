"""The long-lived parts every request shares: settings, Kafka producer, verdict router, upstream client,
tokenizer and metrics; started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from processor.client import GuardProducer
from processor.gateway.metrics import GatewayMetrics
from processor.gateway.reply import ReplyTokenizer
from processor.gateway.router import VerdictRouter
from processor.gateway.settings import GatewaySettings
from processor.gateway.upstream import Upstream
from processor.model.labels import LabelMaps

log = logging.getLogger(__name__)

# What the gateway needs of a checkpoint on the hub: config and tokenizer, never the weights.
TOKENIZER_FILE_PATTERNS = ["*.json", "*.txt", "*.jinja"]


def checkpoint_folder(model: str) -> Path:
    """A local folder as is; otherwise a hub id, of which only the tokenizer and config are fetched."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model, allow_patterns=TOKENIZER_FILE_PATTERNS))
    except Exception as error:  # the hub client raises many types; all mean "could not get it"
        raise ValueError(
            f"--model {model} is neither a checkpoint folder nor a hub id that could be fetched "
            f"({type(error).__name__}: {error})"
        ) from error


@dataclass
class Checkpoint:
    """The checkpoint facts the gateway uses: its name, label maps and tokenizer."""

    name: str
    labels: LabelMaps
    tokenizer: ReplyTokenizer

    @classmethod
    def load(cls, model: str) -> Checkpoint:
        from processor.model.tokenizer import load_tokenizer

        folder = checkpoint_folder(model)
        if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
            raise ValueError(f"--model {model}: {folder} needs config.json and tokenizer.json (a checkpoint)")
        config = json.loads((folder / "config.json").read_text())
        return cls(folder.name, LabelMaps.from_config(config), ReplyTokenizer(load_tokenizer(folder)))


@dataclass
class GatewayServices:
    settings: GatewaySettings
    checkpoint: Checkpoint
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    producer: GuardProducer = field(init=False)
    router: VerdictRouter = field(init=False)
    upstream: Upstream = field(init=False)
    # Work that outlives its request (audit mode's verdict recording); cancelled at stop.
    background: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        settings = self.settings
        kafka = settings.kafka_options()
        self.producer = GuardProducer(topic=settings.tokens_topic, **kafka)  # type: ignore[arg-type]
        self.router = VerdictRouter(settings.verdicts_topic, kafka)
        key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        self.upstream = Upstream(settings.upstream, key, settings.upstream_timeout)

    async def start(self) -> None:
        await self.producer.start()
        await self.router.start()
        await self.upstream.start()

    async def stop(self) -> None:
        for task in list(self.background):
            task.cancel()
        for task in list(self.background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.upstream.stop()
        await self.router.stop()
        await self.producer.stop()

    def keep(self, task: asyncio.Task) -> None:
        self.background.add(task)
        task.add_done_callback(self.background.discard)
