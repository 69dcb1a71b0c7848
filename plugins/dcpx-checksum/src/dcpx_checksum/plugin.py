"""The module the ``checksum`` entry point (group ``dcpx``) names: registers the transform."""

from __future__ import annotations

from typing import Callable

import dcpx

from .transform import ChecksumTransform


@dcpx.hookimpl
def dcpx_register_transforms(register: Callable[[type], None]) -> None:
    register(ChecksumTransform)
