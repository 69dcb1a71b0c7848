"""``dcpx bench`` as a real subprocess (with every installed plugin) and in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dcpx.cli
from cli_helpers import Command, run_all


def test_bench_json_covers_every_installed_transform(tmp_path: Path) -> None:
    r = run_all({"bench": Command(["bench", "--json", "--seconds", "1.5"], spawn=True)}, tmp_path)["bench"]
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = report["rows"]
    cores = report["cores"]
    threads = {1, cores}
    memcpy = [row for row in rows if row["transform"] == "memcpy"]
    assert {row["threads"] for row in memcpy} == threads
    assert all(row["encode_mb_s"] > 0 for row in memcpy)

    # every transform the command's own plugin host registered, in both dtypes and thread counts
    from importlib.metadata import entry_points

    names = {row["transform"] for row in rows} - {"memcpy"}
    assert "stream.zstd" in names
    if any(ep.name == "encrypt" for ep in entry_points(group="dcpx")):
        assert "stream.encrypt@dcpx" in names  # runs with a throwaway key, no configuration
    for name in names:
        mine = [row for row in rows if row["transform"] == name]
        assert {(row["dtype"], row["threads"]) for row in mine} == {(d, t) for d in ("float32", "bfloat16") for t in threads}
        for row in mine:
            assert row["error"] is None, row
            assert row["encode_mb_s"] > 0 and row["decode_mb_s"] > 0 and 0 < row["ratio"] <= 1.1
    zstd = next(row for row in rows if row["transform"] == "stream.zstd" and row["dtype"] == "bfloat16")
    assert zstd["ratio"] < 0.95  # weight-like bf16 data compresses


def test_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert dcpx.cli.main(["bench", "--seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["transform", "from", "dtype", "threads"]
    assert any(line.startswith("memcpy") for line in lines)
    assert any(line.startswith("stream.zstd") and "float32" in line for line in lines)


def test_bench_rejects_bad_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert dcpx.cli.main(["bench", "--seconds", "0"]) == 2
    assert "--seconds" in capsys.readouterr().err
