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
