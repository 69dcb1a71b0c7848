"""What the writer and reader do with planners that stock torch tolerates: planners that
convert tensors, tensor subclasses, planners that fail between planning and writing, load
planners that stage items in memory of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType
from torch.testing._internal.two_tensor import TwoTensor

import dcpx

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _failures(info: pytest.ExceptionInfo[CheckpointException]) -> list[BaseException]:
    return [f[0] if isinstance(f, tuple) else f for f in info.value.failures.values()]


class CastingPlanner(DefaultSavePlanner):
    """Converts tensors in resolve_data but leaves the plan's dtype as it was."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        return data if write_item.type == WriteItemType.BYTE_IO else data.to(self.dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16], ids=["same-size", "smaller"])
@pytest.mark.parametrize("options", [{}, {"transforms": ["zstd"]}, {"compat": True}], ids=["raw", "zstd", "compat"])
def test_tensor_unlike_its_plan_is_refused(tmp_path: Path, dtype: torch.dtype, options: dict) -> None:
    """Stored as the plan describes it, a same-size cast read back as garbage and a smaller one
    as a checkpoint no reader could load; the save now fails naming the item."""
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.arange(4.0)}, storage_writer=dcpx.FileSystemWriter(tmp_path, **options),
                 planner=CastingPlanner(dtype))
    errors = _failures(info)
    assert any(isinstance(e, dcpx.ConfigError) and "w:" in str(e) and str(dtype) in str(e) for e in errors), errors
    assert not (tmp_path / ".metadata").exists()


def test_wrapper_subclass(tmp_path: Path) -> None:
    """A wrapper subclass keeps its values in inner tensors: refused by name in dcpx's format,
    saved as torch.save items (as stock torch does) in compat mode, and loadable into."""
    value = TwoTensor(torch.arange(6.0), torch.arange(6.0) * 10)
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": value}, storage_writer=dcpx.FileSystemWriter(tmp_path / "raw"))
    assert any(isinstance(e, dcpx.ConfigError) and "x:" in str(e) and "compat=True" in str(e) for e in _failures(info))

    dcp.save({"x": value}, storage_writer=dcpx.FileSystemWriter(tmp_path / "compat", compat=True))
    dest = {"x": TwoTensor(torch.zeros(6), torch.zeros(6))}
    with torch.serialization.safe_globals([TwoTensor]):
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path / "compat"))
    assert torch.equal(dest["x"].a, value.a) and torch.equal(dest["x"].b, value.b)

    dcp.save({"x": torch.arange(6.0)}, storage_writer=dcpx.FileSystemWriter(tmp_path / "plain", transforms=["zstd"]))
    dest = {"x": TwoTensor(torch.zeros(6), torch.ones(6))}
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path / "plain"))
    assert torch.equal(dest["x"].a, torch.arange(6.0)) and torch.equal(dest["x"].b, torch.arange(6.0))


class FailsAfterPlanning(DefaultSavePlanner):
    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        raise KeyboardInterrupt


def test_save_failing_between_planning_and_writing_frees_the_path(tmp_path: Path) -> None:
    """The writer locks the directory when it plans; a planner raising before the writer
    writes left the lock marked busy, so every later save to the path in this process failed."""
    dcpx.save({"w": torch.ones(4)}, tmp_path)
    with pytest.raises(CheckpointException):
        dcp.save({"w": torch.zeros(4)}, storage_writer=dcpx.FileSystemWriter(tmp_path), planner=FailsAfterPlanning())
    dest = {"w": torch.zeros(4)}
    dcpx.load(dest, tmp_path)
    assert torch.equal(dest["w"], torch.ones(4))  # the failed save changed nothing
    dcpx.save({"w": torch.full((4,), 2.0)}, tmp_path)
    dcpx.load(dest, tmp_path)
    assert torch.equal(dest["w"], torch.full((4,), 2.0))


class ReusedStagingBuffer(DefaultLoadPlanner):
    """Hands out one staging buffer per shape and copies it out in commit_tensor: correct
    when each item is resolved, filled and committed before the next is resolved."""

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        super().set_up_planner(*args, **kwargs)
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.events: list[tuple[str, str]] = []
        self.outstanding = self.most_outstanding = 0

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        self.events.append(("resolve", read_item.dest_index.fqn))
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        dest = super().resolve_tensor(read_item)
        return self.buffers.setdefault((dest.dtype, tuple(dest.shape)), torch.empty_like(dest))

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        self.events.append(("commit", read_item.dest_index.fqn))
        self.outstanding -= 1
        super().resolve_tensor(read_item).copy_(tensor)


@pytest.mark.parametrize("options", [{}, {"transforms": ["zstd"]}, {"compat": True}], ids=["raw", "zstd", "compat"])
def test_planner_reusing_one_staging_buffer(tmp_path: Path, options: dict) -> None:
    """Items were all resolved first and filled at once, so every item landed in the same
    buffer: wrong values, different on each run, no error.  A tensor whose memory overlaps
    one still being filled now waits until that one is committed."""
    state = {f"w{i}": torch.full((1000,), float(i)) for i in range(40)}
    dcp.save(state, storage_writer=dcpx.FileSystemWriter(tmp_path, **options))
    dest = {k: torch.zeros(1000) for k in state}
    planner = ReusedStagingBuffer()
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path), planner=planner)
    assert all(torch.equal(dest[k], state[k]) for k in state)
    commits = [fqn for op, fqn in planner.events if op == "commit"]
    assert commits == [fqn for op, fqn in planner.events if op == "resolve"]  # plan order
    assert all(planner.events.index(("resolve", f)) < planner.events.index(("commit", f)) for f in commits)


def test_staging_copies_are_bounded(tmp_path: Path) -> None:
    """A planner that stages each item in new memory (a GPU or meta-device destination
    loaded through CPU copies) used to hold a copy of every item at once."""
    state = {f"w{i}": torch.full((100,), float(i)) for i in range(300)}
    dcpx.save(state, tmp_path)

    class NewBufferEachItem(ReusedStagingBuffer):
        def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
            return super().resolve_tensor(read_item).clone()

    dest = {k: torch.zeros(100) for k in state}
    planner = NewBufferEachItem()
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path, workers=1), planner=planner)
    assert all(torch.equal(dest[k], state[k]) for k in state)
    assert planner.most_outstanding < 100, planner.most_outstanding


def test_tied_and_overlapping_destinations(tmp_path: Path) -> None:
    """Destinations that share memory (tied weights, views of one buffer) load as stock does."""
    dcpx.save({"a": torch.arange(12.0), "b": torch.arange(12.0) * 2, "c": torch.arange(6.0) - 1}, tmp_path,
              transforms=["zstd"], chunk_size=16)
    tied = torch.zeros(12)
    flat = torch.zeros(18)
    dest = {"a": tied, "b": tied, "c": flat[6:12]}
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))
    assert torch.equal(tied, torch.arange(12.0) * 2)  # b comes after a in plan order
    assert torch.equal(flat[6:12], torch.arange(6.0) - 1) and not flat[:6].any() and not flat[12:].any()


def test_planner_sees_the_id_the_save_commits(tmp_path: Path) -> None:
    """DCP gives the save planner ``storage_writer.storage_meta()`` before planning; its save
    id is the one the checkpoint records, save after save (stock draws it in ``reset``)."""
    from dcpx.checkpoint_files import load_metadata

    class Recording(DefaultSavePlanner):
        def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
            self.seen = storage_meta.save_id
            self.seen_path = storage_meta.checkpoint_id
            super().set_up_planner(state_dict, storage_meta, is_coordinator)

    writer = dcpx.FileSystemWriter(tmp_path)
    ids = []
    for value in (1.0, 2.0):
        planner = Recording()
        dcp.save({"w": torch.full((4,), value)}, storage_writer=writer, planner=planner)
        committed = load_metadata(str(tmp_path))[0].storage_meta.save_id
        assert planner.seen == committed == writer.save_id
        assert planner.seen_path == tmp_path  # a Path, as stock's writer gives
        ids.append(committed)
    assert ids[0] != ids[1]


@pytest.mark.parametrize("given", [str, Path])
def test_path_and_checkpoint_id_are_paths_as_in_stock(tmp_path: Path, given: Any) -> None:
    """Stock's writer and reader keep ``path`` (and ``checkpoint_id``) as a ``Path``; code
    written against them (``writer.path / "extra"``) runs unchanged, and ``reset`` moves both."""
    from torch.distributed.checkpoint import FileSystemReader as StockReader, FileSystemWriter as StockWriter

    for ours, stock in ((dcpx.FileSystemWriter(given(tmp_path)), StockWriter(given(tmp_path))),
                        (dcpx.FileSystemReader(given(tmp_path)), StockReader(given(tmp_path)))):
        assert ours.path == stock.path == tmp_path and type(ours.path) is type(stock.path)
        assert ours.checkpoint_id == stock.checkpoint_id
        ours.reset(given(tmp_path / "other"))
        assert ours.path == ours.checkpoint_id == tmp_path / "other"
