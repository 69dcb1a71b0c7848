"""The writer flushes large data files in the background while it is still writing them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

import dcpx
from checkpoint_helpers import assert_same, blank
from dcpx import commit


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads started during the test (the real threads still run)."""
    names: list[str] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        names.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return names


def test_large_save_flushes_in_background_and_round_trips(tmp_path: Path, started: list[str]) -> None:
    g = torch.Generator().manual_seed(5)
    sd = {"big": torch.randn(6 << 20, generator=g), "small": torch.randn(10, generator=g)}  # 24 MiB + 40 B
    for transforms in ([], ["zstd"]):
        started.clear()
        path = tmp_path / ("t" + "_".join(transforms))
        dcpx.save(sd, path, transforms=transforms)
        assert "dcpx-flush" in started, transforms
        out = blank(sd)
        dcpx.load(out, path)
        assert_same(out, sd)


def test_no_background_flush_for_small_files_or_without_sync(tmp_path: Path, started: list[str]) -> None:
    dcpx.save({"small": torch.zeros(1000)}, tmp_path / "small")
    dcpx.save({"big": torch.zeros(6 << 20)}, tmp_path / "nosync", sync_files=False)
    assert "dcpx-flush" not in started


def test_background_flush_error_is_raised() -> None:
    """fdatasync on a character device fails (EINVAL): the error must not be lost."""

    class Eager(commit.BackgroundFlush):
        START = 0
        INTERVAL = 0.001

    with open(os.devnull, "wb") as f:
        flush = Eager(f, enabled=True)
        f.write(b"x")
        flush.wrote()
        for _ in range(500):
            try:
                flush.check()
            except OSError:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the background fdatasync error was never reported")
        flush.stop()
        with pytest.raises(OSError, match=f"writing {os.devnull} to disk failed"):
            flush.check()
