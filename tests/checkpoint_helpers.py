"""Helpers shared by the core's tests: bit-exact comparison and blank destination state dicts."""

from __future__ import annotations

import glob
import os
import pickle
from typing import Any, Callable

import torch


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's logical bytes (conjugation/negation resolved), for bit-exact comparison."""
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return bytes(t.view(torch.uint8).numpy().tobytes())


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Recursive, bit-exact equality (dtype, shape, bytes) for tensors and containers."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual)}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert tuple(actual.shape) == tuple(expected.shape), f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert raw_bytes(actual) == raw_bytes(expected), f"{path}: tensor bytes differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{path}: keys {set(actual)} != {set(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in expected):
        assert len(actual) == len(expected), f"{path}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def blank(obj: Any) -> Any:
    """A destination with the same structure: tensors zeroed (same dtype, shape and, for a
    DTensor, placement), other leaves None."""
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, dict):
        return {k: blank(v) for k, v in obj.items()}
    if isinstance(obj, list) and any(isinstance(v, torch.Tensor) for v in obj):
        return [blank(v) for v in obj]
    return None


def data_files(directory: str | os.PathLike) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".distcp"))


def rewrite_metadata(directory: str | os.PathLike, edit: Callable[[Any], None], drop_manifest: bool = True) -> None:
    """Unpickle ``.metadata`` with plain pickle (a test may trust its own files), edit, re-pickle."""
    path = os.path.join(directory, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    edit(metadata)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    if drop_manifest:
        for name in glob.glob(os.path.join(os.fspath(directory), ".dcpx-manifest-*.json")):
            os.remove(name)


def storage_items(metadata: Any) -> dict[str, Any]:
    """fqn -> _StorageInfo for the items of an unsharded checkpoint."""
    return {index.fqn: info for index, info in metadata.storage_data.items()}
