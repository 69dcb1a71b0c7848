"""Chaining: order on disk and in metadata, per-item context, chunking and partial decodes."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcpx
from checkpoint_helpers import assert_same, blank, storage_items
from dcpx import framing
from dcpx.pipeline import BoundChain, decode_range, encode_chunk, iter_chunks
from dcpx.transform import ChunkInfo, ItemInfo

CHUNK = 4096
XOR = "stream.xor@test/1;seed=90"
REV = "stream.rev@test/1"
TRAILER = "stream.trailer@test/1"
DESC = {"xor": XOR, "rev": REV, "trailer": TRAILER}


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "big.weight": torch.randn(50, 100, generator=g),  # 20000 bytes: 5 chunks
        "small": torch.arange(7, dtype=torch.int16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "nested": {"bias": torch.randn(9, generator=g), "steps": [1, 2, 3]},
        "note": "hello",
    }


def _frame_index(directory: Path, info: Any) -> framing.FrameIndex:
    blob = (directory / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    footer = blob[-framing.FOOTER.size:]
    index_len = framing.parse_footer(footer, len(blob), "test")
    body = blob[len(blob) - framing.FOOTER.size - index_len:len(blob) - framing.FOOTER.size]
    layers = len(info.transform_descriptors) - 1
    return framing.parse_index(footer, body, len(blob), layers, "test", None, 1 << 30)


@pytest.mark.parametrize(
    "chain",
    [["xor", "rev"], ["rev", "xor"], ["trailer", "rev", "xor"], ["xor", "trailer", "rev"], ["rev"]],
    ids="-".join,
)
def test_chain_round_trip_and_metadata_order(toys: Any, tmp_path: Path, chain: list[str]) -> None:
    sd = _state()
    dcpx.save(sd, tmp_path, transforms=chain, chunk_size=CHUNK)
    out = blank(sd)
    dcpx.load(out, tmp_path)
    assert_same(out, sd)
    metadata = dcpx.reader.load_metadata(str(tmp_path))[0]
    expected = ["frame@dcpx/1", *[DESC[n] for n in reversed(chain)]]
    for fqn, info in storage_items(metadata).items():
        if fqn == "empty":  # no bytes to transform: stored raw or framed, both fine
            assert info.transform_descriptors in (expected, ["raw@dcpx/1"]), fqn
            continue
        assert info.transform_descriptors == expected, fqn


def test_order_on_disk_is_the_listed_order(toys: Any, tmp_path: Path) -> None:
    """[xor, rev] stores rev(xor(chunk)); [rev, xor] stores xor(rev(chunk)); they differ."""
    sd = {"t": torch.arange(3000, dtype=torch.int32)}  # 12000 bytes: 3 chunks
    raw = memoryview(sd["t"].numpy().tobytes())
    stored = {}
    for chain in (["xor", "rev"], ["rev", "xor"]):
        d = tmp_path / "-".join(chain)
        dcpx.save(sd, d, transforms=chain, chunk_size=CHUNK)
        info = storage_items(dcpx.reader.load_metadata(str(d))[0])["t"]
        blob = (d / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
        index = _frame_index(d, info)
        assert index.count == 3
        offsets = index.stored_offsets()
        stored[tuple(chain)] = [blob[offsets[k]:offsets[k] + index.layer_sizes[k][-1]] for k in range(3)]
    item = ItemInfo("t", len(raw))
    x, r = toys.XorTransform(), toys.RevTransform()
    for k, offset, size in iter_chunks(len(raw), CHUNK):
        chunk = ChunkInfo(item, k, 3, offset, size)
        piece = raw[offset:offset + size]
        assert stored[("xor", "rev")][k] == r.encode(memoryview(x.encode(piece, chunk)), chunk)
        assert stored[("rev", "xor")][k] == x.encode(memoryview(r.encode(piece, chunk)), chunk)
    assert stored[("xor", "rev")] != stored[("rev", "xor")]


def test_inner_descriptors_seen_by_each_layer(toys: Any, tmp_path: Path) -> None:
    sd = {"t": torch.randn(3000)}
    dcpx.save(sd, tmp_path, transforms=["xor", "trailer", "rev"], chunk_size=CHUNK)
    dcpx.load(blank(sd), tmp_path)
    rec = toys.RECORD
    assert {c.inner for c in rec.of("stream.xor@test", "encode")} == {()}
    assert {c.inner for c in rec.of("stream.xor@test", "decode_into")} == {()}  # a full load: all in place
    assert not rec.of("stream.xor@test", "decode")
    for op in ("encode", "decode"):
        assert {c.inner for c in rec.of("stream.trailer@test", op)} == {(XOR,)}
        assert {c.inner for c in rec.of("stream.rev@test", op)} == {(XOR, TRAILER)}


def test_per_item_context(toys: Any, tmp_path: Path) -> None:
    sd = {
        "model.w": torch.randn(40, 60),  # 9600 bytes -> 3 chunks
        "model.idx": torch.arange(10, dtype=torch.int64),
        "scalar": torch.tensor(1.0),
        "extra": {"epoch": 3},
    }
    dcpx.save(sd, tmp_path, transforms=["probe"], chunk_size=CHUNK)
    rec = toys.RECORD
    metadata = dcpx.reader.load_metadata(str(tmp_path))[0]
    save_id = metadata.storage_meta.save_id
    assert save_id

    seen = {i.fqn: i for i in rec.items}
    assert seen["model.w"].dtype == torch.float32 and seen["model.w"].shape == (40, 60)
    assert seen["model.w"].nbytes == 9600 and seen["model.w"].offsets == (0, 0)
    assert seen["model.idx"].dtype == torch.int64 and seen["model.idx"].shape == (10,)
    assert seen["scalar"].shape == () and seen["scalar"].nbytes == 4
    assert seen["extra.epoch"].dtype is None and seen["extra.epoch"].shape is None
    assert {i.checkpoint_id for i in rec.items} == {save_id}

    # for_item's per-item params land in that item's descriptor
    items = storage_items(metadata)
    assert items["model.w"].transform_descriptors[1] == "stream.probe@test/1;kind=float"
    assert items["model.idx"].transform_descriptors[1] == "stream.probe@test/1;kind=other"
    assert items["extra.epoch"].transform_descriptors[1] == "stream.probe@test/1;kind=bytes"

    enc = sorted((c.index, c.count, c.offset, c.size) for c in rec.of(op="encode", fqn="model.w"))
    assert enc == [(0, 3, 0, 4096), (1, 3, 4096, 4096), (2, 3, 8192, 1408)]
    assert {c.descriptor for c in rec.of(op="encode", fqn="model.w")} == {"stream.probe@test/1;kind=float"}

    rec.clear()
    out = blank(sd)
    dcpx.load(out, tmp_path)
    assert_same(out, sd)
    dec = rec.of(op="decode", fqn="model.w")
    assert sorted((c.index, c.count, c.offset, c.size) for c in dec) == enc
    for c in dec:
        assert (c.dtype, c.shape, c.offsets, c.nbytes) == (torch.float32, (40, 60), (0, 0), 9600)
        assert c.checkpoint_id == save_id
        assert c.descriptor == "stream.probe@test/1;kind=float"
    (byte_call,) = rec.of(op="decode", fqn="extra.epoch")
    assert byte_call.dtype is None and byte_call.checkpoint_id == save_id and byte_call.nbytes > 0


def test_items_larger_than_chunk_size_are_split(toys: Any, tmp_path: Path) -> None:
    sd = {"w": torch.randn(5000), "s": torch.randn(10)}  # 20000 bytes and 40 bytes
    dcpx.save(sd, tmp_path, transforms=["trailer", "xor"], chunk_size=CHUNK)
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    index = _frame_index(tmp_path, items["w"])
    assert (index.raw_size, index.chunk_size, index.count, index.layers) == (20000, CHUNK, 5, 2)
    for k in range(5):
        start, end = index.raw_span(k)
        n = end - start
        assert index.layer_sizes[k] == (n + 12, n + 12)
    small = _frame_index(tmp_path, items["s"])
    assert small.count == 1 and small.layer_sizes == ((52, 52),)
    out = blank(sd)
    dcpx.load(out, tmp_path)
    assert_same(out, sd)


def test_chunk_size_default_is_one_chunk_for_small_items(toys: Any, tmp_path: Path) -> None:
    sd = {"w": torch.randn(5000)}
    dcpx.save(sd, tmp_path, transforms=["xor"])
    info = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])["w"]
    assert _frame_index(tmp_path, info).count == 1


# -- partial decodes --------------------------------------------------------------------------------


def _framed_item(toys: Any, raw: bytes, chunk_size: int) -> tuple[framing.FrameIndex, BoundChain, ItemInfo, bytes]:
    item = ItemInfo("part", len(raw), torch.uint8, (len(raw),), (0,), "cid")
    chain = BoundChain.for_item([toys.XorTransform(), toys.TrailerTransform(), toys.RevTransform()], item)
    pieces, sizes = [], []
    count = math.ceil(len(raw) / chunk_size)
    for k, offset, size in iter_chunks(len(raw), chunk_size):
        enc = encode_chunk(chain, memoryview(raw)[offset:offset + size], ChunkInfo(item, k, count, offset, size))
        pieces.append(bytes(enc.data))
        sizes.append(enc.layer_sizes)
    index = framing.FrameIndex(len(raw), chunk_size, len(chain.transforms), tuple(sizes))
    return index, chain, item, b"".join(pieces)


@pytest.mark.parametrize("threads", [0, 3])
@pytest.mark.parametrize(
    "lo, hi, chunks",
    [(0, 10500, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}), (0, 1, {0}), (999, 1001, {0, 1}), (1000, 2000, {1}),
     (2500, 7100, {2, 3, 4, 5, 6, 7}), (10499, 10500, {10}), (4000, 4000, set())],
)
def test_decode_range_touches_only_overlapping_chunks(toys: Any, threads: int, lo: int, hi: int,
                                                      chunks: set[int]) -> None:
    raw = os.urandom(10500)
    index, chain, item, stored = _framed_item(toys, raw, 1000)
    reads: list[tuple[int, int]] = []

    def read(offset: int, size: int) -> bytes:
        reads.append((offset, size))
        return stored[offset:offset + size]

    out = bytearray(hi - lo)
    toys.RECORD.clear()
    pool = ThreadPoolExecutor(threads) if threads else None
    try:
        decode_range(index, chain, item, read, lo, hi, memoryview(out), pool)
    finally:
        if pool:
            pool.shutdown()
    assert bytes(out) == raw[lo:hi]
    for name in ("stream.xor@test", "stream.trailer@test", "stream.rev@test"):
        decoded = sorted(c.index for op in ("decode", "decode_into") for c in toys.RECORD.of(name, op))
        assert decoded == sorted(chunks), name
    # the innermost layer decodes in place exactly the chunks that lie wholly inside the range
    whole = {k for k in chunks if lo <= k * 1000 and min(10500, (k + 1) * 1000) <= hi}
    assert sorted(c.index for c in toys.RECORD.of("stream.xor@test", "decode_into")) == sorted(whole)
    assert not toys.RECORD.of("stream.trailer@test", "decode_into")
    offsets = index.stored_offsets()
    assert sorted(reads) == sorted((offsets[k], index.layer_sizes[k][-1]) for k in chunks)


class _Planner:
    """The two planner calls ``read_data`` makes for tensor items."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest
        self.committed: list[ReadItem] = []

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.dest

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        self.committed.append(req)


def _read_region(path: Path, fqn: str, full: torch.Tensor, offsets: tuple[int, int],
                 lengths: tuple[int, int]) -> torch.Tensor:
    reader = dcpx.FileSystemReader(path)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    dest = torch.zeros(lengths, dtype=full.dtype)
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex(fqn, (0, 0)),
        dest_offsets=torch.Size([0, 0]),
        storage_index=MetadataIndex(fqn, (0, 0)),
        storage_offsets=torch.Size(offsets),
        lengths=torch.Size(lengths),
    )
    planner = _Planner(dest)
    reader.read_data(LoadPlan([req]), planner).wait()  # type: ignore[arg-type]
    assert planner.committed == [req]
    return dest


def test_reader_partial_read_decodes_only_needed_chunks(toys: Any, tmp_path: Path) -> None:
    full = torch.randn(64, 256)  # 1 KiB rows, 16 chunks of 4 KiB
    dcpx.save({"w": full}, tmp_path, transforms=["xor", "rev"], chunk_size=CHUNK)
    toys.RECORD.clear()
    got = _read_region(tmp_path, "w", full, (10, 0), (5, 256))  # bytes 10240..15360 -> chunks 2, 3
    assert torch.equal(got, full[10:15])
    assert sorted(c.index for c in toys.RECORD.of("stream.xor@test", "decode")) == [2, 3]
    assert sorted(c.index for c in toys.RECORD.of("stream.rev@test", "decode")) == [2, 3]

    toys.RECORD.clear()
    got = _read_region(tmp_path, "w", full, (60, 0), (4, 256))  # last chunk only
    assert torch.equal(got, full[60:64])
    assert [c.index for c in toys.RECORD.of("stream.xor@test", "decode_into")] == [15]  # whole: in place
    assert not toys.RECORD.of("stream.xor@test", "decode")


def test_reader_column_slice_is_correct(toys: Any, tmp_path: Path) -> None:
    full = torch.randn(64, 256)
    dcpx.save({"w": full}, tmp_path, transforms=["xor"], chunk_size=CHUNK)
    got = _read_region(tmp_path, "w", full, (3, 100), (4, 50))
    assert torch.equal(got, full[3:7, 100:150])
