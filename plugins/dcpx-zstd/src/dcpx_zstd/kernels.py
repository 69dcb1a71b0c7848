"""Which implementation of the byte shuffles runs: the compiled kernels, or numpy.

``_kernels`` is a C extension built when the plugin is installed (it is optional: without
a C compiler the plugin installs anyway).  It computes byte for byte what the numpy code
in ``grouping`` and ``packing`` computes, in one pass over memory instead of a dozen, so
checkpoints do not depend on which one wrote or reads them.  The numpy code stays as the
reference the kernels are tested against, and as the fallback.
"""

from __future__ import annotations

from types import ModuleType

try:
    from . import _kernels as native
except ImportError:  # built without a C compiler
    native: ModuleType | None = None  # type: ignore[no-redef]


def available() -> bool:
    """True if the compiled kernels were built and are used by default."""
    return native is not None


def use_compiled(compiled: bool | None) -> bool:
    """Resolve a ``compiled=`` argument: ``None`` picks the kernels when they were built."""
    if compiled is None:
        return native is not None
    if compiled and native is None:
        raise RuntimeError("dcpx-zstd was installed without its compiled kernels (no C compiler at build time)")
    return compiled
