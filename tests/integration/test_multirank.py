"""Real multi-process torch.distributed (gloo on 127.0.0.1) saving and loading through dcpx."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcpx
from checkpoint_helpers import assert_same, blank

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("multirank_worker.py")
_spec = importlib.util.spec_from_file_location("dcpx_multirank_worker", WORKER)
assert _spec and _spec.loader
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """What one multi-process launch produced."""

    world: int
    passed: set[tuple[str, int]]
    report: str

    def check(self, scenario: str) -> None:
        missing = [r for r in range(self.world) if (scenario, r) not in self.passed]
        assert not missing, f"{scenario} failed on ranks {missing} of {self.world}\n{self.report}"


def launch(jobs: list[tuple[str, Path]], world: int, logs: Path) -> Run:
    """Run ``world`` ranks through ``jobs`` (scenario, checkpoint dir) in one process group.

    Never hangs: ranks still running after TIMEOUT_S are killed."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("DCPX_")}
    base.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo", DCPX_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONWARNINGS="ignore",
    )
    logs.mkdir(parents=True, exist_ok=True)
    args = [f"{scenario}={path}" for scenario, path in jobs]
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    for rank in range(world):
        log = logs / f"world{world}-rank{rank}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, str(WORKER), *args],
                                    env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append((proc, log))
    deadline = time.monotonic() + TIMEOUT_S
    hung = False
    try:
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung = True
                break
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    passed: set[tuple[str, int]] = set()
    texts = []
    for rank, (proc, log) in enumerate(procs):
        text = log.read_text(errors="replace")
        texts.append(f"--- rank {rank} (rc={proc.returncode})\n{text[-4000:]}")
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "OK" and parts[2] == str(rank):
                passed.add((parts[1], rank))
    report = ("(killed after %d s)\n" % TIMEOUT_S if hung else "") + "\n".join(texts)
    return Run(world, passed, report)


@pytest.fixture(scope="module")
def world4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """4 ranks: a replicated save/load and a DTensor-sharded save."""
    root = tmp_path_factory.mktemp("world4")
    run = launch([("replicated", root / "replicated"), ("dtensor_save", root / "dtensor")], 4, root / "logs")
    return run, root


@pytest.fixture(scope="module")
def world2(world4: tuple[Run, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """2 ranks: a replicated save/load, model + optimizer, rank-local saves, an async save in a
    checkpointing process, a save handed cached plans, and loading the 4-rank DTensor checkpoint."""
    root = tmp_path_factory.mktemp("world2")
    dtensor = world4[1] / "dtensor"
    jobs = [(name, root / name) for name in ("replicated", "model_optim", "rank_local", "async_process", "plan_caching")]
    if ("dtensor_save", 0) in world4[0].passed:
        jobs.append(("dtensor_load", dtensor))
    return launch(jobs, 2, root / "logs"), root


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_state_dict(request: pytest.FixtureRequest, world: int) -> None:
    run, root = request.getfixturevalue(f"world{world}")
    run.check("replicated")
    path = root / "replicated"
    metadata = dcpx.reader.load_metadata(str(path))[0]
    for info in metadata.storage_data.values():
        assert info.transform_descriptors == ["frame@dcpx/1", "stream.zstd/1"]
    dest = blank(worker.replicated_state())
    dcpx.load(dest, path)  # and a single process reads it back
    assert_same(dest, worker.replicated_state())


def test_async_save_in_a_checkpointing_process(world2: tuple[Run, Path]) -> None:
    run, root = world2
    run.check("async_process")
    dest = blank(worker.replicated_state())
    dcpx.load(dest, root / "async_process")
    assert_same(dest, worker.replicated_state())


def test_ranks_saving_on_their_own_keep_each_others_files(world2: tuple[Run, Path]) -> None:
    run, root = world2
    run.check("rank_local")
    names = sorted(os.listdir(root / "rank_local"))
    assert "__0.metadata" in names and "__1.metadata" in names and ".metadata" not in names
    assert len([n for n in names if n.startswith(".dcpx-manifest-")]) == 2, names


def test_ranks_write_cached_plans_as_new_checkpoints(world2: tuple[Run, Path]) -> None:
    """The ranks checked every save's values and verify results; here, from outside: the
    rank whose plan DCP cached wrote its items under an id of its own, which they record."""
    run, root = world2
    run.check("plan_caching")
    from dcpx.manifest import SAVE_ID_RECORD

    for name in ("first", "second"):
        path = root / "plan_caching" / name
        metadata = dcpx.reader.load_metadata(str(path))[0]
        body = json.loads((path / dcpx.manifest.manifest_name(metadata.storage_meta.save_id)).read_bytes())
        own = {item["records"].get(SAVE_ID_RECORD) for item in body["items"]} - {None}
        assert own and metadata.storage_meta.save_id not in own, (name, own)


@pytest.fixture
def dtensor_checkpoint(world4: tuple[Run, Path]) -> Path:
    world4[0].check("dtensor_save")
    return world4[1] / "dtensor"


def test_dtensor_saved_by_four_ranks(dtensor_checkpoint: Path) -> None:
    metadata = dcpx.reader.load_metadata(str(dtensor_checkpoint))[0]
    chunks = {fqn: md.chunks for fqn, md in metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
    assert len(chunks["w"]) == 4 and len(chunks["b"]) == 4
    assert sorted(tuple(c.sizes) for c in chunks["b"]) == [(1,), (3,), (3,), (3,)]
    assert len({info.relative_path for info in metadata.storage_data.values()}) >= 4  # at least one file per rank


def test_dtensor_reshard_four_to_two(dtensor_checkpoint: Path, world2: tuple[Run, Path]) -> None:
    world2[0].check("dtensor_load")


@pytest.mark.parametrize("api", ["dcp", "dcpx"])
def test_dtensor_reshard_four_to_one_plain_tensors(dtensor_checkpoint: Path, api: str) -> None:
    full = worker.full_tensors()
    dest: dict[str, Any] = {**{k: torch.zeros_like(v) for k, v in full.items()}, "step": None}
    if api == "dcp":
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(dtensor_checkpoint))
    else:
        dcpx.load(dest, dtensor_checkpoint)
    assert dest.pop("step") == 17
    assert_same(dest, full)


def test_model_and_optimizer_state(world2: tuple[Run, Path]) -> None:
    run, root = world2
    run.check("model_optim")
    metadata = dcpx.reader.load_metadata(str(root / "model_optim"))[0]
    fqns = set(metadata.state_dict_metadata)
    assert any(f.startswith("model.") for f in fqns) and any(f.startswith("optim.state.") for f in fqns)
