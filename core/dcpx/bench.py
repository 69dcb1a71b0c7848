"""``dcpx bench``: how fast each installed transform encodes and decodes on this machine.

Every transform runs through the same chunk path the writer and reader use (``for_item``,
then ``encode_chunk``/``decode_chunk`` into a destination buffer) on chunks of the
writer's default size, of data shaped like trained weights (normally distributed, small
standard deviation) as float32 and bfloat16, on one thread and on every core.  A plain memory copy is measured alongside as the ceiling.
The whole run fits in a time budget (default 20 s).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .pipeline import DEFAULT_CHUNK_SIZE, BoundChain, decode_chunk, default_workers, encode_chunk
from .plugins import host
from .tensor_bytes import tensor_bytes
from .transform import ChunkInfo, ItemInfo, Transform

CHUNK_BYTES = DEFAULT_CHUNK_SIZE
DTYPES = (torch.float32, torch.bfloat16)
DEFAULT_SECONDS = 20.0


def _bench_options(name: str) -> dict[str, Any]:
    """Options a transform needs to run at all.  Encryption gets a throwaway random key,
    so the benchmark never touches (or needs) the user's keys."""
    if name == "stream.encrypt@dcpx":
        return {"keys": {"bench": os.urandom(32)}}
    return {}


@dataclass
class Row:
    transform: str
    source: str
    dtype: str
    threads: int
    encode_mb_s: float | None = None
    decode_mb_s: float | None = None
    ratio: float | None = None
    error: str | None = None


def run(seconds: float = DEFAULT_SECONDS, chunk_bytes: int = CHUNK_BYTES, threads: int | None = None) -> dict[str, Any]:
    """Measure every registered transform; returns a JSON-ready report."""
    cores = threads or default_workers()
    thread_counts = [1] if cores == 1 else [1, cores]
    regs = host().registrations()
    data = {dtype: _weights(dtype, chunk_bytes, max(thread_counts)) for dtype in DTYPES}
    measurements = len(thread_counts) * (1 + 2 * len(regs) * len(DTYPES))
    slice_s = max(0.02, seconds / max(1, measurements))
    rows: list[Row] = []
    for n in thread_counts:
        speed = _throughput(_memcpy_jobs(data[torch.float32]), n, slice_s)
        rows.append(Row("memcpy", "-", "-", n, speed, speed, 1.0))
    for reg in regs:
        for dtype in DTYPES:
            try:
                transform = host().create(reg.name, **_bench_options(reg.name))
                enc, dec, ratio = _codec_jobs(transform, reg.name, dtype, data[dtype])
            except Exception as exc:  # one broken transform must not hide the others
                for n in thread_counts:
                    rows.append(Row(reg.name, reg.source, _dtype_name(dtype), n, error=f"{type(exc).__name__}: {exc}"))
                continue
            for n in thread_counts:
                rows.append(Row(reg.name, reg.source, _dtype_name(dtype), n,
                                _throughput(enc, n, slice_s), _throughput(dec, n, slice_s), ratio))
    return {
        "chunk_bytes": chunk_bytes,
        "seconds": seconds,
        "cores": cores,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rows": [asdict(r) for r in rows],
    }


def format_table(report: dict[str, Any]) -> str:
    mib = report["chunk_bytes"] / (1 << 20)
    lines = [
        f"dcpx bench: {mib:g} MiB chunks of weight-like data, {report['cores']} core(s), torch {report['torch']}",
        f"{'transform':<24} {'from':<14} {'dtype':<9} {'threads':>7} {'encode MB/s':>12} {'decode MB/s':>12} {'ratio':>6}",
    ]
    for r in report["rows"]:
        head = f"{r['transform']:<24} {r['source'][:14]:<14} {r['dtype']:<9} {r['threads']:>7}"
        if r["error"]:
            lines.append(f"{head}  skipped: {r['error']}")
        else:
            lines.append(f"{head} {r['encode_mb_s']:>12,.0f} {r['decode_mb_s']:>12,.0f} {r['ratio']:>6.3f}")
    lines.append("MB/s counts raw (decoded) bytes, 1 MB = 10^6 bytes; ratio = encoded size / raw size")
    return "\n".join(lines)


# -- data and jobs ---------------------------------------------------------------------
def _weights(dtype: torch.dtype, nbytes: int, count: int) -> list[torch.Tensor]:
    """``count`` distinct chunks resembling trained weights: N(0, 0.02) with per-row scale."""
    gen = torch.Generator().manual_seed(1234)
    elements = nbytes // torch.empty((), dtype=dtype).element_size()
    cols = 1024
    rows = elements // cols
    out = []
    for _ in range(count):
        scale = torch.exp(torch.randn(rows, 1, generator=gen) * 0.3) * 0.02
        out.append((torch.randn(rows, cols, generator=gen) * scale).to(dtype).contiguous())
    return out


Job = Callable[[int], int]  # job(k) processes chunk k, returns raw bytes processed


def _codec_jobs(transform: Transform, name: str, dtype: torch.dtype, chunks: list[torch.Tensor]) -> tuple[Job, Job, float]:
    """Encode and decode jobs over ``chunks`` through the writer's chunk path; checks one
    round trip and returns the compression ratio."""
    size = chunks[0].nbytes
    item = ItemInfo("bench.weight", size * len(chunks), dtype, (chunks[0].shape[0] * len(chunks), chunks[0].shape[1]),
                    (0, 0), checkpoint_id="0" * 32)
    bound = BoundChain.for_item([transform], item)
    raws = [tensor_bytes(c) for c in chunks]
    infos = [ChunkInfo(item, k, len(chunks), k * size, size) for k in range(len(chunks))]
    encoded = [encode_chunk(bound, raws[k], infos[k]) for k in range(len(chunks))]
    back = decode_chunk(bound, encoded[0].data, infos[0], encoded[0].layer_sizes)
    if bytes(memoryview(back)) != bytes(raws[0]):
        raise RuntimeError(f"{name} did not decode its own output back to the input")
    ratio = sum(memoryview(e.data).nbytes for e in encoded) / (size * len(chunks))

    def enc(k: int) -> int:
        encode_chunk(bound, raws[k], infos[k])
        return size

    outs = [memoryview(bytearray(size)) for _ in chunks]  # the destination tensor's memory, in a load

    def dec(k: int) -> int:
        e = encoded[k]
        decode_chunk(bound, e.data, infos[k], e.layer_sizes, out=outs[k])
        return size

    return enc, dec, ratio


def _memcpy_jobs(chunks: list[torch.Tensor]) -> Job:
    sources = [c.data_ptr() for c in chunks]
    targets = [torch.empty_like(c) for c in chunks]
    size = chunks[0].nbytes

    def copy(k: int) -> int:
        ctypes.memmove(targets[k].data_ptr(), sources[k], size)  # ctypes releases the GIL
        return size

    return copy


def _throughput(job: Job, threads: int, seconds: float) -> float:
    """MB/s of ``job`` run by ``threads`` threads for about ``seconds`` (each on its own chunk)."""
    job(0)  # warm up: lazy contexts, first-touch page faults
    if threads == 1:
        done, start = 0, time.perf_counter()
        while True:
            done += job(0)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return done / elapsed / 1e6
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()
    totals = [0] * threads

    def worker(k: int) -> None:
        try:
            job(k)
        except BaseException:
            barrier.abort()  # the main thread stops waiting and sees this error below
            raise
        barrier.wait()
        while not stop.is_set():
            totals[k] += job(k)

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(worker, k) for k in range(threads)]
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            stop.set()
            for f in futures:
                f.result()
            raise
        start = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - start
    return sum(totals) / elapsed / 1e6


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
