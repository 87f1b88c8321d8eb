"""The streaming engine: many conversations' new tokens in one forward pass over a paged KV cache.

Synchronous core. `submit` queues tokens for a conversation; each `step` runs one batch chosen by the
scheduler and returns the requests it completed. The asyncio front (`async_engine.py`) drives it.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from processor.engine.block_manager import BlockManager
from processor.engine.cuda_graphs import GraphRunner
from processor.engine.host_memory import keep_freed_host_memory
from processor.engine.kv_cache import (
    allocate_kv_cache,
    bytes_per_token,
    cache_budget_bytes,
    resolve_attention_and_cache,
)
from processor.engine.model_runner import ModelRunner, StepOutput
from processor.engine.results import ChunkResult, ChunkStatus, HeadLabels
from processor.engine.scheduler import Schedule, Scheduler
from processor.engine.sequence import LABEL_COLUMNS, ChunkRequest, Conversation
from processor.model.attention import get_attention_backend
from processor.model.loader import GuardModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    # KV cache size: bytes, or (CUDA) a fraction of the free device memory at start.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = 0.8
    max_batch_tokens: int = 8192
    max_batch_conversations: int = 512
    # "auto": the C paged-attention kernel on a CPU in float32 (when it builds), SDPA elsewhere.
    attention_backend: str = "auto"
    # Keys and values stored as: "auto" (float16 for the C kernel, else the model's dtype; see
    # resolve_kv_cache_dtype), "float16", "bfloat16" or "float32" (exact on a float32 model).
    kv_cache_dtype: str = "auto"
    keep_probabilities: bool = False  # per-class probabilities in results (`score --all-heads`)
    # Steps replayed as CUDA graphs of the whole forward (processor/engine/cuda_graphs.py), for steps
    # of up to this many conversations and tokens; larger ones run eagerly. Needs the triton backend
    # ("auto" then picks it). Off by default until a GPU run has shown it correct.
    cuda_graphs: bool = False
    cuda_graph_max_conversations: int = 512
    cuda_graph_max_tokens: int = 2048


@dataclass
class EngineStats:
    active_conversations: int = 0
    waiting_conversations: int = 0
    blocks_used: int = 0
    blocks_free: int = 0
    block_size: int = 0
    kv_bytes_per_token: int = 0
    evictions: int = 0
    rebuilt_tokens: int = 0
    steps: int = 0
    tokens_run: int = 0
    last_step_tokens: int = 0
    last_step_conversations: int = 0
    last_step_seconds: float = 0.0
    last_step_cpu_seconds: float = 0.0  # of the thread that ran it: wall time less waiting for the GIL
    step_seconds_total: float = 0.0
    # With CUDA graphs on: steps replayed from a graph, steps that fit no bucket (run eagerly), and
    # what capturing took.
    graph_steps: int = 0
    eager_steps: int = 0
    graph_capture_seconds: float = 0.0
    graph_capture_bytes: int = 0


class GuardEngine:
    def __init__(self, model: GuardModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self._max_positions = model.max_positions  # read by every submit
        self.config = config or EngineConfig()
        if model.device.type == "cpu":
            keep_freed_host_memory()
        backend = self.config.attention_backend
        if self.config.cuda_graphs and backend == "auto":
            backend = "triton"  # the one backend whose steps can be captured
        self.attention_backend, cache_dtype = resolve_attention_and_cache(
            backend, self.config.kv_cache_dtype, model.device, model.dtype
        )
        per_token = bytes_per_token(model.config, cache_dtype)
        graphs = self._graph_runner(model) if self.config.cuda_graphs else None
        # The graphs' memory pool is taken before the cache is sized from what is left.
        reserved = graphs.peak_bytes(self._stand_in_cache(model, cache_dtype)) if graphs else 0
        budget = cache_budget_bytes(
            model.device, self.config.kv_cache_bytes, self.config.kv_cache_fraction, reserved
        )
        num_blocks = budget // (per_token * self.config.block_size)
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget {budget} bytes is below one block "
                f"({per_token * self.config.block_size} bytes); raise kv_cache_bytes"
            )
        self.blocks = BlockManager(num_blocks, self.config.block_size)
        kv_cache = allocate_kv_cache(
            model.config, num_blocks, self.config.block_size, model.device, cache_dtype
        )
        if graphs is not None:
            graphs.capture(kv_cache)
            log.info(
                "CUDA graphs: %d buckets up to %d conversations and %d tokens, captured in %.1f s, %d MiB",
                len(graphs.buckets),
                graphs.buckets[0].conversations,
                graphs.buckets[0].tokens,
                graphs.capture_seconds,
                graphs.capture_bytes >> 20,
            )
        log.info("attention backend: %s; KV cache: %s", self.attention_backend, cache_dtype)
        self.runner = ModelRunner(
            model, kv_cache, self.blocks, get_attention_backend(self.attention_backend), graphs
        )
        self.scheduler = Scheduler(
            self.blocks, self.config.max_batch_tokens, self.config.max_batch_conversations, self._evict
        )
        self._conversations: dict[str, Conversation] = {}
        # Those of them with work queued: what a step looks at. The engine holds every conversation
        # whose cache it keeps (thousands of short ones in a large cache) and a step runs a few hundred,
        # so a step never walks them all: its cost must not grow with the idle ones.
        self._waiting: dict[str, Conversation] = {}
        # The rest of them, least recently used first: what eviction takes, in that order.
        self._idle: dict[str, Conversation] = {}
        self._finished: list[ChunkResult] = []
        self._request_ids = itertools.count()
        self._requests: dict[int, ChunkRequest] = {}
        self._stats = EngineStats(block_size=self.config.block_size, kv_bytes_per_token=per_token)

    def _graph_runner(self, model: GuardModel) -> GraphRunner:
        if self.attention_backend != "triton":
            raise ValueError(
                f"CUDA graphs capture the triton attention backend's steps, not {self.attention_backend}'s; "
                "use --attention-backend triton (or auto) with --cuda-graphs"
            )
        config = self.config
        return GraphRunner(
            model,
            get_attention_backend(self.attention_backend),
            config.block_size,
            min(config.cuda_graph_max_conversations, config.max_batch_conversations),
            min(config.cuda_graph_max_tokens, config.max_batch_tokens),
        )

    def _stand_in_cache(self, model: GuardModel, dtype: torch.dtype) -> torch.Tensor:
        """A one-block cache for measuring the graphs' memory before the real one is sized."""
        return allocate_kv_cache(model.config, 1, self.config.block_size, model.device, dtype)

    # -- what callers ask -------------------------------------------------------------------------

    def next_position(self, conversation_id: str) -> int | None:
        """Where the conversation's next token goes, or None when the engine does not hold it."""
        conversation = self._conversations.get(conversation_id)
        return None if conversation is None else conversation.next_position

    def is_idle(self, conversation_id: str) -> bool:
        conversation = self._conversations.get(conversation_id)
        return conversation is None or conversation.is_idle

    def has_pending(self) -> bool:
        return bool(self._finished) or bool(self._waiting)

    def predicted_step_seconds(self) -> float | None:
        """CPU seconds the next step should take, scaled from the last step by tokens; None before any."""
        stats = self._stats
        if stats.last_step_tokens == 0:
            return None
        queued = sum(request.remaining for c in self._waiting.values() for request in c.pending)
        tokens = min(queued, self.config.max_batch_tokens)
        return stats.last_step_cpu_seconds * tokens / stats.last_step_tokens

    def submit(
        self, conversation_id: str, token_ids: list[int], rebuild_prefix: list[int] | None = None
    ) -> int:
        """Queue tokens; returns the request id its ChunkResult will carry in `step()`'s answer.

        Without `rebuild_prefix` the tokens continue what the engine holds (or start a new
        conversation). With it, the conversation starts over: the prefix is run to refill the cache
        and only `token_ids` get results.
        """
        rebuild = 0
        if rebuild_prefix is not None:
            self.release(conversation_id)
            rebuild = len(rebuild_prefix)
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            conversation = self._conversations[conversation_id] = Conversation(conversation_id)
        tokens = rebuild_prefix + list(token_ids) if rebuild else list(token_ids)
        start_position = conversation.next_position
        request = ChunkRequest(next(self._request_ids), conversation_id, tokens, start_position, rebuild)
        if start_position + len(tokens) > self._max_positions:
            self._finish_early(request, ChunkStatus.CONTEXT_EXCEEDED)
        else:
            conversation.pending.append(request)
            self._idle.pop(conversation_id, None)
            self._waiting[conversation_id] = conversation
            self._stats.rebuilt_tokens += rebuild
        if not conversation.pending and not conversation.cached_token_ids:
            del self._conversations[conversation_id]
        return request.request_id

    def truncate(self, conversation_id: str, length: int) -> None:
        """Forget cached tokens from `length` on (the caller never made them durable)."""
        conversation = self._conversations[conversation_id]
        if conversation.pending or length > conversation.num_cached:
            raise ValueError(
                f"cannot truncate {conversation_id!r} to {length}: it has work queued or fewer tokens"
            )
        del conversation.cached_token_ids[length:]
        self.blocks.shrink(conversation.block_table, length)

    def release(self, conversation_id: str) -> None:
        """Free a conversation's cache (ended, or its partition moved); queued work is dropped."""
        conversation = self._conversations.pop(conversation_id, None)
        if conversation is not None:
            self._waiting.pop(conversation_id, None)
            self._idle.pop(conversation_id, None)
            self.blocks.release(conversation.block_table)

    def release_all(self) -> None:
        for conversation_id in list(self._conversations):
            self.release(conversation_id)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[ChunkResult]:
        """Run one batch; return the requests completed by it (and any that finished early)."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        self._stats.steps += 1
        schedule = self.scheduler.schedule(self._waiting, self._idle)
        for request in schedule.too_large:
            self._dequeue(self._conversations[request.conversation_id])
            self._finish_early(request, ChunkStatus.EXCEEDS_CACHE)
        if schedule.conversations:
            output = self.runner.run(schedule, self.config.keep_probabilities)
            self._take_results(schedule, output)
        self._record_step(schedule, time.perf_counter() - started, time.thread_time() - cpu_started)
        finished, self._finished = self._finished, []
        return finished

    def _take_results(self, schedule: Schedule, output: StepOutput) -> None:
        """Hand each scheduled request its rows of the step's label columns; finish the requests that
        are done. A request run whole in this step, with nothing to rebuild (a streaming step's every
        request), takes its slices straight into its result."""
        finished = self._finished
        columns = output.label_columns
        risk, risk_prob, category, category_prob = columns[:4]
        query_risk, query_risk_prob, query_category, query_category_prob = columns[4:]
        with_probabilities = output.probabilities is not None
        row = 0
        for conversation, request, offset, length in zip(
            schedule.conversations, schedule.requests, schedule.offsets, schedule.lengths, strict=True
        ):
            tokens = request.token_ids
            end = row + length
            if length == len(tokens) and not request.rebuild and not with_probabilities:
                conversation.cached_token_ids += tokens
                finished.append(
                    ChunkResult(
                        request.conversation_id,
                        request.request_id,
                        request.start_position,
                        tokens,
                        HeadLabels(
                            risk[row:end], risk_prob[row:end], category[row:end], category_prob[row:end]
                        ),
                        HeadLabels(
                            query_risk[row:end],
                            query_risk_prob[row:end],
                            query_category[row:end],
                            query_category_prob[row:end],
                        ),
                    )
                )
                self._dequeue(conversation)
            else:
                conversation.cached_token_ids += tokens[offset : offset + length]
                self._take_rows(request, output, row + max(0, request.rebuild - offset), end)
                request.done += length
                if request.remaining == 0:
                    self._dequeue(conversation)
                    finished.append(self._result(request, ChunkStatus.OK))
            row = end

    def _take_rows(self, request: ChunkRequest, output: StepOutput, first: int, end: int) -> None:
        """Rows first..end of the step's results for `request` (a part of it, or with a rebuild)."""
        kept = [values[first:end] for values in output.label_columns]
        if request.label_columns is None:
            request.label_columns = kept
        else:  # a request split over steps (a long rebuild under the token budget)
            for column, values in zip(request.label_columns, kept, strict=True):
                column += values
        if output.probabilities is not None:
            for head, rows in output.probabilities.items():
                request.probabilities.setdefault(head, []).extend(rows[first:end])

    def run_until_idle(self) -> list[ChunkResult]:
        """Step until nothing is queued (offline scoring, tests, benchmarks)."""
        results: list[ChunkResult] = []
        while self.has_pending():
            results += self.step()
        return results

    def stats(self) -> EngineStats:
        self._stats.active_conversations = len(self._conversations)
        self._stats.waiting_conversations = len(self._waiting)
        self._stats.blocks_used = self.blocks.used_blocks
        self._stats.blocks_free = self.blocks.free_blocks
        graphs = self.runner.graphs
        if graphs is not None:
            self._stats.graph_steps = graphs.graph_steps
            self._stats.eager_steps = self.runner.eager_steps
            self._stats.graph_capture_seconds = graphs.capture_seconds
            self._stats.graph_capture_bytes = graphs.capture_bytes
        return self._stats

    # -- internals --------------------------------------------------------------------------------

    def _dequeue(self, conversation: Conversation) -> None:
        """The conversation's first request is done (or refused)."""
        conversation.pending.popleft()
        if not conversation.pending:
            del self._waiting[conversation.conversation_id]
            if conversation.block_table:  # the most recently used, now; nothing to evict without blocks
                self._idle[conversation.conversation_id] = conversation

    def _evict(self, conversation: Conversation) -> None:
        self.blocks.release(conversation.block_table)
        del self._conversations[conversation.conversation_id]
        del self._idle[conversation.conversation_id]
        self._stats.evictions += 1

    def _finish_early(self, request: ChunkRequest, status: ChunkStatus) -> None:
        self._finished.append(self._result(request, status))

    def _result(self, request: ChunkRequest, status: ChunkStatus) -> ChunkResult:
        columns = request.label_columns or [[] for _ in LABEL_COLUMNS]  # none run: finished early

        def head(offset: int) -> HeadLabels:
            return HeadLabels(*columns[offset : offset + 4])

        probabilities = (
            request.probabilities if self.config.keep_probabilities and request.probabilities else None
        )
        return ChunkResult(
            conversation_id=request.conversation_id,
            request_id=request.request_id,
            start_position=request.start_position + request.rebuild,
            token_ids=request.new_token_ids,
            response=head(0),
            query=head(4),
            status=status,
            probabilities=probabilities,
        )

    def _record_step(self, schedule: Schedule, seconds: float, cpu_seconds: float) -> None:
        tokens = schedule.tokens
        stats = self._stats
        stats.tokens_run += tokens
        if tokens:  # a step that only finished requests early says nothing about the model's speed
            stats.last_step_tokens = tokens
            stats.last_step_cpu_seconds = cpu_seconds
        stats.last_step_conversations = len(schedule.conversations)
        stats.last_step_seconds = seconds
        stats.step_seconds_total += seconds
