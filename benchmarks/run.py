"""Side-by-side save/load benchmark: stock torch DCP vs dcpx, in one run, on this machine.

Builds a state dict of realistic shapes (hundreds of tensors from KiB to hundreds of MiB;
fp32, bf16, fp16, int64; the trained all-MiniLM-L6-v2 weights when the package that ships
them is installed), then measures for each configuration: save and load throughput (warm
page cache, and cold where dropping caches is allowed), peak extra RSS during load and size
on disk; plus the machine's own limits (sequential write+fsync, sequential read, memcpy),
each transform chain's standalone single-core speed on the same state dict, and a
resharded read of one quarter of a 1 GiB compressed tensor.  Prints ratios and writes
docs/benchmarks.md.

    python benchmarks/run.py [--gib 1.0] [--repeat 2] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard

import dcpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_speed import CodecSpeed, codec_speed  # noqa: E402  (benchmark-local modules)
from machine import MiB, PeakRSS, drop_caches, machine_limits  # noqa: E402
from partial_read import SliceRead, quarter_reads  # noqa: E402

warnings.filterwarnings("ignore")


def trained_weights() -> dict[str, torch.Tensor]:
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


def run_config(name: str, state: dict[str, torch.Tensor], directory: Path,
               writer: Callable[[Path], Any], reader: Callable[[Path], Any], repeat: int) -> Result:
    """Best of ``repeat`` saves and loads (fastest time, largest RSS); every load is checked."""
    path = directory / name.replace(" ", "_").replace("+", "_")
    target = {k: torch.zeros_like(v) for k, v in state.items()}  # touched: RSS counts only extra memory
    saves, warms, colds, rss_extra, disk = [], [], [], 0, 0
    for _ in range(repeat):
        shutil.rmtree(path, ignore_errors=True)
        gc.collect()
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=writer(path))
        saves.append(time.perf_counter() - t0)
        disk = disk_bytes(path)
        for t in target.values():
            t.zero_()
        gc.collect()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            dcp.load(target, storage_reader=reader(path))
            warms.append(time.perf_counter() - t0)
        rss_extra = max(rss_extra, rss.peak - rss.start)
        for k, v in state.items():
            if not torch.equal(v, target[k]):
                raise SystemExit(f"{name}: {k} did not round-trip")
        if drop_caches():
            t0 = time.perf_counter()
            dcp.load(target, storage_reader=reader(path))
            colds.append(time.perf_counter() - t0)
    shutil.rmtree(path, ignore_errors=True)
    return Result(name, min(saves), min(warms), min(colds) if colds else None, rss_extra, disk)


def configs() -> list[tuple[str, tuple[str, ...] | None, Callable[[Path], Any], Callable[[Path], Any]]]:
    """(name, dcpx transform chain or None for stock, writer factory, reader factory)."""
    installed = {r.name for r in dcpx.plugin_host().registrations()}
    out: list[tuple[str, tuple[str, ...] | None, Callable[[Path], Any], Callable[[Path], Any]]] = [
        ("stock DCP", None, lambda p: dcp.FileSystemWriter(p), lambda p: dcp.FileSystemReader(p)),
        # the drop-in case: checkpoints stock torch wrote, loaded through dcpx's reader
        ("stock DCP files, dcpx reader", None, lambda p: dcp.FileSystemWriter(p), lambda p: dcpx.FileSystemReader(p)),
        ("stock DCP thread_count=2", None, lambda p: dcp.FileSystemWriter(p, thread_count=2),
         lambda p: dcp.FileSystemReader(p)),
        ("stock DCP + ZStandard", None, lambda p: dcp.FileSystemWriter(p, _extensions=[ZStandard()]),
         lambda p: dcp.FileSystemReader(p)),
        ("dcpx", (), lambda p: dcpx.FileSystemWriter(p), lambda p: dcpx.FileSystemReader(p)),
    ]
    chains: list[tuple[str, ...]] = [("zstd",)]
    if {"stream.encrypt@dcpx", "stream.checksum@dcpx"} <= installed:
        os.environ.setdefault("DCPX_ENCRYPT_KEY", __import__("base64").b64encode(os.urandom(32)).decode())
        chains += [("zstd", "encrypt"), ("zstd", "encrypt", "checksum")]
    for chain in chains:
        out.append(("dcpx " + "+".join(chain), chain,
                    lambda p, c=chain: dcpx.FileSystemWriter(p, transforms=list(c)),
                    lambda p: dcpx.FileSystemReader(p)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3, help="rounds per configuration; the best is reported")
    ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    ap.add_argument("--only", default="", help="comma-separated names to run (e.g. 'ZStandard,dcpx zstd'); "
                    "a partial run prints its rows but writes no report")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    total = int(args.gib * (1 << 30))
    directory = Path(args.dir or tempfile.mkdtemp(prefix="dcpx-bench-"))
    state = build_state(total)
    nbytes, tensors = sum(t.nbytes for t in state.values()), len(state)
    cores = dcpx.pipeline.default_workers()
    print(f"state dict: {len(state)} tensors, {nbytes / MiB:.0f} MiB; dir {directory}; {cores} cores", flush=True)
    limits = machine_limits(directory, nbytes, repeat=args.repeat)  # the same size as the state dict
    print("machine: " + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in limits.items()), flush=True)
    results, codecs = [], {}
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    chosen = [c for c in configs() if not wanted or any(c[0] == w for w in wanted)]
    for name, chain, w, r in chosen:
        if chain:
            codecs[name] = speed = codec_speed(state, chain, repeat=args.repeat)
            print(f"{'  one core':<28} encode {speed.encode_bps / 1e9:6.2f} GB/s  decode {speed.decode_bps / 1e9:6.2f} GB/s"
                  f"  ({'+'.join(chain)}, CPU time)", flush=True)
        res = run_config(name, state, directory, w, r, args.repeat)
        results.append(res)
        print(f"{name:<28} save {nbytes / res.save_s / 1e9:6.2f} GB/s  load {nbytes / res.load_warm_s / 1e9:6.2f} GB/s"
              f"  cold {nbytes / res.load_cold_s / 1e9 if res.load_cold_s else float('nan'):6.2f} GB/s"
              f"  extra RSS {res.rss_extra / nbytes:5.3f}x  disk {res.disk / nbytes:5.3f}x", flush=True)
    if not wanted:  # each remaining codec alone, for the codec table
        for chain in (("encrypt",), ("checksum",)):
            if f"dcpx {chain[0]}" not in codecs and any(chain[0] in (c or ()) for _, c, _, _ in chosen):
                codecs[f"dcpx {chain[0]}"] = speed = codec_speed(state, chain, repeat=args.repeat)
                print(f"{'  one core':<28} encode {speed.encode_bps / 1e9:6.2f} GB/s  decode {speed.decode_bps / 1e9:6.2f} GB/s"
                      f"  ({chain[0]} alone, CPU time)", flush=True)
    del state
    gc.collect()
    if wanted:
        shutil.rmtree(directory, ignore_errors=True)
        return
    slices = quarter_reads(directory, args.gib)
    for s in slices:
        print(f"{s.name:<28} quarter read: {s.part_read / s.stored:.3f} of the stored bytes in {s.part_s:.2f} s "
              f"(full read {s.full_read / s.stored:.3f} in {s.full_s:.2f} s)", flush=True)
    write_report(Path(args.out), tensors, nbytes, cores, limits, results, codecs, slices, args)
    shutil.rmtree(directory, ignore_errors=True)


def _gbps(nbytes: int, seconds: float | None) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds else ""


def write_report(out: Path, tensors: int, nbytes: int, cores: int, limits: dict[str, float], results: Sequence[Result],
                 codecs: dict[str, CodecSpeed], slices: Sequence[SliceRead], args: argparse.Namespace) -> None:
    base = {r.name: r for r in results}
    stock, stock_z = base["stock DCP"], base["stock DCP + ZStandard"]
    lines = [
        "# Benchmarks: dcpx vs stock DCP (one run, same machine)",
        "",
        f"Produced by `make bench` (`benchmarks/run.py --gib {args.gib:g} --repeat {args.repeat}`) on "
        f"{platform.machine()}, {cores} cores, torch {torch.__version__}: {tensors} tensors, {nbytes / MiB:.0f} MiB. "
        "Throughput is raw state-dict bytes per second, best of the rounds; \"cold\" drops the page cache first "
        "(blank where the machine does not allow it). Codec-level comparisons (dcpx-zstd against plain zstd and "
        "ZipNN on trained weights) are in [benchmarks-zstd.md](benchmarks-zstd.md), encryption in "
        "[benchmarks-encrypt.md](benchmarks-encrypt.md), checksums in [benchmarks-checksum.md](benchmarks-checksum.md); "
        "where the time goes in [performance.md](performance.md).",
        "",
        "## Machine limits",
        "",
        f"One file of the state dict's size ({nbytes / MiB:.0f} MiB), best of the rounds: written and fsynced, read "
        "after the page cache is dropped, read again from the page cache; and a memcpy of the same size.",
        "",
        "| write+fsync | read cold | read warm (page cache) | memcpy |",
        "| ---: | ---: | ---: | ---: |",
        "| " + " | ".join(f"{limits[k] / 1e9:.2f} GB/s" for k in ("write+fsync", "read cold", "read warm", "memcpy")) + " |",
        "",
        "## Save and load",
        "",
        "| configuration | save GB/s | load warm GB/s | load cold GB/s | save × stock | load × stock "
        "| vs stock+ZStandard (save / load) | load extra RSS × size | disk × size |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {_gbps(nbytes, r.save_s)} | {_gbps(nbytes, r.load_warm_s)} | {_gbps(nbytes, r.load_cold_s)} | "
            f"{stock.save_s / r.save_s:.2f} | {stock.load_warm_s / r.load_warm_s:.2f} | "
            f"{stock_z.save_s / r.save_s:.2f} / {stock_z.load_warm_s / r.load_warm_s:.2f} | "
            f"{r.rss_extra / nbytes:.3f} | {r.disk / nbytes:.3f} |"
        )
    raw = base["dcpx"]
    lines += [
        "",
        "## Against the machine",
        "",
        f"* dcpx without transforms: save {nbytes / raw.save_s / limits['write+fsync']:.2f}× sequential write+fsync; "
        f"cold load {nbytes / raw.load_cold_s / limits['read cold'] if raw.load_cold_s else float('nan'):.2f}× "
        f"cold sequential read; warm load {nbytes / raw.load_warm_s / limits['read warm']:.2f}× page-cache read "
        f"(stock DCP: {nbytes / stock.save_s / limits['write+fsync']:.2f}×, "
        f"{nbytes / stock.load_cold_s / limits['read cold'] if stock.load_cold_s else float('nan'):.2f}×, "
        f"{nbytes / stock.load_warm_s / limits['read warm']:.2f}×).",
    ]
    for name, base_name in (("dcpx zstd+encrypt", "dcpx zstd"), ("dcpx zstd+encrypt+checksum", "dcpx zstd")):
        if name in base and base_name in base:
            a, b = base[name], base[base_name]
            lines.append(f"* {name} vs {base_name}: save {b.save_s / a.save_s:.2f}×, load {b.load_warm_s / a.load_warm_s:.2f}×.")
    if codecs:
        lines += [
            "",
            "## Against the codecs",
            "",
            f"Each chain's standalone speed: every chunk of the same state dict encoded and decoded on one core (CPU "
            f"time, no I/O; best of {args.repeat} passes, like the pipeline figures). The pipeline's ceiling is that speed × {cores} cores, or what the disk allows for the "
            "stored bytes (write+fsync ÷ stored fraction), whichever is lower.",
            "",
            "| chain | encode GB/s (1 core) | decode GB/s (1 core) | save ÷ (encode × cores) | save ÷ ceiling "
            "| load warm ÷ (decode × cores) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, c in codecs.items():
            r = base.get(name)
            if r is None:  # a codec measured alone, not a pipeline configuration
                lines.append(f"| {'+'.join(c.chain)} (alone) | {c.encode_bps / 1e9:.2f} | {c.decode_bps / 1e9:.2f} | | | |")
                continue
            save = nbytes / r.save_s
            disk_ceiling = limits["write+fsync"] * nbytes / r.disk
            lines.append(f"| {'+'.join(c.chain)} | {c.encode_bps / 1e9:.2f} | {c.decode_bps / 1e9:.2f} | "
                         f"{save / (c.encode_bps * cores):.2f} | {save / min(disk_ceiling, c.encode_bps * cores):.2f} | "
                         f"{nbytes / r.load_warm_s / (c.decode_bps * cores):.2f} |")
    if slices:
        lines += [
            "",
            f"## Resharded read: one quarter of a {args.gib:g} GiB compressed tensor",
            "",
            f"A bf16 tensor of {args.gib:g} GiB saved alone (dcpx: default chunk size); the storage reader is asked "
            "for a quarter of its rows, not aligned to chunks, exactly as a 4-way reshard asks. \"read\" is what "
            "the process pulled from the files (`rchar`), as a fraction of the tensor's stored bytes; \"bound\" is "
            "the quarter plus two chunks.",
            "",
            "| configuration | rows asked | full read: read / s | quarter: read / s | bound | quarter ÷ full time |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in slices:
            bound = f"{s.part_fraction + 2 / s.chunks:.3f}" if s.chunks else ""
            lines.append(f"| {s.name} | {s.part_fraction:.3f} | {s.full_read / s.stored:.3f} / {s.full_s:.2f} | "
                         f"{s.part_read / s.stored:.3f} / {s.part_s:.2f} | {bound} | {s.part_s / s.full_s:.2f} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
