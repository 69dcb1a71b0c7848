"""Side-by-side save/load benchmark: stock torch DCP vs dcpx, in one run, on this machine.

Builds a state dict of realistic shapes (hundreds of tensors from KiB to hundreds of MiB;
fp32, bf16, fp16, int64; the trained all-MiniLM-L6-v2 weights when the package that ships
them is installed), then measures for each configuration: save and load throughput (warm
page cache, and cold where dropping caches is allowed), peak extra RSS during load and size
on disk; plus the machine's own limits (sequential write+fsync, sequential read, memcpy).
Prints ratios and writes docs/benchmarks.md.

    python benchmarks/run.py [--gib 1.0] [--repeat 1] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard

import dcpx

warnings.filterwarnings("ignore")
MiB = 1 << 20


def trained_weights() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from zstd_codec import find_weights, load_weights

        path = find_weights(install=False)
        return {f"minilm.{k}": v for k, v in load_weights(path).items()} if path else {}
    except Exception as exc:  # the benchmark still runs on synthetic data
        print(f"(trained weights unavailable: {exc})")
        return {}


def build_state(total_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hundreds of tensors with a long-tailed size distribution, like a real model + optimizer."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = dict(trained_weights())
    used = sum(t.nbytes for t in state.values())
    big = [192 * MiB, 96 * MiB, 48 * MiB]
    i = 0
    while used < total_bytes:
        if big and used + big[0] <= total_bytes:
            nbytes = big.pop(0)
        else:
            nbytes = int(min(total_bytes - used, 4 * MiB * (1 + i % 7) if i % 3 else 16 * 1024 * (1 + i % 50)))
        dtype = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.int64][i % 5]
        n = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
        if dtype == torch.int64:
            t = torch.randint(0, 50_000, (n,), generator=gen)
        else:
            # trained-weight-like: normal values with a narrow exponent range
            t = (torch.randn(n, generator=gen) * 0.02).to(dtype)
        state[f"layer{i}.{'w' if i % 2 else 'exp_avg'}"] = t
        used += t.nbytes
        i += 1
    return state


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


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


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@dataclass
class Result:
    name: str
    save_s: float
    load_warm_s: float
    load_cold_s: float | None
    rss_extra: int
    disk: int


def machine_limits(directory: Path, nbytes: int) -> dict[str, float]:
    buf = torch.empty(nbytes, dtype=torch.uint8).random_()
    view = memoryview(buf.numpy())
    path = directory / "limits.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(view)
        f.flush()
        os.fsync(f.fileno())
    write = nbytes / (time.perf_counter() - t0)
    out = torch.empty_like(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(out.numpy()))
    warm = nbytes / (time.perf_counter() - t0)
    cold = None
    if drop_caches():
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(out.numpy()))
        cold = nbytes / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    out.copy_(buf)
    memcpy = nbytes / (time.perf_counter() - t0)
    path.unlink()
    return {"write+fsync": write, "read warm": warm, "read cold": cold or float("nan"), "memcpy": memcpy}


def run_config(name: str, state: dict[str, torch.Tensor], directory: Path,
               writer: Callable[[Path], Any], reader: Callable[[Path], Any]) -> Result:
    path = directory / name.replace(" ", "_").replace("+", "_")
    shutil.rmtree(path, ignore_errors=True)
    gc.collect()
    t0 = time.perf_counter()
    dcp.save(state, storage_writer=writer(path))
    save_s = time.perf_counter() - t0
    target = {k: torch.zeros_like(v) for k, v in state.items()}  # touched: RSS counts only extra memory
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        dcp.load(target, storage_reader=reader(path))
        warm = time.perf_counter() - t0
    for k, v in state.items():
        if not torch.equal(v, target[k]):
            raise SystemExit(f"{name}: {k} did not round-trip")
    cold = None
    if drop_caches():
        t0 = time.perf_counter()
        dcp.load(target, storage_reader=reader(path))
        cold = time.perf_counter() - t0
    result = Result(name, save_s, warm, cold, rss.peak - rss.start, disk_bytes(path))
    shutil.rmtree(path, ignore_errors=True)
    return result


def configs() -> list[tuple[str, Callable[[Path], Any], Callable[[Path], Any]]]:
    installed = {r.name for r in dcpx.plugin_host().registrations()}
    out = [
        ("stock DCP", lambda p: dcp.FileSystemWriter(p), lambda p: dcp.FileSystemReader(p)),
        ("stock DCP thread_count=2", lambda p: dcp.FileSystemWriter(p, thread_count=2), lambda p: dcp.FileSystemReader(p)),
        ("stock DCP + ZStandard", lambda p: dcp.FileSystemWriter(p, _extensions=[ZStandard()]), lambda p: dcp.FileSystemReader(p)),
        ("dcpx", lambda p: dcpx.FileSystemWriter(p), lambda p: dcpx.FileSystemReader(p)),
        ("dcpx zstd", lambda p: dcpx.FileSystemWriter(p, transforms=["zstd"]), lambda p: dcpx.FileSystemReader(p)),
    ]
    if {"stream.encrypt@dcpx", "stream.checksum@dcpx"} <= installed:
        os.environ.setdefault("DCPX_ENCRYPT_KEY", __import__("base64").b64encode(os.urandom(32)).decode())
        out.append(("dcpx zstd+encrypt",
                    lambda p: dcpx.FileSystemWriter(p, transforms=["zstd", "encrypt"]),
                    lambda p: dcpx.FileSystemReader(p)))
        out.append(("dcpx zstd+encrypt+checksum",
                    lambda p: dcpx.FileSystemWriter(p, transforms=["zstd", "encrypt", "checksum"]),
                    lambda p: dcpx.FileSystemReader(p)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    total = int(args.gib * (1 << 30))
    directory = Path(args.dir or tempfile.mkdtemp(prefix="dcpx-bench-"))
    state = build_state(total)
    nbytes = sum(t.nbytes for t in state.values())
    print(f"state dict: {len(state)} tensors, {nbytes / MiB:.0f} MiB; dir {directory}; {os.cpu_count()} cores")
    limits = machine_limits(directory, min(nbytes, 512 * MiB))
    print("machine: " + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in limits.items()))
    results = []
    for name, w, r in configs():
        res = run_config(name, state, directory, w, r)
        results.append(res)
        print(f"{name:<28} save {nbytes / res.save_s / 1e9:6.2f} GB/s  load {nbytes / res.load_warm_s / 1e9:6.2f} GB/s"
              f"  cold {nbytes / res.load_cold_s / 1e9 if res.load_cold_s else float('nan'):6.2f} GB/s"
              f"  extra RSS {res.rss_extra / nbytes:5.3f}x  disk {res.disk / nbytes:5.3f}x", flush=True)
    write_report(Path(args.out), state, nbytes, limits, results)
    shutil.rmtree(directory, ignore_errors=True)


def write_report(out: Path, state: dict, nbytes: int, limits: dict[str, float], results: list[Result]) -> None:
    base = {r.name: r for r in results}
    stock, stock_z = base["stock DCP"], base["stock DCP + ZStandard"]
    lines = [
        "# Benchmarks: dcpx vs stock DCP (one run, same machine)",
        "",
        f"Produced by `make bench` (`benchmarks/run.py`) on {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}: {len(state)} tensors, {nbytes / MiB:.0f} MiB. Throughput is raw state-dict bytes "
        "per second; \"cold\" drops the page cache first (blank where the machine does not allow it).",
        "",
        "Machine limits: " + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in limits.items()),
        "",
        "| configuration | save GB/s | load warm GB/s | load cold GB/s | save × stock | load × stock | vs stock+ZStandard (save / load) | load extra RSS × size | disk × size |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cold = f"{nbytes / r.load_cold_s / 1e9:.2f}" if r.load_cold_s else ""
        lines.append(
            f"| {r.name} | {nbytes / r.save_s / 1e9:.2f} | {nbytes / r.load_warm_s / 1e9:.2f} | {cold} | "
            f"{stock.save_s / r.save_s:.2f} | {stock.load_warm_s / r.load_warm_s:.2f} | "
            f"{stock_z.save_s / r.save_s:.2f} / {stock_z.load_warm_s / r.load_warm_s:.2f} | "
            f"{r.rss_extra / nbytes:.3f} | {r.disk / nbytes:.3f} |"
        )
    lines.append("")
    for name, base_name in (("dcpx zstd+encrypt", "dcpx zstd"), ("dcpx zstd+encrypt+checksum", "dcpx zstd+encrypt"),
                            ("dcpx zstd+encrypt+checksum", "dcpx zstd")):
        if name in base and base_name in base:
            a, b = base[name], base[base_name]
            lines.append(f"{name} vs {base_name}: save {b.save_s / a.save_s:.2f}×, load {b.load_warm_s / a.load_warm_s:.2f}×  ")
    dcpx_raw = base["dcpx"]
    lines += [
        "",
        f"dcpx without transforms: save {nbytes / dcpx_raw.save_s / limits['write+fsync']:.2f}× sequential write+fsync, "
        f"warm load {nbytes / dcpx_raw.load_warm_s / limits['read warm']:.2f}× page-cache read.",
    ]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
