"""Chunk-level round trips: every dtype, every grouping, awkward sizes, stored-raw fallbacks."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pytest
import torch
import zstandard

import dcpx
from dcpx_zstd import LAYOUTS, ZstdTransform, auto_grouping
from dcpx_zstd.grouping import BLOCK
from dcpx_zstd.packing import MIN_PLANE, pack, packable, packed_size, unpack

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64,
          torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
          torch.complex64, torch.complex128]
INTS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", FLOATS + INTS, ids=str)
def test_every_dtype_round_trips_with_auto_grouping(dtype: torch.dtype, weights: Callable[..., bytes],
                                                    roundtrip: Callable[..., bytes]) -> None:
    data = weights(3 * BLOCK + 17, dtype)  # several blocks, odd element count
    encoded = roundtrip(data, dtype)
    if dtype.is_floating_point or dtype.is_complex:
        assert len(encoded) < 0.95 * len(data), "weight-like floats must compress"


@pytest.mark.parametrize("dtype, group", [
    (torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
    (torch.float64, "float64"), (torch.complex64, "float32"), (torch.float8_e4m3fn, "none"),
    (torch.int16, "int16"), (torch.int32, "int32"), (torch.int64, "int64"), (torch.uint32, "int32"),
    (torch.int8, "none"), (torch.uint8, "none"), (torch.bool, "none"), (None, "none"),
])
def test_auto_grouping_picks_layout_by_dtype(dtype: torch.dtype | None, group: str, chunk_info) -> None:
    t = ZstdTransform().for_item(chunk_info(64, dtype).item)
    assert t.get_descriptor() == f"stream.zstd/1;group={group}"
    assert auto_grouping(dtype)[0] == group


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 1000, 4099, 8 * BLOCK + 5])
def test_every_layout_round_trips_any_size(layout: str, size: int, roundtrip: Callable[..., bytes],
                                            rng: np.random.Generator) -> None:
    # half weight-like floats, half random bytes: exercises compressed and stored planes
    floats = (rng.standard_normal(size // 8 + 1).astype(np.float32) * 0.05).tobytes()
    data = (floats + rng.integers(0, 256, size, dtype=np.uint8).tobytes())[:size]
    roundtrip(data, None, ZstdTransform(grouping=layout))


def test_incompressible_chunk_is_stored_raw(roundtrip: Callable[..., bytes]) -> None:
    data = os.urandom(1 << 20)
    for dtype in (torch.float32, torch.bfloat16, torch.uint8, None):
        encoded = roundtrip(data, dtype)
        assert encoded[0] == 0 and encoded[1:] == data  # kind byte "stored", then the chunk


def test_raw_threshold_controls_storing(weights: Callable[..., bytes], roundtrip: Callable[..., bytes]) -> None:
    data = weights(1 << 16, torch.float32)
    assert roundtrip(data, torch.float32)[0] == 1  # planes
    # ratio is about 0.82, so a threshold below that stores the chunk as it is
    assert roundtrip(data, torch.float32, ZstdTransform(raw_threshold=0.5))[0] == 0


def test_values_above_two_use_a_fallback_for_the_sign_plane(roundtrip: Callable[..., bytes]) -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(1 << 16, generator=g) * 100  # exponent MSB set for many values: not packable
    t[::7] = float("inf")
    t[::11] = float("nan")
    t[::13] = -0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        roundtrip(t.to(dtype).view(torch.uint8).numpy().tobytes(), dtype)


def test_special_patterns_round_trip(roundtrip: Callable[..., bytes]) -> None:
    for data in (bytes(1 << 20), b"\xff" * 100_003, bytes(range(256)) * 999):
        for dtype in (torch.float32, torch.bfloat16, torch.int64, None):
            encoded = roundtrip(data, dtype)
            assert len(encoded) < len(data) // 2


@pytest.mark.parametrize("level", [-50, -1, 1, 3, 9, 19])
def test_levels_round_trip(level: int, weights: Callable[..., bytes], roundtrip: Callable[..., bytes]) -> None:
    for dtype in (torch.bfloat16, torch.int32):
        roundtrip(weights(20_000, dtype), dtype, ZstdTransform(level=level))


def test_grouping_beats_plain_zstd_on_weights(weights: Callable[..., bytes], roundtrip: Callable[..., bytes]) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        data = weights(1 << 18, dtype, scale=0.05)
        grouped = len(roundtrip(data, dtype))
        plain = len(roundtrip(data, dtype, ZstdTransform(grouping="none")))
        assert grouped < 0.93 * plain


def test_auto_grouping_beats_plain_zstd_on_integer_ids(rng: np.random.Generator,
                                                      roundtrip: Callable[..., bytes]) -> None:
    for dtype, high in ((torch.int64, 50_000), (torch.int32, 50_000), (torch.int16, 300)):
        data = torch.from_numpy(rng.integers(0, high, 1 << 17)).to(dtype).view(torch.uint8).numpy().tobytes()
        grouped = len(roundtrip(data, dtype))
        plain = len(roundtrip(data, dtype, ZstdTransform(grouping="none")))
        assert grouped < 0.9 * plain, dtype


def test_explicit_grouping_by_dtype(chunk_info) -> None:
    item = chunk_info(16, torch.int8).item
    assert ZstdTransform(grouping=torch.bfloat16).for_item(item).get_descriptor() == "stream.zstd/1;group=bfloat16"
    assert ZstdTransform(grouping="bfloat16").get_descriptor() == "stream.zstd/1;group=bfloat16"
    assert ZstdTransform(grouping=torch.complex64).get_descriptor() == "stream.zstd/1;group=float32"
    assert ZstdTransform(grouping="float8_e4m3fn").get_descriptor() == "stream.zstd/1;group=none"
    assert ZstdTransform(grouping="int32").get_descriptor() == "stream.zstd/1;group=int32"
    assert ZstdTransform(grouping="none").for_item(chunk_info(16, torch.float32).item).get_descriptor() \
        == "stream.zstd/1;group=none"


def test_one_instance_serves_many_threads(weights: Callable[..., bytes], chunk_info) -> None:
    transform = ZstdTransform()
    jobs = []
    for k, dtype in enumerate([torch.float32, torch.bfloat16, torch.int64, torch.float16] * 6):
        data = weights(50_000 + k, dtype, seed=k)
        jobs.append((data, chunk_info(len(data), dtype, fqn=f"t{k}")))

    def one(job: tuple[bytes, dcpx.ChunkInfo]) -> bool:
        data, chunk = job
        t = transform.for_item(chunk.item)
        for _ in range(3):
            out = t.decode(memoryview(bytes(t.encode(memoryview(data), chunk))), chunk, len(data))
            if bytes(memoryview(out).cast("B")) != data:
                return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, jobs))


def test_torch_format_chunk_is_one_plain_zstd_frame(weights: Callable[..., bytes], roundtrip: Callable[..., bytes]) -> None:
    data = weights(10_000, torch.float32)
    encoded = roundtrip(data, torch.float32, ZstdTransform(torch_format=True))
    assert zstandard.ZstdDecompressor().decompress(encoded) == data
    assert zstandard.frame_content_size(encoded) == len(data)


def test_packing_round_trips_and_refuses_set_bits(rng: np.random.Generator) -> None:
    for n in (8, 9, 15, 16, 1000, MIN_PLANE, MIN_PLANE + 7, 3 * (1 << 15) * 8 + 5):
        plane = (rng.integers(0, 128, n, dtype=np.uint8) * 2).astype(np.uint8)
        assert packable(plane) == (n >= MIN_PLANE)
        packed = pack(plane)
        assert packed.size == packed_size(n)
        out = np.empty(n, dtype=np.uint8)
        unpack(packed, n, out)
        assert np.array_equal(out, plane)
    odd = np.zeros(MIN_PLANE, dtype=np.uint8)
    odd[-1] = 1
    assert not packable(odd)
