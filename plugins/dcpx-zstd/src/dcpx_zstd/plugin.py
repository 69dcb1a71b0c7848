"""The module the ``zstd`` entry point names: registers ``stream.zstd`` with dcpx.

dcpx lets this one registration replace torch's built-in ``ZStandard`` for the name torch
gave it, so checkpoints written by stock torch are read through ``ZstdTransform`` too.
"""

from __future__ import annotations

from typing import Callable

import dcpx

from .transform import ZstdTransform


@dcpx.hookimpl
def dcpx_register_transforms(register: Callable[[type], None]) -> None:
    register(ZstdTransform)
