"""A helper process for the crash tests: imports torch and dcpx once, then forks one child
per command to save a checkpoint, killing the child at a chosen instant.

It never runs a save itself, so it has no threads when it forks (forking a multi-threaded
process can deadlock the child).  Commands arrive as JSON lines on stdin; each answer is
one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
import torch.distributed.checkpoint as dcp

import dcpx
from dcpx import commit

N_TENSORS = 12


def state(value: float) -> dict:
    return {f"layer{i}.weight": torch.full((256, 256), value) for i in range(N_TENSORS)} | {"step": int(value)}


def arm(phase: str) -> None:
    """Make this (child) process SIGKILL itself at a phase boundary of the commit."""
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    write, remove = commit.write_atomic, commit.remove_files
    calls = {"write": 0}

    def write_atomic(directory, name, data, tmp_name, sync, what):  # type: ignore[no-untyped-def]
        calls["write"] += 1
        if (phase, calls["write"]) in (("before-manifest", 1), ("before-metadata", 2)):
            die()
        write(directory, name, data, tmp_name, sync, what)
        if (phase, calls["write"]) == ("after-metadata", 2):
            die()

    def remove_files(directory, names):  # type: ignore[no-untyped-def]
        names = list(names)
        if phase == "mid-cleanup" and calls["write"] == 2 and len(names) > 1:
            remove(directory, names[:1])
            die()
        remove(directory, names)

    commit.write_atomic, commit.remove_files = write_atomic, remove_files


def run(cmd: dict) -> dict:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            if cmd.get("phase"):
                arm(cmd["phase"])
            if cmd.get("local"):  # the rank's own checkpoint, as with several ranks saving apart
                writer = dcpx.FileSystemWriter(cmd["path"], transforms=["zstd"], chunk_size=64 << 10, sync_files=False)
                dcp.save(state(cmd["value"]), storage_writer=writer, use_collectives=False)
            else:
                dcpx.save(state(cmd["value"]), cmd["path"], transforms=["zstd"], chunk_size=64 << 10, sync_files=False)
            os._exit(0)
        except BaseException:
            os._exit(3)
    if cmd.get("kill_after") is not None:
        time.sleep(cmd["kill_after"])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return {"killed": os.WIFSIGNALED(status), "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": time.perf_counter() - start}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
