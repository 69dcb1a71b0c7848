"""Per-chunk and per-item digests for the manifest, and the keyless verify entry point."""

from __future__ import annotations

from typing import Callable

import pytest
from dcpx.transform import ChunkInfo, ItemInfo

import dcpx
from dcpx_checksum import ALGORITHMS, ChecksumMismatchError, ChecksumTransform

MakeChunk = Callable[..., ChunkInfo]
MakePayload = Callable[..., bytes]


def _encode_item(t: ChecksumTransform, data: bytes, chunk_size: int, fqn: str,
                 chunk_info: MakeChunk) -> tuple[list[bytes], list[str]]:
    count = -(-len(data) // chunk_size)
    encoded, records = [], []
    for k in range(count):
        piece = data[k * chunk_size:(k + 1) * chunk_size]
        chunk = chunk_info(len(piece), fqn=fqn, index=k, count=count)
        out = t.encode(memoryview(piece), chunk)
        encoded.append(out)
        records.append(t.chunk_record(memoryview(out), chunk))
    return encoded, records


def test_chunk_record_is_the_chunk_digest(algorithm: str, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    data = payload(12345)
    chunk = chunk_info(len(data))
    record = t.chunk_record(memoryview(t.encode(memoryview(data), chunk)), chunk)
    assert record == ALGORITHMS[algorithm].digest(memoryview(data)).hex()


def test_item_record_combines_chunk_digests_in_order(
    algorithm: str, chunk_info: MakeChunk, payload: MakePayload
) -> None:
    t = ChecksumTransform(algorithm)
    item = ItemInfo("model.w", 10_000)
    _, records = _encode_item(t, payload(10_000), 4096, "model.w", chunk_info)
    assert len(records) == 3
    combined = t.item_record(item, records)
    alg = ALGORITHMS[algorithm]
    assert combined == alg.digest(memoryview(b"".join(bytes.fromhex(r) for r in records))).hex()
    assert t.item_record(item, [records[1], records[0], records[2]]) != combined
    assert t.item_record(item, records[:2]) != combined
    assert t.item_record(ItemInfo("empty", 0), []) == alg.digest(memoryview(b"")).hex()


def test_item_record_rejects_foreign_records() -> None:
    t = ChecksumTransform("crc32c")
    for bad in (None, "xyz", "00" * 16):
        with pytest.raises(dcpx.CheckpointFormatError, match="'w' chunk 0"):
            t.item_record(ItemInfo("w", 1), [bad])


def test_verify_walks_an_item_without_keeping_payloads(
    algorithm: str, chunk_info: MakeChunk, payload: MakePayload
) -> None:
    """What a ``dcpx verify`` command does: check each chunk, then the item digest."""
    t = ChecksumTransform(algorithm)
    data = payload(9000, seed=5)
    item = ItemInfo("opt.step", 9000)
    encoded, records = _encode_item(t, data, 4000, "opt.step", chunk_info)
    recorded = t.item_record(item, records)
    sizes = [4000, 4000, 1000]
    checked = [t.verify(memoryview(e), chunk_info(s, fqn="opt.step", index=k, count=3), s)
               for k, (e, s) in enumerate(zip(encoded, sizes))]
    assert checked == records
    t.verify_item(item, checked, recorded)

    with pytest.raises(ChecksumMismatchError, match=r"'opt\.step' chunk 1") as info:
        bad = bytearray(encoded[1])
        bad[7] ^= 0xFF
        t.verify(memoryview(bad), chunk_info(4000, fqn="opt.step", index=1, count=3), 4000)
    assert info.value.expected == records[1]

    # chunks intact on their own but swapped: only the item digest notices
    with pytest.raises(ChecksumMismatchError, match=r"item 'opt\.step'.*item digest mismatch") as info:
        t.verify_item(item, [checked[1], checked[0], checked[2]], recorded)
    assert info.value.expected == recorded and info.value.actual in str(info.value)
