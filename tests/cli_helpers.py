"""Helpers for the tests that run the ``dcpx`` command in real subprocesses.

Starting a Python process that imports torch's checkpoint package costs seconds of CPU, so
each test module prepares its inputs in-process, then starts all of its commands at once
(``run_all``) and its tests check one result each.  A few commands per module start a new
interpreter (``python -m dcpx``); the others run in children forked from ``cli_zygote``,
which has done the imports once.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

import dcpx
import dcpx.plugins

#: environment variables that would change what a subprocess loads or which keys it finds
_SCRUB = ("DCPX_DISABLE_PLUGIN_AUTOLOAD", "DCPX_LOAD_PLUGINS", "DCPX_TRACE_PLUGINS", "DCPX_ENCRYPT_KEY",
          "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def dcpx_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a user's shell: installed plugins load, no keys configured."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(extra or {})
    return env


@dataclass
class Command:
    """``python -m dcpx ARGS``.  ``spawn=True`` starts a new interpreter for it; otherwise
    it runs in a child forked from ``cli_zygote`` (same ``dcpx.__main__``, argv, environment,
    working directory, stdio and exit status, without paying for the imports again).
    ``DCPX_TEST_CLI_SPAWN=1`` spawns every command."""

    args: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    spawn: bool = False


def run_all(commands: Mapping[str, Command], cwd: str | os.PathLike, timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    """Run every command concurrently; results by name."""
    force = os.environ.get("DCPX_TEST_CLI_SPAWN") == "1"
    spawned = {n: c for n, c in commands.items() if c.spawn or force}
    forked = {n: c for n, c in commands.items() if n not in spawned}

    def spawn(cmd: Command) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dcpx", *cmd.args], cwd=cwd, env=dcpx_env(cmd.env),
                              capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(max(1, len(spawned))) as pool:
        futures = {name: pool.submit(spawn, cmd) for name, cmd in spawned.items()}
        results = _zygote().run(forked, cwd, timeout) if forked else {}
        results.update({name: fut.result() for name, fut in futures.items()})
    return results


class _Zygote:
    """Drives ``cli_zygote.py`` (one per test session)."""

    def __init__(self) -> None:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_zygote.py")
        self.proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=dcpx_env(), text=True)
        self.lock = threading.Lock()

    def run(self, commands: Mapping[str, Command], cwd: str | os.PathLike, timeout: float) -> dict[str, subprocess.CompletedProcess]:
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            batch = [{"args": list(c.args), "env": dcpx_env(c.env), "cwd": os.fspath(cwd),
                      "stdout": os.path.join(tmp, f"{n}.out"), "stderr": os.path.join(tmp, f"{n}.err")}
                     for n, c in enumerate(commands.values())]
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(batch) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            assert ready, f"dcpx commands did not finish within {timeout} s"
            codes = json.loads(self.proc.stdout.readline())
            out = {}
            for (name, cmd), req, code in zip(commands.items(), batch, codes):
                with open(req["stdout"]) as o, open(req["stderr"]) as e:
                    out[name] = subprocess.CompletedProcess(["dcpx", *cmd.args], code, o.read(), e.read())
            return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_zygote_instance: _Zygote | None = None


def _zygote() -> _Zygote:
    global _zygote_instance
    if _zygote_instance is None or _zygote_instance.proc.poll() is not None:
        _zygote_instance = _Zygote()
        atexit.register(_zygote_instance.close)
    return _zygote_instance


def error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The single ``dcpx <command>: ...`` error line on stderr (warnings may surround it)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(f"dcpx {command}:")]
    assert len(lines) == 1, f"expected one error line, got stderr:\n{result.stderr}"
    return lines[0]


@contextlib.contextmanager
def installed_plugins() -> Iterator[None]:
    """In-process plugin host that loads the installed distributions (the test suite's
    default fixture turns autoload off); the host is rebuilt on entry and exit."""
    with pytest_monkeypatch() as mp:
        mp.delenv("DCPX_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        mp.delenv("DCPX_LOAD_PLUGINS", raising=False)
        dcpx.plugins.reset_host()
        try:
            yield
        finally:
            dcpx.plugins.reset_host()


def pytest_monkeypatch() -> contextlib.AbstractContextManager:
    import pytest

    return pytest.MonkeyPatch.context()


def training_state(seed: int = 0) -> dict:
    """A small but realistic state dict: nested modules, bf16, an item larger than one
    4 MiB chunk, an empty tensor, a scalar, and non-tensor entries."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "embed.weight": torch.randn(1200, 1024, generator=gen) * 0.02,  # 4.7 MiB: two chunks
            "proj.weight": (torch.randn(256, 384, generator=gen) * 0.02).bfloat16(),
            "proj.bias": torch.zeros(384),
            "empty": torch.empty(0, 8),
        },
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "step_count": torch.tensor(17)},
        "step": 1234,
    }


def tensors_only(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(128, 256, generator=gen) * 0.02,
        "layer.0.norm": torch.ones(256, dtype=torch.bfloat16),
        "layer.1.ids": torch.arange(100, dtype=torch.int64),
    }

