"""Envelope round trips and attacks: every tampering fails with its own error naming the item."""

from __future__ import annotations

import struct
import threading
import tracemalloc

import pytest
from dcpx.transform import ChunkInfo, ItemInfo

import dcpx
from dcpx_encrypt import (
    CheckpointMismatchError,
    ContextMismatchError,
    EncryptTransform,
    EnvelopeHeaderError,
    NoKeyConfiguredError,
    SegmentAuthenticationError,
    SegmentOrderError,
    SizeMismatchError,
    TrailingDataError,
    TruncatedEnvelopeError,
    UnknownKeyIdError,
    WrongKeyError,
    parse_header,
)
from dcpx_encrypt import envelope

SEG = 4096
TAG = 16
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DCPX_ENCRYPT_KEY", "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def chunk(size: int, fqn: str = "model.w", ckpt: str = "ckpt-A", index: int = 0, offset: int = 0,
          offsets: tuple[int, ...] | None = (0, 0), inner: tuple[str, ...] = ("stream.zstd/1",)) -> ChunkInfo:
    item = ItemInfo(fqn, offset + size, offsets=offsets, checkpoint_id=ckpt)
    return ChunkInfo(item, index, index + 1, offset, size, inner)


def payload(size: int) -> bytes:
    return bytes((i * 131 + 7) % 251 for i in range(size))


def seal(data: bytes, info: ChunkInfo | None = None, key: bytes = KEY, seg: int = SEG) -> bytes:
    t = EncryptTransform(keys={"k1": key}, segment_size=seg)
    return bytes(t.encode(memoryview(data), info or chunk(len(data))))


def open_(blob: bytes, info: ChunkInfo, size: int | None = None, keys: dict | None = None) -> bytes:
    t = EncryptTransform(keys={"k1": KEY} if keys is None else keys, segment_size=SEG)
    return bytes(t.decode(memoryview(blob), info, info.size if size is None else size))


def fails(exc_type: type, blob: bytes, info: ChunkInfo, **kw: object) -> Exception:
    with pytest.raises(Exception) as err:
        open_(blob, info, **kw)  # type: ignore[arg-type]
    assert type(err.value) is exc_type, f"{type(err.value).__name__}: {err.value}"
    assert info.item.fqn in str(err.value) and err.value.fqn == info.item.fqn  # type: ignore[attr-defined]
    return err.value


def layout(blob: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Header size and (start, end) of each sealed segment."""
    h = parse_header(memoryview(blob))
    spans, pos, left = [], h.size, h.plaintext_size
    for _ in range(h.segment_count):
        n = min(left, h.segment_size) + TAG
        spans.append((pos, pos + n))
        pos, left = pos + n, left - (n - TAG)
    return h.size, spans


# -- round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 3 * SEG + 1, 10_000])
def test_round_trip_sizes(size: int) -> None:
    data = payload(size)
    info = chunk(size)
    blob = seal(data, info)
    h = parse_header(memoryview(blob))
    assert h.segment_count == max(1, -(-size // SEG))
    assert len(blob) == h.size + size + TAG * h.segment_count
    assert open_(blob, info) == data


def test_decode_into_writes_the_destination_in_place() -> None:
    data = payload(3 * SEG + 5)
    info = chunk(len(data))
    blob = seal(data, info)
    t = EncryptTransform(keys={"k1": KEY}, segment_size=SEG)
    out = bytearray(b"\xee" * len(data))
    t.decode_into(memoryview(blob), info, memoryview(out))
    assert out == data
    with pytest.raises(SizeMismatchError, match="model.w"):  # checked before anything is written
        t.decode_into(memoryview(blob), info, memoryview(bytearray(len(data) - 1)))


def test_decode_into_leaves_no_unauthenticated_plaintext() -> None:
    """AES-GCM writes a segment before it checks the tag: a tampered segment must end up
    zeroed in the caller's buffer, the segments before it intact."""
    data = payload(3 * SEG)
    info = chunk(len(data))
    blob = bytearray(seal(data, info))
    _, spans = layout(bytes(blob))
    blob[spans[1][1] - 1] ^= 1  # the second segment's tag
    t = EncryptTransform(keys={"k1": KEY}, segment_size=SEG)
    out = bytearray(b"\xee" * len(data))
    with pytest.raises(SegmentAuthenticationError, match="model.w"):
        t.decode_into(memoryview(bytes(blob)), info, memoryview(out))
    assert out[:SEG] == data[:SEG]
    assert out[SEG:2 * SEG] == bytes(SEG)
    assert out[2 * SEG:] == b"\xee" * SEG  # never reached


def test_default_segment_size_and_typed_views() -> None:
    t = dcpx.transform("encrypt", keys={"k1": KEY})
    assert isinstance(t, EncryptTransform) and t.segment_size == 1 << 20
    data = memoryview(bytearray(payload(2_500_000))).cast("f")  # a float view: bytes are what count
    info = chunk(data.nbytes)
    blob = t.encode(data, info)
    assert parse_header(memoryview(blob)).segment_count == 3
    assert bytes(t.decode(memoryview(blob), info, data.nbytes)) == data.tobytes()


def test_concurrent_use_of_one_instance() -> None:
    t = EncryptTransform(keys={"k1": KEY}, segment_size=SEG)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for k in range(20):
                data = payload(1000 * n + k)
                info = chunk(len(data), fqn=f"w{n}", index=k)
                assert bytes(t.decode(memoryview(t.encode(memoryview(data), info)), info, len(data))) == data
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_no_repeated_key_nonce_pairs_over_1000_encodes() -> None:
    data = payload(2 * SEG + 5)
    info = chunk(len(data))
    ctx = envelope.Context.from_chunk(info)
    salts, pairs = set(), set()
    for _ in range(1000):
        blob = seal(data, info)
        h = parse_header(memoryview(blob))
        salts.add(h.salt)
        aead_key = envelope.derive(KEY, h.prefix, h.salt, ctx).aead_key
        for i in range(h.segment_count):
            pairs.add((aead_key, envelope.nonce(i, i == h.segment_count - 1)))
    assert len(salts) == 1000
    assert len(pairs) == 3000


# -- tampering --------------------------------------------------------------------------
def expected_for_offset(pos: int, header_size: int, kid_len: int) -> set[type]:
    kid_end = 20 + kid_len
    salt_end = kid_end + 32
    if pos < 6 or pos == 7 or 8 <= pos < 12:  # magic, version, suite, reserved, segment size
        return {EnvelopeHeaderError}
    if pos == 6:  # key id length: out of range, or a shifted header
        return {EnvelopeHeaderError, TruncatedEnvelopeError, TrailingDataError}
    if 12 <= pos < 20:
        return {SizeMismatchError, EnvelopeHeaderError}
    if 20 <= pos < kid_end:
        return {EnvelopeHeaderError, UnknownKeyIdError}
    if pos < salt_end + 16:  # salt, key check
        return {WrongKeyError}
    if pos < salt_end + 32:
        return {CheckpointMismatchError}
    if pos < header_size:
        return {ContextMismatchError}
    return {SegmentAuthenticationError}


def test_flip_every_bit_of_a_two_segment_envelope() -> None:
    data = payload(SEG + 16)
    info = chunk(len(data))
    blob = seal(data, info)
    header_size, spans = layout(blob)
    assert len(spans) == 2
    for pos in range(len(blob)):
        allowed = expected_for_offset(pos, header_size, 2)
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(dcpx.DcpxError) as err:
                open_(bytes(bad), info)
            assert type(err.value) in allowed, (pos, bit, type(err.value).__name__, str(err.value))
            assert "model.w" in str(err.value)


def test_truncation_at_and_inside_every_segment() -> None:
    data = payload(3 * SEG + 100)
    info = chunk(len(data))
    blob = seal(data, info)
    header_size, spans = layout(blob)
    cuts = {0, 5, 19, 20, header_size - 1, header_size}
    for start, end in spans:
        cuts |= {start + 1, start + TAG, (start + end) // 2, end - TAG, end - 1}
        cuts.add(end)
    cuts.discard(len(blob))
    for cut in sorted(cuts):
        fails(TruncatedEnvelopeError, blob[:cut], info)


def test_truncation_with_metadata_size_edited_to_match() -> None:
    data = payload(3 * SEG)
    info = chunk(len(data))
    blob = seal(data, info)
    _, spans = layout(blob)
    fails(SizeMismatchError, blob[:spans[1][1]], info, size=2 * SEG)


def test_appended_bytes_and_segments() -> None:
    data = payload(2 * SEG + 10)
    info = chunk(len(data))
    blob = seal(data, info)
    _, spans = layout(blob)
    fails(TrailingDataError, blob + b"\x00", info)
    fails(TrailingDataError, blob + bytes(TAG), info)
    fails(TrailingDataError, blob + blob[spans[0][0]:spans[0][1]], info)  # a whole extra segment
    other = seal(data, info)
    fails(TrailingDataError, blob + other[layout(other)[0]:], info)


def test_deleted_duplicated_swapped_segments() -> None:
    data = payload(3 * SEG)  # three full segments
    info = chunk(len(data))
    blob = seal(data, info)
    header_size, spans = layout(blob)
    segs = [blob[a:b] for a, b in spans]
    head = blob[:header_size]
    fails(TruncatedEnvelopeError, head + segs[0] + segs[2], info)  # deleted
    fails(TrailingDataError, head + segs[0] + segs[1] + segs[1] + segs[2], info)  # duplicated, inserted
    fails(SegmentOrderError, head + segs[1] + segs[0] + segs[2], info)  # swapped
    fails(SegmentOrderError, head + segs[0] + segs[0] + segs[2], info)  # duplicated over another
    err = fails(SegmentOrderError, head + segs[2] + segs[1] + segs[0], info)  # final moved to front
    assert "segment 0 of 3 is segment 2 (final)" in str(err)


def test_segment_from_another_envelope_of_the_same_chunk() -> None:
    data = payload(2 * SEG)
    info = chunk(len(data))
    a, b = seal(data, info), seal(data, info)
    header_size, spans = layout(a)
    mixed = a[:spans[1][0]] + b[spans[1][0]:]
    fails(SegmentAuthenticationError, mixed, info)


def test_swap_between_items_chunks_shards_chains_and_checkpoints() -> None:
    data = payload(SEG + 1)
    n = len(data)
    blob = seal(data, chunk(n, fqn="model.a"))
    fails(ContextMismatchError, blob, chunk(n, fqn="model.b"))  # another item, same checkpoint
    fails(ContextMismatchError, blob, chunk(n, fqn="model.a", index=1, offset=n))  # another chunk
    fails(ContextMismatchError, blob, chunk(n, fqn="model.a", offsets=(4, 0)))  # another shard
    fails(ContextMismatchError, blob, chunk(n, fqn="model.a", inner=()))  # inner layer stripped
    fails(CheckpointMismatchError, blob, chunk(n, fqn="model.a", ckpt="ckpt-B"))  # another checkpoint
    assert open_(blob, chunk(n, fqn="model.a")) == data


def test_swap_same_size_chunks_between_two_items() -> None:
    n = 2 * SEG
    a_info, b_info = chunk(n, fqn="layer.0.weight"), chunk(n, fqn="layer.1.weight")
    a, b = seal(payload(n), a_info), seal(payload(n)[::-1], b_info)
    fails(ContextMismatchError, b, a_info)
    fails(ContextMismatchError, a, b_info)


def test_wrong_key_unknown_id_and_no_key() -> None:
    data = payload(SEG * 2)
    info = chunk(len(data))
    blob = seal(data, info)
    err = fails(WrongKeyError, blob, info, keys={"k1": OTHER_KEY})
    assert "'k1'" in str(err) and err.key_id == "k1"  # type: ignore[attr-defined]
    err = fails(UnknownKeyIdError, blob, info, keys={"k2": KEY})
    assert "'k1'" in str(err) and "DCPX_ENCRYPT_KEYS" in str(err) and "['k2']" in str(err)
    err = fails(NoKeyConfiguredError, blob, info, keys={})
    assert "'k1'" in str(err) and "DCPX_ENCRYPT_KEY_FILE" in str(err)
    with pytest.raises(NoKeyConfiguredError, match="DCPX_ENCRYPT_KEY"):
        EncryptTransform().encode(memoryview(data), info)
    for secret in (KEY, OTHER_KEY):
        assert secret.hex() not in str(err) and repr(secret) not in str(err)


def test_size_mismatch_is_reported_before_decryption() -> None:
    data = payload(100)
    info = chunk(len(data))
    blob = seal(data, info)
    fails(SizeMismatchError, blob, info, size=101)
    fails(SizeMismatchError, blob, info, size=99)


# -- hostile headers --------------------------------------------------------------------
def header(magic: bytes = b"DCPE", version: int = 1, suite: int = 1, kid_len: int = 2, reserved: int = 0,
           seg: int = SEG, size: int = 100, kid: bytes = b"k1") -> bytes:
    return struct.pack("<4sBBBBIQ", magic, version, suite, kid_len, reserved, seg, size) + kid + bytes(96)


@pytest.mark.parametrize(
    "fields",
    [
        {"magic": b"DCPX"}, {"magic": b"\x00" * 4}, {"version": 0}, {"version": 2}, {"suite": 0}, {"suite": 2},
        {"kid_len": 0}, {"kid_len": 65}, {"kid_len": 255}, {"reserved": 1},
        {"seg": 0}, {"seg": 1}, {"seg": 3000}, {"seg": 2048}, {"seg": 1 << 27}, {"seg": 0xFFFFFFFF},
        {"size": (1 << 40) + 1}, {"size": (1 << 64) - 1},
        {"kid": b"k\x00"}, {"kid": b"-k"}, {"kid": b"k:"}, {"kid": b"\xff\xfe"},
    ],
)
def test_header_fields_out_of_range(fields: dict) -> None:
    info = chunk(fields.get("size", 100))
    blob = header(**fields) + bytes(200)
    tracemalloc.start()
    try:
        fails(EnvelopeHeaderError, blob, info)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_huge_claimed_size_fails_before_allocation() -> None:
    big = 1 << 40
    info = chunk(big)
    blob = header(size=big, seg=1 << 26) + bytes(1000)
    tracemalloc.start()
    try:
        fails(TruncatedEnvelopeError, blob, info)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_short_inputs_are_truncation() -> None:
    info = chunk(100)
    for blob in (b"", b"DCPE", header()[:19], header()[:60]):
        fails(TruncatedEnvelopeError, blob, info)


def test_header_edit_with_consistent_sizes_is_caught_by_the_key_check() -> None:
    """Shrinking the declared size and cutting the envelope to match still fails: the
    header is bound into the key check and the segment key."""
    data = payload(3 * SEG)
    info = chunk(len(data))
    blob = bytearray(seal(data, info))
    _, spans = layout(bytes(blob))
    struct.pack_into("<Q", blob, 12, 2 * SEG)
    fails(WrongKeyError, bytes(blob[:spans[1][1]]), chunk(2 * SEG))
