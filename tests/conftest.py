"""Fixtures for the core's tests.

Test modules are imported with ``--import-mode=importlib``; the helper modules next to this
file (``toy_transforms``, ``checkpoint_helpers``) are made importable here.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dcpx  # noqa: E402
import dcpx.plugins  # noqa: E402
import toy_transforms  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: installs a distribution or starts processes (>10 s)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tests that need the pip-installed toy distributions share a ~10 s install
    for item in items:
        if "toy_dists" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def core_plugins_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts from a fresh plugin host that loads no installed distributions, so
    the core's behaviour (e.g. ``"zstd"`` = torch's ``ZStandard``) does not depend on which
    plugins happen to be installed.  Tests of entry-point loading lift this explicitly."""
    monkeypatch.setenv("DCPX_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("DCPX_LOAD_PLUGINS", raising=False)
    dcpx.plugins.reset_host()
    yield
    dcpx.plugins.reset_host()


@pytest.fixture
def fresh_host() -> dcpx.plugins.PluginHost:
    """The (freshly built) process-wide plugin host."""
    return dcpx.plugin_host()


@pytest.fixture
def toys(fresh_host: dcpx.plugins.PluginHost) -> Iterator[object]:
    """The toy transforms registered in-process (``stream.xor@test`` ...), with a clean recorder."""
    dcpx.register_plugin(toy_transforms.ToyPlugin(), name="dcpx-test-toys")
    toy_transforms.RECORD.clear()
    yield toy_transforms
    toy_transforms.RECORD.clear()


class Hang(BaseException):
    """Raised by the watchdog; derives from BaseException so no ``except Exception`` eats it."""


@pytest.fixture
def watchdog() -> Iterator[dict[str, bool]]:
    """Fail instead of hanging: interrupts the main thread after 20 s."""
    state = {"fired": False}

    def on_alarm(signum: int, frame: object) -> None:
        state["fired"] = True
        raise Hang("operation did not finish within 20 s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    try:
        yield state
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
