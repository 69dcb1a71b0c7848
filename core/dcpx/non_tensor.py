"""Handing a checkpoint's non-tensor entries (pickled objects) to the load planner.

torch's ``DefaultLoadPlanner`` unpickles them with ``weights_only=False``, so the reader
first loads each one with ``weights_only=True`` and refuses what that refuses.  Where the
planner would place the object exactly as torch's does, it is given the object the check
built instead of unpickling the entry a second time (a 256 MiB entry takes seconds each way).
"""

from __future__ import annotations

import io
from typing import Any

from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

from .torch_archive import load_weights_only


def store_entry(planner: DefaultLoadPlanner, req: ReadItem, obj: Any) -> None:
    """Put a loaded entry where ``DefaultLoadPlanner.load_bytes`` puts it."""
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[req.dest_index.fqn], obj)
    else:
        planner.state_dict[req.dest_index.fqn] = obj


def hand_over(planner: LoadPlanner, req: ReadItem, data: bytes, where: str, weights_only: bool) -> None:
    """Give one decoded entry to ``planner``; with ``weights_only``, nothing the restricted
    unpickler refuses reaches an unrestricted one."""
    if not weights_only or getattr(planner, "dcpx_weights_only", False):
        planner.load_bytes(req, io.BytesIO(data))  # trusted, or a planner that loads safely itself
    elif isinstance(planner, DefaultLoadPlanner) and type(planner).load_bytes is DefaultLoadPlanner.load_bytes:
        store_entry(planner, req, load_weights_only(data, where))
    else:
        load_weights_only(data, where, map_location="cpu")  # refuses before the planner unpickles
        planner.load_bytes(req, io.BytesIO(data))
