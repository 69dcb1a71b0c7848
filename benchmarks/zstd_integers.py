"""Integer tensors under dcpx-zstd: plain zstd against byte planes, per kind of data.

``grouping="auto"`` cuts 2-, 4- and 8-byte integers into byte planes; this measures why
(and where it loses) on 64 MiB of each kind of integer data a checkpoint holds: ids,
position ids, sorted indices, small counts, constant and repeated data, random words, and
ids mixed with a negative sentinel.  Chunks of 1 MiB as the pipeline cuts them, one
thread, CPU time, best of ``--repeat``; every round trip is checked bit for bit.

    python benchmarks/zstd_integers.py [--repeat 2] [--mib 64]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import dcpx
from dcpx.transform import ChunkInfo, ItemInfo

CHUNK = 1 << 20


def data_sets(nbytes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = nbytes // 8

    def ids(count: int, high: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(0, high, (count,), generator=g, dtype=dtype)

    sentinel = torch.rand(n, generator=g) < 0.3
    return {
        "int64 token ids below 50 000": ids(n, 50_000),
        "int64 arange (position ids)": torch.arange(n),
        "int64 sorted indices below 10^9": torch.sort(ids(n, 10**9)).values,
        "int64 values 0-3": ids(n, 4),
        "int64 all zero": torch.zeros(n, dtype=torch.int64),
        "int64 one 1000-id sequence repeated": ids(1000, 50_000).repeat(n // 1000 + 1)[:n],
        "int64 uniformly random": torch.randint(-2**63, 2**63 - 1, (n,), generator=g),
        "int64 ids below 32 000, 30% -100": torch.where(sentinel, torch.tensor(-100), ids(n, 32_000)),
        "int32 token ids below 50 000": ids(2 * n, 50_000, torch.int32),
        "int16 values -300-300": (ids(4 * n, 601, torch.int32) - 300).to(torch.int16),
    }


def cpu_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def measure(tensor: torch.Tensor, grouping: str, repeat: int) -> tuple[float, float, float]:
    """(ratio, encode GB/s, decode GB/s) of one tensor under one grouping."""
    item = ItemInfo("x", tensor.nbytes, tensor.dtype, tuple(tensor.shape), (0,), "")
    transform = dcpx.transform("zstd", grouping=grouping).for_item(item)
    raw = memoryview(tensor.numpy()).cast("B")
    chunks = [ChunkInfo(item, k, 0, off, min(CHUNK, len(raw) - off), ())
              for k, off in enumerate(range(0, len(raw), CHUNK))]
    encoded: list[bytes] = []

    def encode() -> None:
        encoded[:] = [transform.encode(raw[c.offset:c.offset + c.size], c) for c in chunks]

    out = bytearray(len(raw))  # resident, as a loaded tensor is: decoding straight into it, as loads do
    view = memoryview(out)

    def decode() -> None:
        for e, c in zip(encoded, chunks):
            transform.decode_into(memoryview(e), c, view[c.offset:c.offset + c.size])

    enc_s, dec_s = cpu_time(encode, repeat), cpu_time(decode, repeat)
    if out != raw:
        raise SystemExit(f"{grouping}: round trip changed the data")
    return sum(map(len, encoded)) / len(raw), len(raw) / enc_s / 1e9, len(raw) / dec_s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64, help="size of each data set")
    args = ap.parse_args()
    print("| data | plain zstd: ratio, encode, decode | grouped (auto): ratio, encode, decode |")
    print("| --- | --- | --- |")
    for name, tensor in data_sets(args.mib << 20).items():
        plain = measure(tensor, "none", args.repeat)
        grouped = measure(tensor, "auto", args.repeat)
        cells = [f"{r:.3f}, {e:.2f}, {d:.2f} GB/s" for r, e, d in (plain, grouped)]
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
