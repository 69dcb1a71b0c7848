"""Chaining transforms over chunks, on a thread pool, with bounded memory.

Encoding runs the chain innermost first (the order the user listed the transforms) on each
chunk; decoding runs it outermost first.  zstd, AES-GCM and hashing release the GIL, so
chunks of one item, and items of one file, are encoded and decoded in parallel, while the
thread that owns the file writes results strictly in order.
"""

from __future__ import annotations

import operator
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from .errors import CheckpointFormatError, ConfigError, DcpxError, IntegrityError
from .framing import FrameIndex, chunk_count
from .transform import Buffer, ChunkInfo, ItemInfo, Transform

DEFAULT_CHUNK_SIZE = 1 << 20
# chunks of one item submitted to the codec pool ahead of the one being waited for (at
# least; twice the pool's threads where that is more)
CHUNKS_IN_FLIGHT = 64


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def checked_workers(workers: Any) -> int:
    """A ``workers=`` argument: None for one thread per available core, else a positive count
    (any integer type, e.g. numpy's; not a bool)."""
    if workers is None:
        return default_workers()
    try:
        count = operator.index(workers) if not isinstance(workers, bool) else 0
    except TypeError:
        count = 0
    if count < 1:
        raise ConfigError(f"workers must be a positive number of threads (or None for one per core), not {workers!r}")
    return count


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _forget_pools() -> None:
    """A forked child inherits the pool objects but not their threads: start afresh."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def codec_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool per size; chunk tasks never wait on other tasks, so sharing is safe."""
    with _pool_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="dcpx-codec")
        return pool


@dataclass(frozen=True)
class BoundChain:
    """A chain specialised for one item: transforms innermost first, descriptors likewise."""

    transforms: tuple[Transform, ...]
    descriptors: tuple[str, ...]

    @classmethod
    def for_item(cls, chain: Sequence[Transform], item: ItemInfo) -> "BoundChain":
        bound = tuple(t.for_item(item) for t in chain)
        return cls(bound, tuple(t.get_descriptor() for t in bound))

    def outermost_first(self) -> list[str]:
        return list(reversed(self.descriptors))


@dataclass
class EncodedChunk:
    data: Buffer
    layer_sizes: tuple[int, ...]
    records: tuple[str | None, ...]


def encode_chunk(chain: BoundChain, raw: memoryview, chunk: ChunkInfo) -> EncodedChunk:
    data: Buffer = raw
    sizes: list[int] = []
    records: list[str | None] = []
    for i, transform in enumerate(chain.transforms):
        info = ChunkInfo(chunk.item, chunk.index, chunk.count, chunk.offset, chunk.size, chain.descriptors[:i])
        data = transform.encode(memoryview(data), info)
        view = memoryview(data)
        sizes.append(view.nbytes)
        records.append(transform.chunk_record(view, info))
    return EncodedChunk(data, tuple(sizes), tuple(records))


class ItemDigests:
    """An item's manifest records (e.g. a checksum's item digest) and the chunk records its
    layers yield while decoding, so chunks intact one by one but swapped, moved from another
    item, repeated or dropped are caught once every chunk is decoded.

    A layer is checked when the manifest holds a record for its descriptor and the transform
    offers ``verify_item(item, chunk_records, recorded)``.  Its chunk records are what
    ``chunk_record`` returns on the bytes that layer decoded (the writer called it on the same
    bytes), taken after the layer's own check passed, e.g. the digest in a checksum trailer:
    no extra pass over the data.  Chunks are noted from several threads, each its own slot.
    """

    def __init__(self, chain: BoundChain, item: ItemInfo, count: int, recorded: Mapping[str, Any],
                 stop: int = 0) -> None:
        self.chain, self.item = chain, item
        self.recorded = {i: recorded[d] for i, d in _last_layers(chain.descriptors, stop).items()
                         if d in recorded and callable(getattr(chain.transforms[i], "verify_item", None))}
        self._records: dict[int, list[str | None]] = {i: [None] * count for i in self.recorded}
        self._noted = [False] * count if self.recorded else []

    def __bool__(self) -> bool:
        return bool(self.recorded)

    def note(self, layer: int, data: memoryview, info: ChunkInfo) -> None:
        """Keep the chunk record of ``layer`` for a chunk that layer decoded and checked."""
        records = self._records.get(layer)
        if records is not None:
            records[info.index] = self.chain.transforms[layer].chunk_record(data, info)

    def done(self, index: int) -> None:
        if self.recorded:
            self._noted[index] = True

    def check(self) -> None:
        """Compare each item record with the chunk records, once every chunk was decoded
        (a partial read sees only some of them and checks nothing)."""
        if not self.recorded or not all(self._noted):
            return
        for layer, value in self.recorded.items():
            descriptor = self.chain.descriptors[layer]
            if not isinstance(value, str):
                raise CheckpointFormatError(
                    f"{self.item.fqn}: the manifest records a malformed {descriptor} item record {value!r}"
                )
            try:
                verify = self.chain.transforms[layer].verify_item  # type: ignore[attr-defined]
                verify(self.item, self._records[layer], value)
            except DcpxError:
                raise
            except Exception as exc:  # a plugin's library error still names the item
                raise CheckpointFormatError(
                    f"{self.item.fqn}: {descriptor} failed to check the item record: {type(exc).__name__}: {exc}"
                ) from exc


def _last_layers(descriptors: Sequence[str], stop: int) -> dict[int, str]:
    """Layer index (innermost first, from ``stop``) of each descriptor's outermost use: the
    manifest keys records by descriptor, so a descriptor listed twice (only an edited
    ``.metadata`` does that) has one record, the one the writer would have kept."""
    last = {d: i for i, d in enumerate(descriptors)}
    return {i: d for d, i in last.items() if i >= stop}


def decode_chunk(chain: BoundChain, stored: Buffer, chunk: ChunkInfo, layer_sizes: Sequence[int], stop: int = 0,
                 out: memoryview | None = None, digests: ItemDigests | None = None) -> Buffer:
    """Undo the chain on one chunk; every layer must produce exactly its recorded size.
    With ``stop`` > 0 only the layers from the outermost down to ``stop`` are undone.
    With ``out`` (writable, the chunk's size) the innermost layer decodes straight into
    it, and ``out`` is returned.  ``digests`` collects the chunk records of an item read whole."""
    data = _decode_layers(chain, stored, chunk, layer_sizes, stop, out, digests)
    if digests is not None:
        digests.done(chunk.index)
    return data


def _decode_layers(chain: BoundChain, stored: Buffer, chunk: ChunkInfo, layer_sizes: Sequence[int], stop: int,
                   out: memoryview | None, digests: ItemDigests | None) -> Buffer:
    data: Buffer = stored
    expected = [chunk.size, *layer_sizes[:-1]]
    for i in range(len(chain.transforms) - 1, stop - 1, -1):
        info = ChunkInfo(chunk.item, chunk.index, chunk.count, chunk.offset, chunk.size, chain.descriptors[:i])
        into = out if i == 0 and out is not None else None
        if into is not None and into.nbytes != expected[0]:
            raise ValueError(f"decode_chunk: out has {into.nbytes} bytes, chunk {chunk.index} has {expected[0]}")
        try:
            if into is not None:
                chain.transforms[i].decode_into(memoryview(data), info, into)
                if digests is not None:
                    digests.note(i, memoryview(data), info)
                return into
            decoded = chain.transforms[i].decode(memoryview(data), info, expected[i])
            if digests is not None:
                digests.note(i, memoryview(data), info)
            data = decoded
        except DcpxError:
            raise
        except Exception as exc:  # a plugin's library error still names the item
            raise CheckpointFormatError(
                f"{chunk.item.fqn}: {chain.descriptors[i]} failed to decode chunk {chunk.index}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if memoryview(data).nbytes != expected[i]:
            raise IntegrityError(
                f"{chunk.item.fqn}: {chain.descriptors[i]} decoded chunk {chunk.index} to "
                f"{memoryview(data).nbytes} bytes, expected {expected[i]}"
            )
    return data


def iter_chunks(raw_size: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """(index, offset, size) of each chunk of an item of ``raw_size`` bytes."""
    for k in range(chunk_count(raw_size, chunk_size)):
        start = k * chunk_size
        yield k, start, min(chunk_size, raw_size - start)


class OrderedWindow:
    """Submit work to a pool and hand results back in submission order, keeping at most
    ``limit`` bytes of results in flight (the bound on encode memory)."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int) -> None:
        self._pool, self._limit = pool, limit
        self._queue: deque[tuple[Future, int, object]] = deque()
        self._in_flight = 0

    def submit(self, fn: Callable[[], object], cost: int, tag: object) -> Iterator[tuple[object, object]]:
        """Queue ``fn``; yield finished (tag, result) pairs whenever the window is full."""
        while self._queue and self._in_flight + cost > self._limit:
            yield self._pop()
        self._queue.append((self._pool.submit(fn), cost, tag))
        self._in_flight += cost

    def drain(self) -> Iterator[tuple[object, object]]:
        while self._queue:
            yield self._pop()

    def cancel(self) -> None:
        for fut, _, _ in self._queue:
            fut.cancel()
        self._queue.clear()

    def _pop(self) -> tuple[object, object]:
        fut, cost, tag = self._queue.popleft()
        self._in_flight -= cost
        return tag, fut.result()


def decode_range(
    index: FrameIndex,
    chain: BoundChain,
    item: ItemInfo,
    read: Callable[[int, int], Buffer],
    lo: int,
    hi: int,
    out: memoryview,
    pool: ThreadPoolExecutor | None,
    digests: ItemDigests | None = None,
    threads: int = 1,
) -> None:
    """Decode raw bytes ``[lo, hi)`` of a framed item into ``out``, touching only the chunks
    that overlap the range, on ``pool`` (of ``threads`` threads) when given.
    ``read(offset, size)`` returns stored bytes relative to the item.
    When the range touches every chunk, ``digests`` collects their records: the caller
    checks them with ``digests.check()`` once ``out`` is filled."""
    if hi <= lo:
        return
    offsets = index.stored_offsets()
    first, last = lo // index.chunk_size, (hi - 1) // index.chunk_size
    if not digests or (first, last) != (0, index.count - 1):
        digests = None

    def one(k: int) -> None:
        start, end = index.raw_span(k)
        sizes = index.layer_sizes[k]
        stored = read(offsets[k], sizes[-1])
        chunk = ChunkInfo(item, k, index.count, start, end - start)
        if lo <= start and end <= hi:  # the whole chunk lands in ``out``: decode in place
            decode_chunk(chain, stored, chunk, sizes, out=out[start - lo:end - lo], digests=digests)
            return
        data = memoryview(decode_chunk(chain, stored, chunk, sizes, digests=digests)).cast("B")
        a, b = max(lo, start), min(hi, end)
        out[a - lo:b - lo] = data[a - start:b - start]

    ks = range(first, last + 1)
    if pool is None or len(ks) == 1:
        for k in ks:
            one(k)
        return
    # a bounded window of submitted chunks: an item of a million tiny chunks (chunk_size is
    # the checkpoint's to choose) must not hold a million futures at once
    window: deque[Future[None]] = deque()
    in_flight = max(CHUNKS_IN_FLIGHT, 2 * threads)  # every thread kept busy
    try:
        for k in ks:
            if len(window) >= in_flight:
                window.popleft().result()
            window.append(pool.submit(one, k))
        while window:
            window.popleft().result()
    finally:
        # on a failure, chunks already running still write into ``out`` (perhaps the
        # caller's tensor): they must be done before the error reaches the caller
        for fut in window:
            fut.cancel()
        wait(window)
