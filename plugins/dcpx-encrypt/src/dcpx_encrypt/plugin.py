"""The dcpx plugin object (entry point ``encrypt`` in the group ``dcpx``)."""

from __future__ import annotations

from typing import Callable

import pluggy

import dcpx

from . import hookspecs
from .transform import EncryptTransform


@dcpx.hookimpl
def dcpx_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add the key-provider hooks, so a KMS plugin can serve keys to this one."""
    pluginmanager.add_hookspecs(hookspecs)


@dcpx.hookimpl
def dcpx_register_transforms(register: Callable[[type], None]) -> None:
    register(EncryptTransform)
