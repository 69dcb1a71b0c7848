"""``dcpx plugins``, ``dcpx inspect`` and ``dcpx verify`` run as real subprocesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch.distributed.checkpoint as dcp

import dcpx
import dcpx.checkpoint_files
import dcpx.cli
import dcpx.inspect
from checkpoint_helpers import data_files, rewrite_metadata
from cli_helpers import Command, error_line, installed, installed_plugins, run_all, training_state

HAS_CHECKSUM = installed("dcpx_checksum")
needs_checksum = pytest.mark.skipif(not HAS_CHECKSUM, reason="dcpx-checksum is not installed")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("commands")
    dcp.save(training_state(0), storage_writer=dcp.FileSystemWriter(root / "stock"))
    with installed_plugins():
        dcpx.save(training_state(1), root / "checked", transforms=["zstd", "checksum"] if HAS_CHECKSUM else ["zstd"])
    shutil.copytree(root / "checked", root / "damaged")
    victim = max((root / "damaged" / n for n in data_files(root / "damaged")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x40  # inside the large item's compressed chunks
    victim.write_bytes(data)
    _damage(root)
    shutil.copytree(root / "stock", root / "stock_damaged")  # no digest: only --full notices
    metadata = dcpx.checkpoint_files.load_metadata(str(root / "stock_damaged"))[0]
    info = next(i for x, i in metadata.storage_data.items() if x.fqn == "model.embed.weight")
    with open(root / "stock_damaged" / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\xff" * 4)  # the torch.save archive's first local header
    return root


HUGE = 10 ** 5000  # more digits than Python agrees to turn into a string


def _damage(root: Path) -> None:
    """Checkpoints only a forger or a broken tool writes, each failing in another layer."""
    shutil.copytree(root / "checked", root / "bad_manifest")  # valid JSON, hash matches, items of the wrong shape
    (name,) = (root / "bad_manifest").glob(".dcpx-manifest-*.json")
    body = json.loads(name.read_text())
    body["items"][0] = 1
    name.write_text(json.dumps(body))
    for case, edit in {"huge_chunk": _huge_chunk_offset, "huge_length": _huge_length}.items():
        shutil.copytree(root / "stock", root / case)
        rewrite_metadata(root / case, edit)


def _huge_chunk_offset(metadata: Any) -> None:
    metadata.state_dict_metadata["model.proj.bias"].chunks[0].offsets = [HUGE]


def _huge_length(metadata: Any) -> None:
    for index, info in metadata.storage_data.items():
        if index.fqn == "model.proj.bias":
            info.length = HUGE


@pytest.fixture(scope="module")
def results(work: Path) -> dict[str, Any]:
    cmds = {
        "plugins": Command(["plugins", "--json"], spawn=True),
        "inspect_dcpx": Command(["inspect", "checked"]),
        "inspect_stock": Command(["inspect", "stock", "--json"]),
        "verify_stock": Command(["verify", "stock", "--quiet"], spawn=True),
        "verify_allow": Command(["verify", "stock", "--allow-missing", "--quiet"]),
        "verify_full_stock": Command(["verify", "stock", "--full", "--allow-missing", "--quiet"]),
        "verify_stock_damaged": Command(["verify", "stock_damaged", "--allow-missing", "--quiet"]),
        "verify_full_stock_damaged": Command(["verify", "stock_damaged", "--full", "--allow-missing", "--quiet"]),
        "verify_missing_path": Command(["verify", "no_such_checkpoint"]),
        **{f"{cmd}_{case}": Command([cmd, case, *extra])
           for cmd, extra in (("inspect", []), ("verify", ["--quiet"]))
           for case in ("bad_manifest", "huge_chunk", "huge_length")},
        "inspect_json_huge_length": Command(["inspect", "huge_length", "--json"]),
    }
    if HAS_CHECKSUM:
        cmds["verify_ok"] = Command(["verify", "checked"])
        cmds["verify_damaged"] = Command(["verify", "damaged", "--json"])
        cmds["verify_full"] = Command(["verify", "checked", "--full", "--quiet"])
    return run_all(cmds, work)


def test_plugins_json_lists_installed_distributions(results: dict[str, Any]) -> None:
    r = results["plugins"]
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report) == {"plugins", "transforms", "failures"}
    names = {p["name"] for p in report["plugins"]}
    first_party = {"zstd": "dcpx_zstd", "encrypt": "dcpx_encrypt", "checksum": "dcpx_checksum"}
    assert {name for name, module in first_party.items() if installed(module)} <= names
    assert not {f["name"] for f in report["failures"]} & set(first_party)
    transforms = {t["name"]: t["source"] for t in report["transforms"]}
    assert "stream.zstd" in transforms
    for plugin in report["plugins"]:
        assert plugin["distribution"] and plugin["version"]
        for name in plugin["transforms"]:
            assert transforms[name] == plugin["distribution"]


def test_inspect_dcpx_checkpoint(results: dict[str, Any]) -> None:
    r = results["inspect_dcpx"]
    assert r.returncode == 0, r.stderr
    assert "manifest: yes" in r.stdout
    assert "stream.zstd" in r.stdout
    assert "model.embed.weight" in r.stdout and "bfloat16" in r.stdout
    assert "total: 8 items" in r.stdout


def test_inspect_stock_checkpoint_json(results: dict[str, Any]) -> None:
    r = results["inspect_stock"]
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["manifest"] is False and info["transforms"] == []
    fqns = {i["fqn"] for i in info["items"]}
    assert {"model.embed.weight", "model.proj.weight", "optim.lr", "step"} <= fqns
    embed = next(i for i in info["items"] if i["fqn"] == "model.embed.weight")
    assert embed["dtype"] == "float32" and embed["shape"] == [1200, 1024] and embed["raw_bytes"] == 1200 * 1024 * 4


def test_verify_stock_checkpoint_has_no_digests(results: dict[str, Any]) -> None:
    r = results["verify_stock"]
    assert r.returncode == 1
    assert "0 verified" in r.stdout and "NO DIGEST" in r.stdout
    assert "--allow-missing" in r.stderr


def test_verify_allow_missing(results: dict[str, Any]) -> None:
    r = results["verify_allow"]
    assert r.returncode == 0, r.stderr
    assert "0 failed" in r.stdout and "missing" in r.stdout


def test_verify_full_reads_every_stock_item(results: dict[str, Any]) -> None:
    r = results["verify_full_stock"]
    assert r.returncode == 0, r.stderr
    assert "0 verified, 0 failed, 8 without a digest" in r.stdout


def test_verify_full_fails_a_stock_item_that_does_not_decode(results: dict[str, Any]) -> None:
    assert results["verify_stock_damaged"].returncode == 0  # nothing to check it against
    r = results["verify_full_stock_damaged"]
    assert r.returncode == 1, r.stderr
    assert "FAILED  model.embed.weight" in r.stdout and "0 verified, 1 failed, 7 without a digest" in r.stdout


def test_names_no_encoding_can_print_are_escaped(tmp_path: Path) -> None:
    """An entry name with a lone surrogate (a pickle may hold one) is printed escaped."""
    import subprocess
    import sys

    import torch

    dcp.save({"w": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(tmp_path))

    def rename(metadata: Any) -> None:
        metadata.state_dict_metadata["w\ud800"] = metadata.state_dict_metadata.pop("w")
        for index in metadata.storage_data:
            object.__setattr__(index, "fqn", "w\ud800")

    rewrite_metadata(tmp_path, rename)
    run = subprocess.run([sys.executable, "-m", "dcpx", "verify", str(tmp_path), "--full", "--quiet"],
                         capture_output=True, text=True, errors="replace", timeout=120)
    assert run.returncode == 1, run.stderr
    assert "NO DIGEST  w\\ud800" in run.stdout and "0 verified, 0 failed, 1 without a digest" in run.stdout


def test_control_characters_from_the_checkpoint_are_escaped(tmp_path: Path) -> None:
    """Names and descriptors come from the checkpoint: a forged one may not clear the screen
    or print a line of its own."""
    import subprocess
    import sys

    import torch

    dcp.save({"w": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(tmp_path))
    name = "w\x1b[2J\nFAKE LINE"

    def rename(metadata: Any) -> None:
        metadata.state_dict_metadata[name] = metadata.state_dict_metadata.pop("w")
        for index, info in metadata.storage_data.items():
            object.__setattr__(index, "fqn", name)
            info.transform_descriptors = ["stream.x\x1b[31m/1"]

    rewrite_metadata(tmp_path, rename)
    for command in (["inspect"], ["verify", "--full", "--quiet"]):
        run = subprocess.run([sys.executable, "-m", "dcpx", *command, str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
        shown = run.stdout + run.stderr
        assert "\x1b" not in shown and "FAKE LINE" in shown, shown
        assert not any(line.startswith("FAKE LINE") for line in shown.splitlines()), shown
        assert "w\\x1b[2J\\nFAKE LINE" in shown, shown


def test_verify_bad_path_is_a_usage_error(results: dict[str, Any]) -> None:
    r = results["verify_missing_path"]
    assert r.returncode == 2
    assert "no_such_checkpoint" in error_line(r, "verify")


@needs_checksum
def test_verify_checksummed_checkpoint(results: dict[str, Any]) -> None:
    r = results["verify_ok"]
    assert r.returncode == 0, r.stderr
    assert "8 verified, 0 failed, 0 without a digest" in r.stdout


@needs_checksum
def test_verify_full_decodes_every_layer(results: dict[str, Any]) -> None:
    r = results["verify_full"]
    assert r.returncode == 0, r.stderr
    assert "8 verified, 0 failed, 0 without a digest" in r.stdout


@needs_checksum
def test_verify_damaged_checkpoint_json(results: dict[str, Any]) -> None:
    r = results["verify_damaged"]
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] == 7 and report["missing"] == []
    (failed,) = report["failed"]
    assert failed["fqn"] == "model.embed.weight" and "mismatch" in failed["detail"]


@pytest.mark.parametrize("name", ["inspect_bad_manifest", "verify_bad_manifest"])
def test_malformed_manifest_is_an_input_error(results: dict[str, Any], name: str) -> None:
    r = results[name]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "manifest item 0 is 1, expected an object" in error_line(r, name.split("_")[0])


@pytest.mark.parametrize("name", ["inspect_huge_chunk", "verify_huge_chunk", "inspect_huge_length",
                                  "verify_huge_length", "inspect_json_huge_length"])
def test_integers_too_long_to_print_are_an_input_error(results: dict[str, Any], name: str) -> None:
    """Whichever layer fails on them, the user gets one line naming the checkpoint, exit 2."""
    r = results[name]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "huge_" in error_line(r, name.split("_")[0])


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_unexpected_error_is_one_line_and_exit_2(work: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], command: str) -> None:
    """An exception no check foresaw (here one whose message cannot even be formatted)."""
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError(HUGE)

    monkeypatch.setattr(dcpx.inspect, "describe", broken)
    monkeypatch.setattr(dcpx.checkpoint_files, "load_metadata", broken)
    monkeypatch.setattr(dcpx.reader, "load_metadata", broken)  # verify reads .metadata as a load does
    assert dcpx.cli.main([command, str(work / "checked"), *(["--quiet"] if command == "verify" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dcpx {command}: {work / 'checked'}: "), err
    assert "ValueError" in err[0]
