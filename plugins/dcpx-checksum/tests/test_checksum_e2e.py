"""End to end through ``dcpx.save`` / ``dcpx.load``: damage on disk never reaches a tensor.

Chunk regions are located from public information only: the JSON manifest (each item's
file, offset, raw size) and this plugin's trailer size; a chunked item is its chunks, then
the core's chunk index and footer.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import dcpx
from dcpx_checksum import ALGORITHMS, ChecksumError, ChecksumTransform

pytestmark = [
    pytest.mark.skipif(not hasattr(dcpx, "save"), reason="dcpx.save/dcpx.load not available"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

CHUNK = 64 << 10


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(200, 300, generator=g),  # 240000 bytes: 4 chunks of 64 KiB
        "model.b": torch.randn(300, generator=g),
        "opt.step": torch.tensor(7),
        "empty": torch.empty(0),
        "meta": {"epoch": 3},
    }


def _blank() -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"epoch": 0} for k, v in _state().items()}


def _save(path: Path, algorithm: str = "crc32c", **options: Any) -> Path:
    dcpx.save(_state(), path, transforms=[dcpx.transform("checksum", algorithm=algorithm)], chunk_size=CHUNK,
              **options)
    return path


def _manifest(path: Path) -> dict[str, Any]:
    (name,) = glob.glob(os.path.join(path, ".dcpx-manifest-*.json"))
    return json.loads(Path(name).read_text())


def _chunk_regions(path: Path, algorithm: str = "crc32c") -> Iterator[tuple[str, str, int, int]]:
    """(fqn, file, start, end) of every item's stored chunks (payloads + trailers)."""
    trailer = ALGORITHMS[algorithm].digest_size + 4
    for item in _manifest(path)["items"]:
        count = -(-item["raw_size"] // CHUNK)
        yield item["fqn"], item["file"], item["offset"], item["offset"] + item["raw_size"] + count * trailer


def _flip(file: Path, pos: int) -> bytes:
    with open(file, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ 0x01]))
    return old


def _restore(file: Path, pos: int, old: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(pos)
        f.write(old)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("ck") / "one-file")


@pytest.fixture(scope="module")
def saved_many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("ck") / "file-per-item", single_file_per_rank=False)


@pytest.fixture
def damaged(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved checkpoint, free to break."""
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def _assert_equal(loaded: dict[str, Any]) -> None:
    for k, v in _state().items():
        assert torch.equal(loaded[k], v) if isinstance(v, torch.Tensor) else loaded[k] == v, k


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_round_trip_and_manifest_digests(tmp_path: Path, algorithm: str) -> None:
    path = _save(tmp_path / "ck", algorithm)
    out = _blank()
    dcpx.load(out, path)
    _assert_equal(out)
    # the manifest's item digest is reproducible from the stored chunk trailers
    t = ChecksumTransform(algorithm)
    size = ALGORITHMS[algorithm].digest_size
    for item in _manifest(path)["items"]:
        if item["descriptors"] == ["raw@dcpx/1"]:  # empty tensors are stored raw: no bytes to check
            assert item["raw_size"] == item["length"] == 0
            continue
        data = (path / item["file"]).read_bytes()[item["offset"]:]
        records, pos, left = [], 0, item["raw_size"]
        while left:
            n = min(CHUNK, left)
            records.append(data[pos + n:pos + n + size].hex())
            pos, left = pos + n + size + 4, left - n
        assert item["records"] == {t.get_descriptor(): t.item_record(dcpx.ItemInfo(item["fqn"], 0), records)}


@pytest.mark.parametrize("layout", ["saved", "saved_many"])
def test_flipped_chunk_byte_names_item_and_digests(layout: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(layout)
    checked = 0
    for fqn, name, start, end in _chunk_regions(path):
        size = end - start
        for pos in sorted({start, start + size // 3, start + size // 2, end - 6, end - 1} & set(range(start, end))):
            old = _flip(path / name, pos)
            try:
                with pytest.raises(ChecksumError) as info:
                    dcpx.load(_blank(), path)
            finally:
                _restore(path / name, pos, old)
            msg = str(info.value)
            assert isinstance(info.value, dcpx.IntegrityError)
            assert f"'{fqn}'" in msg and info.value.fqn == fqn, (pos, msg)
            assert info.value.expected and info.value.expected in msg, msg
            assert info.value.actual and info.value.actual in msg, msg
            checked += 1
    assert checked > 15
    out = _blank()
    dcpx.load(out, path)  # restored: loads again
    _assert_equal(out)


def test_error_names_the_file(damaged: Path) -> None:
    fqn, name, start, _ = next(r for r in _chunk_regions(damaged) if r[0] == "model.w")
    _flip(damaged / name, start + 100)
    with pytest.raises(ChecksumError) as info:
        dcpx.load(_blank(), damaged)
    assert fqn in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("layout", ["saved", "saved_many"])
def test_flip_anywhere_in_any_data_file(layout: str, request: pytest.FixtureRequest) -> None:
    """Every byte of every data file belongs to some item: a flip must fail the load.
    Sampled: a stride through each file, plus the first and last bytes of every item."""
    path: Path = request.getfixturevalue(layout)
    positions: dict[str, set[int]] = {}
    for item in _manifest(path)["items"]:
        lo, hi = item["offset"], item["offset"] + item["length"]
        positions.setdefault(item["file"], set()).update(range(lo, min(hi, lo + 8)), range(max(lo, hi - 48), hi))
    survivors = []
    for name, picks in sorted(positions.items()):
        length = (path / name).stat().st_size
        for pos in sorted(picks | set(range(0, length, 4099))):
            old = _flip(path / name, pos)
            try:
                dcpx.load(_blank(), path)
                survivors.append((name, pos))
            except dcpx.DcpxError:
                pass
            finally:
                _restore(path / name, pos, old)
    assert not survivors, repr(survivors)


def test_zeroed_last_4k(damaged: Path) -> None:
    name = "__0_0.distcp"
    file = damaged / name
    length = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(length - 4096)
        f.write(bytes(4096))
    with pytest.raises(dcpx.DcpxError) as info:
        dcpx.load(_blank(), damaged)
    assert name in str(info.value) or isinstance(info.value, ChecksumError), str(info.value)


@pytest.mark.parametrize("keep", ["all but 1 byte", "half"])
def test_truncated_file(damaged: Path, keep: str) -> None:
    file = damaged / "__0_0.distcp"
    length = file.stat().st_size
    os.truncate(file, length - 1 if keep == "all but 1 byte" else length // 2)
    with pytest.raises(dcpx.DcpxError, match="__0_0.distcp"):
        dcpx.load(_blank(), damaged)


def test_deleted_file(damaged: Path) -> None:
    (damaged / "__0_0.distcp").unlink()
    with pytest.raises(dcpx.DcpxError, match="__0_0.distcp"):
        dcpx.load(_blank(), damaged)


def test_verify_command(damaged: Path) -> None:
    """``dcpx verify`` stops at the checksum layer and reports the damaged item only."""
    fqn, name, start, _ = next(r for r in _chunk_regions(damaged) if r[0] == "model.b")
    _flip(damaged / name, start + 7)
    run = subprocess.run([sys.executable, "-m", "dcpx", "verify", str(damaged)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"'{fqn}'" in run.stdout and "crc32c mismatch" in run.stdout and name in run.stdout, run.stdout
    items = len(_manifest(damaged)["items"])
    assert f"{items - 1} verified, 1 failed" in run.stdout, run.stdout


def _chain(names: list[str], key: bytes) -> list[Any]:
    return [dcpx.transform("encrypt", keys={"k1": key}, primary="k1") if n == "encrypt" else n for n in names]


@pytest.mark.parametrize("chain", [["checksum", "zstd"], ["zstd", "checksum"], ["zstd", "encrypt", "checksum"]],
                         ids="-".join)
def test_place_in_a_chain(tmp_path: Path, chain: list[str]) -> None:
    """Innermost it covers the tensor bytes; outermost the stored bytes, checkable without keys."""
    if "encrypt" in chain:
        pytest.importorskip("dcpx_encrypt")
    key = os.urandom(32)
    path = tmp_path / "ck"
    dcpx.save(_state(), path, transforms=_chain(chain, key), chunk_size=CHUNK)
    readers = _chain([n for n in chain if n == "encrypt"], key)
    out = _blank()
    dcpx.load(out, path, transforms=readers)
    _assert_equal(out)

    item = next(i for i in _manifest(path)["items"] if i["fqn"] == "model.w")
    _flip(path / item["file"], item["offset"] + 10)  # inside chunk 0 as stored
    with pytest.raises(dcpx.DcpxError, match="model.w") as info:
        dcpx.load(_blank(), path, transforms=readers)
    if chain[-1] == "checksum":  # outermost: it is the first layer to see the damage
        assert isinstance(info.value, ChecksumError)
        assert info.value.expected in str(info.value) and info.value.actual in str(info.value)
    if "encrypt" in chain:  # no key given: verify still finds the damage
        run = subprocess.run([sys.executable, "-m", "dcpx", "verify", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "'model.w'" in run.stdout and "crc32c mismatch" in run.stdout, run.stdout
