"""Throughput of the checksum plugin: raw library vs the transform's encode/decode.

For each algorithm, over one buffer split into chunks as the dcpx pipeline splits items:

* ``raw``       the library call alone (crc32c.crc32c, xxhash.xxh3_128_digest, hashlib.sha256)
* ``encode``    ChecksumTransform.encode: digest + one copy of the payload into the output
* ``decode``    ChecksumTransform.decode: digest + compare, returns a zero-copy view
* ``copy``      (reference) the single payload copy encode makes, without hashing

each on one thread and on a pool of ``--threads`` threads (the libraries release the GIL, so
the pool should scale until memory bandwidth runs out).  Best of ``--repeat`` interleaved
rounds, in GB/s (10^9 bytes of payload per second).

    python benchmarks/checksum_codec.py [--mib 256] [--chunk-mib 4] [--threads 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import crc32c
import numpy as np
import xxhash
from dcpx.transform import ChunkInfo, ItemInfo

from dcpx_checksum import ALGORITHMS, ChecksumTransform

RAW: dict[str, Callable[[memoryview], object]] = {
    "crc32c": crc32c.crc32c,
    "xxh3-128": xxhash.xxh3_128_digest,
    "sha256": lambda b: hashlib.sha256(b).digest(),
}


def _over_chunks(fn: Callable[[int], None], count: int, pool: ThreadPoolExecutor | None) -> Callable[[], None]:
    if pool is None:
        return lambda: [fn(k) for k in range(count)] and None
    return lambda: list(pool.map(fn, range(count))) and None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="payload size in MiB (default 256)")
    ap.add_argument("--chunk-mib", type=float, default=4, help="chunk size in MiB (default 4, the dcpx default)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=7, help="measured rounds (default 7)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = ap.parse_args()

    total = args.mib << 20
    chunk = int(args.chunk_mib * (1 << 20))
    data = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8).tobytes()
    view = memoryview(data)
    count = -(-total // chunk)
    spans = [(k * chunk, min(total, (k + 1) * chunk)) for k in range(count)]
    infos = [ChunkInfo(ItemInfo("bench", total), k, count, a, b - a) for k, (a, b) in enumerate(spans)]
    pools = {1: None, args.threads: ThreadPoolExecutor(args.threads)} if args.threads > 1 else {1: None}

    # Every case is measured once per round and rounds are interleaved, so a burst of
    # background load spoils one sample of many cases rather than every sample of one.
    cases: list[tuple[str, str, Callable[[int], None]]] = [
        ("-", "copy", lambda k: b"".join((view[spans[k][0]:spans[k][1]], b"12345678")) and None)
    ]
    encoded: dict[str, list[bytes]] = {}
    for name in ALGORITHMS:
        t = ChecksumTransform(name)
        encoded[name] = [t.encode(view[a:b], info) for (a, b), info in zip(spans, infos)]
        cases += [
            (name, "raw", lambda k, raw=RAW[name]: raw(view[spans[k][0]:spans[k][1]]) and None),
            (name, "encode", lambda k, t=t: t.encode(view[spans[k][0]:spans[k][1]], infos[k]) and None),
            (name, "decode", lambda k, t=t, enc=encoded[name]: t.decode(
                memoryview(enc[k]), infos[k], infos[k].size) and None),
        ]
    best: dict[tuple[str, str, int], float] = {}
    for round_ in range(args.repeat + 1):  # round 0 warms up (page faults, caches)
        for algorithm, op, fn in cases:
            for threads, pool in pools.items():
                start = time.perf_counter()
                _over_chunks(fn, count, pool)()
                seconds = time.perf_counter() - start
                key = (algorithm, op, threads)
                if round_:
                    best[key] = min(best.get(key, float("inf")), seconds)
    rows = [{"algorithm": a, "op": o, "threads": n, "gb_s": total / s / 1e9} for (a, o, n), s in best.items()]

    env = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "crc32c": f"{crc32c.__version__} (hardware: {bool(crc32c.hardware_based)})",
        "xxhash": f"{xxhash.VERSION} (xxHash {xxhash.XXHASH_VERSION})",
        "payload_mib": args.mib,
        "chunk_mib": args.chunk_mib,
        "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps({"env": env, "rows": rows}, indent=2))
        return
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    threads = sorted(pools)
    print()
    print("| algorithm | op | " + " | ".join(f"{n} thread{'s' if n > 1 else ''} GB/s" for n in threads) + " |")
    print("|---|---|" + "---:|" * len(threads))
    keys = dict.fromkeys((r["algorithm"], r["op"]) for r in rows)
    for algorithm, op in keys:
        cells = [next(r["gb_s"] for r in rows if (r["algorithm"], r["op"], r["threads"]) == (algorithm, op, n))
                 for n in threads]
        print(f"| {algorithm} | {op} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
