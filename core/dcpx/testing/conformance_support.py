"""The machinery behind ``TransformConformance``: reading a suite's variants, encoding and
decoding test cases as the pipeline does, the sample state dict, and assertions whose
failure messages tell a plugin author what their transform did wrong.

Kept apart from the suite so that subclassing it brings in tests only.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import torch

import dcpx

from . import payloads
from .payloads import Case

Factory = Callable[[], dcpx.Transform]


def variant_params(cls: type) -> tuple[list[Any], list[str]]:
    factory = variants = None
    for klass in cls.__mro__:  # the most derived setting wins
        if "transform_factory" in klass.__dict__ or "variants" in klass.__dict__:
            factory, variants = klass.__dict__.get("transform_factory"), klass.__dict__.get("variants")
            break
    if isinstance(factory, staticmethod):
        factory = factory.__func__
    if (factory is None) == (variants is None):
        raise TypeError(f"{cls.__qualname__}: set exactly one of transform_factory or variants")
    if factory is not None:
        return [factory], ["default"]
    if isinstance(variants, Mapping):
        return list(variants.values()), [str(k) for k in variants]
    values = list(variants)
    if not values:
        raise TypeError(f"{cls.__qualname__}.variants is empty")
    return values, [f"variant{i}" for i in range(len(values))]


def make_transform(factory: Factory) -> dcpx.Transform:
    t = factory()
    assert isinstance(t, dcpx.Transform), f"the factory returned {t!r}, not a dcpx.Transform"
    return t


def dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def bound_forms(t: dcpx.Transform) -> list[tuple[str, dcpx.Transform]]:
    """The transform as configured and as specialised for each kind of item."""
    forms = [("as configured", t)]
    for kind in payloads.KINDS:
        forms.append((f"for_item({kind} item)", t.for_item(payloads.item_for(kind, 4096, False))))
    for label, tr in forms:
        assert isinstance(tr, dcpx.Transform), f"{label} returned {tr!r}, not a dcpx.Transform"
        assert tr.name == t.name, f"{label} returned a transform named {tr.name!r}, not {t.name!r}"
    return forms


def expect_descriptor_error(factory: Factory, cls: type, bad: str, label: str) -> None:
    desc = dcpx.parse_descriptor(bad)
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("from_params", lambda: cls.from_params(desc.version, dict(desc.params))),
        ("plugin_host().from_descriptor", lambda: dcpx.plugin_host().from_descriptor(bad)),
        ("with_descriptor", lambda: make_transform(factory).with_descriptor(desc)),
    ]
    for how, attempt in attempts:
        try:
            result = attempt()
        except dcpx.DescriptorError:
            continue
        except Exception as exc:
            pytest.fail(f"{label}: {how}({bad!r}) raised {type(exc).__name__}: {exc}; expected dcpx.DescriptorError")
        pytest.fail(f"{label}: {how}({bad!r}) accepted the descriptor and returned {result!r}")


class Readers:
    """Reader-side instances per descriptor, built as a reader does: a fresh configured
    instance (keys and the like come from the factory) rebuilt with ``with_descriptor``."""

    def __init__(self, factory: Factory) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._cache: dict[str, dcpx.Transform] = {}

    def get(self, text: str) -> dcpx.Transform:
        with self._lock:
            reader = self._cache.get(text)
            if reader is None:
                reader = self._cache[text] = make_transform(self._factory).with_descriptor(dcpx.parse_descriptor(text))
            return reader


def flat_bytes(buf: object, label: str) -> memoryview:
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        pytest.fail(f"{label}: returned {type(buf).__name__}, not a bytes-like buffer")
    assert view.c_contiguous, f"{label}: returned a non-contiguous buffer"
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode_case(t: dcpx.Transform, case: Case, inner: tuple[str, ...] = ()) -> tuple[Any, str, bytes]:
    """Encode ``case`` as the pipeline does; check that encode does not hand back (a view
    of) its input, which the pipeline reuses once encode returns."""
    raw = payloads.payload(case.kind, case.pattern, case.size)
    chunk = payloads.chunk_for(case, inner)
    bound = t.for_item(chunk.item)
    source = bytearray(raw)
    out = flat_bytes(bound.encode(memoryview(source).toreadonly(), chunk), f"{case.label}: encode")
    before = bytes(out)
    source[:] = bytes(len(source))  # the caller reuses the buffer
    if bytes(out) != before:
        pytest.fail(f"{case.label}: encode returned a view of its input buffer, which the pipeline reuses; "
                    "return new memory")
    return chunk, bound.get_descriptor(), before


def round_trip(t: dcpx.Transform, readers: Readers, case: Case, inner: tuple[str, ...]) -> None:
    raw = payloads.payload(case.kind, case.pattern, case.size)
    chunk, text, encoded = encode_case(t, case, inner)
    try:
        decoded = readers.get(text).decode(memoryview(encoded), chunk, case.size)
    except Exception as exc:
        pytest.fail(f"{case.label}: decode of what encode wrote ({text}) raised {type(exc).__name__}: {exc}")
    out = flat_bytes(decoded, f"{case.label}: decode")
    assert out.nbytes == case.size, f"{case.label}: decoded {out.nbytes} bytes, expected {case.size}"
    same_bytes(bytes(out), raw, f"{case.label}: round trip through {text}")
    # decode_into, as the pipeline calls it: into a slice of a larger buffer at an odd address
    dest = bytearray(case.size + 3)
    try:
        readers.get(text).decode_into(memoryview(encoded), chunk, memoryview(dest)[1:1 + case.size])
    except Exception as exc:
        pytest.fail(f"{case.label}: decode_into of what encode wrote ({text}) raised {type(exc).__name__}: {exc}")
    assert dest[0] == 0 and dest[-2:] == b"\0\0", f"{case.label}: decode_into wrote outside its buffer"
    same_bytes(bytes(dest[1:1 + case.size]), raw, f"{case.label}: decode_into through {text}")


def same_bytes(got: bytes, want: bytes, label: str) -> None:
    """Compare without pytest's byte-by-byte diff (payloads run to megabytes)."""
    if got == want:
        return
    if len(got) != len(want):
        pytest.fail(f"{label}: {len(got)} bytes, expected {len(want)}")
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    pytest.fail(f"{label}: bytes differ, first at offset {first} of {len(want)}")


def expect_decode_error(reader: dcpx.Transform, data: bytes, chunk: Any, size: int, label: str) -> None:
    """Both ``decode`` and ``decode_into`` must refuse ``data`` with a dcpx error naming the item."""
    calls = {
        "decode": lambda: memoryview(reader.decode(memoryview(data), chunk, size)).nbytes,
        "decode_into": lambda: reader.decode_into(memoryview(data), chunk, memoryview(bytearray(size))),
    }
    for name, call in calls.items():
        try:
            result = call()
        except dcpx.DcpxError as exc:
            assert chunk.item.fqn in str(exc), f"{label}: {name}: the error does not name the item {chunk.item.fqn!r}: {exc}"
            continue
        except Exception as exc:
            pytest.fail(f"{label}: {name} raised {type(exc).__name__}: {exc}; it must raise a dcpx error "
                        "(dcpx.IntegrityError / dcpx.CheckpointFormatError or a subclass)")
        what = f"returned {result} bytes" if name == "decode" else "returned"
        pytest.fail(f"{label}: {name} {what} instead of raising a dcpx error")


def edge_cases() -> list[Case]:
    return [
        Case("float32", "weights", 5000, False),
        Case("bytes", "random", 4097, True),
        Case("int64", "compressible", 0, False),
        Case("bfloat16", "random", 1, False),
        Case("bytes", "compressible", 70_000, True),
    ]


def mixed_writes(raw: bytes) -> Iterator[object]:
    """``raw`` as a mix of empty, tiny and large writes of different buffer types."""
    view, pos, step = memoryview(raw), 0, 0
    sizes = [0, 1, 6, 4089, 100_000, 1 << 20]
    while pos < len(raw):
        n = sizes[step % len(sizes)]
        piece = view[pos:pos + n]
        yield (bytes(piece), bytearray(piece), piece)[step % 3]
        pos += n
        step += 1


def cycle(values: Sequence[int]) -> Iterator[int]:
    while True:
        yield from values


class Sink(io.BytesIO):
    """Output stream that keeps its bytes when the transform closes it."""

    def close(self) -> None:
        self._final = self.getvalue()
        super().close()

    def value(self) -> bytes:
        return self.getvalue() if not self.closed else self._final


def sample_state_dict() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "model.embed.weight": torch.randn(64, 96, generator=g),
        "model.norm.weight": (torch.randn(1500, generator=g) * 0.02).to(torch.bfloat16),
        "model.head.weight": torch.randn(40, 50, generator=g).to(torch.float16).t(),  # non-contiguous
        "optim.step": torch.arange(3000, dtype=torch.int64),
        "optim.mask": torch.rand(5000, generator=g) > 0.5,
        "codes": torch.randint(0, 255, (777,), dtype=torch.uint8, generator=g),
        "scale": torch.tensor(0.125, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "epoch": 3,
        "run": {"name": "conformance", "lr": 0.0003, "betas": [0.9, 0.95]},
    }


def blank_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {k: blank_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [blank_like(v) for v in value]
    return type(value)()  # 0, 0.0, "" - replaced by the load


def assert_same(got: Any, want: Any, where: str = "state_dict") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, (
            f"{where}: loaded {got!r:.80}, expected a {want.dtype} tensor of shape {tuple(want.shape)}")
        assert torch.equal(got, want), f"{where}: loaded values differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys differ"
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    else:
        assert got == want, f"{where}: loaded {got!r}, expected {want!r}"


def assert_applied(path: Path, names: list[str], chunk_size: int) -> None:
    """Every multi-chunk item records the chain, outermost first (the order of undoing it)."""
    from ..inspect import describe

    expected = list(reversed(names))
    big = [it for it in describe(os.fspath(path))["items"] if (it["raw_bytes"] or 0) > chunk_size]
    assert big, "the test state dict has no multi-chunk item"
    for it in big:
        recorded = [d.partition("/")[0] for d in it["descriptors"][1:]]
        assert recorded == expected, f"{it['fqn']}: recorded transforms {recorded}, expected {expected} (outermost first)"
