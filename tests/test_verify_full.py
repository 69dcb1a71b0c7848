"""``verify_checkpoint(full=True)`` (``dcpx verify --full``) undoes every layer, as a load
does, so it fails items whose outermost check passes but which a load would refuse."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpx
from checkpoint_helpers import storage_items
from dcpx.verify import verify_checkpoint

zstd_plugin = pytest.importorskip("dcpx_zstd.plugin")
zstd_transform = pytest.importorskip("dcpx_zstd.transform")
checksum_plugin = pytest.importorskip("dcpx_checksum.plugin")
encrypt_plugin = pytest.importorskip("dcpx_encrypt.plugin")

KEY = bytes(range(32))
CHUNK = 64 << 10


@pytest.fixture
def plugins(fresh_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DCPX_ENCRYPT_KEY", "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, plugin in {"dcpx-zstd": zstd_plugin, "dcpx-checksum": checksum_plugin,
                         "dcpx-encrypt": encrypt_plugin}.items():
        dcpx.register_plugin(plugin, name=name)


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {"w": torch.randn(256, 256, generator=g), "b": torch.randn(256, generator=g).to(torch.bfloat16),
            "empty": torch.zeros(0, 4), "step": 7, "note": {"lr": 0.1, "tags": ["a", "b"]}}


def _statuses(path: Path, **kwargs: Any) -> dict[str, tuple[str, str]]:
    return {c.fqn: (c.status, c.detail) for c in verify_checkpoint(str(path), **kwargs)}


def test_full_verify_of_an_intact_checkpoint(plugins: None, tmp_path: Path) -> None:
    enc = dcpx.transform("encrypt", keys={"k1": KEY})
    dcpx.save(_state(), tmp_path, transforms=["zstd", enc, "checksum"], chunk_size=CHUNK)
    checks = _statuses(tmp_path, transforms=[enc], full=True)
    assert {fqn: status for fqn, (status, _) in checks.items()} == dict.fromkeys(checks, "ok")
    assert checks["w"][1].startswith("decoded; stream.checksum@dcpx")


def test_damage_under_the_checksum_fails_only_a_full_verify(plugins: None, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A zstd chunk damaged before the checksum was computed over it (a writer-side fault):
    the checksum layer is intact, the load is not."""
    encode = zstd_transform.ZstdTransform.encode

    def damaged(self: Any, data: memoryview, chunk: Any) -> bytes:
        out = encode(self, data, chunk)
        return bytes(len(out)) if chunk.item.fqn == "w" and chunk.index == 1 else out

    monkeypatch.setattr(zstd_transform.ZstdTransform, "encode", damaged)
    dcpx.save(_state(), tmp_path, transforms=["zstd", "checksum"], chunk_size=CHUNK)
    monkeypatch.undo()

    assert _statuses(tmp_path)["w"][0] == "ok"
    status, detail = _statuses(tmp_path, full=True)["w"]
    assert status == "failed" and "chunk 1" in detail and "zstd" in detail
    with pytest.raises(dcpx.DcpxError, match="chunk 1"):
        dcpx.load(_state(), tmp_path)


def test_full_verify_needs_every_key(plugins: None, tmp_path: Path) -> None:
    enc = dcpx.transform("encrypt", keys={"k1": KEY})
    dcpx.save(_state(), tmp_path, transforms=["zstd", enc, "checksum"], chunk_size=CHUNK)
    assert _statuses(tmp_path)["w"][0] == "ok"  # the checksum needs no key
    status, detail = _statuses(tmp_path, full=True)["w"]
    assert status == "missing" and "no key to decode it with" in detail


def _stock_with_damaged_start(path: Path, fqn: str) -> None:
    """A stock checkpoint of ``_state()`` whose item ``fqn`` has its first 4 bytes (the
    torch.save archive's first local header) overwritten."""
    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(path))
    with open(path / ".metadata", "rb") as f:
        info = storage_items(pickle.load(f))[fqn]
    name = path / info.relative_path
    data = bytearray(name.read_bytes())
    data[info.offset:info.offset + 4] = b"\xff" * 4
    name.write_bytes(data)


def test_a_damaged_stock_item_fails_only_a_full_verify(tmp_path: Path) -> None:
    _stock_with_damaged_start(tmp_path, "w")

    assert {s for s, _ in _statuses(tmp_path).values()} == {"missing"}
    checks = _statuses(tmp_path, full=True)
    assert checks["w"][0] == "failed" and "torch.save" in checks["w"][1]
    assert {fqn: s for fqn, (s, _) in checks.items() if fqn != "w"} == dict.fromkeys(set(checks) - {"w"}, "missing")
    assert checks["b"][1] == "decoded; no integrity transform"


@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("rows", [10 ** 6, 2 ** 15])  # no machine holds it / 4 GiB, allocated lazily
def test_a_forged_stock_tensor_size_fails_a_full_verify(tmp_path: Path, zstd: bool, rows: int) -> None:
    from torch.distributed.checkpoint._extension import ZStandard

    from checkpoint_helpers import rewrite_metadata

    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(tmp_path, _extensions=[ZStandard()] if zstd else None))

    def claim(metadata: Any) -> None:
        md = metadata.state_dict_metadata["w"]
        md.size = md.chunks[0].sizes = torch.Size([rows, rows])

    rewrite_metadata(tmp_path, claim)
    status, detail = _statuses(tmp_path, full=True)["w"]
    assert status == "failed" and "'__0_0.distcp'" in detail, detail


class Opaque:
    """A class torch's weights-only unpickler does not admit."""


def test_a_stock_entry_a_default_load_refuses_fails_a_full_verify(tmp_path: Path) -> None:
    """Entries are unpickled as a default (weights-only) load unpickles them."""
    import io

    from checkpoint_helpers import rewrite_metadata

    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(tmp_path))
    with open(tmp_path / ".metadata", "rb") as f:
        info = storage_items(pickle.load(f))["step"]
    payload = io.BytesIO()
    torch.save(Opaque(), payload)
    with open(tmp_path / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(payload.getvalue())

    def point(metadata: Any) -> None:
        entry = storage_items(metadata)["step"]
        entry.offset, entry.length = offset, len(payload.getvalue())

    rewrite_metadata(tmp_path, point)
    assert _statuses(tmp_path)["step"][0] == "missing"
    status, detail = _statuses(tmp_path, full=True)["step"]
    assert status == "failed" and "weights_only" in detail
    with pytest.raises(dcpx.DcpxError, match="step"):
        dcpx.load(_state(), tmp_path)


def test_a_raw_item_of_another_size_than_its_metadata_fails_a_full_verify(tmp_path: Path) -> None:
    from checkpoint_helpers import rewrite_metadata

    dcpx.save({"w": torch.arange(16.0)}, tmp_path)

    def claim(metadata: Any) -> None:
        md = metadata.state_dict_metadata["w"]
        md.size = md.chunks[0].sizes = torch.Size([8])

    rewrite_metadata(tmp_path, claim)  # and the manifest, with its CRC-32C, is gone
    assert _statuses(tmp_path)["w"] == ("missing", "no integrity transform")
    status, detail = _statuses(tmp_path, full=True)["w"]
    assert status == "failed" and "raw item holds 64 bytes, metadata expects 32" in detail


@pytest.mark.parametrize("offset, index", [(5, None), (("a",), None), (None, "0")])
def test_a_storage_key_of_the_wrong_shape_is_refused_with_the_metadata(tmp_path: Path, offset: Any, index: Any) -> None:
    """A forged key reaches no code that would take it apart: .metadata itself is refused."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from checkpoint_helpers import rewrite_metadata

    dcpx.save({"w": torch.randn(4, 4), "step": 7}, tmp_path)

    def forge(metadata: Any) -> None:
        key = next(k for k in metadata.storage_data if k.fqn == "w")
        forged = MetadataIndex.__new__(MetadataIndex)
        for name, value in (("fqn", "w"), ("offset", offset), ("index", index)):
            object.__setattr__(forged, name, value)
        metadata.storage_data[forged] = metadata.storage_data.pop(key)

    rewrite_metadata(tmp_path, forge)
    for read in (lambda: verify_checkpoint(str(tmp_path), full=True), lambda: dcpx.load({"w": torch.zeros(4, 4)}, tmp_path)):
        with pytest.raises(dcpx.CheckpointFormatError, match="storage entry of 'w'.*its key has offset"):
            read()


@pytest.mark.parametrize("full", [False, True])
def test_an_entry_with_no_stored_item_fails_verify(tmp_path: Path, full: bool) -> None:
    """A load of 'b' fails when .metadata lists it but stores nothing for it, so verify
    must not report the checkpoint as verified."""
    import glob
    import hashlib
    import json

    from checkpoint_helpers import rewrite_metadata

    dcpx.save({"a": torch.arange(6.0), "b": torch.ones(3), "n": 7}, tmp_path)
    rewrite_metadata(tmp_path, lambda m: [m.storage_data.pop(i) for i in list(m.storage_data) if i.fqn in ("b", "n")],
                     drop_manifest=False)
    (name,) = glob.glob(str(tmp_path / ".dcpx-manifest-*.json"))  # rebound, as anyone can without a key
    body = json.loads(Path(name).read_bytes())
    body["metadata_sha256"] = hashlib.sha256((tmp_path / ".metadata").read_bytes()).hexdigest()
    Path(name).write_text(json.dumps(body))
    checks = {c.fqn: c for c in verify_checkpoint(str(tmp_path), full=full)}
    assert checks["a"].status == "ok"
    assert (checks["b"].status, checks["b"].shard_offsets) == ("failed", (0,))
    assert (checks["n"].status, checks["n"].shard_offsets) == ("failed", None)
    assert "lists it but stores no item" in checks["b"].detail
    with pytest.raises(dcpx.CheckpointFormatError, match="b: no storage entry"):
        dcpx.load({"a": torch.zeros(6), "b": torch.zeros(3)}, tmp_path)


def test_full_verify_decodes_one_non_tensor_entry_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry is decoded whole (up to max_item_bytes): on N threads at once, a few KB of
    forged zstd entries cost N times that, so entries take turns, as in a load."""
    import threading
    import time

    from dcpx import verify

    dcpx.save({f"e{i}": {"step": i} for i in range(6)}, tmp_path, transforms=["zstd"])
    running, peak, guard = [0], [0], threading.Lock()
    real = verify.load_weights_only

    def counted(data: Any, where: str) -> Any:
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with guard:
            running[0] -= 1
        return real(data, where)

    monkeypatch.setattr(verify, "load_weights_only", counted)
    checks = verify_checkpoint(str(tmp_path), full=True, workers=4)
    assert len(checks) == 6 and {c.status for c in checks} == {"missing"}  # decoded; zstd has no digest
    assert peak[0] == 1
