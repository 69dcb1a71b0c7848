"""``dcpx.save`` / ``dcpx.load``: one-call wrappers around ``dcp.save`` / ``dcp.load``.

They build the dcpx writer/reader, load non-tensor entries without ``weights_only=False``,
and re-raise dcpx errors as themselves instead of torch's ``CheckpointException`` (which
derives from ``BaseException`` and escapes ``except Exception``).
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem

from .errors import DcpxError, StateDictMismatchError
from .non_tensor import store_entry
from .torch_archive import load_weights_only
from .reader import FileSystemReader
from .writer import FileSystemWriter


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor entries with ``weights_only=True``.

    Stock DCP's planner unpickles them with ``weights_only=False``; dcpx's reader therefore
    checks each entry with ``weights_only=True`` before handing it to any other planner.
    This planner loads entries safely whichever storage reader reads them, stock torch's too.
    """

    dcpx_weights_only = True  # the reader need not check entries first: this planner loads them safely

    def create_local_plan(self) -> LoadPlan:
        """torch's plan, with its two complaints about the checkpoint (a missing key, another
        shape) raised as ``StateDictMismatchError`` so that they too are dcpx errors."""
        try:
            return super().create_local_plan()
        except (RuntimeError, ValueError) as exc:
            text = str(exc)
            if text.startswith("Missing key in checkpoint state_dict"):
                raise StateDictMismatchError(
                    f"{text} The checkpoint has no such entry; SafeLoadPlanner(allow_partial_load=True) "
                    "leaves such keys as they are") from exc
            if text.startswith("Size mismatch between saved"):
                raise StateDictMismatchError(f"{text}: the checkpoint holds this entry with another shape") from exc
            raise

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        store_entry(self, read_item, load_weights_only(value, read_item.storage_index.fqn))


def save(
    state_dict: dict[str, Any],
    path: str | os.PathLike,
    *,
    transforms: Sequence[Any] | None = None,
    process_group: Any = None,
    planner: Any = None,
    **writer_options: Any,
) -> None:
    """Save ``state_dict`` to ``path`` through dcpx (works with and without a process group)."""
    writer = FileSystemWriter(path, transforms=transforms, **writer_options)
    try:
        with unwrap_errors():
            dcp.save(state_dict, storage_writer=writer, process_group=process_group, planner=planner)
    finally:
        writer.reset()  # releases the save lock even when another rank failed


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike,
    *,
    transforms: Sequence[Any] | None = None,
    require: Sequence[str] = (),
    process_group: Any = None,
    planner: Any = None,
    **reader_options: Any,
) -> None:
    """Load ``path`` into ``state_dict`` in place, safely: non-tensor entries never run code
    (unless ``weights_only=False`` says the checkpoint is trusted)."""
    reader = FileSystemReader(path, transforms=transforms, require=require, **reader_options)
    if planner is None:
        planner = SafeLoadPlanner() if reader.weights_only else DefaultLoadPlanner()
    try:
        with unwrap_errors():
            dcp.load(state_dict, storage_reader=reader, process_group=process_group, planner=planner)
    except AssertionError as exc:  # torch's "metadata is None" after our metadata error
        if reader.metadata_error is not None:
            raise reader.metadata_error from exc
        raise


class unwrap_errors:
    """Context manager: re-raise the error inside torch's ``CheckpointException`` (a
    ``BaseException``) as itself, so ``except Exception`` / ``except dcpx.DcpxError`` work."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, CheckpointException):
            failures = _failures(exc)
            # prefer a dcpx error (it names the item); else the first ordinary exception
            for failure in sorted(failures, key=lambda f: not isinstance(f, DcpxError)):
                if isinstance(failure, Exception):
                    raise failure from exc
        return False


def _failures(exc: CheckpointException) -> list[BaseException]:
    return [value[0] if isinstance(value, tuple) else value for value in (exc.failures or {}).values()]
