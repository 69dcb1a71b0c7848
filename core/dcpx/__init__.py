"""dcpx: compressed, encrypted and verified storage for PyTorch Distributed Checkpoint."""

__version__ = "0.1.0"

from .errors import (
    CheckpointFormatError,
    CommitError,
    ConfigError,
    DcpxError,
    DescriptorError,
    IntegrityError,
    PluginError,
    PolicyError,
    UnknownTransformError,
    UnsafeCheckpointError,
)
from .hookspecs import hookimpl, hookspec
from .descriptor import Descriptor, format_descriptor, parse as parse_descriptor
from .plugins import host as plugin_host
from .transform import ChunkInfo, ItemInfo, Transform
from .rules import Rule
from .writer import FileSystemWriter
from .reader import FileSystemReader
from .api import SafeLoadPlanner, load, save


def transform(name: str, **params: object) -> Transform:
    """Build a registered transform for a save, e.g. ``dcpx.transform("zstd", level=3)``."""
    return plugin_host().create(name, **params)


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object in this process (same hooks as an installed distribution)."""
    plugin_host().register(plugin, name)


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
    "Transform",
    "UnknownTransformError",
    "UnsafeCheckpointError",
    "format_descriptor",
    "hookimpl",
    "hookspec",
    "parse_descriptor",
    "plugin_host",
    "register_plugin",
    "transform",
]
