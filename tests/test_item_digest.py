"""The checksum layer's item digest: chunks intact one by one but swapped, moved from another
item, repeated or dropped fail the load and ``dcpx verify``, since the manifest records a
digest over the chunk digests in chunk order."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import dcpx
from checkpoint_helpers import storage_items
from dcpx.verify import verify_checkpoint

dcpx_checksum = pytest.importorskip("dcpx_checksum")
from dcpx_checksum import plugin as checksum_plugin  # noqa: E402

CHUNK = 4096
STORED_CHUNK = CHUNK + 8  # payload, then a crc32c trailer: 4-byte digest, "DCK", algorithm id


@pytest.fixture
def checksum(fresh_host: Any) -> None:
    dcpx.register_plugin(checksum_plugin, name="dcpx-checksum")


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, 64, generator=g)}


def _blank() -> dict[str, torch.Tensor]:
    """Destinations filled with ones, so a zeroed one shows the reader zeroed it."""
    return {"a": torch.ones(64, 64), "b": torch.ones(64, 64)}


def _save(path: Path, transforms: list[Any] | None = None) -> dict[str, torch.Tensor]:
    state = _state()
    dcpx.save({k: v.clone() for k, v in state.items()}, path, transforms=transforms or ["checksum"], chunk_size=CHUNK)
    return state


def _edit_data(path: Path, edit: Any) -> None:
    """Apply ``edit(data, infos)`` to the data file holding item ``a``; nothing else changes."""
    with open(path / ".metadata", "rb") as f:
        infos = storage_items(pickle.load(f))
    name = path / infos["a"].relative_path
    data = bytearray(name.read_bytes())
    edit(data, infos)
    name.write_bytes(data)


def _swap_chunks(data: bytearray, infos: dict[str, Any]) -> None:
    o, n = infos["a"].offset, STORED_CHUNK
    data[o:o + n], data[o + n:o + 2 * n] = data[o + n:o + 2 * n], data[o:o + n]


def _repeat_chunk(data: bytearray, infos: dict[str, Any]) -> None:
    """Chunk 0 stored again in place of chunk 1 (chunk 1 is missing)."""
    o, n = infos["a"].offset, STORED_CHUNK
    data[o + n:o + 2 * n] = data[o:o + n]


def _swap_items(data: bytearray, infos: dict[str, Any]) -> None:
    a, b = infos["a"], infos["b"]
    assert a.length == b.length and a.relative_path == b.relative_path
    first, second = bytes(data[a.offset:a.offset + a.length]), bytes(data[b.offset:b.offset + b.length])
    data[a.offset:a.offset + a.length], data[b.offset:b.offset + b.length] = second, first


EDITS = {"swapped chunks": _swap_chunks, "repeated chunk": _repeat_chunk, "swapped items": _swap_items}


def test_intact_checkpoint_loads_and_verifies(tmp_path: Path, checksum: None) -> None:
    state = _save(tmp_path)
    out = _blank()
    dcpx.load(out, tmp_path)
    assert torch.equal(out["a"], state["a"]) and torch.equal(out["b"], state["b"])
    assert [c.status for c in verify_checkpoint(str(tmp_path))] == ["ok", "ok"]


def test_verify_says_it_checked_the_item_digest(tmp_path: Path, checksum: None) -> None:
    _save(tmp_path)
    assert all(c.detail.endswith("(and item digest)") for c in verify_checkpoint(str(tmp_path)))


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_load_refuses_chunks_out_of_place(tmp_path: Path, checksum: None, edit: str) -> None:
    _save(tmp_path)
    _edit_data(tmp_path, EDITS[edit])
    out = _blank()
    with pytest.raises(dcpx_checksum.ChecksumMismatchError, match="item 'a'.*item digest mismatch") as info:
        dcpx.load(out, tmp_path)
    assert isinstance(info.value, dcpx.IntegrityError) and info.value.chunk_index is None
    # decoded straight into the destination, which is zeroed before the error is raised
    assert not out["a"].any()


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_verify_reports_chunks_out_of_place(tmp_path: Path, checksum: None, edit: str) -> None:
    _save(tmp_path)
    _edit_data(tmp_path, EDITS[edit])
    checks = {c.fqn: c for c in verify_checkpoint(str(tmp_path))}
    assert checks["a"].status == "failed" and "item digest mismatch" in checks["a"].detail
    assert checks["b"].status == ("failed" if edit == "swapped items" else "ok")


def test_verify_command_fails_on_swapped_chunks(tmp_path: Path, checksum: None) -> None:
    from cli_helpers import Command, installed, run_all

    if not installed("dcpx_checksum"):
        pytest.skip("the dcpx command loads installed plugins only")
    for name in ("intact", "swapped"):
        _save(tmp_path / name)
    _edit_data(tmp_path / "swapped", _swap_chunks)
    results = run_all({n: Command(["verify", n]) for n in ("intact", "swapped")}, tmp_path)
    assert results["intact"].returncode == 0, results["intact"].stderr
    r = results["swapped"]
    assert r.returncode == 1 and "FAILED  a" in r.stdout and "item digest mismatch" in r.stdout
    assert "1 verified, 1 failed, 0 without a digest" in r.stdout


def test_items_of_equal_size_have_different_digests(tmp_path: Path, checksum: None) -> None:
    """What makes a whole-item swap detectable: the item digests differ with the content."""
    _save(tmp_path)
    (name,) = tmp_path.glob(".dcpx-manifest-*.json")
    records = {i["fqn"]: i["records"] for i in json.loads(name.read_text())["items"]}
    assert records["a"] != records["b"] and all(len(r) == 1 for r in records.values())


def test_swap_into_a_copy_buffer_leaves_the_destination_untouched(tmp_path: Path, checksum: None) -> None:
    """A destination of another dtype is filled from a buffer, after the check."""
    _save(tmp_path)
    _edit_data(tmp_path, _swap_chunks)
    out = {"a": torch.ones(64, 64, dtype=torch.float64), "b": torch.ones(64, 64, dtype=torch.float64)}
    with pytest.raises(dcpx.IntegrityError, match="item digest mismatch"):
        dcpx.load(out, tmp_path)
    assert torch.equal(out["a"], torch.ones(64, 64, dtype=torch.float64))


def test_a_partial_read_of_an_intact_item_still_loads(tmp_path: Path, checksum: None) -> None:
    """A read that decodes only some chunks has no item digest to compare: it still loads."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    state = _save(tmp_path)
    reader = dcpx.FileSystemReader(tmp_path)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    target = torch.zeros(16, 64)
    req = ReadItem(LoadItemType.TENSOR, MetadataIndex("a", torch.Size([16, 0])), torch.Size([0, 0]),
                   MetadataIndex("a", torch.Size([0, 0])), torch.Size([16, 0]), torch.Size([16, 64]))

    class Planner:
        def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
            return target

        def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
            pass

    reader.read_data(LoadPlan([req]), Planner()).wait()  # type: ignore[arg-type]
    assert torch.equal(target, state["a"][16:32])


def test_item_record_of_another_item_fails_the_load(tmp_path: Path, checksum: None) -> None:
    """A manifest whose record for ``a`` is ``b``'s fails like a swap of the data."""
    _save(tmp_path)
    (name,) = tmp_path.glob(".dcpx-manifest-*.json")
    body = json.loads(name.read_text())
    by_fqn = {i["fqn"]: i for i in body["items"]}
    by_fqn["a"]["records"] = dict(by_fqn["b"]["records"])
    name.write_text(json.dumps(body))
    with pytest.raises(dcpx.IntegrityError, match="item 'a'.*item digest mismatch"):
        dcpx.load(_blank(), tmp_path)
