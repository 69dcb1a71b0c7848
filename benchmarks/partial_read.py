"""A resharded read: one quarter of a 1 GiB compressed tensor, as a 4-way reshard asks for.

DCP turns a resharded load into read items that name a slice of the stored tensor
(``storage_offsets`` / ``lengths``); this drives the storage reader with exactly such an
item for rows [n/4 + 13, n/2 + 13) of a 2-D tensor (deliberately not chunk-aligned) and
measures what the reader pulls from disk (``rchar``) and how long it takes, for dcpx with
zstd and for stock DCP with torch's ``ZStandard``, against a full read of the same tensor.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcpx
from dcpx.framing import chunk_count
from dcpx.pipeline import DEFAULT_CHUNK_SIZE

from machine import bytes_read

FQN = "big.weight"


class _Destination:
    """The two planner calls a storage reader makes for a tensor read item."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.dest

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        if tensor is not self.dest:
            self.dest.copy_(tensor)


@dataclass
class SliceRead:
    name: str
    stored: int  # bytes of the tensor's stored form on disk
    full_read: int
    full_s: float
    part_read: int
    part_s: float
    part_fraction: float  # rows read / rows stored
    chunks: int | None  # dcpx: chunks the tensor is stored in


def _read(reader_for: Callable[[], dcp.FileSystemReader], rows: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    reader = reader_for()
    reader.set_up_storage_reader(reader.read_metadata(), True)
    lo, hi = rows
    dest = torch.zeros((hi - lo, like.shape[1]), dtype=like.dtype)
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex(FQN, (0, 0)),
        dest_offsets=torch.Size([0, 0]),
        storage_index=MetadataIndex(FQN, (0, 0)),
        storage_offsets=torch.Size([lo, 0]),
        lengths=torch.Size([hi - lo, like.shape[1]]),
    )
    before, t0 = bytes_read(), time.perf_counter()
    reader.read_data(LoadPlan([req]), _Destination(dest)).wait()  # type: ignore[arg-type]
    return dest, bytes_read() - before, time.perf_counter() - t0


def quarter_reads(directory: Path, gib: float = 1.0) -> list[SliceRead]:
    """Save one ``gib`` GiB bf16 tensor per configuration and read a quarter of it back."""
    cols = 16384
    rows = int(gib * (1 << 30)) // (2 * cols)
    tensor = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(7)) * 0.02).to(torch.bfloat16)
    lo = rows // 4 + 13
    part = (lo, lo + rows // 4)
    configs = [
        ("dcpx zstd", lambda p: dcpx.FileSystemWriter(p, transforms=["zstd"]), dcpx.FileSystemReader),
        ("stock DCP + ZStandard", lambda p: dcp.FileSystemWriter(p, _extensions=[ZStandard()]), dcp.FileSystemReader),
    ]
    out = []
    for name, writer, reader in configs:
        path = directory / ("slice-" + name.replace(" ", "_").replace("+", "_"))
        shutil.rmtree(path, ignore_errors=True)
        dcp.save({FQN: tensor}, storage_writer=writer(path))
        stored = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != ".metadata")
        full, full_read, full_s = _read(lambda: reader(path), (0, rows), tensor)
        got, part_read, part_s = _read(lambda: reader(path), part, tensor)
        if not (torch.equal(full, tensor) and torch.equal(got, tensor[part[0]:part[1]])):
            raise SystemExit(f"{name}: the sliced read returned the wrong values")
        del full, got
        chunks = chunk_count(tensor.nbytes, DEFAULT_CHUNK_SIZE) if name.startswith("dcpx") else None
        out.append(SliceRead(name, stored, full_read, full_s, part_read, part_s, (part[1] - part[0]) / rows, chunks))
        shutil.rmtree(path, ignore_errors=True)
    return out
