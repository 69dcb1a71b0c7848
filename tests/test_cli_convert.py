"""``dcpx convert`` run as a user runs it: a real subprocess on real checkpoints.

Inputs are written in-process; all commands of this module then run concurrently, each in
its own process (see ``cli_helpers.run_all``), and each test checks one of them.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpx
import dcpx.cli
from checkpoint_helpers import assert_same, blank, data_files
from cli_helpers import Command, error_line, installed, installed_plugins, run_all, tensors_only, training_state
from dcpx.inspect import describe

HAS_CHECKSUM = installed("dcpx_checksum")
HAS_ENCRYPT = installed("dcpx_encrypt")
HAS_SAFETENSORS = installed("safetensors")
DCPX_CHAIN = ["zstd", "checksum"] if HAS_CHECKSUM else ["zstd"]
# the dcpx source: checksummed if the plugin is installed, so a reader without it must say so
SRC_CHAIN = ["checksum"] if HAS_CHECKSUM else ["zstd"]


class NotAllowed:
    """A class a ``weights_only=True`` load must refuse."""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every input checkpoint of this module."""
    root = tmp_path_factory.mktemp("convert")
    dcp.save(training_state(0), storage_writer=dcp.FileSystemWriter(root / "stock"))
    dcp.save(tensors_only(1), storage_writer=dcp.FileSystemWriter(root / "stock_tensors"))
    torch.save(training_state(2), root / "model.pt")
    if HAS_SAFETENSORS:
        import safetensors.torch

        safetensors.torch.save_file(tensors_only(3), str(root / "model.safetensors"))
    with installed_plugins():
        dcpx.save(training_state(4), root / "dcpx_src", transforms=SRC_CHAIN)
        if HAS_ENCRYPT:
            key = base64.b64decode(base64.b64encode(os.urandom(32)))
            dcpx.save(training_state(5), root / "encrypted", transforms=["zstd", dcpx.transform("encrypt", keys={"ci-key": key})])
    shutil.copytree(root / "stock", root / "truncated")
    victim = root / "truncated" / data_files(root / "truncated")[0]
    os.truncate(victim, victim.stat().st_size // 2)
    (root / "not_a_checkpoint").mkdir()
    (root / "not_a_checkpoint" / "notes.txt").write_text("hello\n")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("do not touch\n")
    return root


@pytest.fixture(scope="module")
def results(work: Path) -> dict[str, Any]:
    cmds = {
        "to_dcpx": Command(["convert", "stock", "out_dcpx", "--quiet", *(a for t in DCPX_CHAIN for a in ("--transform", t))], spawn=True),
        "to_compat": Command(["convert", "dcpx_src", "out_compat", "--compat"]),
        "pt_in": Command(["convert", "model.pt", "from_pt", "--transform", "zstd"]),
        "pt_out": Command(["convert", "stock", "out.pt"]),
        "not_ckpt": Command(["convert", "not_a_checkpoint", "x_not_ckpt"]),
        "corrupt": Command(["convert", "truncated", "x_corrupt"]),
        "exists": Command(["convert", "stock", "existing"]),
        # with no plugin loaded: reading needs dcpx-checksum, writing needs dcpx-encrypt
        "no_plugin": Command(["convert", "dcpx_src", "x_no_plugin"] if HAS_CHECKSUM else
                             ["convert", "stock", "x_no_plugin", "--transform", "encrypt"], {"DCPX_LOAD_PLUGINS": "none-such"}, spawn=True),
    }
    if HAS_SAFETENSORS:
        cmds["st_in"] = Command(["convert", "model.safetensors", "from_st", "--transform", "zstd"])
        cmds["st_out"] = Command(["convert", "stock_tensors", "out.safetensors"])
    if HAS_ENCRYPT:
        cmds["no_key"] = Command(["convert", "encrypted", "x_no_key"])
    return run_all(cmds, work)


def ok(result: Any) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "every item verified" in result.stdout


# -- conversions ---------------------------------------------------------------------------
def test_stock_to_dcpx_chain(work: Path, results: dict[str, Any]) -> None:
    ok(results["to_dcpx"])
    info = describe(str(work / "out_dcpx"))
    assert info["manifest"] and "stream.zstd" in info["transforms"]
    if HAS_CHECKSUM:
        assert "stream.checksum@dcpx" in info["transforms"]
    assert info["totals"]["stored_bytes"] < info["totals"]["raw_bytes"]
    state = blank(training_state(0))
    with installed_plugins():
        dcpx.load(state, work / "out_dcpx")
    assert_same(state, training_state(0))
    # the same logical checkpoint: identical DCP metadata and storage keys
    stock_md = dcp.FileSystemReader(work / "stock").read_metadata()
    new_md = dcpx.FileSystemReader(work / "out_dcpx").read_metadata()
    assert new_md.state_dict_metadata == stock_md.state_dict_metadata
    assert set(new_md.storage_data) == set(stock_md.storage_data)


def test_dcpx_to_compat_is_read_by_stock_torch(work: Path, results: dict[str, Any]) -> None:
    ok(results["to_compat"])
    state = blank(training_state(4))
    dcp.load(state, storage_reader=dcp.FileSystemReader(work / "out_compat"))  # stock torch's reader
    assert_same(state, training_state(4))


def test_torch_save_file_in(work: Path, results: dict[str, Any]) -> None:
    ok(results["pt_in"])
    state = blank(training_state(2))
    with installed_plugins():
        dcpx.load(state, work / "from_pt")
    assert_same(state, training_state(2))


def test_torch_save_file_out(work: Path, results: dict[str, Any]) -> None:
    ok(results["pt_out"])
    loaded = torch.load(work / "out.pt", weights_only=True)
    assert_same(loaded, training_state(0))  # nesting restored from DCP's flattening map


@pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors is not installed")
def test_safetensors_in(work: Path, results: dict[str, Any]) -> None:
    ok(results["st_in"])
    state = blank(tensors_only(3))
    with installed_plugins():
        dcpx.load(state, work / "from_st")
    assert_same(state, tensors_only(3))


@pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors is not installed")
def test_safetensors_out(work: Path, results: dict[str, Any]) -> None:
    import safetensors.torch

    ok(results["st_out"])
    assert_same(safetensors.torch.load_file(str(work / "out.safetensors")), tensors_only(1))


# -- bad input: exit 2, one line naming the path / item --------------------------------------
def test_not_a_checkpoint(results: dict[str, Any]) -> None:
    r = results["not_ckpt"]
    assert r.returncode == 2
    line = error_line(r, "convert")
    assert "not_a_checkpoint" in line and "not a checkpoint" in line


def test_corrupted_source(work: Path, results: dict[str, Any]) -> None:
    r = results["corrupt"]
    assert r.returncode == 2
    line = error_line(r, "convert")
    assert "truncated" in line and data_files(work / "truncated")[0] in line
    assert not (work / "x_corrupt").exists()  # nothing half-written is left behind


def test_destination_exists(work: Path, results: dict[str, Any]) -> None:
    r = results["exists"]
    assert r.returncode == 2
    assert "already exists" in error_line(r, "convert") and "--overwrite" in r.stderr
    assert sorted(os.listdir(work / "existing")) == ["keep.txt"]


def test_missing_plugin(work: Path, results: dict[str, Any]) -> None:
    r = results["no_plugin"]
    assert r.returncode == 2
    line = error_line(r, "convert")
    if HAS_CHECKSUM:  # the source needs a plugin this process did not load
        assert "dcpx_src" in line and "pip install dcpx-checksum" in line
    else:  # the requested destination transform does
        assert "pip install dcpx-encrypt" in line
    assert not (work / "x_no_plugin").exists()


@pytest.mark.skipif(not HAS_ENCRYPT, reason="dcpx-encrypt is not installed")
def test_missing_key(work: Path, results: dict[str, Any]) -> None:
    r = results["no_key"]
    assert r.returncode == 2
    line = error_line(r, "convert")
    assert "encrypted" in line and "ci-key" in line
    assert not (work / "x_no_key").exists()


# -- in-process: a transform that does not decode what it encoded fails verification --------
class Liar(dcpx.Transform):
    """Encodes faithfully, decodes with the first byte of every tensor chunk flipped."""

    name = "stream.liar@test"

    def encode(self, data: memoryview, chunk: dcpx.ChunkInfo) -> bytes:
        return bytes(data)

    def decode(self, data: memoryview, chunk: dcpx.ChunkInfo, size: int) -> bytes:
        out = bytearray(data)
        if out and chunk.item.is_tensor:
            out[0] ^= 1
        return bytes(out)


class LiarPlugin:
    @dcpx.hookimpl
    def dcpx_register_transforms(self, register: Any) -> None:
        register(Liar)


def test_verification_failure_exits_1(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dcpx.register_plugin(LiarPlugin(), name="liar-plugin")
    code = dcpx.cli.main(["convert", str(work / "stock_tensors"), str(tmp_path / "lied"), "--transform", "liar", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "layer.0" in err
