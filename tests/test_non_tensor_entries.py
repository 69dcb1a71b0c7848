"""Non-tensor entries (pickled objects) on load: checked with weights_only, unpickled once under
torch's own planner, and decoded only as the planner takes them."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

import dcpx

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

UNPICKLED: list[int] = []


class Counted:
    """A user class allowed with torch's safe_globals; counts how often it is unpickled."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        UNPICKLED.append(state["value"])
        self.__dict__.update(state)


class OwnLoadBytes(DefaultLoadPlanner):
    """A planner with its own ``load_bytes``: the reader cannot know what it does with the bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.got: dict[str, Any] = {}

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.got[read_item.dest_index.fqn] = torch.load(value, weights_only=False)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_torch_planner_gets_the_checked_object(tmp_path: Path, nested: bool) -> None:
    """The reader's weights-only check builds each entry; torch's planner is handed that object
    instead of unpickling the entry a second time (with nothing checked, and seconds per
    hundred MiB)."""
    def wrap(d: dict[str, Any]) -> dict[str, Any]:
        return {"opt": d} if nested else d

    dcpx.save(wrap({"a": Counted(1), "b": [Counted(2), 3], "w": torch.ones(4)}), tmp_path)
    UNPICKLED.clear()
    dest = wrap({"a": None, "b": None, "w": torch.zeros(4)})
    with torch.serialization.safe_globals([Counted]):
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))  # torch's DefaultLoadPlanner
    got = dest["opt"] if nested else dest
    assert sorted(UNPICKLED) == [1, 2]
    assert got["a"].value == 1 and got["b"][0].value == 2 and got["b"][1] == 3
    assert torch.equal(got["w"], torch.ones(4))


def test_planner_with_its_own_load_bytes_gets_checked_bytes(tmp_path: Path) -> None:
    dcpx.save({"a": Counted(5)}, tmp_path)
    UNPICKLED.clear()
    planner = OwnLoadBytes()
    with torch.serialization.safe_globals([Counted]):
        dcp.load({"a": None}, storage_reader=dcpx.FileSystemReader(tmp_path), planner=planner)
    assert UNPICKLED == [5, 5]  # the reader's check, then the planner's own load
    assert planner.got["a"].value == 5
    UNPICKLED.clear()
    planner = OwnLoadBytes()
    with pytest.raises(dcp.api.CheckpointException, match="Counted"):  # not allowed: refused before the planner
        dcp.load({"a": None}, storage_reader=dcpx.FileSystemReader(tmp_path), planner=planner)
    assert UNPICKLED == [] and planner.got == {}


def test_entries_are_decoded_as_the_planner_takes_them(tmp_path: Path, toys: Any) -> None:
    """Decoded entries used to pile up: item threads decoded every entry while the planner
    was still unpickling the first (12 entries of 256 MiB took 7 GiB).  Now an entry is
    decoded only when the planner is ready for it."""
    names = [f"blob{i}" for i in range(6)]
    sd: dict[str, Any] = {n: bytes([i]) * 50_000 for i, n in enumerate(names)}
    sd.update({f"w{i}": torch.full((3000,), float(i)) for i in range(6)})
    dcpx.save(sd, tmp_path, transforms=["probe"], chunk_size=16_384)

    class SlowPlanner(DefaultLoadPlanner):
        seen: list[tuple[str, set[str]]] = []

        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            decoded = {c.fqn for c in toys.RECORD.of(op="decode") if c.fqn in names}
            self.seen.append((read_item.dest_index.fqn, decoded))
            time.sleep(0.05)  # an unpickle that takes a while: item threads would run ahead
            super().load_bytes(read_item, value)

    toys.RECORD.clear()
    dest: dict[str, Any] = {n: b"" for n in names}
    dest.update({f"w{i}": torch.zeros(3000) for i in range(6)})
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path, weights_only=False), planner=SlowPlanner())
    assert [fqn for fqn, _ in SlowPlanner.seen] == names
    for k, (fqn, decoded) in enumerate(SlowPlanner.seen):
        assert decoded == set(names[:k + 1]), f"when {fqn} was handed over, {sorted(decoded)} were decoded"
    assert all(dest[n] == sd[n] for n in names)
    assert all(torch.equal(dest[f"w{i}"], sd[f"w{i}"]) for i in range(6))


class TrainState:
    """DCP's idiom for extra state: a ``Stateful`` that hands over an ``io.BytesIO``."""

    def __init__(self, losses: list[float]) -> None:
        self.losses = losses

    def state_dict(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(self.losses, buffer)
        return {"losses": buffer, "empty": io.BytesIO(), "step": len(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict["losses"].seek(0)
        self.losses = torch.load(state_dict["losses"])
        assert state_dict["empty"].getvalue() == b""


@pytest.mark.parametrize("transforms", [None, ["zstd"]])
def test_bytesio_entries_load_through_every_planner(tmp_path: Path, transforms: Any) -> None:
    """``io.BytesIO`` values (torch's weights-only unpickler refuses the class) load under
    torch's planner, a planner with its own ``load_bytes`` and ``dcpx.load``."""
    losses = [0.5, 0.25, 0.125] * 100
    dcp.save({"train": TrainState(losses), "w": torch.ones(3)},
             storage_writer=dcpx.FileSystemWriter(tmp_path, transforms=transforms))
    state = TrainState([])
    dcp.load({"train": state, "w": torch.zeros(3)}, storage_reader=dcpx.FileSystemReader(tmp_path))
    assert state.losses == losses
    planner = OwnLoadBytes()
    dcp.load({"train": TrainState([]).state_dict()}, storage_reader=dcpx.FileSystemReader(tmp_path), planner=planner)
    assert planner.got["train.step"] == 300
    state = TrainState([])
    dcpx.load({"train": state}, tmp_path)
    assert state.losses == losses


def _entry_pickle(payload: bytes) -> bytes:
    """A protocol-2 pickle of an io.BytesIO whose state is built by ``payload`` opcodes."""
    return b"\x80\x02c_io\nBytesIO\nq\x00)\x81q\x01" + payload + b"b."


@pytest.mark.parametrize("payload, refusal", [
    # another codec could be asked to import its module
    (b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86RK\x00N\x87", "encoding 'rot13'"),
    # bytes(10**9) allocates a gigabyte from a 40-byte pickle
    (b"c__builtin__\nbytes\nJ\x00\xca\x9a;\x85RK\x00N\x87", "takes 0 positional arguments"),
    # a global beside the buffer
    (b"X\x00\x00\x00\x00K\x00cos\nsystem\nX\x02\x00\x00\x00id\x85R\x87", "refusing to load os.system"),
    # a callable planted in the buffer's __dict__, which ADDITEMS would then call
    (b"X\x00\x00\x00\x00K\x00}X\x03\x00\x00\x00addc__builtin__\nlist\ns\x87", "refusing to set attribute 'add'"),
])
def test_bytesio_entries_admit_nothing_else(payload: bytes, refusal: str) -> None:
    """The buffer allowance is for buffers: an entry that uses it to reach anything more is
    refused, as any other entry torch's weights-only unpickler refuses."""
    import zipfile

    from dcpx.safe_pickle import BUFFER_GLOBALS, safe_loads
    from dcpx.torch_archive import load_weights_only

    pickled = _entry_pickle(payload)
    with pytest.raises(dcpx.UnsafeCheckpointError, match=refusal):
        safe_loads(pickled, "entry", BUFFER_GLOBALS)
    archive, forged = io.BytesIO(), io.BytesIO()
    torch.save(io.BytesIO(b"ok"), archive)
    with zipfile.ZipFile(io.BytesIO(archive.getvalue())) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = pickled if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
    with pytest.raises(dcpx.UnsafeCheckpointError, match="non-tensor entry refused"):
        load_weights_only(forged.getvalue(), "entry")


def test_buffers_copied_from_one_string_over_and_over() -> None:
    """BUILD copies a buffer's state into it: a memoised 1 MiB string set into 200 new
    buffers (7 bytes of pickle each) is refused by the budget, not copied 200 times."""
    from dcpx.safe_pickle import BUFFER_GLOBALS, safe_loads

    big = b"X" + (1 << 20).to_bytes(4, "little") + b"a" * (1 << 20)
    encode = b"c_codecs\nencode\n" + big + b"X\x06\x00\x00\x00latin1\x86RK\x00N\x87q\x09"
    pickled = b"\x80\x02c_io\nBytesIO\nq\x00" + encode + b"0]" + b"h\x00)\x81h\x09ba" * 200 + b"."
    with pytest.raises(dcpx.UnsafeCheckpointError, match="builds far more than"):
        safe_loads(pickled, "entry", BUFFER_GLOBALS)


def test_empty_bytes_entries_load() -> None:
    """Pickle protocol 2 stores ``b""`` as a call of ``bytes``, which torch's weights-only
    unpickler refuses; such entries load like the buffers they usually come with."""
    from dcpx.torch_archive import load_weights_only

    for value in ({"empty": b""}, [io.BytesIO(b"a"), b""]):
        archive = io.BytesIO()
        torch.save(value, archive)
        got = load_weights_only(archive.getvalue(), "entry")
        assert (got == value) if isinstance(value, dict) else (got[0].getvalue(), got[1]) == (b"a", b"")
