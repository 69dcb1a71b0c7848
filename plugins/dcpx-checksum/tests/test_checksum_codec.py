"""Chunk-level encode/decode: round trips, and every kind of damage is caught and named."""

from __future__ import annotations

import hashlib
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import crc32c
import numpy as np
import pytest
import xxhash

import dcpx
from dcpx.transform import ChunkInfo
from dcpx_checksum import (
    ALGORITHMS,
    ChecksumError,
    ChecksumFramingError,
    ChecksumMismatchError,
    ChecksumTransform,
)
from dcpx_checksum.trailer import FOOTER_SIZE, MAGIC

MakeChunk = Callable[..., ChunkInfo]
MakePayload = Callable[..., bytes]

SIZES = [0, 1, 7, 4096 + 3, (3 << 20) + 17]


def trailer_len(algorithm: str) -> int:
    return ALGORITHMS[algorithm].digest_size + FOOTER_SIZE


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(algorithm: str, size: int, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    data = payload(size, seed=size)
    chunk = chunk_info(size)
    encoded = t.encode(memoryview(data), chunk)
    assert len(encoded) == size + trailer_len(algorithm)
    assert bytes(encoded[:size]) == data  # payload stored unchanged, at offset 0
    decoded = t.decode(memoryview(encoded), chunk, size)
    assert len(decoded) == size
    assert bytes(decoded) == data


def test_digest_is_the_plain_library_digest(chunk_info: MakeChunk, payload: MakePayload) -> None:
    data = payload(10_000, seed=3)
    expected = {
        "crc32c": crc32c.crc32c(data).to_bytes(4, "big"),
        "xxh3-128": xxhash.xxh3_128_digest(data),
        "sha256": hashlib.sha256(data).digest(),
    }
    for name, digest in expected.items():
        encoded = ChecksumTransform(name).encode(memoryview(data), chunk_info(len(data)))
        assert encoded[len(data):len(data) + len(digest)] == digest
    # CRC-32C check value from RFC 3720 / iSCSI: "123456789" -> 0xE3069283
    encoded = ChecksumTransform().encode(memoryview(b"123456789"), chunk_info(9))
    assert encoded[9:13] == bytes.fromhex("e3069283")
    assert encoded[13:] == MAGIC + b"\x01"


def test_accepts_typed_and_writable_buffers(algorithm: str, chunk_info: MakeChunk) -> None:
    t = ChecksumTransform(algorithm)
    floats = np.arange(1000, dtype=np.float32)
    chunk = chunk_info(floats.nbytes)
    encoded = t.encode(memoryview(floats), chunk)
    assert bytes(t.decode(memoryview(bytearray(encoded)), chunk, floats.nbytes)) == floats.tobytes()


def test_decode_is_zero_copy(algorithm: str, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    data = payload(1 << 16)
    chunk = chunk_info(len(data))
    stored = bytearray(t.encode(memoryview(data), chunk))
    decoded = t.decode(memoryview(stored), chunk, len(data))
    assert isinstance(decoded, memoryview) and decoded.obj is stored


def _flip_positions(encoded_len: int, size: int) -> list[int]:
    """Payload edges and middle, every trailer byte."""
    picks = {0, size // 2, size - 1} if size else set()
    return sorted(picks | set(range(size, encoded_len)))


@pytest.mark.parametrize("size", [1, 4096 + 3, (2 << 20) + 5])
def test_any_flipped_byte_is_caught_and_named(
    algorithm: str, size: int, chunk_info: MakeChunk, payload: MakePayload
) -> None:
    t = ChecksumTransform(algorithm)
    data = payload(size, seed=1)
    chunk = chunk_info(size, fqn="model.embed.weight", index=3, count=7)
    good = t.encode(memoryview(data), chunk)
    actual_digest = bytes(good[size:size + t.algorithm.digest_size]).hex()
    for pos in _flip_positions(len(good), size):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        with pytest.raises(ChecksumError) as info:
            t.decode(memoryview(bad), chunk, size)
        err = info.value
        msg = str(err)
        assert isinstance(err, dcpx.IntegrityError)
        assert "'model.embed.weight'" in msg and "chunk 3" in msg and algorithm in msg, msg
        assert err.expected in msg and err.actual in msg, msg
        assert (err.fqn, err.chunk_index, err.algorithm) == ("model.embed.weight", 3, algorithm)
        stored_digest = bytes(bad[size:size + t.algorithm.digest_size]).hex()
        assert err.expected == stored_digest
        if pos < size:  # payload damaged: the computed digest moves
            assert isinstance(err, ChecksumMismatchError) and err.actual != actual_digest
        elif pos < size + t.algorithm.digest_size:  # stored digest damaged
            assert isinstance(err, ChecksumMismatchError) and err.actual == actual_digest
        else:  # marker or algorithm id damaged
            assert isinstance(err, ChecksumFramingError)


def test_every_byte_of_a_small_chunk(algorithm: str, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    data = payload(64, seed=9)
    chunk = chunk_info(64)
    good = t.encode(memoryview(data), chunk)
    for pos in range(len(good)):
        for bit in (0x01, 0x80):
            bad = bytearray(good)
            bad[pos] ^= bit
            with pytest.raises(ChecksumError):
                t.decode(memoryview(bad), chunk, 64)


@pytest.mark.parametrize("cut", ["1 byte", "4 bytes", "the trailer", "everything"])
def test_truncation(algorithm: str, cut: str, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    size = 5000
    chunk = chunk_info(size, fqn="opt.state.0.exp_avg")
    good = t.encode(memoryview(payload(size)), chunk)
    keep = {"1 byte": len(good) - 1, "4 bytes": len(good) - 4, "the trailer": size, "everything": 0}[cut]
    with pytest.raises(ChecksumFramingError, match=r"'opt\.state\.0\.exp_avg' chunk 0.*truncated") as info:
        t.decode(memoryview(good[:keep]), chunk, size)
    assert info.value.fqn == "opt.state.0.exp_avg"


@pytest.mark.parametrize("extra", [b"\x00", b"DCK\x01", bytes(4096)])
def test_trailing_bytes(algorithm: str, extra: bytes, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    chunk = chunk_info(100)
    good = t.encode(memoryview(payload(100)), chunk)
    with pytest.raises(ChecksumFramingError, match=f"{len(extra)} unexpected trailing bytes"):
        t.decode(memoryview(good + extra), chunk, 100)


def test_wrong_size_claim(algorithm: str, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    chunk = chunk_info(100)
    good = t.encode(memoryview(payload(100)), chunk)
    for size in (99, 101, -1, 10**12):
        with pytest.raises(ChecksumFramingError):
            t.decode(memoryview(good), chunk, size)


def test_chunk_written_with_another_algorithm(chunk_info: MakeChunk, payload: MakePayload) -> None:
    data = payload(300)
    chunk = chunk_info(300)
    encoded = ChecksumTransform("xxh3-128").encode(memoryview(data), chunk)
    with pytest.raises(ChecksumFramingError, match="written with xxh3-128, but the descriptor says crc32c"):
        ChecksumTransform("crc32c").decode(memoryview(encoded), chunk, 300)


@pytest.mark.parametrize("ident, named", [(2, "xxh3-128"), (3, "sha256"), (0, "unknown algorithm id 0"),
                                          (255, "unknown algorithm id 255")])
def test_wrong_algorithm_id(ident: int, named: str, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform("crc32c")
    chunk = chunk_info(300, fqn="w")
    bad = bytearray(t.encode(memoryview(payload(300)), chunk))
    bad[-1] = ident
    with pytest.raises(ChecksumFramingError, match=f"trailer names {named}") as info:
        t.decode(memoryview(bad), chunk, 300)
    # the payload is intact, so both digests agree and are named
    assert info.value.expected == info.value.actual
    assert info.value.expected in str(info.value)


def test_concurrent_use_of_one_instance(algorithm: str, chunk_info: MakeChunk, payload: MakePayload) -> None:
    t = ChecksumTransform(algorithm)
    chunks = [(payload(256 << 10, seed=i), chunk_info(256 << 10, index=i, count=32)) for i in range(32)]

    def one(job: tuple[bytes, object]) -> bool:
        data, chunk = job
        encoded = t.encode(memoryview(data), chunk)  # type: ignore[arg-type]
        return bytes(t.decode(memoryview(encoded), chunk, len(data))) == data  # type: ignore[arg-type]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, chunks))


def test_torch_stream_api_round_trip(algorithm: str) -> None:
    """The base class's StreamTransformExtension methods work for this transform too."""
    import io

    class Keep(io.BytesIO):
        def close(self) -> None:
            pass

    t = ChecksumTransform(algorithm)
    sink = Keep()
    with t.transform_to(sink) as stream:
        stream.write(b"abc" * 1000)
    out = t.transform_from(io.BytesIO(sink.getvalue()))
    assert out.read() == b"abc" * 1000
    damaged = bytearray(sink.getvalue())
    damaged[20] ^= 0x10
    with pytest.raises(ChecksumMismatchError, match="<stream>"):
        t.transform_from(io.BytesIO(bytes(damaged)))


def test_errors_survive_pickling(chunk_info: MakeChunk, payload: MakePayload) -> None:
    """torch gathers exceptions across ranks by pickling them."""
    t = ChecksumTransform()
    chunk = chunk_info(10, fqn="x")
    bad = bytearray(t.encode(memoryview(payload(10)), chunk))
    bad[0] ^= 1
    with pytest.raises(ChecksumMismatchError) as info:
        t.decode(memoryview(bad), chunk, 10)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ChecksumMismatchError and str(copy) == str(info.value)
    assert (copy.fqn, copy.chunk_index, copy.expected, copy.actual) == (
        "x", 0, info.value.expected, info.value.actual)
