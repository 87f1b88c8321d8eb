"""Builds and loads the CPU paged-attention kernel (`kernels/paged_attention.c`, where its reasons are).

It is compiled with the machine's C compiler (`$CC`, else `cc`) on first use, for this CPU
(-march=native), into a cache folder keyed by the source, the flags and the CPU's features
(`$GUARDSTREAM_KERNEL_CACHE`, else `~/.cache/guardstream/kernels`), and loaded with ctypes, which
releases the GIL while the kernel runs. Without a compiler `load()` returns None (saying why once in
the log) and the engine keeps the portable SDPA backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from processor import builds

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "paged_attention.c"
# -ffast-math for the vectorized expf of glibc's libmvec (its headers declare it only then). Compiled
# and linked in two steps: linking with -ffast-math adds crtfastmath.o, which would set flush-to-zero
# for the whole process, torch included.
COMPILE_FLAGS = ("-O3", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c11")
LINK_FLAGS = ("-shared", "-lm")

_int, _pointer = ctypes.c_int64, ctypes.c_void_p


class KernelUnavailableError(RuntimeError):
    """The kernel could not be built or loaded here (no compiler, a failed build)."""


class PagedAttentionKernel:
    """The compiled kernel, called on torch tensors. It uses as many threads as torch does: a
    step's chunks are split into runs of about equal work, one per thread (ctypes lets go of the
    GIL, so they run at once)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        # One writer and one reader per cache element type; float16 when the compiler had _Float16.
        self._write: dict[torch.dtype, Callable[..., None]] = {}
        self._attend: dict[torch.dtype, Callable[..., None]] = {}
        library.paged_kv_half_supported.restype = ctypes.c_int
        suffixes = {torch.float32: "f32"}
        if library.paged_kv_half_supported():
            suffixes[torch.float16] = "f16"
        for dtype, suffix in suffixes.items():
            write = getattr(library, f"paged_kv_write_{suffix}")
            write.restype = None
            write.argtypes = [
                *(_pointer,) * 3,  # key, value, kv
                *(_int,) * 5,  # slots, tokens, kv_heads, head_dim, block_size
                _pointer,  # slot_mapping
            ]
            attend = getattr(library, f"paged_attention_{suffix}")
            attend.restype = None
            attend.argtypes = [
                *(_pointer,) * 3,  # query, out, kv
                *(_int,) * 5,  # slots, heads, kv_heads, head_dim, block_size
                _pointer,  # chunks
                _int,  # chunk count
                _pointer,  # tables
                ctypes.c_float,  # scale
                _pointer,  # scratch
            ]
            self._write[dtype], self._attend[dtype] = write, attend
        self._scratch_floats = library.paged_attention_scratch_floats
        self._scratch_floats.restype = _int
        self._scratch_floats.argtypes = [_int] * 6
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    @property
    def cache_dtypes(self) -> tuple[torch.dtype, ...]:
        """Element types of a cache this build reads: float32, and float16 where the compiler can."""
        return tuple(self._attend)

    def describe_cache_dtypes(self) -> str:
        return " or ".join(str(dtype).removeprefix("torch.") for dtype in self.cache_dtypes)

    def scratch_floats(
        self, heads: int, kv_heads: int, head_dim: int, block_size: int, max_length: int, max_context: int
    ) -> int:
        """Floats of scratch one thread needs for chunks up to these sizes."""
        return self._scratch_floats(heads, kv_heads, head_dim, block_size, max_length, max_context)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
        chunks: torch.Tensor,
        tables: torch.Tensor,
        block_size: int,
        scale: float,
        runs: list[tuple[int, int]],
        scratch: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        """Writes the new keys and values into `kv_layer`, returns the attention output [T, heads, D].

        query [T, heads, D], key/value [T, kv_heads, D] (float32), kv_layer [2, kv_heads, slots, D]
        (one of `cache_dtypes`, contiguous, keys transposed within their blocks); chunks [C, 4] and
        tables int64, as the C source describes. `runs` ([first, last) chunk ranges, `split_by_work`)
        run on threads at once; `scratch(part)` gives part's float32 buffer of at least
        `scratch_floats(...)`.
        """
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        tokens, heads, head_dim = query.shape
        kv_heads, slots = kv_layer.shape[1], kv_layer.shape[2]
        _check_layout(query, key, value, kv_layer, slot_mapping, chunks, tables)
        if kv_layer.dtype not in self._attend:
            raise ValueError(f"the kernel reads a {self.describe_cache_dtypes()} cache, not {kv_layer.dtype}")
        attend = self._attend[kv_layer.dtype]
        self._write[kv_layer.dtype](
            key.data_ptr(),
            value.data_ptr(),
            kv_layer.data_ptr(),
            slots,
            tokens,
            kv_heads,
            head_dim,
            block_size,
            slot_mapping.data_ptr(),
        )
        out = torch.empty_like(query)

        def run(part: int, first: int, last: int) -> None:
            attend(
                query.data_ptr(),
                out.data_ptr(),
                kv_layer.data_ptr(),
                slots,
                heads,
                kv_heads,
                head_dim,
                block_size,
                chunks[first].data_ptr(),
                last - first,
                tables.data_ptr(),
                scale,
                scratch(part).data_ptr(),
            )

        if len(runs) == 1:
            run(0, *runs[0])
        else:
            if self._pool_size < len(runs):
                self._pool = ThreadPoolExecutor(len(runs), thread_name_prefix="paged-attention")
                self._pool_size = len(runs)
            for done in [self._pool.submit(run, part, *bounds) for part, bounds in enumerate(runs)]:
                done.result()
        return out


def _check_layout(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    chunks: torch.Tensor,
    tables: torch.Tensor,
) -> None:
    """The kernel reads raw pointers: a tensor of another dtype, device or layout would be read as
    garbage or past its end, so it is refused here instead (a few checks per layer)."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (query, key, value)):
        raise ValueError("the CPU paged-attention kernel takes float32 tensors on the CPU")
    if kv_layer.device.type != "cpu":
        raise ValueError("the CPU paged-attention kernel reads a cache in host memory")
    indexes = (slot_mapping, chunks, tables)
    if any(t.dtype != torch.int64 or not t.is_contiguous() for t in indexes):
        raise ValueError("slot mapping, chunks and tables must be contiguous int64 tensors")
    tokens, heads, head_dim = query.shape
    if not kv_layer.is_contiguous() or kv_layer.shape[0] != 2 or kv_layer.shape[3] != head_dim:
        raise ValueError(f"kv_layer must be a contiguous [2, kv_heads, slots, {head_dim}] tensor")
    if key.shape != value.shape or key.shape != (tokens, kv_layer.shape[1], head_dim):
        raise ValueError("key and value must be [tokens, kv_heads, head_dim] like the cache")
    if heads % kv_layer.shape[1] or slot_mapping.numel() != tokens or chunks.shape[1:] != (4,):
        raise ValueError("heads must be a multiple of kv_heads, one slot per token, chunks [C, 4]")


def split_by_work(chunks: torch.Tensor, parts: int) -> list[tuple[int, int]]:
    """Runs [first, last) of `chunks` ([C, 4]: row, start, length, table) of about equal work (new
    tokens x context), at most `parts` of them."""
    count = chunks.shape[0]
    if parts <= 1 or count <= 1:
        return [(0, count)]
    lengths = chunks[:, 2]
    work = (lengths * (chunks[:, 1] + lengths)).cumsum(0).tolist()
    bounds, first = [], 0
    for part in range(1, parts):
        target = work[-1] * part / parts
        last = max(first + 1, next((i + 1 for i in range(first, count) if work[i] >= target), count))
        if last >= count:
            break
        bounds.append((first, last))
        first = last
    return [*bounds, (first, count)]


def require() -> PagedAttentionKernel:
    """The kernel, or KernelUnavailableError when this machine cannot build it."""
    kernel = load()
    if kernel is None:
        raise KernelUnavailableError("the CPU paged-attention kernel could not be built here")
    return kernel


@functools.cache  # built and loaded once per process
def load() -> PagedAttentionKernel | None:
    """The kernel, built if needed; None when this machine cannot build it (logged once)."""
    try:
        return PagedAttentionKernel(ctypes.CDLL(str(build())))
    except (KernelUnavailableError, OSError) as error:
        log.warning("CPU paged-attention kernel unavailable (%s); using the portable SDPA backend", error)
        return None


def build(cache_dir: Path | None = None, target: str = "native", source: Path = SOURCE) -> Path:
    """The kernel's shared library for this source, flags and CPU; compiled when not in the cache.

    `target` is gcc's -march: this CPU by default; tests also build older instruction sets (AVX2,
    baseline x86-64) to check the kernel's paths for them on this machine. `source` is another
    version of the kernel's file (bench/kernel.py builds a revision's beside this one)."""
    compiler = builds.c_compiler(KernelUnavailableError)
    compile_flags = (*COMPILE_FLAGS, f"-march={target}")
    text = source.read_bytes()
    flags = " ".join(compile_flags + LINK_FLAGS).encode()
    key = hashlib.sha256(b"\0".join([text, flags, compiler.encode(), _cpu_features()])).hexdigest()[:16]
    cache_dir = cache_dir or builds.cache_dir("kernels", "GUARDSTREAM_KERNEL_CACHE")
    library = cache_dir / f"paged_attention-{key}.so"
    if library.exists():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        obj, built = Path(scratch) / "kernel.o", Path(scratch) / "kernel.so"
        for command in (
            [compiler, *compile_flags, "-c", str(source), "-o", str(obj)],
            [compiler, str(obj), "-o", str(built), *LINK_FLAGS],
        ):
            builds.run_tool(command, KernelUnavailableError, timeout=120)
        os.replace(built, library)  # atomic: workers starting together never load half a file
    log.info("built the CPU paged-attention kernel: %s", library)
    return library


def _cpu_features() -> bytes:
    """-march=native builds for this CPU: a cache shared between machines must not mix them up."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return os.uname().machine.encode()
