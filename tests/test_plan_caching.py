"""Every save gets its own checkpoint id and file names, also when DCP's plan caching
(``DefaultSavePlanner(enable_plan_caching=True)``) hands the writer an earlier save's plan,
and also when one writer object saves several times.  The multi-rank case, where a rank
writes such a plan under an id of its own, is in integration/test_multirank.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlanner

import dcpx
from dcpx.checkpoint_files import load_metadata

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

_CACHES = ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan", "_cached_metadata")


@pytest.fixture(autouse=True)
def empty_plan_cache():
    """DCP keeps cached plans in class attributes: start and end each test without them."""
    for name in _CACHES:
        getattr(SavePlanner, name).clear()
    yield
    for name in _CACHES:
        getattr(SavePlanner, name).clear()


def _state(value: float) -> dict:
    return {"w": torch.full((1000,), value), "b": torch.arange(10.0) + value, "step": int(value)}


def _loaded(path: Path) -> dict:
    dest = {"w": torch.zeros(1000), "b": torch.zeros(10), "step": -1}
    dcpx.load(dest, path)
    return dest


def _committed(path: Path) -> tuple[str, set[str]]:
    """The checkpoint id and data files of the checkpoint committed at ``path``."""
    metadata = load_metadata(str(path))[0]
    return metadata.storage_meta.save_id, {info.relative_path for info in metadata.storage_data.values()}


def _save(path: Path, value: float, writer: dcpx.FileSystemWriter | None = None, **options) -> None:
    writer = writer or dcpx.FileSystemWriter(path, sync_files=False, **options)
    dcp.save(_state(value), storage_writer=writer, planner=DefaultSavePlanner(enable_plan_caching=True))


@pytest.mark.parametrize("transforms", [None, ["zstd"]])
def test_cached_plans_are_written_as_new_checkpoints(tmp_path: Path, transforms) -> None:
    path = tmp_path / "ckpt"
    seen: list[tuple[str, set[str]]] = []
    for value in (1.0, 2.0, 3.0):
        _save(path, value, transforms=transforms)
        assert SavePlanner._cached_final_save_plan, "the planner should have cached its plan"
        seen.append(_committed(path))
        got = _loaded(path)
        assert torch.equal(got["w"], _state(value)["w"]) and got["step"] == int(value)
    ids = [i for i, _ in seen]
    assert len(set(ids)) == 3, f"saves share a checkpoint id: {ids}"
    for (_, before), (_, after) in zip(seen, seen[1:]):
        assert not before & after, "a re-save wrote into the committed checkpoint's files"
    _save(tmp_path / "other", 4.0, transforms=transforms)
    assert _committed(tmp_path / "other")[0] not in ids


def test_an_interrupted_cached_resave_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _save(path, 1.0)
    writer = dcpx.FileSystemWriter(path, sync_files=False)

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the commit")

    writer.finish = crash
    with pytest.raises(CheckpointException, match="killed before the commit"):
        _save(path, 2.0, writer=writer)
    writer.reset()
    assert torch.equal(_loaded(path)["w"], _state(1.0)["w"])


def test_one_writer_saving_twice_gives_two_checkpoint_ids(tmp_path: Path) -> None:
    writer = dcpx.FileSystemWriter(tmp_path / "ckpt", sync_files=False)
    ids = []
    for value in (1.0, 2.0):
        dcp.save(_state(value), storage_writer=writer)
        ids.append(_committed(tmp_path / "ckpt")[0])
        assert writer.save_id == ids[-1]
    assert ids[0] != ids[1]
    assert torch.equal(_loaded(tmp_path / "ckpt")["w"], _state(2.0)["w"])


def test_rank_local_saves_with_cached_plans(tmp_path: Path) -> None:
    path = tmp_path / "own"
    ids = set()
    for value in (1.0, 2.0):
        writer = dcpx.FileSystemWriter(path, sync_files=False)
        dcp.save(_state(value), storage_writer=writer, planner=DefaultSavePlanner(enable_plan_caching=True),
                 use_collectives=False)
        ids.add(writer.save_id)
        assert torch.equal(_loaded(path)["w"], _state(value)["w"])
    assert len(ids) == 2


def test_plan_cached_from_a_stock_writer(tmp_path: Path) -> None:
    """DCP caches plans per planner class, whatever writer they were made for: after a stock
    save with plan caching, the next dcpx save is handed stock's plan, not one of its own."""
    dcp.save(_state(1.0), storage_writer=dcp.FileSystemWriter(tmp_path / "stock"),
             planner=DefaultSavePlanner(enable_plan_caching=True))
    for value in (2.0, 3.0):
        _save(tmp_path / "ckpt", value)
        assert torch.equal(_loaded(tmp_path / "ckpt")["w"], torch.full((1000,), value))
