"""A save killed at any instant leaves the previous checkpoint or the new one, never a mix."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import dcpx
from dcpx import commit

sys.path.insert(0, os.path.dirname(__file__))
from crash_zygote import N_TENSORS, state as _state  # noqa: E402


def _load_values(path) -> set[float]:
    out = {f"layer{i}.weight": torch.zeros(256, 256) for i in range(N_TENSORS)} | {"step": -1}
    dcpx.load(out, path)
    values = {float(v.unique().item()) if v.unique().numel() == 1 else float("nan")
              for k, v in out.items() if k != "step"}
    values.add(float(out["step"]))
    return values


class Zygote:
    """Drives tests/crash_zygote.py: one forked child per save, killed on request."""

    def __init__(self) -> None:
        script = os.path.join(os.path.dirname(__file__), "crash_zygote.py")
        env = os.environ | {"DCPX_DISABLE_PLUGIN_AUTOLOAD": "1"}  # same core-only host as the tests
        self.proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def save(self, path, value: float, kill_after: float | None = None, phase: str | None = None,
             local: bool = False) -> dict:
        cmd = {"path": str(path), "value": value, "kill_after": kill_after, "phase": phase, "local": local}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "crash helper process died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture
def committed(tmp_path):
    path = tmp_path / "ckpt"
    dcpx.save(_state(1.0), path, transforms=["zstd"], chunk_size=64 << 10, sync_files=False)
    return path


@pytest.mark.parametrize("phase", ["before-manifest", "before-metadata", "after-metadata", "mid-cleanup"])
def test_kill_at_phase_boundaries(committed, zygote, phase):
    assert zygote.save(committed, 2.0, phase=phase)["killed"], "the save should die at the phase boundary"
    expected = {1.0} if phase in ("before-manifest", "before-metadata") else {2.0}
    assert _load_values(committed) == expected
    dcpx.save(_state(3.0), committed, transforms=["zstd"], sync_files=False)
    assert _load_values(committed) == {3.0}
    _assert_no_leftovers(committed)


def test_kill_at_random_points(committed, zygote):
    first = zygote.save(committed, 2.0)
    assert first["exit"] == 0
    duration = max(first["seconds"], 0.05)
    rng = random.Random(1234)
    current = 2.0
    for attempt in range(30):
        value = 10.0 + attempt
        zygote.save(committed, value, kill_after=rng.uniform(0, duration * 1.2))
        seen = _load_values(committed)
        assert seen in ({current}, {value}), f"attempt {attempt}: mixed checkpoint {seen}"
        current = seen.pop()
    dcpx.save(_state(99.0), committed, transforms=["zstd"], sync_files=False)
    assert _load_values(committed) == {99.0}
    _assert_no_leftovers(committed)


@pytest.mark.parametrize("phase", ["before-manifest", "before-metadata", "after-metadata", "mid-cleanup"])
def test_rank_local_save_killed_in_its_commit(tmp_path, zygote, phase):
    """A rank's own checkpoint (``use_collectives=False``): its manifest and temporary files
    carry no rank prefix, yet the rank's next save removes what the killed one left."""
    path = tmp_path / "own"
    assert zygote.save(path, 1.0, local=True)["exit"] == 0
    assert zygote.save(path, 2.0, phase=phase, local=True)["killed"]
    assert _load_values(path) == ({1.0} if phase in ("before-manifest", "before-metadata") else {2.0})
    assert zygote.save(path, 3.0, local=True)["exit"] == 0
    assert _load_values(path) == {3.0}
    assert (path / "__0.metadata").exists() and not (path / ".metadata").exists()
    _assert_no_leftovers(path)


def test_lock_files_are_never_written_through_a_link(tmp_path):
    """A rank notes its commit in its lock file: a hard-linked lock is left unwritten, and a
    symbolic link is refused, so no file outside the checkpoint is truncated."""
    import torch.distributed.checkpoint as dcp

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = tmp_path / "own"
    path.mkdir()
    os.link(victim, path / ".dcpx-0.lock")
    dcp.save(_state(1.0), storage_writer=dcpx.FileSystemWriter(path, sync_files=False), use_collectives=False)
    assert _load_values(path) == {1.0}
    assert victim.read_text() == "keep me"
    (path / ".dcpx-0.lock").unlink()
    os.symlink(victim, path / ".dcpx-0.lock")
    with pytest.raises(Exception, match="lock file is a symbolic link"):
        dcp.save(_state(2.0), storage_writer=dcpx.FileSystemWriter(path, sync_files=False), use_collectives=False)
    (path / ".dcpx.lock").unlink()  # the rank-local saves shared it
    os.symlink(victim, path / ".dcpx.lock")
    with pytest.raises(dcpx.CommitError, match="lock file is a symbolic link"):
        dcpx.save(_state(2.0), path, sync_files=False)
    assert victim.read_text() == "keep me"
    assert _load_values(path) == {1.0}


def test_io_error_at_every_write_leaves_previous_intact(committed, monkeypatch):
    """An OSError injected at the n-th file write: clear error, previous checkpoint intact."""
    import builtins

    real_open = builtins.open
    for n in range(1, 6):
        count = {"writes": 0}

        class FailingFile:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                count["writes"] += 1
                if count["writes"] == n:
                    raise OSError(28, "No space left on device (injected)")
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def failing_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return FailingFile(f) if "w" in mode and str(committed) in str(file) else f

        monkeypatch.setattr(builtins, "open", failing_open)
        with pytest.raises(OSError) as info:
            dcpx.save(_state(5.0), committed, transforms=["zstd"], sync_files=False)
        monkeypatch.setattr(builtins, "open", real_open)
        assert "injected" in str(info.value) or "No space" in repr(info.value)
        assert _load_values(committed) == {1.0}
        _assert_no_leftovers(committed)
    dcpx.save(_state(6.0), committed, transforms=["zstd"], sync_files=False)
    assert _load_values(committed) == {6.0}
    _assert_no_leftovers(committed)


_FILE_SIZE_LIMITED = r"""
import errno, json, resource, signal, sys
import torch, dcpx
path, case = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
if case == "data":  # one tensor larger than any file may grow, compressed or not
    sd = {"big": torch.randn(1 << 19)}
else:  # small tensors whose manifest is larger than any file may grow
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(8000)}
try:
    dcpx.save(sd, path, transforms=["zstd"], sync_files=False)
except OSError as exc:
    print(json.dumps({"type": type(exc).__name__, "errno": exc.errno, "message": str(exc)}))
"""


@pytest.mark.parametrize("case, what", [("data", "data file"), ("manifest", "manifest")])
def test_a_write_the_system_refuses(committed, case, what):
    """A real failed write (a file-size limit makes the kernel refuse it with EFBIG):
    ``WriteError``, an ``OSError`` with the kernel's errno that names the file and says the
    save was not committed; the previous checkpoint loads and nothing is left behind."""
    import errno

    env = os.environ | {"DCPX_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMITED, str(committed), case],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout, done.stderr
    failure = json.loads(done.stdout)
    assert failure["type"] == "WriteError" and failure["errno"] == errno.EFBIG, failure
    assert f"writing the {what} failed" in failure["message"] and str(committed) in failure["message"], failure
    assert "not committed" in failure["message"]
    assert _load_values(committed) == {1.0}
    _assert_no_leftovers(committed)


def test_concurrent_save_is_refused(committed):
    lock = commit.SaveLock(str(committed))
    lock.busy = True  # a save that is writing or committing right now
    lock.acquire()
    try:
        with pytest.raises(dcpx.CommitError, match="another save"):
            dcpx.save(_state(2.0), committed, transforms=["zstd"], sync_files=False)
    finally:
        lock.release()
    assert _load_values(committed) == {1.0}


def _write_without_finishing(path, value: float) -> tuple[dcpx.FileSystemWriter, object, list]:
    """A save whose data is written but whose ``finish`` never comes, as when another rank
    failed: DCP then raises on every rank without calling the coordinator's ``finish``."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    writer = dcpx.FileSystemWriter(path, transforms=["zstd"], sync_files=False)
    planner = DefaultSavePlanner()
    planner.set_up_planner(_state(value), writer.storage_meta(), is_coordinator=True)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    plans, metadata = planner.create_global_plan([writer.prepare_local_plan(planner.create_local_plan())])
    plan = planner.finish_plan(writer.prepare_global_plan(plans)[0])
    return writer, metadata, writer.write_data(plan, planner).wait()


def test_a_save_left_unfinished_does_not_lock_the_path(committed):
    stale, metadata, results = _write_without_finishing(committed, 2.0)
    dcpx.save(_state(3.0), committed, transforms=["zstd"], sync_files=False)  # the retry
    assert _load_values(committed) == {3.0}
    _assert_no_leftovers(committed)
    with pytest.raises(dcpx.CommitError, match="took over"):
        stale.finish(metadata, [results])  # a late finish must not commit over the retry
    assert _load_values(committed) == {3.0}


def _failed_after_planning(path: os.PathLike[str]) -> dcpx.FileSystemWriter:
    """A writer whose save failed after the coordinator took the lock (a planner raising in
    finish_plan): DCP tells the writer nothing, so it still holds the lock."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.api import CheckpointException

    class Failing(DefaultSavePlanner):
        def finish_plan(self, new_plan):
            raise RuntimeError("planner failed")

    writer = dcpx.FileSystemWriter(path, transforms=["zstd"], sync_files=False)
    with pytest.raises(CheckpointException):
        dcp.save(_state(2.0), storage_writer=writer, planner=Failing())
    return writer


def test_a_save_that_failed_in_planning_frees_the_path_when_its_writer_is_dropped(committed):
    """A planner raising in finish_plan, after the coordinator took the lock: DCP tells the
    writer nothing, so dropping the writer is what frees the path for other processes."""
    import fcntl
    import gc

    writer = _failed_after_planning(committed)
    lock = os.path.join(committed, commit.LOCK)

    def free() -> bool:  # a separate open file description, as another process would have
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    assert not free()  # the writer still exists: it may yet be used again
    del writer
    gc.collect()
    assert free()
    assert _load_values(committed) == {1.0}


def test_a_writer_handed_to_another_process_takes_no_lock_along(committed):
    """``async_save`` with a process executor pickles the writer into torch's checkpointing
    process.  A writer whose last save failed after planning still held its lock: the copy
    carried the descriptor numbers (and closed whatever had them there when dropped), and
    the original kept the path locked against the copy's own saves."""
    import gc
    import pickle

    writer = _failed_after_planning(committed)
    held = list(writer._scope.lock._fds)
    assert held
    data = pickle.dumps(writer)
    # the original let go: the numbers it held can name other files in this process (the
    # lowest free number is taken first, so opening enough files reaches them)
    reused: list[int] = []
    try:
        while not set(held) <= set(reused) and len(reused) < 256:
            reused.append(os.open(os.devnull, os.O_RDONLY))
        assert set(held) <= set(reused)
        copy = pickle.loads(data)
        del copy
        gc.collect()
        for fd in reused:
            os.fstat(fd)  # still open
    finally:
        for fd in reused:
            os.close(fd)
    torch.distributed.checkpoint.save(_state(3.0), storage_writer=pickle.loads(data))  # as that process would
    assert _load_values(committed) == {3.0}


def test_a_save_still_writing_keeps_the_lock(committed):
    stale, metadata, results = _write_without_finishing(committed, 2.0)
    stale._scope.lock.busy = True  # as while it writes or commits
    with pytest.raises(dcpx.CommitError, match="another save"):
        dcpx.save(_state(3.0), committed, transforms=["zstd"], sync_files=False)
    stale.finish(metadata, [results])
    assert _load_values(committed) == {2.0}


def _assert_no_leftovers(path) -> None:
    from dcpx.checkpoint_files import referenced_files

    keep = referenced_files(str(path))
    assert keep is not None
    assert commit.owned_leftovers(str(path), keep) == []
