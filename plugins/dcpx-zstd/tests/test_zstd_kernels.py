"""The compiled kernels against the numpy code, byte for byte.

The on-disk format is whatever the numpy code in ``grouping`` and ``packing`` writes, so
the kernels are checked against it on every layout and rotation, on sizes around every
block and vector boundary, on random bytes (every bit pattern, NaNs included) as well as
weight-like values, and on buffers at odd addresses.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from dcpx_zstd import grouping, packing
from dcpx_zstd.grouping import LAYOUTS, Layout

kernels = pytest.importorskip("dcpx_zstd._kernels", reason="compiled kernels not built")

GROUPED = [layout for layout in LAYOUTS.values() if layout.width > 1]
WORDS = [0, 1, 7, 63, 64, 65, 4095, 3 * grouping.BLOCK + 5]
PLANES = [0, 63, 64, 65, 1 << 14, 64 * 259 + 13, (1 << 20) + 13]


def _data(layout: Layout, words: int, kind: str, weights: Callable[..., bytes], rng: np.random.Generator) -> bytes:
    if kind == "random":
        return rng.integers(0, 256, words * layout.width, dtype=np.uint8).tobytes()
    return weights(words, getattr(torch, layout.name), seed=words)


def _planes(layout: Layout, words: int) -> list[np.ndarray]:
    return [np.full(words, 0xA5, dtype=np.uint8) for _ in range(layout.width)]


def _odd(size: int, offset: int) -> memoryview:
    """A writable buffer of ``size`` bytes that starts ``offset`` bytes into an allocation."""
    return memoryview(bytearray(size + offset))[offset:]


def _same(planes, expected) -> bool:
    return len(planes) == len(expected) and all(bytes(a) == bytes(b) for a, b in zip(planes, expected))


@pytest.mark.parametrize("kind", ["random", "weights"])
@pytest.mark.parametrize("words", WORDS)
@pytest.mark.parametrize("layout", GROUPED, ids=lambda layout: layout.name)
def test_split_join_match_numpy(layout: Layout, words: int, kind: str, weights, rng) -> None:
    data = _data(layout, words, kind, weights, rng)
    expected, tail = layout.split(memoryview(data), compiled=False)
    assert len(tail) == 0
    planes = _planes(layout, words)
    kernels.split(data, layout.width, layout.rotate, planes)
    assert _same(planes, expected)

    out = np.full(len(data), 0x5A, dtype=np.uint8)
    kernels.join(planes, layout.width, layout.rotate, out)
    assert out.tobytes() == data
    reference = np.empty(len(data), dtype=np.uint8)
    layout.join(expected, b"", reference, compiled=False)
    assert reference.tobytes() == data


@pytest.mark.parametrize("rotate", range(16))
@pytest.mark.parametrize("width", [2, 4, 8])
def test_every_rotation(width: int, rotate: int, rng) -> None:
    """Rotations without a specialised loop take the generic one; same result."""
    layout = Layout("probe", width, rotate=rotate)
    data = rng.integers(0, 256, 1000 * width, dtype=np.uint8).tobytes()
    expected, _ = layout.split(memoryview(data), compiled=False)
    planes = _planes(layout, 1000)
    kernels.split(data, width, rotate, planes)
    assert _same(planes, expected)
    out = bytearray(len(data))
    kernels.join(planes, width, rotate, out)
    assert bytes(out) == data


@pytest.mark.parametrize("offset", range(1, 8))
@pytest.mark.parametrize("layout", GROUPED, ids=lambda layout: layout.name)
def test_unaligned_buffers(layout: Layout, offset: int, rng) -> None:
    words = 4099
    src = _odd(words * layout.width, offset)
    src[:] = rng.integers(0, 256, len(src), dtype=np.uint8).tobytes()
    expected, _ = layout.split(memoryview(bytes(src)), compiled=False)
    planes = [_odd(words, (offset + k) % 8) for k in range(layout.width)]
    kernels.split(src, layout.width, layout.rotate, planes)
    assert _same(planes, expected)
    out = _odd(len(src), 8 - offset)
    kernels.join([bytes(p) for p in planes], layout.width, layout.rotate, out)
    assert bytes(out) == bytes(src)


def test_accepts_any_contiguous_buffer(rng) -> None:
    """Typed arrays and memoryviews count by bytes, whatever their item size."""
    layout = LAYOUTS["float32"]
    words = rng.standard_normal(512).astype(np.float32)
    expected, _ = layout.split(memoryview(words.tobytes()), compiled=False)
    planes = [np.empty(256, dtype=np.uint16) for _ in range(2)] + [bytearray(512), np.empty(512, np.uint8)]
    with pytest.raises(ValueError):  # plane lengths count bytes: 256 are not one per word
        kernels.split(words, 4, 2, [np.empty(256, np.uint8)] + planes[1:])
    kernels.split(memoryview(words), 4, 2, planes)
    assert _same(planes, expected)
    out = np.empty(512, dtype=np.float32)
    kernels.join(planes, 4, 2, out)
    assert out.tobytes() == words.tobytes()


@pytest.mark.parametrize("n", PLANES)
def test_pack7_matches_numpy(n: int, rng) -> None:
    plane = rng.integers(0, 256, n, dtype=np.uint8) & 0xFE
    expected = packing.pack(plane, compiled=False)
    packed = np.full(packing.packed_size(n), 0xA5, dtype=np.uint8)
    kernels.pack7(plane, packed)
    assert packed.tobytes() == expected.tobytes()

    back = np.full(n, 0x5A, dtype=np.uint8)
    kernels.unpack7(packed, back)
    assert back.tobytes() == plane.tobytes()
    reference = np.empty(n, dtype=np.uint8)
    packing.unpack(expected, n, reference, compiled=False)
    assert reference.tobytes() == plane.tobytes()


@pytest.mark.parametrize("n", [64 * 259 + 13, (1 << 16) + 64])
def test_pack7_is_numpy_on_any_bytes(n: int, rng) -> None:
    """Bit 0 set (which the caller never packs) and arbitrary packed input still give
    exactly what numpy gives: the kernels are pure functions of their input bytes."""
    plane = rng.integers(0, 256, n, dtype=np.uint8)
    packed = bytearray(packing.packed_size(n))
    kernels.pack7(plane, packed)
    assert bytes(packed) == packing.pack(plane, compiled=False).tobytes()

    noise = rng.integers(0, 256, packing.packed_size(n), dtype=np.uint8)
    out, reference = bytearray(n), np.empty(n, dtype=np.uint8)
    kernels.unpack7(noise, out)
    packing.unpack(noise, n, reference, compiled=False)
    assert bytes(out) == reference.tobytes()


@pytest.mark.parametrize("offset", [1, 3, 7])
def test_pack7_unaligned(offset: int, rng) -> None:
    n = 64 * 300 + 9
    plane = _odd(n, offset)
    plane[:] = (rng.integers(0, 256, n, dtype=np.uint8) & 0xFE).tobytes()
    packed = _odd(packing.packed_size(n), 8 - offset)
    kernels.pack7(plane, packed)
    assert bytes(packed) == packing.pack(np.frombuffer(plane, dtype=np.uint8), compiled=False).tobytes()
    back = _odd(n, offset + 2)
    kernels.unpack7(packed, back)
    assert bytes(back) == bytes(plane)


def test_split_join_reject_bad_arguments() -> None:
    data = bytes(40)
    ok = [bytearray(10) for _ in range(4)]
    kernels.split(data, 4, 2, ok)
    with pytest.raises(ValueError, match="whole number"):
        kernels.split(bytes(41), 4, 2, ok)
    with pytest.raises(ValueError, match=r"planes\[2\] has 9 bytes"):
        kernels.split(data, 4, 2, ok[:2] + [bytearray(9), ok[3]])
    with pytest.raises(ValueError, match="expected 4 planes"):
        kernels.split(data, 4, 2, ok[:3])
    with pytest.raises(ValueError, match="width"):
        kernels.split(bytes(30), 3, 0, ok[:3])
    for rotate in (-1, 16):
        with pytest.raises(ValueError, match="rotate"):
            kernels.split(data, 4, rotate, ok)
    with pytest.raises(TypeError, match=r"planes\[1\] must be a writable"):
        kernels.split(data, 4, 2, [ok[0], bytes(10), ok[2], ok[3]])
    with pytest.raises(TypeError):
        kernels.split(data, 4, 2, 42)
    with pytest.raises(TypeError):
        kernels.split("not bytes", 4, 2, ok)
    with pytest.raises(TypeError):
        kernels.split(memoryview(bytes(80))[::2], 4, 2, ok)
    shared = bytearray(20)
    with pytest.raises(ValueError, match="overlaps"):
        kernels.split(data, 2, 0, [memoryview(shared)[:20], memoryview(shared)[:20]])
    buf = bytearray(50)
    with pytest.raises(ValueError, match="overlaps"):
        kernels.split(memoryview(buf)[:40], 4, 2, [memoryview(buf)[30:40]] + ok[1:])

    kernels.join(ok, 4, 2, bytearray(40))
    with pytest.raises(TypeError, match="must be a writable"):
        kernels.join(ok, 4, 2, bytes(40))
    with pytest.raises(ValueError, match="has 10 bytes, expected 11"):
        kernels.join(ok, 4, 2, bytearray(44))
    with pytest.raises(ValueError, match="expected 4 planes"):
        kernels.join(ok + [bytearray(10)], 4, 2, bytearray(40))
    with pytest.raises(ValueError, match="overlaps"):
        kernels.join([memoryview(buf)[:10]] + ok[1:], 4, 2, memoryview(buf)[:40])
    with pytest.raises(TypeError):
        kernels.join(ok, 4, 2)
    for b in (*ok, shared, buf):  # every buffer was released, error or not: resizing works
        b.append(0)


def test_pack7_reject_bad_arguments() -> None:
    n = 100  # q = 8: packs into 56 + 36 bytes
    with pytest.raises(ValueError, match="packs into 92"):
        kernels.pack7(bytes(n), bytearray(n))
    with pytest.raises(TypeError, match="must be a writable"):
        kernels.pack7(bytes(n), bytes(92))
    with pytest.raises(ValueError, match="packs into 92"):
        kernels.unpack7(bytes(93), bytearray(n))
    with pytest.raises(TypeError, match="must be a writable"):
        kernels.unpack7(bytes(92), bytes(n))
    buf = bytearray(200)
    with pytest.raises(ValueError, match="overlaps"):
        kernels.pack7(memoryview(buf)[:100], memoryview(buf)[50:142])
    kernels.pack7(b"", bytearray())
    kernels.unpack7(b"", bytearray())
    buf.append(0)


def test_threads_share_the_kernels(rng) -> None:
    """The loops run without the GIL; concurrent calls on separate buffers stay exact."""
    from concurrent.futures import ThreadPoolExecutor

    layout = LAYOUTS["bfloat16"]
    chunks = [rng.integers(0, 256, 1 << 17, dtype=np.uint8).tobytes() for _ in range(8)]

    def roundtrip(data: bytes) -> bytes:
        planes = _planes(layout, len(data) // 2)
        kernels.split(data, 2, 2, planes)
        packed = bytearray(packing.packed_size(len(planes[0])))
        kernels.pack7(bytes(planes[0]), packed)  # bit 0 is not clear: packing loses it
        out = bytearray(len(data))
        kernels.join(planes, 2, 2, out)
        return bytes(out)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(roundtrip, chunks * 4)) == chunks * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.int64])
def test_transform_writes_the_same_chunks_without_kernels(dtype: torch.dtype, monkeypatch) -> None:
    """A plugin built without a compiler writes and reads exactly what the compiled one does."""
    from dcpx.transform import ChunkInfo, ItemInfo

    from dcpx_zstd import ZstdTransform, kernels as which

    gen = torch.Generator().manual_seed(3)
    tensor = (torch.randn(300_001, generator=gen) * 0.02 * 1000 ** (dtype == torch.int64)).to(dtype)
    raw = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
    item = ItemInfo("w", raw.nbytes, dtype, tuple(tensor.shape))
    chunk = ChunkInfo(item, 0, 1, 0, raw.nbytes)
    transform = ZstdTransform().for_item(item)
    with_kernels = bytes(transform.encode(raw, chunk))
    monkeypatch.setattr(which, "native", None)
    assert not which.available()
    assert bytes(transform.encode(raw, chunk)) == with_kernels
    assert bytes(transform.decode(memoryview(with_kernels), chunk, raw.nbytes)) == bytes(raw)
    with pytest.raises(RuntimeError, match="without its compiled kernels"):
        which.use_compiled(True)
