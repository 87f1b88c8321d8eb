"""The worker's loop: poll -> prepare -> finish, step after step, and the recovery from a failed step.

A step is polled, prepared, then finished in the background while the next step is prepared:

    poll:    the records the consumer holds, decoded and planned (and the last step's objects
             freed) while the fetch their drain sets off is in flight; then that fetch's records
             (fetch.py)
    prepare: records -> decode the rest (bad ones to the DLQ) -> per conversation (unless planned
             during the poll): order by seq, drop what was applied, template and tokenize -> engine
             (all conversations at once, one batched forward) -> verdicts (prepare.py)
    finish:  publish verdicts and dead letters (acks from all replicas) -> one Redis transaction for
             every session of the step -> commit the offsets (finish.py, which states the delivery
             guarantee this order buys)

Why two stages: the finish is mostly waiting (broker acks, Redis, the commit), and the next step's
model run does not need it. Finishes run strictly in step order (`StepChain`): a step's Redis writes
are conditional on the previous step's, and its commit must not pass an earlier step's. The sessions a
step leaves are kept in memory (`SessionCache`), so the next step reads Redis only for conversations
it has not seen; the engine's history reads wait for the finishes in flight (`SettledHistory`).
Rebalances and the conversations this worker holds are rebalance.py's; start-up is serve.py's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from processor.engine import AsyncGuardEngine
from processor.events import EventLimits
from processor.model import GuardModel
from processor.model.tokenizer import special_token_ids
from processor.worker.fetch import Fetching
from processor.worker.finish import Finishing
from processor.worker.health import StallWatch
from processor.worker.metrics import WorkerMetrics
from processor.worker.pipeline import SessionCache, SettledHistory, StepChain
from processor.worker.prepare import Preparing
from processor.worker.publisher import BatchPublisher
from processor.worker.rebalance import IDLE_SWEEP_SECONDS, OpenConversations, Rebalancing
from processor.worker.session_store import REDIS_OUTAGES, SessionStore
from processor.worker.settings import WorkerSettings
from processor.worker.template import TurnWriter
from processor.worker.text import IncrementalTokenizer
from processor.worker.verdicts import VerdictConfig

log = logging.getLogger(__name__)

RETRY_BACKOFF_SECONDS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Worker(Fetching, Preparing, Finishing, Rebalancing):
    """Holds a worker's state and runs its loop; each stage's methods live in the stage's module."""

    def __init__(
        self,
        settings: WorkerSettings,
        model: GuardModel,
        front: AsyncGuardEngine,
        store: SessionStore,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        metrics: WorkerMetrics,
        chain: StepChain | None = None,
    ) -> None:
        self.settings = settings
        self.front = front
        self.store = store
        self.consumer = consumer
        self.publisher = BatchPublisher(producer)
        self.metrics = metrics
        self.health = StallWatch(settings.stall_seconds)
        # The engine's history must settle on this same chain (`or` would replace an empty one: len 0).
        self.chain = chain if chain is not None else StepChain(settings.steps_in_flight)
        self.history = SettledHistory(store, self.chain)
        self.sessions = SessionCache()
        # Finishes overlap; a step's records must reach each partition's queue before the next step's
        # (a conversation's verdicts in seq order), and queuing can wait while a partition drains.
        self.send_order = asyncio.Lock()  # FIFO: finishes start, and so queue, in step order
        self._failure: BaseException | None = None  # a finish that failed under the rebalance listener
        tokenizer = model.tokenizer
        special = special_token_ids(tokenizer) if tokenizer is not None else None
        control_ids = (
            frozenset((special.im_start, special.im_end, special.endoftext))
            if special is not None and settings.template == "chat"
            else frozenset()
        )
        self.limits: EventLimits = settings.event_limits(
            model.config.vocab_size, text_allowed=tokenizer is not None, control_ids=control_ids
        )
        self.writer = TurnWriter(
            settings.template, special, IncrementalTokenizer(tokenizer) if tokenizer is not None else None
        )
        self.verdict_config = VerdictConfig(
            model.labels, settings.policy, settings.verdicts, model_name(model)
        )
        self.max_positions = model.max_positions
        self.open = OpenConversations()
        # Held for a whole step; the rebalance listener takes it so that revocation waits for the step
        # in flight to publish, save and commit before the partitions go.
        self.step_lock = asyncio.Lock()
        self.ready = False
        # The last step's records, events and plans, freed while the next poll's fetch is in flight:
        # off the step's critical path, where freeing a step's thousands of objects would otherwise fall.
        self._spent: list[object] = []
        # Rebalances, as the poll and prepare must see them (see `Rebalancing`).
        self._revocations = 0
        self._awaiting_assignment = False
        self._revoked_since_poll: set[TopicPartition] = set()  # since the batch in hand was fetched

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        settings, next_expiry = self.settings, time.monotonic() + IDLE_SWEEP_SECONDS
        interval, next_step = settings.step_interval_ms / 1000.0, 0.0
        try:
            while not stop.is_set():
                if (early := next_step - time.monotonic()) > 0:
                    await asyncio.sleep(early)  # let the next step gather more (--step-interval-ms)
                batch, ahead = await self.poll()
                self.ready = True
                # On a timer, not only when idle: steady traffic must not keep expired sessions counted.
                if time.monotonic() >= next_expiry:
                    await self._expire_idle()
                    next_expiry = time.monotonic() + IDLE_SWEEP_SECONDS
                async with self.step_lock:
                    if not await self._settle(keep=self.chain.depth - 1):
                        continue  # a finish failed: the batch is dropped, its records come again
                    if not batch:
                        continue
                    next_step = time.monotonic() + interval
                    self.health.step_began()  # ended by its finish, or here when there is none
                    try:
                        prepared = await self.prepare(batch, stop, ahead)
                    except Exception:
                        self.health.step_ended()
                        log.exception("step failed; rewinding to the committed offsets")
                        await self._recover()
                        continue
                    if prepared is None:
                        self.health.step_ended()
                    else:
                        self.chain.start(functools.partial(self.finish, prepared, stop=stop))
                    self._spent.append((batch, ahead))
                    batch, ahead, prepared = {}, None, None
        finally:
            await self.chain.wait()  # stopping: what was prepared is published, saved and committed

    # -- recovery -------------------------------------------------------------------------------

    async def _settle(self, keep: int) -> bool:
        """Let at most `keep` finishes stay in flight; on a failure, recover and say False."""
        started = time.perf_counter()
        failure = await self.chain.wait(keep) or self._failure
        self.metrics.stage_seconds.labels("wait").observe(time.perf_counter() - started)
        self._failure = None
        if failure is None:
            return True
        log.error("step failed; rewinding to the committed offsets", exc_info=failure)
        await self._recover()
        return False

    async def _recover(self) -> None:
        """Nothing of the failed steps was committed: forget what memory holds ahead of Redis (the
        engine truncates to what Redis says on the next submission) and redo from the commits."""
        self.metrics.step_failures.inc()
        await self.chain.wait()
        self.sessions.clear()
        await asyncio.sleep(RETRY_BACKOFF_SECONDS[-1])
        await self._rewind()

    async def _rewind(self) -> None:
        """Back to the committed offsets; while Kafka itself is away, keep trying rather than exit."""
        for delay in (*RETRY_BACKOFF_SECONDS, *[RETRY_BACKOFF_SECONDS[-1]] * 60):
            try:
                committed = await self.consumer.seek_to_committed()
                # aiokafka leaves a partition with no committed offset (or 0) where it is, which would
                # skip the failed records: those go back to the start, as a restart would (earliest).
                never_committed = [partition for partition, offset in committed.items() if not offset]
                if never_committed:
                    await self.consumer.seek_to_beginning(*never_committed)
                return
            except Exception as error:  # any client error: the broker is unreachable or moving
                log.warning("rewind to committed offsets failed (%s); retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
        raise RuntimeError("could not rewind to the committed offsets for 5 minutes; giving up")

    async def with_retry(self, call, stop: asyncio.Event, what: str):
        """Redis outages are waited out: nothing is committed until the call succeeds."""
        attempt = 0
        while True:
            try:
                result = await call()
            except (ConnectionError, TimeoutError, OSError, *REDIS_OUTAGES) as error:
                if stop.is_set() and attempt >= len(RETRY_BACKOFF_SECONDS):
                    raise
                delay = RETRY_BACKOFF_SECONDS[min(attempt, len(RETRY_BACKOFF_SECONDS) - 1)]
                log.warning("%s failed (%s); retrying in %.1fs", what, error, delay)
                self.ready = False
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self.ready = True
            return result


def model_name(model: GuardModel) -> str:
    """What verdicts name: a hub id as given, a local checkpoint by its folder name."""
    return Path(model.name).name if Path(model.name).is_dir() else model.name
