"""One exception hierarchy for everything dcpx raises.

torch's ``CheckpointException`` derives from ``BaseException``; dcpx errors derive from
``Exception`` so that ``except Exception`` and ``except dcpx.DcpxError`` both work.  When
an error crosses ``dcp.save``/``dcp.load`` torch wraps it in ``CheckpointException``; the
convenience functions ``dcpx.save``/``dcpx.load`` unwrap it again (see ``api.py``).
"""

from __future__ import annotations


class DcpxError(Exception):
    """Base class of every error dcpx raises on purpose."""


class DescriptorError(DcpxError, ValueError):
    """A transform descriptor string is malformed or carries unknown versions/parameters."""


class UnknownTransformError(DcpxError, LookupError):
    """A descriptor names a transform that no installed plugin registers."""


class PluginError(DcpxError):
    """A plugin failed to load, or two plugins claim the same transform name."""


class ConfigError(DcpxError, ValueError):
    """The caller asked for something inconsistent (bad option, unsupported combination)."""


class CheckpointFormatError(DcpxError):
    """Checkpoint files are malformed: bad framing, sizes, paths or metadata."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A checkpoint tried something a reader must never do (escape its directory, run code)."""


class IntegrityError(DcpxError):
    """Stored bytes do not match what was recorded (checksum, size, authentication)."""


class StateDictMismatchError(DcpxError):
    """The checkpoint does not hold what the state dict being loaded asks for (a key, a shape)."""


class PolicyError(DcpxError):
    """An item does not satisfy the reader's policy (e.g. a required transform is missing)."""


class CommitError(DcpxError, RuntimeError):
    """A save could not be committed, or another save holds the checkpoint path."""


class WriteError(DcpxError, OSError):
    """The system refused a save's write (the disk full, a quota, an I/O error); an
    ``OSError`` with the original ``errno``, naming the file.  Nothing was committed."""
