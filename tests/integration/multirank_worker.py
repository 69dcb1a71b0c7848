"""One rank of a multi-process DCP save/load through dcpx (run by test_multirank.py).

Usage: ``python multirank_worker.py <scenario>=<checkpoint dir> ...`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment.  Scenarios run in order in one process group
(starting processes is the slow part); after each one every rank prints ``OK <scenario>
<rank>``.  On any difference a rank prints the traceback and exits at once, so its peers fail
fast instead of waiting in a collective.  All data comes from fixed seeds, so every rank and
the test agree on it.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint_helpers import assert_same, blank  # noqa: E402  (tests/ is not a package)

CHUNK = 256  # small, so shards span several chunks and resharding reads parts of chunks


# -- deterministic data shared with the test ---------------------------------------------------------


def replicated_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(11)
    return {
        "emb": torch.randn(300, 17, generator=g),
        "ids": torch.arange(5000, dtype=torch.int64),
        "half": torch.randn(999, generator=g).bfloat16(),
        "scalar": torch.tensor(0.25),
        "cfg": {"epoch": 4, "name": "replicated", "lrs": [0.1, 0.01]},
    }


def full_tensors() -> dict[str, torch.Tensor]:
    """The global tensors that the DTensor scenarios shard."""
    g = torch.Generator().manual_seed(23)
    return {
        "w": torch.randn(16, 12, generator=g),
        "b": torch.randn(10, generator=g),  # uneven over 4 ranks: 3, 3, 3, 1
        "odd": torch.randint(-1000, 1000, (7, 5), generator=g, dtype=torch.int32),  # 2, 2, 2, 1
        "bf": torch.randn(40, 3, generator=g).bfloat16(),
    }


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    optim.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optim.step()


# -- helpers ----------------------------------------------------------------------------------------------


def writer(path: str) -> dcpx.FileSystemWriter:
    return dcpx.FileSystemWriter(path, transforms=["zstd"], chunk_size=CHUNK, thread_count=2)


def reader(path: str) -> dcpx.FileSystemReader:
    return dcpx.FileSystemReader(path)


# -- scenarios --------------------------------------------------------------------------------------------


def replicated(path: str) -> None:
    sd = replicated_state()
    dcp.save(sd, storage_writer=writer(path))
    dist.barrier()
    dest = blank(sd)
    dcp.load(dest, storage_reader=reader(path))
    assert_same(dest, replicated_state())
    files = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))
    assert files, "no data files"


def _dtensors(shard_dim: int = 0, zero: bool = False) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out: dict[str, Any] = {}
    for name, full in full_tensors().items():
        src = torch.zeros_like(full) if zero else full
        dim = shard_dim if full.dim() > shard_dim else 0
        out[name] = distribute_tensor(src, mesh, [Shard(dim)])
    return out


def dtensor_save(path: str) -> None:
    sd: dict[str, Any] = {**_dtensors(), "step": 17}
    dcp.save(sd, storage_writer=writer(path))


def _check_dtensors(sd: dict[str, Any]) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    for name, full in full_tensors().items():
        got = sd[name]
        assert_same(got.full_tensor(), full, name)
        dim = got.placements[0].dim
        chunks = torch.chunk(full, world, dim=dim)  # DTensor's Shard() splits like torch.chunk
        expected = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
        assert_same(got.to_local(), expected, f"{name} (local shard of rank {rank})")


def dtensor_load(path: str) -> None:
    for shard_dim in (0, 1):  # rows (contiguous ranges) and columns (strided regions)
        sd: dict[str, Any] = {**_dtensors(shard_dim, zero=True), "step": None}
        dcp.load(sd, storage_reader=reader(path))
        assert sd["step"] == 17
        _check_dtensors(sd)


def model_optim(path: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.manual_seed(0)
    model = tiny_model()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, optim, seed=1)
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, storage_writer=writer(path))
    dist.barrier()

    torch.manual_seed(1234)  # a different initialisation that the load must overwrite
    model2 = tiny_model()
    optim2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    msd2, osd2 = get_state_dict(model2, optim2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, storage_reader=reader(path))
    set_state_dict(model2, optim2, model_state_dict=state["model"], optim_state_dict=state["optim"])

    ref_m, ref_o = get_state_dict(model, optim)
    got_m, got_o = get_state_dict(model2, optim2)
    assert_same(got_m, ref_m, "model")
    assert_same(got_o, ref_o, "optim")
    assert optim2.param_groups[0]["lr"] == 1e-2
    # training continues identically
    train_step(model, optim, seed=2)
    train_step(model2, optim2, seed=2)
    assert_same(dict(model2.state_dict()), dict(model.state_dict()), "after-step")


def rank_local(path: str) -> None:
    """``use_collectives=False``: every rank saves a checkpoint of its own into one directory,
    twice, at the same time; each loads its own values and no rank removes another's files."""
    rank = dist.get_rank()
    for step in (1, 2):
        sd = {"x": torch.full((64,), float(10 * step + rank)), "note": f"rank {rank} step {step}"}
        dcp.save(sd, storage_writer=writer(path), use_collectives=False)
        dist.barrier()
        dest = {"x": torch.zeros(64), "note": ""}
        dcp.load(dest, storage_reader=reader(path))
        assert dest["note"] == f"rank {rank} step {step}" and torch.equal(dest["x"], sd["x"]), dest
        dist.barrier()
    mine = sorted(n for n in os.listdir(path) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))
    assert len(mine) == 1, f"rank {rank}: the first save's files were not removed: {mine}"


def async_process(path: str) -> None:
    """``dcp.async_save`` on torch's process-based executor: the writer is pickled into a
    checkpointing process that saves while this one goes on."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    sd = replicated_state()
    dcp.async_save(sd, storage_writer=writer(path), async_checkpointer_type=AsyncCheckpointerType.PROCESS).result()
    dist.barrier()
    dest = blank(sd)
    dcp.load(dest, storage_reader=reader(path))
    assert_same(dest, replicated_state())
    # again through torch's own stager (staging on a background thread) instead of the writer's
    staged = path + "_staged"
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=True, use_non_blocking_copy=False))
    try:
        dcp.async_save(sd, storage_writer=writer(staged), async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                       async_stager=stager).upload_completion.result()
    finally:
        stager.close()
    dist.barrier()
    dest = blank(sd)
    dcp.load(dest, storage_reader=reader(staged))
    assert_same(dest, replicated_state())


def plan_caching(path: str) -> None:
    """``DefaultSavePlanner(enable_plan_caching=True)``: from the second save on, DCP hands a
    rank whose plan did not change the final plan of an earlier save (its checkpoint id and
    files).  Every save is still written as a new checkpoint through zstd, encrypt and
    checksum: into a new directory, over the committed one in place, and with the coordinator's
    plan changed while the other rank's stays cached (replicated entries are saved by rank 0,
    so rank 1's plan holds only its own tensor).  Each loads back and verifies, the first
    still loads after the second is saved, and no data file of a replaced one is left."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    import dcpx_checksum.plugin
    import dcpx_encrypt.plugin

    from dcpx.verify import verify_checkpoint

    for plugin in (dcpx_encrypt.plugin, dcpx_checksum.plugin):  # the ranks run without plugin autoload
        dcpx.register_plugin(plugin)
    rank = dist.get_rank()
    enc = dcpx.transform("encrypt", keys={"k1": bytes(range(32))})
    chain = ["zstd", enc, "checksum"]

    def state(step: int, own_rows: int = 40) -> dict[str, Any]:
        sd = replicated_state()
        sd["emb"] = sd["emb"] + step  # new values, same plan
        sd["cfg"] = {**sd["cfg"], "step": step}
        sd[f"own{rank}"] = torch.arange(own_rows * 3, dtype=torch.float32).reshape(own_rows, 3) * (rank + step)
        return sd

    def save(where: str, sd: dict[str, Any]) -> None:
        writer = dcpx.FileSystemWriter(where, transforms=chain, chunk_size=CHUNK)
        metadata = dcp.save(sd, storage_writer=writer,
                            planner=DefaultSavePlanner(enable_plan_caching=True, dedup_save_to_lowest_rank=True))
        committed = dcpx.reader.load_metadata(where)[0].storage_meta.save_id
        assert metadata.storage_meta.save_id == committed
        # a rank that wrote a cached plan under an id of its own does not know the committed one
        assert writer.save_id in (committed, None) and (writer.save_id is not None or rank != 0), writer.save_id
        dist.barrier()

    def check(where: str, sd: dict[str, Any]) -> None:
        dest = blank(sd)
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(where, transforms=[enc], require=["encrypt"]))
        assert_same(dest, sd)
        if rank == 0:
            for full in (False, True):  # full: each item decrypts under the id its records bind it to
                bad = [c for c in verify_checkpoint(where, transforms=[enc], full=full) if c.status != "ok"]
                assert not bad, bad
        dist.barrier()

    first, second = os.path.join(path, "first"), os.path.join(path, "second")
    save(first, state(1))  # nothing cached yet: planned as usual
    check(first, state(1))
    save(second, state(2))  # every plan is cached: rank 0 writes with the id it drew, rank 1 with its own
    check(second, state(2))
    check(first, state(1))
    save(first, state(3))  # cached plans, over the committed checkpoint in place
    check(first, state(3))
    rows = 50 if rank == 0 else 40  # rank 0's plan changes, rank 1's stays cached
    save(second, state(4, rows))
    check(second, state(4, rows))
    for where in (first, second):  # each save removed the files of the checkpoint it replaced
        names = {n for n in os.listdir(where) if n.endswith(".distcp")}
        used = {info.relative_path for info in dcpx.reader.load_metadata(where)[0].storage_data.values()}
        assert names == used, (where, sorted(names - used))


SCENARIOS: dict[str, Callable[[str], None]] = {
    "plan_caching": plan_caching,
    "async_process": async_process,
    "replicated": replicated,
    "rank_local": rank_local,
    "dtensor_save": dtensor_save,
    "dtensor_load": dtensor_load,
    "model_optim": model_optim,
}


def main() -> None:
    jobs = [arg.split("=", 1) for arg in sys.argv[1:]]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    for scenario, path in jobs:
        try:
            SCENARIOS[scenario](path)
            dist.barrier()
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        print(f"OK {scenario} {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
