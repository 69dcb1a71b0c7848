"""``FileSystemWriter``: DCP's ``StorageWriter`` with transforms, chunk framing and a safe commit."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import threading
import uuid
from typing import Any, Iterator, Sequence

import torch
from torch.distributed.checkpoint.filesystem import FileSystem, SerializationFormat, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from . import commit, digest, manifest
from .errors import CommitError, ConfigError, WriteError
from .framing import RAW_DESCRIPTOR
from .gc_pause import gc_paused
from .checkpoint_files import CheckpointDirectory, metadata_files
from .item_writer import ItemState, ItemStorageInfo, WholeItem, item_result, item_tensor, torch_save_bytes
from .plan_data import PlanData, SavePlanning
from .pipeline import DEFAULT_CHUNK_SIZE, BoundChain, OrderedWindow, checked_workers, codec_pool, encode_chunk, iter_chunks
from .rules import TransformSpec, resolve_transforms
from .safetensors_io import write_safetensors_file
from .save_scope import SaveScope
from .tensor_bytes import tensor_bytes
from .transform import ChunkInfo, ItemInfo

DCP_VERSION = "1.0.0"
SUFFIX = ".distcp"


class FileSystemWriter(CheckpointDirectory, StorageWriter, BlockingAsyncStager):
    """Drop-in replacement for ``torch.distributed.checkpoint.FileSystemWriter``.

    Accepts every argument of torch's writer with the same meaning, plus:

    * ``transforms``: transforms to apply, innermost first, e.g. ``["zstd", "encrypt",
      "checksum"]`` or instances from ``dcpx.transform(...)``; torch's ``_extensions``
      is accepted as an alias.  May also be a list of per-item rules (``dcpx.Rule``).
    * ``compat``: write exactly what stock torch writes (``torch.save`` items, unframed,
      only transforms torch knows), so stock ``FileSystemReader`` loads it.  Also implied
      by passing ``serialization_format=SerializationFormat.TORCH_SAVE`` explicitly.
    * ``chunk_size``: items larger than this are split into independently decodable chunks.
    * ``workers``: threads that encode chunks (default: one per available core).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: SerializationFormat | None = None,
        *,
        transforms: Sequence[TransformSpec] | None = None,
        compat: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int | None = None,
    ) -> None:
        StorageWriter.__init__(self)
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)
        if transforms is not None and _extensions is not None:
            raise ConfigError("pass either transforms= or _extensions=, not both")
        if thread_count < 1 or chunk_size < 1:
            raise ConfigError("thread_count and chunk_size must be positive")
        self.fs = FileSystem()
        self.path = path
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.overwrite = overwrite
        self.serialization_format = serialization_format or SerializationFormat.TORCH_SAVE
        self.compat = compat or serialization_format == SerializationFormat.TORCH_SAVE
        self.safetensors = self.serialization_format == SerializationFormat.SAFETENSORS
        self.chunk_size = chunk_size
        self.workers = checked_workers(workers)
        self.rules = resolve_transforms(transforms if transforms is not None else _extensions)
        if self.safetensors and compat:
            raise ConfigError(
                "compat=True writes torch.save items, which stock torch's reader loads; "
                "serialization_format=SAFETENSORS writes safetensors files, which it cannot. Pass one of the two"
            )
        if self.safetensors and self.rules.any_active():
            raise ConfigError(
                "serialization_format=SAFETENSORS cannot carry transforms: a safetensors file holds raw "
                "tensor bytes only. Drop the transforms or use the default format"
            )
        if self.compat:
            self.rules = self.rules.torch_compatible()
        self.rank: int | None = None
        self.is_coordinator = True
        self.use_collectives = True
        self._plan: PlanData | None = None
        self._scope: SaveScope | None = None  # set while a save holds the directory
        self._planning = SavePlanning()
        # the id the last save committed, where this rank knows it (see write_data)
        self.save_id: str | None = uuid.uuid4().hex
        # the path .metadata records, where it is not ``path``: ``dcpx convert`` writes a new
        # checkpoint elsewhere first and moves it into place once checked
        self.recorded_path: str | None = None

    # -- StorageWriter protocol -------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._release()
        if checkpoint_id:
            self.path = checkpoint_id
        self._plan = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._planning.begin()
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def storage_meta(self) -> StorageMeta | None:
        # what the next save will commit as its id: DCP hands this to the planner before planning.
        # A Path, as stock gives planners; the committed metadata records the plain string.
        return StorageMeta(checkpoint_id=self.path, save_id=self._planning.next_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        os.makedirs(self._dir, exist_ok=True)
        if os.path.exists(os.path.join(self._dir, commit.metadata_name(self._own_rank()))):
            if not self.overwrite:
                raise CommitError(f"{self._dir}: Checkpoint already exists and overwrite=False; pass overwrite=True or save elsewhere")
        if not self.use_collectives:
            plan = dataclasses.replace(plan, storage_data=self._new_plan_data(f"__{self._own_rank()}_"))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._scope = SaveScope(self._dir, self._own_rank())
        self._scope.lock_and_clean()
        if not self.use_collectives:  # the rank's own checkpoint: planned by prepare_local_plan
            return plans
        shared = self._new_plan_data("")
        return [dataclasses.replace(p, storage_data=dataclasses.replace(shared, prefix=f"__{i}_")) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            self._claim_lock()
            data = self._planning.resolve(plan.storage_data, f"{self._dir}: rank {self.rank}")
        except BaseException:
            self._release()
            raise
        # a rank that drew an id of its own cannot know the one the coordinator commits: dcp.save
        # returns it on every rank (``metadata.storage_meta.save_id``)
        self._plan, self.save_id = data, None if data.own_id else data.checkpoint_id
        files = self._assign_files(plan.items, data)
        results: list[WriteResult] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run(queue: list[tuple[str, list[WriteItem]]]) -> None:
            for name, items in queue:
                if errors:
                    return
                try:
                    out = self._write_file(name, items, planner, data.checkpoint_id)
                except BaseException as exc:  # reported to DCP through the future below
                    errors.append(commit.write_failure(exc, os.path.join(self._dir, name), "data file"))
                    return
                with lock:
                    results.extend(out)

        queues = [files[i::self.thread_count] for i in range(self.thread_count)]
        threads = [threading.Thread(target=run, args=(q,), name="dcpx-writer") for q in queues[1:]]
        for t in threads:
            t.start()
        run(queues[0])
        for t in threads:
            t.join()
        fut: Future[list[WriteResult]] = Future()
        if errors:
            # nothing will be committed: remove this rank's partial files, free the path
            commit.remove_files(self._dir, [name for name, _ in files])
            self._release()
            fut.set_exception(errors[0])
        else:
            if data.own_id:  # a cached plan: this rank's items are bound to an id of its own
                for result in results:
                    result.storage_data.records[manifest.SAVE_ID_RECORD] = data.checkpoint_id
            if self._scope is not None:
                self._scope.lock.busy = False  # waiting for the other ranks now (see SaveLock)
            fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            self._claim_lock()
            self._commit(metadata, results)
        finally:
            self._release()

    def _claim_lock(self) -> None:
        """Mark the lock busy for writing or committing, unless a newer save took it over
        while this one was planning or waiting for its other ranks (see SaveLock)."""
        if self._scope is not None:
            self._scope.lock.claim(self._dir)

    # -- files -------------------------------------------------------------------------
    def _assign_files(self, items: list[WriteItem], data: PlanData) -> list[tuple[str, list[WriteItem]]]:
        tag = f".{data.tag}" if data.tag else ""
        names = (f"{data.prefix}{n}{tag}{SUFFIX}" for n in range(1 << 62))
        if self.safetensors:
            tensors = [i for i in items if i.type != WriteItemType.BYTE_IO]
            blobs = [i for i in items if i.type == WriteItemType.BYTE_IO]
            groups = _balance(tensors, self.thread_count) if self.single_file_per_rank else [[i] for i in tensors]
            groups += [blobs] if self.single_file_per_rank else [[i] for i in blobs]
        elif self.single_file_per_rank:
            groups = _balance(items, self.thread_count)
        else:
            groups = [[i] for i in items]
        return [(next(names), g) for g in groups if g]

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner, checkpoint_id: str) -> list[WriteResult]:
        path = os.path.join(self._dir, name)
        if self.safetensors and items[0].type != WriteItemType.BYTE_IO:
            tensors = [(item, item_tensor(item, planner.resolve_data(item))) for item in items]
            placed = write_safetensors_file(path, tensors, self.sync_files)
            return [item_result(item, name, off, length, [RAW_DESCRIPTOR], length, {digest.RECORD: crc})
                    for item, off, length, crc in placed]
        pool = codec_pool(self.workers)
        window = OrderedWindow(pool, max(4 * self.workers * self.chunk_size, self.per_thread_copy_ahead))
        results: list[WriteResult] = []
        with open(path, "wb") as f:
            flush = commit.BackgroundFlush(f, self.sync_files)
            try:
                for tag, value in _chain(
                    (w for item in items for job in self._item_jobs(item, planner, checkpoint_id, name) for w in window.submit(*job)),
                    window.drain(),
                ):
                    result = tag(f, value)
                    flush.wrote()
                    if result is not None:
                        results.append(result)
            except BaseException:
                window.cancel()
                raise
            finally:
                flush.stop()
            flush.check()
            if self.sync_files:
                f.flush()
                os.fsync(f.fileno())
        return results

    def _item_jobs(self, item: WriteItem, planner: SavePlanner, checkpoint_id: str, name: str) -> Iterator[tuple[Any, int, Any]]:
        """Jobs for one item as (work, cost in bytes, continuation run in file order)."""
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            buffer = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(bytes(data))
            raw, keep, info = memoryview(buffer).cast("B"), buffer, ItemInfo(item.index.fqn, buffer.nbytes, checkpoint_id=checkpoint_id)
        else:
            keep = tensor = item_tensor(item, data, for_torch_save=self.compat)
            raw = memoryview(b"") if self.compat else tensor_bytes(tensor)  # compat: torch.save reads the tensor
            info = ItemInfo(
                item.index.fqn, tensor.nbytes, tensor.dtype, tuple(tensor.shape),
                tuple(item.index.offset) if item.index.offset is not None else None, checkpoint_id,
            )
        state = ItemState(item, name, info, keep, self.chunk_size)
        chain = BoundChain.for_item(self.rules.chain_for(info), info)
        if self.compat:
            yield (lambda: torch_save_bytes(item, keep, chain), info.nbytes, state.write_whole)
        elif not chain.transforms or (info.is_tensor and raw.nbytes == 0):
            # an empty tensor has no bytes to transform, and DCP never issues a read for it
            descriptors = [RAW_DESCRIPTOR] if item.type != WriteItemType.BYTE_IO else None
            # the cost (raw.nbytes) bounds staged GPU->CPU copies in flight
            yield (lambda: WholeItem(raw, descriptors, record_crc=True), raw.nbytes, state.write_whole)
        else:
            state.chain = chain
            for k, offset, size in iter_chunks(raw.nbytes, self.chunk_size):
                chunk = ChunkInfo(info, k, -(-raw.nbytes // self.chunk_size), offset, size)
                yield (lambda c=chunk: encode_chunk(chain, raw[c.offset:c.offset + c.size], c), size, state.write_chunk)
            yield (lambda: None, 0, state.write_index)

    # -- commit ------------------------------------------------------------------------
    def _commit(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self._plan is None:
            raise CommitError(f"{self._dir}: finish() called before write_data()")
        checkpoint_id = self._plan.checkpoint_id
        storage: dict[MetadataIndex, _StorageInfo] = {}
        records: list[manifest.ItemRecord] = []
        for wr in (wr for rank_results in results for wr in rank_results):
            info = wr.storage_data
            storage[wr.index] = info.plain() if isinstance(info, ItemStorageInfo) else info
            records.append(manifest.ItemRecord(
                fqn=wr.index.fqn,
                shard_offsets=list(wr.index.offset) if wr.index.offset is not None else None,
                file=info.relative_path, offset=info.offset, length=info.length,
                raw_size=getattr(info, "raw_size", info.length),
                descriptors=list(info.transform_descriptors or []),
                records=dict(getattr(info, "records", {})),
            ))
        metadata.storage_data = storage
        metadata.version = DCP_VERSION
        metadata.storage_meta = StorageMeta(checkpoint_id=self.recorded_path or self._dir, save_id=checkpoint_id)
        with gc_paused():  # pickling creates a dict per entry; collections only rescan torch's heap
            md_bytes = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        extra: dict[str, Any] = {"files": _file_sizes(self._dir, records)}
        keyed = self.rules.manifest_key()
        if keyed is not None:
            extra["hmac_key"] = {"transform": keyed[0], "key_id": keyed[1]}
        body = manifest.build(checkpoint_id, md_bytes, records, extra)
        man_name = manifest.manifest_name(checkpoint_id)
        data = manifest.dumps(body, keyed[2] if keyed is not None else None)
        if self._scope is not None:
            self._scope.begin_commit(checkpoint_id, self.sync_files)
        md_name = commit.metadata_name(self._own_rank())
        try:
            commit.write_atomic(self._dir, man_name, data, man_name + ".tmp", self.sync_files, "manifest")
            commit.write_atomic(self._dir, md_name, md_bytes, commit.metadata_tmp_name(checkpoint_id), self.sync_files,
                                "checkpoint metadata")
        except WriteError:  # .metadata was not replaced: this save's files go now, not at the next save
            commit.remove_files(self._dir, sorted({r.file for r in records} | {man_name}))
            raise
        if self._scope is not None:
            self._scope.clean_after_commit({r.file for r in records} | {man_name})

    def _own_rank(self) -> int | None:
        """The rank whose own checkpoint this is (``use_collectives=False``), else None."""
        return None if self.use_collectives else (self.rank or 0)

    def _new_plan_data(self, prefix: str) -> PlanData:
        """This save's plan data (a writer may save many times; see plan_data.py)."""
        data = self._planning.draw(prefix, committed=bool(metadata_files(self._dir)))
        self.save_id = data.checkpoint_id
        return data

    def _release(self) -> None:
        if self._scope is not None:
            self._scope.lock.release()
            self._scope = None


def _chain(*iterables: Iterator[Any]) -> Iterator[Any]:
    for it in iterables:
        yield from it


def _balance(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Spread items over ``bins`` files by size, as torch does, so threads finish together."""
    if bins == 1:
        return [list(items)]
    groups: list[list[WriteItem]] = [[] for _ in range(bins)]
    sizes = [0] * bins
    blobs = [i for i in items if i.type == WriteItemType.BYTE_IO]
    for n, item in enumerate(blobs):
        groups[n % bins].append(item)
    for item in sorted((i for i in items if i.type != WriteItemType.BYTE_IO), key=_item_nbytes, reverse=True):
        k = sizes.index(min(sizes))
        groups[k].append(item)
        sizes[k] += _item_nbytes(item)
    return groups


def _item_nbytes(item: WriteItem) -> int:
    td = item.tensor_data
    assert td is not None
    n = 1
    for s in td.size:
        n *= s
    return n * torch.empty((), dtype=td.properties.dtype).element_size()


def _file_sizes(directory: str, records: list[manifest.ItemRecord]) -> dict[str, int]:
    return {name: os.path.getsize(os.path.join(directory, name)) for name in sorted({r.file for r in records})}
