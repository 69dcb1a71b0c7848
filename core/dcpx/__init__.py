"""dcpx: compressed, encrypted and verified storage for PyTorch Distributed Checkpoint."""

__version__ = "0.1.0"

import sys as _sys
import types as _types
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .errors import (
    CheckpointFormatError,
    CommitError,
    ConfigError,
    DcpxError,
    DescriptorError,
    IntegrityError,
    PluginError,
    PolicyError,
    StateDictMismatchError,
    UnknownTransformError,
    UnsafeCheckpointError,
    WriteError,
)
from .hookspecs import hookimpl, hookspec
from .descriptor import Descriptor, format_descriptor, parse as parse_descriptor

if _TYPE_CHECKING:
    from .transform import Transform

# Everything below needs torch; it is imported on first use so that light users (the
# pytest plugin entry point, descriptor parsing) do not pay for importing torch.
_LAZY = {
    "plugin_host": ("plugins", "host"),
    "ChunkInfo": ("transform", "ChunkInfo"),
    "ItemInfo": ("transform", "ItemInfo"),
    "Transform": ("transform", "Transform"),
    "Rule": ("rules", "Rule"),
    "FileSystemWriter": ("writer", "FileSystemWriter"),
    "FileSystemReader": ("reader", "FileSystemReader"),
    "SafeLoadPlanner": ("api", "SafeLoadPlanner"),
    "load": ("api", "load"),
    "save": ("api", "save"),
}


def __getattr__(name: str) -> object:
    import importlib
    import importlib.util

    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # submodules, e.g. dcpx.reader
    raise AttributeError(f"module 'dcpx' has no attribute {name!r}")


def transform(name: str, **params: object) -> "Transform":
    """Build a registered transform for a save, e.g. ``dcpx.transform("zstd", level=3)``."""
    from .plugins import host

    return host().create(name, **params)


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object in this process (same hooks as an installed distribution)."""
    from .plugins import host

    host().register(plugin, name)


class _Package(_types.ModuleType):
    """Keeps ``dcpx.transform`` the function: importing the submodule ``dcpx.transform``
    (lazily, after this file ran) would otherwise rebind the package attribute to it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "transform" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


__all__ = [
    "CheckpointFormatError",
    "ChunkInfo",
    "CommitError",
    "ConfigError",
    "FileSystemReader",
    "FileSystemWriter",
    "Rule",
    "SafeLoadPlanner",
    "load",
    "save",
    "DcpxError",
    "Descriptor",
    "DescriptorError",
    "IntegrityError",
    "ItemInfo",
    "PluginError",
    "PolicyError",
    "StateDictMismatchError",
    "Transform",
    "UnknownTransformError",
    "UnsafeCheckpointError",
    "WriteError",
    "format_descriptor",
    "hookimpl",
    "hookspec",
    "parse_descriptor",
    "plugin_host",
    "register_plugin",
    "transform",
]
