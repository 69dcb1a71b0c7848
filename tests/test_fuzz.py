"""Property-based fuzzing of everything a reader parses from an untrusted checkpoint.

Each target takes valid input, mutates it at random (bit flips, byte overwrites,
truncation, insertion, splicing) and checks the property: the parser either accepts the
input or raises a ``dcpx.DcpxError`` - never another exception, never a hang (the watchdog
fixture), and never a large allocation (tracemalloc).  The run is seeded and short in
``make test``; ``make fuzz`` runs many more iterations (DCPX_FUZZ_ITERATIONS).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pickle
import random
import shutil
import signal
import tracemalloc
from typing import Any, Callable

import pytest
import torch

import dcpx
from dcpx import digest, framing, manifest
from dcpx.descriptor import parse
from dcpx.metadata_check import check_metadata
from dcpx.safe_pickle import safe_loads

ITERATIONS = int(os.environ.get("DCPX_FUZZ_ITERATIONS", "300"))
SEED = int(os.environ.get("DCPX_FUZZ_SEED", "20261128"))
MEMORY_LIMIT = 64 << 20
WATCHDOG_S = 20


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and buf:
            del buf[rng.randrange(len(buf)):]
        elif op == 5 and len(buf) > 8:  # splice: repeat a slice, as a forged table might
            a = rng.randrange(len(buf) - 4)
            buf[pos:pos] = buf[a:a + rng.randint(1, 8)] * rng.randint(1, 8)
    return bytes(buf)


def rearm_watchdog() -> None:
    """The watchdog fixture guards each input, not a whole run of thousands of them."""
    signal.alarm(WATCHDOG_S)


def fuzz(target: Callable[[bytes], object], seeds: list[bytes], rng: random.Random) -> int:
    """Run ``target`` on mutated seeds; return how many inputs were accepted."""
    accepted = 0
    tracemalloc.start()
    try:
        for _ in range(ITERATIONS):
            rearm_watchdog()
            data = mutate(rng.choice(seeds), rng)
            tracemalloc.reset_peak()
            try:
                target(data)
                accepted += 1
            except dcpx.DcpxError:
                pass
            _, peak = tracemalloc.get_traced_memory()
            assert peak < MEMORY_LIMIT, f"input {data[:64]!r}... allocated {peak} bytes"
    finally:
        tracemalloc.stop()
    return accepted


def test_descriptor_strings(watchdog):
    rng = random.Random(SEED)
    seeds = [s.encode() for s in (
        "stream.zstd/1", "stream.zstd/1;group=bfloat16", "stream.encrypt@dcpx/1;key_id=k1;segment_size=1048576",
        "frame@dcpx/1", "stream.checksum@dcpx/1;algorithm=crc32c", "a@b/0;k=%25%3B",
    )]

    def target(data: bytes) -> None:
        parse(data.decode("latin-1"))

    assert fuzz(target, seeds, rng) < ITERATIONS


def test_frame_footer_and_index(watchdog):
    rng = random.Random(SEED + 1)
    index = framing.FrameIndex(raw_size=10_000, chunk_size=4096, layers=2,
                               layer_sizes=((3000, 3016), (2000, 2016), (900, 916)))
    stored = sum(s[-1] for s in index.layer_sizes)
    blob = index.encode()

    def target(data: bytes) -> None:
        footer, body = data[-framing.FOOTER.size:], data[:-framing.FOOTER.size]
        length = stored + len(data)
        index_len = framing.parse_footer(footer, length, "fuzz")
        framing.parse_index(footer, body[-index_len:] if index_len else b"", length, 2, "fuzz", None, 1 << 20)

    target(blob)  # the unmutated seed is valid
    fuzz(target, [blob], rng)


def test_manifest(tmp_path, watchdog):
    rng = random.Random(SEED + 2)
    metadata_bytes = b"metadata"
    body = manifest.build("0" * 32, metadata_bytes, [
        manifest.ItemRecord("w", [0, 0], "__0_0.distcp", 0, 100, 400, ["frame@dcpx/1", "stream.zstd/1"], {"x": "y"}),
        manifest.ItemRecord("b", [0], "__0_0.distcp", 100, 56, 56, ["raw@dcpx/1"], {"crc32c": "0a1b2c3d"}),
    ], {"files": {"__0_0.distcp": 156}})
    key = b"k" * 32
    seeds = [manifest.dumps(body), manifest.dumps(body, key)]

    def target(data: bytes) -> None:
        parsed = manifest.loads(data, "fuzz")
        manifest.verify(parsed, metadata_bytes, "fuzz", key if "hmac_sha256" in parsed else None)
        for entry in manifest.items_by_location(parsed).values():  # as a reader looks them up
            records = entry["records"] or {}
            if digest.RECORD in records:
                digest.check(0x0A1B2C3D, records[digest.RECORD], "fuzz")

    fuzz(target, seeds, rng)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    state = {"w": torch.arange(600, dtype=torch.float32).reshape(20, 30), "b": torch.arange(7), "meta": {"k": [1, 2]}}
    dcpx.save(state, path, transforms=["zstd"], chunk_size=1024)
    return path


def _blank() -> dict:
    return {"w": torch.zeros(20, 30), "b": torch.zeros(7, dtype=torch.long), "meta": {"k": [0]}}


def test_metadata_pickle(checkpoint, watchdog):
    rng = random.Random(SEED + 3)
    data = (checkpoint / ".metadata").read_bytes()

    def target(blob: bytes) -> None:
        check_metadata(safe_loads(blob, "fuzz"), "fuzz", len(blob))  # as the reader does

    fuzz(target, [data], rng)


def test_whole_load_with_mutated_files(checkpoint, tmp_path, watchdog):
    """Mutate .metadata or the data file of a real checkpoint: a load either succeeds or
    raises a dcpx error.  With mutated metadata a successful load must also be correct (the
    manifest binds it); a data file without an integrity transform (here torch's plain
    zstd) can decode flipped bytes to other values, which only a checksum or encryption
    layer detects (see docs/security.md)."""
    rng = random.Random(SEED + 4)
    expected = _blank()
    dcpx.load(expected, checkpoint)
    runs = max(20, ITERATIONS // 10)
    for i in range(runs):
        rearm_watchdog()
        work = tmp_path / f"mutant{i}"
        shutil.copytree(checkpoint, work)
        name = rng.choice([".metadata", "__0_0.distcp"])
        (work / name).write_bytes(mutate((work / name).read_bytes(), rng))
        out = _blank()
        try:
            dcpx.load(out, work)
        except dcpx.DcpxError:
            shutil.rmtree(work)
            continue
        if name == ".metadata":
            assert torch.equal(out["w"], expected["w"]) and torch.equal(out["b"], expected["b"]), i
        shutil.rmtree(work)


# Values an edited .metadata could hold where DCP expects something else.
ODD_VALUES: list[Any] = [None, "x", "", -1, 0, 10**12, 2.5, True, [], {}, (), [None], {"k": 1}, ("a", 10**9),
                         (-1,), torch.Size([-3]), torch.Size([10**9, 10**9]), torch.float32, b"\x00"]


def _slots(obj: Any, depth: int = 0) -> list[tuple[Any, Any]]:
    """(container, field or key) for every value in a Metadata tree, dataclass fields
    included: the places a forger can put an odd value."""
    if depth > 8:
        return []
    out: list[tuple[Any, Any]] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out.append((obj, f.name))
            out += _slots(getattr(obj, f.name), depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            out += _slots(k, depth + 1) + _slots(v, depth + 1)  # keys too: storage_data's are MetadataIndex
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            out += _slots(v, depth + 1)
    return out


def test_whole_load_with_forged_metadata_fields(checkpoint, tmp_path, watchdog):
    """Put odd values into the fields of a valid ``.metadata`` (no manifest to bind it): a
    load succeeds or raises a dcpx error naming the problem, whichever field was forged."""
    rng = random.Random(SEED + 5)
    original = (checkpoint / ".metadata").read_bytes()
    for name in glob.glob(str(checkpoint / ".dcpx-manifest-*.json")):
        os.remove(name)
    for _ in range(max(40, ITERATIONS // 5)):
        rearm_watchdog()
        metadata = pickle.loads(original)
        for _ in range(rng.randint(1, 2)):
            holder, key = rng.choice(_slots(metadata))
            value = rng.choice(ODD_VALUES)
            if isinstance(holder, (dict, list)):
                try:
                    holder[key] = value
                except TypeError:  # the key is a MetadataIndex the first forgery made unhashable
                    pass
            else:
                object.__setattr__(holder, key, value)  # MetadataIndex is frozen
        try:
            blob = pickle.dumps(metadata)
        except Exception:  # noqa: BLE001 - TensorProperties refuses to pickle some forgeries itself
            continue
        (checkpoint / ".metadata").write_bytes(blob)
        try:
            dcpx.load(_blank(), checkpoint)
        except dcpx.DcpxError:
            pass
