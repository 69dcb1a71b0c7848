"""The machine's own limits and the measuring instruments the benchmarks share.

Every figure here is a ceiling for the pipeline rows: a sequential write with fsync, a
sequential read from a cold and a warm page cache into memory that is already resident
(so page faults on the destination are not counted against the disk), and memcpy.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20


def drop_caches() -> bool:
    """Drop the page cache (needs root); False where the machine does not allow it."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def bytes_read() -> int:
    """Bytes this process has read through read-like system calls so far (``rchar``)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


class PeakRSS:
    """Samples this process's RSS on a thread; ``peak - start`` is the extra memory used."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed_read(path: Path, out: memoryview) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.readinto(out)
    return time.perf_counter() - t0


def machine_limits(directory: Path, nbytes: int, repeat: int = 2) -> dict[str, float]:
    """Bytes per second of the machine's sequential I/O and memcpy, best of ``repeat``."""
    buf = torch.empty(nbytes, dtype=torch.uint8).random_()
    out = torch.zeros_like(buf)  # resident before timing: only the read itself is measured
    src, dst = memoryview(buf.numpy()), memoryview(out.numpy())
    path = directory / "limits.bin"
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = max(best.get(name, 0.0), nbytes / seconds)

    for _ in range(repeat):
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(src)
            f.flush()
            os.fsync(f.fileno())
        keep("write+fsync", time.perf_counter() - t0)
        _timed_read(path, dst)  # now certainly in the page cache
        keep("read warm", _timed_read(path, dst))
        if drop_caches():
            keep("read cold", _timed_read(path, dst))
        t0 = time.perf_counter()
        out.copy_(buf)
        keep("memcpy", time.perf_counter() - t0)
    path.unlink()
    best.setdefault("read cold", float("nan"))
    return best
