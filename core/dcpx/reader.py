"""``FileSystemReader``: DCP's ``StorageReader`` that treats the checkpoint as untrusted.

Every path is confined to the checkpoint directory, every offset and length is checked
against the file, every decode is bounded by the recorded raw size, and nothing from the
checkpoint is unpickled outside an allow-list.  Reads dcpx checkpoints and everything stock
torch 2.13 writes (torch.save items, with or without torch's zstd extension).
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from . import commit, manifest
from .checkpoint_files import CheckpointDirectory, load_manifest, load_metadata
from .data_files import DataFiles
from .descriptor import parse
from .errors import CheckpointFormatError, ConfigError, DcpxError, IntegrityError, PolicyError
from .framing import MARKERS
from .metadata_check import check_storage_entry
from .non_tensor import hand_over
from .pipeline import checked_workers
from .plugins import as_transform, host
from .read_job import ReadJob
from .read_window import ReadWindow
from .transform import TorchStreamTransform, Transform, descriptor_name, holds_keys, transform_name


READS_PER_CORE = 2
# tensors resolved ahead of their commit (a planner may stage each in memory of its own)
IN_FLIGHT_BYTES = 1 << 30


class FileSystemReader(CheckpointDirectory, StorageReader):
    """Drop-in replacement for ``torch.distributed.checkpoint.FileSystemReader``.

    * ``transforms``: configured transforms for reading (e.g. an ``encrypt`` transform
      holding keys).  Descriptors in the checkpoint choose what runs; these only supply
      reader-side configuration.  Everything else is rebuilt from the plugin registry.
    * ``require``: transform names every item must carry (e.g. ``["encrypt"]``); an item
      without them is refused before its bytes are read.
    * ``checkpoint_id``: refuse a checkpoint whose dcpx checkpoint id differs (anti-replay).
    * ``max_item_bytes``: upper bound for a non-tensor item's decoded size.
    * ``weights_only``: refuse a non-tensor entry that ``torch.load(weights_only=True)``
      refuses, before the load planner sees it (torch's default planner unpickles entries
      with ``weights_only=False``, which runs whatever code an edited file names).  Pass
      ``False`` only for checkpoints you trust.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        _extension_registry: Any = None,
        *,
        transforms: Sequence[Any] | None = None,
        require: Sequence[str] = (),
        checkpoint_id: str | None = None,
        workers: int | None = None,
        max_item_bytes: int = 1 << 30,
        weights_only: bool = True,
    ) -> None:
        super().__init__()
        self.fs = FileSystem()
        self.path = path
        self.workers = checked_workers(workers)
        self.max_item_bytes = max_item_bytes
        self.weights_only = weights_only
        self.expected_checkpoint_id = checkpoint_id
        self._configured: dict[str, Transform] = {}
        for spec in transforms or ():
            t = host().create(spec) if isinstance(spec, str) else as_transform(spec)
            self._configured[transform_name(t)] = t
        # torch's experimental ExtensionRegistry: its classes read descriptors that no
        # installed plugin provides (installed plugins win, e.g. dcpx-zstd for stream.zstd)
        self._extensions: dict[str, type] = dict(getattr(_extension_registry, "extensions", None) or {})
        self.require = [_required_name(r) for r in require]
        self._cache: dict[str, Transform] = {}
        self.storage_data: dict[MetadataIndex, Any] = {}
        self.metadata: Metadata | None = None
        self.manifest: dict[str, Any] | None = None
        self._recorded: dict[tuple[str, int, int], dict[str, Any]] = {}  # manifest entries by (file, offset, length)
        self.metadata_error: DcpxError | None = None
        self.rank: int | None = None
        self.use_collectives = True
        self.load_id = str(uuid.uuid4())  # as stock torch: identifies this load in StorageMeta

    # -- StorageReader protocol ---------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        self.metadata = None
        self.manifest = None
        self._recorded = {}
        self.metadata_error = None
        self.load_id = str(uuid.uuid4())
        if checkpoint_id:
            self.path = checkpoint_id

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None and self.metadata_error is not None and os.path.lexists(os.path.join(self._dir, commit.METADATA)):
            # the global metadata exists but was refused: never fall back to a stale rank-local one
            raise self.metadata_error
        name = commit.metadata_name(rank)
        try:
            metadata, data = load_metadata(self._dir, name)
            self.manifest = load_manifest(self._dir, metadata, data, covers=False)
            self._authenticate_manifest(metadata, data)
            if self.manifest is not None:
                where = manifest.path_in(self._dir, str(metadata.storage_meta.save_id))
                manifest.check_covers(self.manifest, metadata.storage_data, where)
            if self.expected_checkpoint_id is not None:
                found = metadata.storage_meta.save_id if metadata.storage_meta else None
                if found != self.expected_checkpoint_id:
                    raise PolicyError(
                        f"{self._dir}: checkpoint id is {found!r}, the caller expected {self.expected_checkpoint_id!r}"
                    )
        except Exception as exc:
            # torch retries with rank-local metadata and then raises a bare AssertionError;
            # keep the first, informative error for dcpx.load to re-raise.  Anything but a
            # dcpx error here is a checkpoint no check foresaw: still say which file it was
            error = exc if isinstance(exc, DcpxError) else CheckpointFormatError(
                f"{self._dir}/{name}: cannot be read ({type(exc).__name__}: {exc})")
            if self.metadata_error is None:
                self.metadata_error = error
            if error is exc:
                raise
            raise error from exc
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _authenticate_manifest(self, metadata: Metadata, data: bytes) -> None:
        """Check the manifest's HMAC when a key for it is at hand.  A checkpoint whose items
        use a keyed transform must carry a keyed manifest, so deleting or replacing the
        manifest (to hide an edit of ``.metadata``) is detected by a reader holding the key.
        A reader holding key material fails closed on a key claim it cannot check (a
        transform it cannot resolve, a key id it lacks); only a reader without any key
        skips the check, as it could not decrypt the items either."""
        claim = (self.manifest or {}).get("hmac_key")
        keyed = {n: t for n, t in self._configured.items() if callable(getattr(t, "manifest_key_for", None))}
        if not isinstance(claim, dict):
            self._refuse_unkeyed(metadata, keyed)
            return
        where = f"{self._dir}/{manifest.manifest_name(str(metadata.storage_meta.save_id))}"
        key = self._claimed_key(where, str(claim.get("transform")), str(claim.get("key_id")), keyed)
        if key is not None:
            manifest.verify(self.manifest, data, where, key)

    def _refuse_unkeyed(self, metadata: Metadata, keyed: dict[str, Transform]) -> None:
        """Refuse a checkpoint without a keyed manifest whose items use a keyed transform
        this reader holds keys for."""
        used = {descriptor_name(d) for info in (metadata.storage_data or {}).values()
                if isinstance(info, _StorageInfo) for d in (info.transform_descriptors or ()) if isinstance(d, str)}
        used -= {descriptor_name(m) for m in MARKERS}
        held = sorted(used & set(self._key_holders(keyed, used))) if used else []
        if held:
            raise IntegrityError(
                f"{self._dir}: items use {held} but the checkpoint has no keyed manifest; "
                "its manifest was removed or replaced"
            )

    def _claimed_key(self, where: str, name: str, key_id: str, keyed: dict[str, Transform]) -> bytes | None:
        """The HMAC key the manifest's claim names, or None when this reader holds no key
        material at all; raises when it holds some but cannot check the claim."""
        transform = keyed.get(name) or _keyed_default(name)
        if transform is None:
            holders = self._key_holders(keyed, None)
            if holders:
                raise IntegrityError(
                    f"{where}: the manifest claims an HMAC key of transform {name!r}, which cannot check it, "
                    f"while this reader holds keys for {holders}: the key claim was forged or damaged"
                )
            return None
        holds = True if name in keyed else holds_keys(transform)
        if holds is False:
            return None  # no key here: the items themselves cannot be decrypted either
        try:
            return transform.manifest_key_for(key_id)  # type: ignore[attr-defined]
        except DcpxError as exc:
            if holds is None:
                return None  # a transform that cannot say whether it has keys: taken as keyless
            # the plugin's own error (e.g. an unknown key id, with how to supply it), naming the manifest
            named = copy.copy(exc)
            named.args = (f"{where}: the manifest is keyed with {name} key id {key_id!r}, which this reader "
                          f"does not hold, so it cannot be authenticated: {exc}",)
            raise named from exc

    def _key_holders(self, keyed: dict[str, Transform], among: set[str] | None) -> list[str]:
        """Keyed transforms (``among`` these names, or any) with key material at hand: those
        configured on this reader, and installed ones whose default configuration finds a
        key (environment, key file)."""
        names = set(keyed)
        for reg in host().registrations():
            if among is not None and reg.name not in among:
                continue
            if reg.name not in names and callable(getattr(reg.cls, "manifest_key_for", None)):
                default = _keyed_default(reg.name)
                if default is not None and holds_keys(default):
                    names.add(reg.name)
        return sorted(names)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.metadata = metadata
        self.storage_data = metadata.storage_data
        self._recorded = manifest.items_by_location(self.manifest)
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        if not isinstance(self.storage_data, dict):
            raise CheckpointFormatError(f"{self._dir}: metadata has no storage table")

    def recorded_size(self, info: _StorageInfo) -> int | None:
        """The decoded size the manifest records for the item stored at ``info`` (None without
        a manifest entry): what a non-tensor entry will take in memory, before reading it."""
        entry = self._recorded.get((info.relative_path, info.offset, info.length))
        return None if entry is None else int(entry["raw_size"])

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        files = DataFiles(self._dir)
        try:
            jobs = [self.prepare(req, files) for req in plan.items]
            # Raw items go from the file straight into their tensors, and a cold one waits on
            # the disk: two reads per core keep more requests in flight (performance.md).
            # Every other tensor holds buffers while it runs: at most one per core at a time.
            buffered = threading.BoundedSemaphore(self.workers)
            threads = READS_PER_CORE * self.workers
            item_pool = ThreadPoolExecutor(threads, thread_name_prefix="dcpx-reader")
            try:
                window = ReadWindow(
                    planner, item_pool, threads, IN_FLIGHT_BYTES,
                    run=lambda job, target: _run(job, target, buffered),
                    hand_over=lambda job: hand_over(planner, job.req, job.run(None), job.where, self.weights_only),
                )
                for job in jobs:
                    window.add(job)
                window.finish()
            finally:
                item_pool.shutdown(wait=True, cancel_futures=True)
        finally:
            files.close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # -- one item -----------------------------------------------------------------------
    def prepare(self, req: ReadItem, files: DataFiles) -> "ReadJob":
        info = self.storage_data.get(req.storage_index)
        fqn = req.storage_index.fqn
        if not isinstance(info, _StorageInfo):
            raise CheckpointFormatError(f"{fqn}: no storage entry for this item in {self._dir}/.metadata")
        # read_metadata checked every entry; metadata handed to set_up_storage_reader from
        # elsewhere gets the same check here
        check_storage_entry(req.storage_index, info, f"{self._dir}/{commit.METADATA}")
        rel, offset, length = info.relative_path, info.offset, info.length
        where = f"{fqn} (file {rel!r}, offset {offset}, length {length})"
        descriptors = list(info.transform_descriptors or [])
        self._check_policy(where, descriptors)
        opened = files.get(rel, where)
        if offset + length > opened.size:
            raise CheckpointFormatError(
                f"{where}: item ends at byte {offset + length} but the file has only {opened.size} bytes (truncated?)"
            )
        expected = self._expected(req, where)
        recorded = self._recorded.get((rel, offset, length), {})
        return ReadJob(self, req, where, opened, offset, length, descriptors, expected, recorded)

    def _check_policy(self, where: str, descriptors: list[str]) -> None:
        names = {descriptor_name(d) for d in descriptors}
        missing = [r for r in self.require if r not in names]
        if missing:
            raise PolicyError(f"{where}: item lacks required transform(s) {missing}; it carries {sorted(names) or 'none'}")

    def _expected(self, req: ReadItem, where: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        if req.type == LoadItemType.BYTE_IO:
            return None
        md = self.metadata.state_dict_metadata.get(req.storage_index.fqn) if self.metadata else None
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointFormatError(f"{where}: metadata has no tensor entry for this item")
        offsets = tuple(req.storage_index.offset or ())
        for chunk in md.chunks:
            if tuple(chunk.offsets) == offsets:
                shape = tuple(int(s) for s in chunk.sizes)
                if any(s < 0 for s in shape):
                    raise CheckpointFormatError(f"{where}: negative size in metadata")
                return md.properties.dtype, shape
        raise CheckpointFormatError(f"{where}: metadata has no chunk at offsets {offsets}")

    def transform_for(self, text: str, where: str) -> Transform:
        cached = self._cache.get(text)
        if cached is None:
            try:
                name = descriptor_name(text)
                configured = self._configured.get(name)
                if configured is not None:
                    cached = configured.with_descriptor(parse(text))
                elif name in self._extensions and name not in {r.name for r in host().registrations()}:
                    cached = TorchStreamTransform(self._extensions[name].from_descriptor(text.partition("/")[2]))
                else:
                    cached = host().from_descriptor(text)
            except DcpxError as exc:
                raise type(exc)(f"{where}: {exc}") from exc
            self._cache[text] = cached
        return cached


def _required_name(name: str) -> str:
    """A ``require=`` entry as items' descriptors name it: short names resolved (``"encrypt"``
    is ``stream.encrypt@dcpx``); a version cannot be required, so one is refused."""
    if "/" in name:
        raise ConfigError(f"require= takes transform names, not descriptors: pass {descriptor_name(name)!r}, "
                          f"not {name!r} (any version of a required transform satisfies it)")
    return name if "@" in name else host().resolve_name(name)


def _keyed_default(name: str) -> Transform | None:
    """The transform ``name`` in its default configuration (keys from the environment, a key
    file), if it is installed and keyed (offers ``manifest_key_for``), else None.  Only a
    full name counts: writers record nothing else, so a shorthand in a manifest was forged."""
    try:
        if host().resolve_name(name) != name:
            return None
        transform = host().create(name)
    except DcpxError:
        return None
    return transform if callable(getattr(transform, "manifest_key_for", None)) else None


def _run(job: ReadJob, target: torch.Tensor | None, buffered: threading.BoundedSemaphore) -> Any:
    """Run one read on an item thread; reads that hold buffers take a slot of ``buffered``."""
    if job.reads_in_place(target):
        return job.run(target)
    with buffered:
        return job.run(target)
