"""Tuples nested too deep to hash are refused before any unpickler builds them: CPython
hashes a tuple's items recursively in C, with no depth check, and crashes (SIGSEGV)."""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpx
from checkpoint_helpers import rewrite_metadata, storage_items
from dcpx.pickle_nesting import MAX_TUPLE_NESTING, check_nesting


def _nested(depth: int) -> bytes:
    """A protocol-2 pickle of ``{((...(),...),): 1}`` with ``depth`` tuples around the empty one."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x01s."


def test_legitimate_pickles_pass() -> None:
    state = {"model": {"w": torch.randn(3, 4), "layers": [{"b": torch.ones(2)} for _ in range(100)]},
             "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
             "nested": ((((1, 2), 3), 4), 5), "size": torch.Size([2, 3]), "set": {1, 2, (3, 4)},
             "pairs": [(i, (str(i), (i, 0.5))) for i in range(100)]}  # enough tuples to be walked
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        plain = {k: v for k, v in state.items() if k not in ("model", "optim", "size")}
        check_nesting(pickle.dumps(plain, protocol=protocol), "x")
    buf = io.BytesIO()
    torch.save(state, buf)
    with __import__("zipfile").ZipFile(buf) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        check_nesting(archive.read(name), "x")


def test_the_limit() -> None:
    assert pickle.loads(_nested(MAX_TUPLE_NESTING))
    check_nesting(_nested(MAX_TUPLE_NESTING), "x")
    with pytest.raises(dcpx.UnsafeCheckpointError, match="x: its pickle nests tuples more than"):
        check_nesting(_nested(MAX_TUPLE_NESTING + 1), "x")


def test_depth_travels_through_the_memo_and_mutated_lists() -> None:
    """A list is memoised empty, then a deep tuple is appended to it; the copy fetched from
    the memo is as deep as the list now is (the walk counts lists as deep as their items)."""
    fill = b")" + b"\x85" * (MAX_TUPLE_NESTING - 1) + b"a"
    stream = b"\x80\x02]q\x00" + fill + b"0h\x00" + b"\x85\x85."
    with pytest.raises(dcpx.UnsafeCheckpointError):
        check_nesting(stream, "x")
    check_nesting(b"\x80\x02]q\x00" + fill + b"0h\x00" + b"\x85.", "x")  # one level less passes


def test_what_is_not_a_pickle_is_left_to_the_unpickler() -> None:
    """Streams an unpickler fails on before it builds anything deep: the walk stops there too
    (each holds enough deepening bytes to be walked)."""
    deepening = b"\x85" * (2 * MAX_TUPLE_NESTING)
    for junk in (b"\xff" + deepening, b"((((((" + b"t" * (2 * MAX_TUPLE_NESTING), b"h\x07" + deepening,
                 b"\x80\x02X\xff\xff\xff\x7f" + deepening):
        check_nesting(junk, "x")


@pytest.mark.parametrize("fqn", ["step", "w"])
def test_a_deeply_nested_archive_is_refused_by_a_load(tmp_path: Path, fqn: str) -> None:
    """In a subprocess: without the check the interpreter dies of SIGSEGV."""
    dcp.save({"w": torch.randn(4, 4), "step": 7}, storage_writer=dcp.FileSystemWriter(tmp_path))
    pickled = _nested(200_000)
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf)
    for name, data in (("data.pkl", pickled), ("byteorder", b"little"), ("version", b"3\n")):
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    info = storage_items(pickle.loads((tmp_path / ".metadata").read_bytes()))[fqn]
    with open(tmp_path / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(buf.getvalue())

    def point(metadata: Any) -> None:
        entry = storage_items(metadata)[fqn]
        entry.offset, entry.length = offset, len(buf.getvalue())

    rewrite_metadata(tmp_path, point)
    code = ("import dcpx, torch\n"
            f"dcpx.load({{'w': torch.zeros(4, 4), 'step': 0}}, {str(tmp_path)!r})\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, (run.returncode, run.stderr[-500:])
    assert re.search(rf"UnsafeCheckpointError: {fqn}[ :].*nests tuples", run.stderr), run.stderr[-500:]
