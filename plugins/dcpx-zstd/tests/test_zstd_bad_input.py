"""Hostile and damaged input: every failure is a dcpx error that names the item, and no
frame header can make the decoder allocate more than the recorded chunk size."""

from __future__ import annotations

import io
import struct
from typing import Callable

import numpy as np
import pytest
import torch
import zstandard

import dcpx
from dcpx_zstd import ZstdTransform

FQN = "encoder.layer.3.attention.weight"
TERA = 1 << 40


def encode(transform: ZstdTransform, data: bytes, chunk: dcpx.ChunkInfo) -> tuple[ZstdTransform, bytes]:
    t = transform.for_item(chunk.item)
    return t, bytes(t.encode(memoryview(data), chunk))


def forge_content_size(frame: bytes, claimed: int) -> bytes:
    """``frame`` with its header rewritten to claim ``claimed`` bytes of content."""
    header = zstandard.frame_header_size(frame)
    descriptor = 0xE0 | (frame[4] & 0x04)  # 8-byte content size, single segment, keep checksum flag
    return frame[:4] + bytes([descriptor]) + struct.pack("<Q", claimed) + frame[header:]


def planes(encoded: bytes, count: int) -> list[tuple[int, int, int]]:
    """(codec, offset, length) of each plane of a dcpx-format chunk."""
    out, pos = [], 1 + 9 * count
    for k in range(count):
        codec, length = struct.unpack_from("<BQ", encoded, 1 + 9 * k)
        out.append((codec, pos, length))
        pos += length
    return out


@pytest.fixture
def case(weights: Callable[..., bytes], chunk_info) -> tuple[bytes, dcpx.ChunkInfo]:
    data = weights(100_000, torch.float32)
    return data, chunk_info(len(data), torch.float32, fqn=FQN, index=2, count=5)


@pytest.mark.parametrize("torch_format", [False, True], ids=["dcpx", "torch"])
def test_corrupted_compressed_bytes(case, torch_format: bool) -> None:
    data, chunk = case
    t, encoded = encode(ZstdTransform(torch_format=torch_format), data, chunk)
    start = 200 if torch_format else next(off for codec, off, _ in planes(encoded, 4) if codec == 1)
    for pos in (start + 10, start + 100, len(encoded) - 2):
        bad = bytearray(encoded)
        bad[pos] ^= 0x5A
        with pytest.raises(dcpx.DcpxError, match=FQN):
            t.decode(memoryview(bytes(bad)), chunk, len(data))


@pytest.mark.parametrize("torch_format", [False, True], ids=["dcpx", "torch"])
@pytest.mark.parametrize("keep", [0, 1, 5, 12, 40, 0.5, -1])
def test_truncated_chunk(case, torch_format: bool, keep: float) -> None:
    data, chunk = case
    t, encoded = encode(ZstdTransform(torch_format=torch_format), data, chunk)
    cut = int(len(encoded) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(encoded) + keep)
    with pytest.raises(dcpx.DcpxError, match=FQN):
        t.decode(memoryview(encoded[:cut]), chunk, len(data))


def test_trailing_bytes_are_refused(case) -> None:
    data, chunk = case
    for torch_format in (False, True):
        t, encoded = encode(ZstdTransform(torch_format=torch_format), data, chunk)
        with pytest.raises(dcpx.DcpxError, match=FQN):
            t.decode(memoryview(encoded + b"\x00junk"), chunk, len(data))


@pytest.mark.parametrize("torch_format", [False, True], ids=["dcpx", "torch"])
def test_forged_frame_size_is_refused_before_allocation(case, torch_format: bool) -> None:
    data, chunk = case
    t, encoded = encode(ZstdTransform(torch_format=torch_format, raw_threshold=1.0), data, chunk)
    if torch_format:
        forged = forge_content_size(encoded, TERA)
    else:
        codec, off, length = next(p for p in planes(encoded, 4) if p[0] == 1)
        frame = forge_content_size(encoded[off:off + length], TERA)
        header = bytearray(encoded[: 1 + 9 * 4])
        k = [p[1] for p in planes(encoded, 4)].index(off)
        struct.pack_into("<BQ", header, 1 + 9 * k, 1, len(frame))
        forged = bytes(header) + encoded[1 + 9 * 4:off] + frame + encoded[off + length:]
    with pytest.raises(dcpx.IntegrityError, match=rf"{FQN}.*claims {TERA} bytes"):
        t.decode(memoryview(forged), chunk, len(data))


def test_decompression_bomb_stops_at_the_recorded_size(chunk_info) -> None:
    """Frames that state no size (torch's format) and expand far beyond the recorded size:
    decoding stops one byte past it instead of inflating 4 GiB."""
    block = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(block, closefd=False) as w:
        w.write(bytes(1 << 17))
    bomb = block.getvalue() * (1 << 15)  # ~4 GiB of zeros from well under 1 MiB
    chunk = chunk_info(1 << 20, torch.float32, fqn=FQN)
    t = ZstdTransform.from_params(1, {})
    with pytest.raises(dcpx.IntegrityError, match=f"{FQN}.*more than"):
        t.decode(memoryview(bomb), chunk, 1 << 20)
    reader = t.transform_from(io.BytesIO(bomb))
    assert len(reader.read(1 << 20)) <= 1 << 20  # the stream API decodes only what is asked for
    reader.close()


def test_raw_size_mismatch(case, chunk_info) -> None:
    data, chunk = case
    for torch_format in (False, True):
        t, encoded = encode(ZstdTransform(torch_format=torch_format), data, chunk)
        for size in (len(data) - 1, len(data) + 1, len(data) - 4, len(data) * 2, 0):
            with pytest.raises(dcpx.DcpxError, match=FQN):
                t.decode(memoryview(encoded), chunk_info(size, torch.float32, fqn=FQN), size)
    # a stored (incompressible) chunk too
    raw = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    t, encoded = encode(ZstdTransform(), raw, chunk_info(len(raw), None, fqn=FQN))
    assert encoded[0] == 0
    with pytest.raises(dcpx.IntegrityError, match=FQN):
        t.decode(memoryview(encoded), chunk_info(4999, None, fqn=FQN), 4999)


def test_unknown_kind_and_codec_bytes(case) -> None:
    data, chunk = case
    t, encoded = encode(ZstdTransform(), data, chunk)
    with pytest.raises(dcpx.CheckpointFormatError, match=f"{FQN}.*unknown chunk kind 7"):
        t.decode(memoryview(b"\x07" + encoded[1:]), chunk, len(data))
    bad = bytearray(encoded)
    bad[1] = 9  # codec of plane 0
    with pytest.raises(dcpx.CheckpointFormatError, match=f"{FQN}.*unknown codec 9"):
        t.decode(memoryview(bytes(bad)), chunk, len(data))
    bad = bytearray(encoded)
    struct.pack_into("<Q", bad, 2, struct.unpack_from("<Q", bad, 2)[0] + 1)  # length of plane 0
    with pytest.raises(dcpx.CheckpointFormatError, match=f"{FQN}.*header accounts for"):
        t.decode(memoryview(bytes(bad)), chunk, len(data))


def test_a_frame_in_the_wrong_plane_is_caught(case) -> None:
    data, chunk = case
    t, encoded = encode(ZstdTransform(), data, chunk)
    with pytest.raises(dcpx.DcpxError, match=FQN):
        t.decode(memoryview(b"\x01" + b"\x01" + struct.pack("<Q", 3) + b"abc" + encoded[10:]), chunk, len(data))
    with pytest.raises(dcpx.CheckpointFormatError, match=f"{FQN}.*not a zstd frame"):
        ZstdTransform.from_params(1, {}).decode(memoryview(b"not zstd at all"), chunk, len(data))


@pytest.mark.parametrize("text, match", [
    ("stream.zstd/1;group=float32;level=3", r"unknown parameters \['level'\]"),
    ("stream.zstd/1;mode=fast", r"unknown parameters \['mode'\]"),
    ("stream.zstd/1;group=half", "unknown byte grouping 'half'"),
    ("stream.zstd/1;group=float8_e4m3fn", "unknown byte grouping 'float8_e4m3fn'"),
    ("stream.zstd/1;group=auto", "unknown byte grouping 'auto'"),
    ("stream.zstd/2", "unsupported version 2"),
    ("stream.zstd/2;group=float32", "unsupported version 2"),
])
def test_strict_descriptors(text: str, match: str) -> None:
    with pytest.raises(dcpx.DescriptorError, match=match):
        dcpx.plugin_host().from_descriptor(text)


@pytest.mark.parametrize("options", [
    {"level": 23}, {"level": 2.5}, {"level": True}, {"level": "3"}, {"grouping": "bytes"},
    {"grouping": "float128"}, {"grouping": 4}, {"raw_threshold": 0}, {"raw_threshold": 1.5},
    {"raw_threshold": "0.9"}, {"compression": "max"}, {"torch_format": True, "grouping": "float32"},
])
def test_bad_options(options: dict) -> None:
    with pytest.raises(dcpx.ConfigError):
        dcpx.transform("zstd", **options)


@pytest.mark.parametrize("cut", [0, 3, 6, 20, -5, -1])
def test_stream_reader_reports_truncation(weights: Callable[..., bytes], cut: int) -> None:
    t = ZstdTransform(torch_format=True)
    sink = io.BytesIO()
    sink.close = lambda: None  # type: ignore[method-assign]
    with t.transform_to(sink) as w:
        w.write(weights(50_000, torch.float32))
    stream = sink.getvalue()
    with pytest.raises(dcpx.CheckpointFormatError, match="truncated|empty"):
        t.transform_from(io.BytesIO(stream[:cut])).read()


def test_stream_reader_reports_corruption_and_garbage(weights: Callable[..., bytes]) -> None:
    t = ZstdTransform(torch_format=True)
    stream = zstandard.ZstdCompressor(write_checksum=True).compress(weights(50_000, torch.float32))
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(dcpx.CheckpointFormatError, match="stream.zstd"):
        t.transform_from(io.BytesIO(bytes(bad))).read()
    with pytest.raises(dcpx.CheckpointFormatError, match="stream.zstd"):
        t.transform_from(io.BytesIO(stream + b"garbage!")).read()
