"""torch.save archives from a checkpoint are refused where Python's zip reader (which checks
them) and torch's (which loads them) could read different members."""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any, Callable

import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

import dcpx
from dcpx.non_tensor import hand_over
from dcpx.torch_archive import check_stored_archive, load_weights_only

BENIGN = io.BytesIO(b"benign")
OTHER = io.BytesIO(b"OTHER")


def _archive(value: Any) -> bytes:
    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


def _pickle_of(value: Any) -> bytes:
    with zipfile.ZipFile(io.BytesIO(_archive(value))) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _rebuilt(members: Callable[[str, bytes], list[tuple[str, bytes]]]) -> bytes:
    """A torch.save archive of BENIGN with each member replaced by what ``members`` returns."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_archive(BENIGN))) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            for name, data in members(info.filename, src.read(info)):
                dst.writestr(name, data)
    return out.getvalue()


def _nul_named() -> bytes:
    """Two pickles: zipfile cuts 'data.pkl<NUL>' to the name torch looks up, torch's reader
    finds 'DATA.pkl' (it matches names without regard to case)."""
    other = _pickle_of(OTHER)

    def members(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name.endswith("/data.pkl"):
            return [(name[:-8] + "DATA.pkl", other), (name + "Z", data)]
        return [(name, data)]
    raw = _rebuilt(members)
    return raw.replace(b"data.pklZ", b"data.pkl\0")


def _case_twins() -> bytes:
    other = _pickle_of(OTHER)
    return _rebuilt(lambda name, data: [(name, data), (name[:-8] + "Data.pkl", other)] if name.endswith("/data.pkl")
                    else [(name, data)])


def _commented() -> bytes:
    raw = bytearray(_archive(BENIGN))
    raw[-2:] = struct.pack("<H", 4)  # the end record's comment length
    return bytes(raw) + b"note"


def _directory_copied() -> bytes:
    """A copy of the central directory before the end records: zipfile reads the copy (the
    directory right before the end records), torch's reader the one at the recorded offset."""
    raw = _archive(BENIGN)
    end64 = raw.rfind(b"PK\x06\x06")
    cd_size, cd_offset = struct.unpack_from("<QQ", raw, end64 + 40)
    copied = raw[:end64] + raw[cd_offset:cd_offset + cd_size] + raw[end64:]
    locator = len(copied) - 42
    return copied[:locator + 8] + struct.pack("<Q", end64 + cd_size) + copied[locator + 16:]


@pytest.mark.parametrize("forge, why", [
    (_nul_named, "member name with a NUL byte"),
    (_case_twins, "differ only in case"),
    (_commented, "comment or bytes after its end record"),
    (_directory_copied, "bytes between its central directory"),
])
def test_archives_two_zip_readers_read_differently_are_refused(forge: Callable[[], bytes], why: str) -> None:
    data = forge()
    with zipfile.ZipFile(io.BytesIO(data)) as z:  # each is a zip archive Python opens without complaint
        assert any(n.lower().endswith("/data.pkl") for n in z.namelist())
    with pytest.raises(dcpx.UnsafeCheckpointError, match=why):
        check_stored_archive(io.BytesIO(data), "entry")


def test_a_planner_unpickling_an_entry_again_gets_what_was_checked() -> None:
    """A planner with its own ``load_bytes`` unpickles an entry after the reader's check,
    with torch's zip reader: an archive whose readers disagree never reaches it."""
    class Unpickling(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    index = MetadataIndex("extra")
    req = ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size([0]),
                   storage_index=index, storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    for data, expected in ((_archive(BENIGN), b"benign"), (_nul_named(), None)):
        planner = Unpickling(flatten_state_dict=False)
        planner.state_dict = {}
        if expected is None:
            with pytest.raises(dcpx.UnsafeCheckpointError):
                hand_over(planner, req, data, "extra", weights_only=True)
            assert planner.state_dict == {}
        else:
            hand_over(planner, req, data, "extra", weights_only=True)
            assert planner.state_dict["extra"].getvalue() == expected


@pytest.mark.parametrize("value", [{"w": torch.arange(3)}, [1, "two", 3.0], io.BytesIO(b"x" * 100_000), torch.ones(2, 2)])
def test_archives_torch_save_writes_pass(value: Any) -> None:
    data = _archive(value)
    check_stored_archive(io.BytesIO(data), "entry")
    got = load_weights_only(data, "entry")
    if isinstance(value, io.BytesIO):
        assert got.getvalue() == value.getvalue()
    elif isinstance(value, dict):
        assert torch.equal(got["w"], value["w"])
    elif isinstance(value, torch.Tensor):
        assert torch.equal(got, value)
    else:
        assert got == value
