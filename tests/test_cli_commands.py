"""``dcpx plugins``, ``dcpx inspect`` and ``dcpx verify`` run as real subprocesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch.distributed.checkpoint as dcp

import dcpx
from checkpoint_helpers import data_files
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
    return root


@pytest.fixture(scope="module")
def results(work: Path) -> dict[str, Any]:
    cmds = {
        "plugins": Command(["plugins", "--json"], spawn=True),
        "inspect_dcpx": Command(["inspect", "checked"]),
        "inspect_stock": Command(["inspect", "stock", "--json"]),
        "verify_stock": Command(["verify", "stock", "--quiet"], spawn=True),
        "verify_allow": Command(["verify", "stock", "--allow-missing", "--quiet"]),
        "verify_missing_path": Command(["verify", "no_such_checkpoint"]),
    }
    if HAS_CHECKSUM:
        cmds["verify_ok"] = Command(["verify", "checked"])
        cmds["verify_damaged"] = Command(["verify", "damaged", "--json"])
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
def test_verify_damaged_checkpoint_json(results: dict[str, Any]) -> None:
    r = results["verify_damaged"]
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] == 7 and report["missing"] == []
    (failed,) = report["failed"]
    assert failed["fqn"] == "model.embed.weight" and "mismatch" in failed["detail"]
