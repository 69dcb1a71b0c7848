"""Items stored as they are (raw tensors, untransformed entries) carry a CRC-32C in the
manifest; a changed byte is an ``IntegrityError`` naming the item, never a wrong tensor."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

import dcpx
from dcpx.data_files import DataFiles
from dcpx.verify import verify_checkpoint
from checkpoint_helpers import assert_same, blank, storage_items


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(256, 64, generator=g),
        "ids": torch.arange(5000, dtype=torch.int64),
        "half": torch.randn(999, generator=g).bfloat16(),
        "extra": {"step": 7, "name": "run-1"},
    }


def _manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    (name,) = path.glob(".dcpx-manifest-*.json")
    return name, json.loads(name.read_text())


def _flip(path: Path, fqn: str, at: float = 0.5) -> None:
    """Flip one bit inside the stored bytes of ``fqn``."""
    with open(path / ".metadata", "rb") as f:  # the test's own, freshly written file
        info = storage_items(pickle.load(f))[fqn]
    with open(path / info.relative_path, "r+b") as f:
        pos = info.offset + int(info.length * at)
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x10]))


@pytest.fixture(params=["default", "safetensors"])
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    options = {"serialization_format": SerializationFormat.SAFETENSORS} if request.param == "safetensors" else {}
    dcp.save(_state(), storage_writer=dcpx.FileSystemWriter(tmp_path, **options))
    return tmp_path


def test_manifest_records_crc_of_every_item_stored_as_it_is(saved: Path) -> None:
    _, body = _manifest(saved)
    records = {item["fqn"]: item["records"] for item in body["items"]}
    for fqn in ("w", "ids", "half"):
        assert len(records[fqn]["crc32c"]) == 8, fqn
    dest = blank(_state())
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(saved))
    assert_same(dest, _state())


@pytest.mark.parametrize("fqn, at", [("w", 0.0), ("w", 0.5), ("w", 0.999), ("ids", 0.3), ("half", 0.7)])
def test_changed_byte_in_a_raw_tensor_is_refused_and_zeroed(saved: Path, fqn: str, at: float) -> None:
    _flip(saved, fqn, at)
    dest = blank(_state())
    dest[fqn].fill_(1)
    with pytest.raises(dcpx.IntegrityError, match=rf"{fqn} \(file .*CRC-32C"):
        dcpx.load(dest, saved)
    # what was read into the destination before the check failed is not left there
    assert not dest[fqn].reshape(-1).view(torch.uint8).any()


def test_changed_byte_in_a_non_tensor_entry_is_refused(tmp_path: Path) -> None:
    dcpx.save(_state(), tmp_path)
    extra = next(f for f in storage_items(pickle.load(open(tmp_path / ".metadata", "rb"))) if f.startswith("extra"))
    _flip(tmp_path, extra, 0.5)
    with pytest.raises(dcpx.DcpxError, match=extra.replace(".", r"\.")):
        dcpx.load(blank(_state()), tmp_path)


def test_malformed_crc_in_manifest_is_a_format_error(tmp_path: Path) -> None:
    dcpx.save(_state(), tmp_path)
    name, body = _manifest(tmp_path)
    next(i for i in body["items"] if i["fqn"] == "w")["records"]["crc32c"] = "not-hex!"
    name.write_text(json.dumps(body))
    with pytest.raises(dcpx.CheckpointFormatError, match="w .*malformed CRC-32C"):
        dcpx.load(blank(_state()), tmp_path)


def test_resharded_read_of_a_raw_item_still_loads(tmp_path: Path) -> None:
    dcpx.save(_state(), tmp_path)
    got = {"w": torch.zeros(64, 64)}
    reader = dcpx.FileSystemReader(tmp_path)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    index = MetadataIndex("w", torch.Size([0, 0]))
    # rows 100-163 of the stored 256, as a 4-way reshard asks: not the whole item, so no CRC
    req = ReadItem(LoadItemType.TENSOR, index, torch.Size([0, 0]), index, torch.Size([100, 0]), torch.Size([64, 64]))
    files = DataFiles(str(tmp_path))
    try:
        reader.prepare(req, files).run(got["w"])
    finally:
        files.close()
    assert torch.equal(got["w"], _state()["w"][100:164])


def test_verify_checks_raw_items_against_the_manifest(tmp_path: Path) -> None:
    dcpx.save(_state(), tmp_path)
    checks = {c.fqn: c for c in verify_checkpoint(str(tmp_path))}
    assert all(c.status == "ok" for c in checks.values()), checks
    _flip(tmp_path, "ids", 0.5)
    checks = {c.fqn: c for c in verify_checkpoint(str(tmp_path))}
    assert checks["ids"].status == "failed" and "CRC-32C" in checks["ids"].detail
    assert checks["w"].status == "ok"
