"""A load opens a bounded number of data files at a time, whatever the checkpoint holds."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpx
import dcpx.verify
from dcpx import data_files

N_FILES = 300


@pytest.fixture
def few_descriptors():
    """Leave this process only 40 descriptors beyond those it has open now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("writer", ["stock", "dcpx"])
def test_many_data_files_load_under_a_low_descriptor_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           few_descriptors: None, writer: str) -> None:
    """One file per item: 300 files, read with at most 16 open (stock torch opens one at a
    time; keeping them all open ran out of descriptors)."""
    monkeypatch.setattr(data_files, "MAX_OPEN", 16)
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(N_FILES)}
    make = dcp.FileSystemWriter if writer == "stock" else dcpx.FileSystemWriter
    dcp.save(state, storage_writer=make(tmp_path, single_file_per_rank=False))
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".distcp")]) == N_FILES
    dest = {k: torch.zeros(8) for k in state}
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))
    assert all(torch.equal(dest[k], v) for k, v in state.items())
    checks = dcpx.verify.verify_checkpoint(str(tmp_path))  # reads through the same bounded set
    assert len(checks) == N_FILES and not [c for c in checks if c.status == "failed"]


def test_a_file_that_changed_size_between_reads_is_refused(tmp_path: Path) -> None:
    """A file closed to stay under the limit is reopened for its next item; it must be the
    same size it was when its items were checked."""
    (tmp_path / "a.distcp").write_bytes(b"x" * 100)
    files = data_files.DataFiles(str(tmp_path), max_open=1)
    a = files.get("a.distcp", "item a")
    (tmp_path / "b.distcp").write_bytes(b"y" * 10)
    files.get("b.distcp", "item b")  # closes a: only one may stay open
    (tmp_path / "a.distcp").write_bytes(b"x" * 50)
    with pytest.raises(dcpx.CheckpointFormatError, match="changed size"):
        with a.use():
            pass
    files.close()
