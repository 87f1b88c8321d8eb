"""Graphed steps: the whole forward (embedding -> heads -> label matrix) captured as CUDA graphs for a
few bucketed step shapes, replayed with each step's metadata in the same static buffers.

A step's shape is (conversations, tokens). It is padded up to the smallest captured bucket that holds
it: padding tokens have token id 0, position 0 and slot -1, and the Triton KV store skips negative
slots, so padding writes no block at all (no block has to be kept back for it); padding conversations
bring no tokens and no keys, so the attention kernel's programs for them return before reading a
block-table entry, and the padding tokens belong to no conversation, so no query row of theirs is
attended. Every other op of the forward is row-wise, so the padded rows change nothing in the real
ones. A step that fits no bucket is not run here: the model runner runs it eagerly through the same
kernel.

The layout follows nano-vllm's `capture_cudagraph` / `run_model`: static buffers sized for the largest
bucket, graphs captured largest first into one memory pool, a replay after refilling the buffers. On a
CPU (Triton's interpreter, tests) nothing is captured: the same padded forward over the same static
buffers runs eagerly, which is what the tests compare with the unpadded path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from processor.engine.step_metadata import StepMetadata, step_metadata
from processor.model.attention import AttentionBackend, AttentionBatch, GatherScratch, PagedTables
from processor.model.loader import GuardModel
from processor.model.qwen3_guard import LABEL_MATRIX_COLUMNS

TABLE_FILLER = 0  # block-table entries past a conversation's blocks: bounded out by seq_lens, never read
PADDING_SLOT = -1  # a padding token's cache slot: the KV store writes nothing for it
# Token buckets of a conversation bucket reach this many tokens a conversation: worker steps bring 1-9
# tokens a conversation; steps with more (prompts) are compute-bound, and launch costs matter less.
TOKENS_PER_CONVERSATION = 16


@dataclass(frozen=True, order=True)
class Bucket:
    """A captured step shape: up to `tokens` new tokens of up to `conversations` conversations."""

    tokens: int
    conversations: int


def powers_of_two_upto(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    values, value = [], 1
    while value < limit:
        values.append(value)
        value *= 2
    return [*values, limit]


def token_steps(start: int, limit: int) -> list[int]:
    """start, 1.5 start, 2 start, 3 start, 4 start, 6 start, ... below `limit`, then `limit`: a step
    pads by under half of its tokens. Attention skips padding, but the GEMMs compute every row, and
    at a worker step's hundreds of tokens they are what the step's time is made of."""
    values, base = [], start
    while base < limit:
        between = base * 3 // 2
        values += [base, between] if base < between < limit else [base]
        base *= 2
    return [*values, limit]


def step_buckets(max_conversations: int, max_tokens: int) -> list[Bucket]:
    """Buckets for steps of up to `max_conversations` conversations and `max_tokens` tokens, largest
    first (the capture order): conversations by powers of two; for each, tokens from one a
    conversation to TOKENS_PER_CONVERSATION a conversation (`token_steps`)."""
    if max_conversations < 1 or max_tokens < 1:
        raise ValueError(
            f"CUDA-graph buckets need at least one conversation and one token, "
            f"got {max_conversations} and {max_tokens}"
        )
    buckets = set()
    for conversations in powers_of_two_upto(max_conversations):
        most = min(max_tokens, conversations * TOKENS_PER_CONVERSATION)
        for tokens in token_steps(min(conversations, most), most):
            buckets.add(Bucket(tokens, conversations))
    return sorted(buckets, reverse=True)


def choose_bucket(buckets: list[Bucket], conversations: int, tokens: int) -> Bucket | None:
    """The bucket that pads a step of `conversations` and `tokens` least (fewest tokens, then fewest
    conversations), or None when none holds it."""
    fitting = [b for b in buckets if b.conversations >= conversations and b.tokens >= tokens]
    return min(fitting, default=None)


class StepBuffers:
    """The static device tensors the graphs read, and the pinned host buffer a step is packed into.

    One int32 buffer on each side, laid out alike: tokens, positions and slots (max_tokens each),
    query starts (max_conversations + 1), seq_lens (max_conversations), then the step's block-table rows
    packed at its own width. A step sends the part it filled in one host-to-device copy; the table
    rows then move into the [max_conversations, max_blocks] table on the device (one device-side copy),
    since a step's width varies and the graphs read a fixed row stride.
    """

    def __init__(self, max_conversations: int, max_tokens: int, max_blocks: int, device: torch.device):
        self.max_conversations, self.max_tokens, self.max_blocks = max_conversations, max_tokens, max_blocks
        self.fixed = 3 * max_tokens + 2 * max_conversations + 1
        size = self.fixed + max_conversations * max_blocks
        # Pinned, so the copy is a DMA that does not wait for a staging copy. Reused every step: the
        # previous step's copy is done by then, since a step ends by reading its labels back.
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.device_side = torch.zeros(size, dtype=torch.int32, device=device)
        t, c = max_tokens, max_conversations
        self.token_ids = self.device_side[:t]
        self.positions = self.device_side[t : 2 * t]
        self.slots = self.device_side[2 * t : 3 * t]
        self.query_starts = self.device_side[3 * t : 3 * t + c + 1]
        self.seq_lens = self.device_side[3 * t + c + 1 : self.fixed]
        self.block_tables = torch.full((c, max_blocks), TABLE_FILLER, dtype=torch.int32, device=device)

    def fill(self, step: StepMetadata, bucket: Bucket) -> None:
        """Pack `step` padded to `bucket` on the host, send it, and place its table rows."""
        t, c = self.max_tokens, self.max_conversations
        tokens, conversations = step.token_ids.numel(), step.lengths.numel()
        width = step.block_tables.shape[1]
        table_end = self.fixed + conversations * width
        host = self.host
        # Cleared whole each step, padding included: stale slots would write into another
        # conversation's block. Padding tokens: id 0 at position 0.
        host[:table_end].zero_()
        host[:tokens] = step.token_ids
        host[t : t + tokens] = step.positions
        host[2 * t : 2 * t + tokens] = step.slots
        host[2 * t + tokens : 2 * t + bucket.tokens] = PADDING_SLOT
        starts = 3 * t  # [0, ends of the real conversations' rows..., then T for every padding one]
        host[starts : starts + conversations + 1] = step.query_starts
        host[starts + conversations + 1 : starts + bucket.conversations + 1] = tokens
        lens = starts + c + 1  # padding conversations: no keys
        host[lens : lens + conversations] = step.seq_lens
        host[self.fixed : table_end] = step.block_tables.view(-1)  # padded by step_metadata with block 0
        self.device_side[:table_end].copy_(host[:table_end], non_blocking=True)
        if width:
            packed = self.device_side[self.fixed : table_end].view(conversations, width)
            self.block_tables[:conversations, :width].copy_(packed)
        # Rows of padding conversations keep whatever they held: no program of theirs reads them.


class GraphRunner:
    """Runs steps that fit a bucket over the static buffers: replays the bucket's graph on CUDA, runs
    the same padded forward eagerly elsewhere."""

    def __init__(
        self,
        model: GuardModel,
        attend: AttentionBackend,
        block_size: int,
        max_conversations: int,
        max_tokens: int,
    ) -> None:
        self.model = model
        self.attend = attend
        self.block_size = block_size
        self.buckets = step_buckets(max_conversations, max_tokens)
        largest = self.buckets[0]
        max_blocks = -(-model.max_positions // block_size)
        self.buffers = StepBuffers(largest.conversations, largest.tokens, max_blocks, model.device)
        network = model.network
        heads = (network.response_head, network.query_head)
        # Classes of each head, in GuardLogits' order.
        self.head_sizes = [layer.weight.shape[0] for head in heads for layer in (head.level, head.category)]
        columns = LABEL_MATRIX_COLUMNS + sum(self.head_sizes)
        # The graphs' output: label matrix and every head's probabilities, of the bucket's tokens.
        self.out = torch.zeros(largest.tokens, columns, dtype=torch.float32, device=model.device)
        self.scratch = GatherScratch()  # unused by the triton backend; AttentionBatch wants one
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self.kv_cache: torch.Tensor | None = None
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.graph_steps = 0

    @property
    def captures(self) -> bool:
        return self.model.device.type == "cuda"

    @torch.inference_mode()
    def peak_bytes(self, kv_cache: torch.Tensor) -> int:
        """Device memory the largest bucket's forward takes beyond what is allocated now: what the
        graphs' shared pool will hold. Run over an all-padding step, which reads and writes no cache, so
        `kv_cache` may be a stand-in of one block (the real cache is sized after this)."""
        if not self.captures:
            return 0
        largest = self.buckets[0]
        self.kv_cache = kv_cache
        self.buffers.fill(step_metadata([], [], [], [], self.block_size), largest)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self._forward(largest)
        torch.cuda.synchronize()
        self.kv_cache = None
        peak = torch.cuda.max_memory_allocated() - before
        # Handed back to the device, so that the free memory the cache is sized from counts it once.
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def capture(self, kv_cache: torch.Tensor) -> None:
        """Capture every bucket's forward over `kv_cache`, largest first into one pool (a smaller
        graph reuses the larger ones' memory). On a CPU only binds the cache."""
        self.kv_cache = kv_cache
        if not self.captures:
            return
        started = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info()
        pool = None
        for bucket in self.buckets:
            self.buffers.fill(step_metadata([], [], [], [], self.block_size), bucket)
            self._forward(bucket)  # warm-up: kernels compiled and libraries set up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(bucket)
            pool = pool or graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        self.capture_bytes = free_before - torch.cuda.mem_get_info()[0]

    @torch.inference_mode()
    def run(self, step: StepMetadata, with_probabilities: bool = False) -> torch.Tensor | None:
        """The step's label matrix on the host ([tokens, 8], then every head's probabilities when
        asked for), or None when no bucket holds the step."""
        assert self.kv_cache is not None, "capture() binds the KV cache before the first step"
        tokens = step.token_ids.numel()
        bucket = choose_bucket(self.buckets, step.lengths.numel(), tokens)
        if bucket is None:
            return None
        self.buffers.fill(step, bucket)
        if self.captures:
            self.graphs[bucket].replay()
        else:
            self._forward(bucket)
        self.graph_steps += 1
        columns = self.out.shape[1] if with_probabilities else LABEL_MATRIX_COLUMNS
        return self.out[:tokens, :columns].cpu()  # the step's one device-to-host copy

    def _forward(self, bucket: Bucket) -> None:
        """The padded forward over the static buffers, into `out`: what a graph holds."""
        buffers, tokens, conversations = self.buffers, bucket.tokens, bucket.conversations
        tables = PagedTables(
            buffers.query_starts[: conversations + 1],
            buffers.seq_lens[:conversations],
            buffers.block_tables[:conversations],
        )
        batch = AttentionBatch(buffers.slots[:tokens], [], self.block_size, self.scratch, tables=tables)
        logits = self.model.network(
            buffers.token_ids[:tokens], buffers.positions[:tokens], self.kv_cache, batch, self.attend
        )
        self.out[:tokens].copy_(logits.label_matrix(with_probabilities=True))
