"""Re-encoding a checkpoint into another transform chain or file format, item by item.

``convert`` reads one group of stored items at a time (a group stays under ``group_bytes``
unless a single item is larger) and hands each group to the dcpx writer, so a checkpoint of
any size is converted with memory for one group.  A DCP destination is one checkpoint with
the source's ``state_dict_metadata`` and one storage item per stored chunk (same
``MetadataIndex`` offsets), committed once at the end.  Afterwards every item of the
destination is decoded and compared with the source's, again a group at a time
(``convert_check``).  A new destination is written and checked in a staging directory
and renamed into place after the check (``convert_staging``).

Sources: a DCP directory (dcpx or stock torch), a ``torch.save`` file (``.pt``/``.pth``,
loaded with ``weights_only=True`` and memory-mapped) or a ``.safetensors`` file.
Destinations: the same three; ``.pt`` and ``.safetensors`` are written in one call by their
libraries, so those hold the whole state dict in memory.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from . import commit
from .convert_check import ConvertVerificationError, Progress, compare
from .convert_staging import Staging
from .errors import CheckpointFormatError, ConfigError, DcpxError
from .pipeline import DEFAULT_CHUNK_SIZE
from .safetensors_io import _DTYPES as SAFETENSORS_DTYPES
from .tensor_bytes import QUANTIZED, region
from .transform import Transform
from .writer import FileSystemWriter
from .convert_sources import (
    PT_SUFFIXES,
    SAFETENSORS_SUFFIX,
    _Blob,
    _Source,
    allocate,
    open_source,
    _safetensors,
)

DEFAULT_GROUP_BYTES = 64 << 20

@dataclass
class ConvertReport:
    src: str
    dst: str
    src_format: str
    dst_format: str
    items: int
    raw_bytes: int
    stored_bytes: int
    verified: bool
    seconds: float


# -- public entry point ------------------------------------------------------------------
def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    transforms: Sequence[Any] | None = None,
    compat: bool = False,
    reader_transforms: Sequence[Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    workers: int | None = None,
) -> ConvertReport:
    """Write ``src`` again at ``dst`` with ``transforms`` (innermost first, as for a save).

    ``compat=True`` writes a checkpoint stock torch reads.  ``reader_transforms`` configure
    reading ``src`` (e.g. an ``encrypt`` transform holding keys).  Raises
    ``ConvertVerificationError`` if ``dst`` does not read back equal to ``src``.
    """
    started = time.monotonic()
    src, dst = os.fspath(src), os.fspath(dst)
    dst_format = destination_format(dst)
    _check_paths(src, dst, dst_format, overwrite)
    if dst_format != "dcp" and (transforms or compat):
        raise ConfigError(f"{dst}: transforms and compat mode apply to DCP checkpoints only, not to a {dst_format} file")
    if group_bytes < 1:
        raise ConfigError("group_bytes must be positive")
    source = open_source(src, reader_transforms, workers)
    _refuse_quantized(source)
    report = ConvertReport(src, dst, source.format, dst_format, len(source.items),
                           sum(source.raw_size(i) for i in source.items), 0, False, 0.0)
    # an existing directory is written in place (the commit keeps a checkpoint in it loadable
    # until then, and the directory keeps its owner, mode and mount); a new destination or a
    # file it replaces is staged, and appears only once checked
    in_place = dst_format == "dcp" and os.path.isdir(dst)
    with nullcontext() if in_place else Staging(dst, replace=overwrite) as stage:
        target = dst if stage is None else stage.path
        if dst_format == "dcp":
            writer = FileSystemWriter(target, transforms=transforms, compat=compat, chunk_size=chunk_size,
                                      workers=workers, overwrite=overwrite)
            writer.recorded_path = dst
            _write_dcp(source, writer, group_bytes, progress, report.raw_bytes)
        else:
            _write_single_file(source, target, dst, dst_format, group_bytes, progress, report.raw_bytes)
        try:
            written = open_source(target, _reader_config(reader_transforms, transforms), workers)
        except DcpxError as exc:
            raise ConvertVerificationError(f"{dst}: written, but cannot be opened again: {exc}") from exc
        report.stored_bytes = _stored_bytes(target, dst_format, written)
        if verify:
            compare(source, written, group_bytes // 2 or 1, progress, report.raw_bytes)
            report.verified = True
        if stage is not None:
            stage.publish()
    report.seconds = time.monotonic() - started
    return report


def _refuse_quantized(source: _Source) -> None:
    """DCP stores a quantized tensor's integer values only, not its scale and zero point, so
    no copy of it could be checked equal to the source: say so instead of converting."""
    for item in source.items:
        dtype = item.tensor_data.properties.dtype if item.tensor_data is not None else None
        if dtype in QUANTIZED:
            raise ConfigError(
                f"{source.path}: item {item.index.fqn!r} is a quantized tensor ({dtype}); a DCP checkpoint keeps only "
                "its integer values, not its scale and zero point. Dequantize it (tensor.dequantize()) first"
            )


def destination_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(PT_SUFFIXES):
        return "pt"
    if lower.endswith(SAFETENSORS_SUFFIX):
        return "safetensors"
    return "dcp"


def transform_from_spec(text: str) -> Transform:
    """``"zstd"`` or ``"zstd:level=9:raw_threshold=0.9"``: options as ``:key=value``; numbers and
    true/false are converted, anything else stays a string."""
    from . import transform as make

    name, *options = text.split(":")
    params: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ConfigError(f"transform option {option!r} in {text!r} is not key=value")
        params[key.strip()] = _option_value(value.strip())
    return make(name.strip(), **params)


def _option_value(text: str) -> Any:
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+)([eE]-?\d+)?", text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), text)


class _GroupPlanner:
    """The part of a ``SavePlanner`` the dcpx writer calls: the data of the current group."""

    def __init__(self, data: Mapping[MetadataIndex, torch.Tensor | _Blob]) -> None:
        self.data = data

    def resolve_data(self, item: WriteItem) -> Any:
        value = self.data[item.index]
        return io.BytesIO(value.data) if isinstance(value, _Blob) else value


def _write_dcp(source: _Source, writer: FileSystemWriter, group_bytes: int, progress: Progress | None, total: int) -> None:
    """Drive the ``StorageWriter`` protocol by hand: plan once, ``write_data`` once per group
    (each group in its own data files), ``finish`` once with the merged results."""
    created = not os.path.exists(writer.path)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    results: list[Any] = []
    try:
        plan = writer.prepare_local_plan(SavePlan(list(source.items)))
        (plan,) = writer.prepare_global_plan([plan])
        shared = plan.storage_data
        done = 0
        for n, group in enumerate(source.groups(source.items, group_bytes)):
            data = source.read(group)
            sub = dataclasses.replace(plan, items=group, storage_data=dataclasses.replace(shared, prefix=f"__{n}_"))
            results.extend(writer.write_data(sub, _GroupPlanner(data)).wait())  # type: ignore[arg-type]
            del data
            done += sum(source.raw_size(i) for i in group)
            if progress is not None:
                progress("convert", done, total)
        metadata = Metadata(dict(source.metadata.state_dict_metadata), planner_data=source.metadata.planner_data)
        writer.finish(metadata, [results])
    except BaseException:
        writer.reset()
        written = os.fspath(writer.path)
        if not _committed(written, results):
            commit.remove_files(written, {r.storage_data.relative_path for r in results})
            if created:
                shutil.rmtree(written, ignore_errors=True)
        raise


def _committed(path: str, results: list[Any]) -> bool:
    """Whether ``.metadata`` at ``path`` already names the files just written (a failure
    after the commit point must not delete a committed checkpoint's data)."""
    from .checkpoint_files import referenced_files

    mine = {r.storage_data.relative_path for r in results}
    keep = referenced_files(path)
    return bool(mine) and (keep is None or bool(mine & keep))


def _write_single_file(source: _Source, dst: str, named: str, fmt: str, group_bytes: int, progress: Progress | None,
                       total: int) -> None:
    """A ``.pt`` or ``.safetensors`` file at ``dst`` (a staging path; errors name the
    destination the caller gave, ``named``): shards are assembled into whole tensors, then
    the library writes the file.  ``torch.save`` writes to a stream, which names the
    archive's records ``archive/...`` rather than after the file; ``torch.load`` reads either."""
    if fmt == "safetensors":
        blobs = [i.index.fqn for i in source.items if i.type == WriteItemType.BYTE_IO]
        if blobs:
            shown = ", ".join(repr(b) for b in blobs[:5]) + (" ..." if len(blobs) > 5 else "")
            what = f"item {shown} is not a tensor" if len(blobs) == 1 else f"items {shown} are not tensors"
            raise ConfigError(f"{source.path}: {what}; a safetensors file holds tensors only")
    flat: dict[str, Any] = {}
    covered: dict[str, int] = {}
    done = 0
    for group in source.groups(source.items, group_bytes):
        data = source.read(group)
        for item in group:
            value = data[item.index]
            fqn = item.index.fqn
            if isinstance(value, _Blob):
                flat[fqn] = value.value
            elif item.type == WriteItemType.TENSOR:
                flat[fqn] = value
            else:
                td = item.tensor_data
                whole = flat.get(fqn)
                if whole is None:
                    whole = flat[fqn] = allocate(source.path, fqn, tuple(td.size), td.properties.dtype)
                region(whole, td.chunk.offsets, td.chunk.sizes).copy_(value)
                covered[fqn] = covered.get(fqn, 0) + math.prod(td.chunk.sizes)
        done += sum(source.raw_size(i) for i in group)
        if progress is not None:
            progress("convert", done, total)
    for fqn, n in covered.items():
        if n != flat[fqn].numel():
            raise CheckpointFormatError(f"{source.path}: item {fqn!r}: stored shards cover {n} of {flat[fqn].numel()} elements")
    order = {fqn: n for n, fqn in enumerate(source.metadata.state_dict_metadata)}
    flat = dict(sorted(flat.items(), key=lambda kv: order.get(kv[0], len(order))))
    if fmt == "safetensors":
        for fqn, tensor in flat.items():
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise ConfigError(f"{named}: item {fqn!r} is {tensor.dtype}, which safetensors has no code for; "
                                  "convert to a DCP directory or a .pt file instead")
    try:
        if fmt == "pt":
            with open(dst, "wb") as f:  # a file object: torch keeps the system's error as the context of its own
                torch.save(_nest(flat, source.metadata.planner_data), f)
        else:
            _safetensors().torch.save_file(_unshared(flat), dst, metadata={"format": "pt"})
    except Exception as exc:
        refused = _system_error(exc)
        if refused is None:
            raise
        raise commit.write_failure(refused, named, f"{fmt} file") from exc


def _system_error(exc: BaseException) -> OSError | None:
    """The system's refusal behind a library's failed write, where it can be recovered:
    torch's ``RuntimeError`` carries the ``OSError`` as its context, safetensors names the
    errno only in its message ("... (os error 28)")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _nest(flat: dict[str, Any], mappings: Any) -> dict[str, Any]:
    """Rebuild the original nesting from DCP's flattening map, when the checkpoint has one."""
    if not isinstance(mappings, dict) or not all(
        isinstance(mappings.get(k), (tuple, list)) and mappings[k] and all(isinstance(p, (str, int)) for p in mappings[k])
        for k in flat
    ):
        return flat
    return unflatten_state_dict(flat, {k: tuple(mappings[k]) for k in flat})


def _unshared(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own."""
    seen: set[int] = set()
    out = {}
    for key, tensor in flat.items():
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor.contiguous()
    return out


# -- helpers -----------------------------------------------------------------------------
# a save's lock files, which stay in a directory a failed conversion wrote into
_LOCK_FILE = re.compile(r"\.dcpx(-\d+)?\.lock")


def _check_paths(src: str, dst: str, dst_format: str, overwrite: bool) -> None:
    if not src or not dst:
        raise ConfigError(f"an empty {'source' if not src else 'destination'} path; name a checkpoint or file")
    if not os.path.exists(src):
        raise CheckpointFormatError(f"{src}: no such file or directory")
    if os.path.exists(dst) and os.path.realpath(src) == os.path.realpath(dst):
        raise ConfigError(f"{dst}: the destination is the source; convert into a new path")
    if dst_format == "dcp":
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise ConfigError(f"{dst}: exists and is not a directory (a DCP checkpoint is a directory)")
        if os.path.isdir(dst) and not overwrite and any(not _LOCK_FILE.fullmatch(n) for n in os.listdir(dst)):
            raise ConfigError(f"{dst}: already exists; pass --overwrite (overwrite=True) to replace it")
    else:
        if os.path.isdir(dst):
            raise ConfigError(f"{dst}: is a directory; a {dst_format} destination is a single file")
        if os.path.exists(dst) and not overwrite:
            raise ConfigError(f"{dst}: already exists; pass --overwrite (overwrite=True) to replace it")
        parent = os.path.dirname(os.path.abspath(dst))
        if not os.path.isdir(parent):
            raise ConfigError(f"{dst}: directory {parent} does not exist")


def _reader_config(reader_transforms: Sequence[Any] | None, transforms: Sequence[Any] | None) -> list[Any]:
    """Transform instances the caller configured (e.g. with keys), to read DST back with.
    Names are left out: the reader builds those from the registry, as any reader would."""
    from .rules import Rule

    out = [t for t in reader_transforms or () if not isinstance(t, str)]
    for spec in transforms or ():
        specs = spec.transforms if isinstance(spec, Rule) else [spec]
        out.extend(t for t in specs if not isinstance(t, str))
    return out


def _stored_bytes(dst: str, fmt: str, written: _Source) -> int:
    if fmt != "dcp":
        return os.path.getsize(dst)
    return sum(int(info.length) for info in (written.metadata.storage_data or {}).values())
