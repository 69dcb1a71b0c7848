"""``TransformConformance``: the tests every dcpx transform must pass, inherited by subclassing.

A plugin's test module holds one subclass that says how to build the transform::

    class TestMine(TransformConformance):
        transform_factory = staticmethod(lambda: MyTransform())
        entry_point = "mine"          # optional: also check the installed entry point

or several configurations with ``variants = {"fast": lambda: ..., "strong": lambda: ...}``.
Every test then runs once per variant.  Factories carry any configuration the transform
needs (keys, key rings), so the tests themselves stay generic.  See docs/conformance.md.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import pytest
import torch
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

import dcpx

from ..plugins import TORCH, PluginHost
from . import payloads
from .payloads import Case
from .reference import XorReference, plugin_for

Factory = Callable[[], dcpx.Transform]
UNKNOWN_PARAM = "dcpx-conformance-unknown"
AUTOLOAD_ENV = "DCPX_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "DCPX_LOAD_PLUGINS"
STATE_CHUNK_SIZE = 4096  # small, so every tensor of the test state dict spans several chunks
CHAIN_CHUNK_SIZE = 3001  # odd, so chunks also end in the middle of elements


class TransformConformance:
    """Base class of a plugin's conformance tests (not collected itself: no ``Test`` prefix)."""

    #: builds the transform under test (a fresh instance per call)
    transform_factory: ClassVar[Factory | None] = None
    #: several configurations instead: ``{"id": factory}`` or a list of factories / ``pytest.param``
    variants: ClassVar[Mapping[str, Factory] | Sequence[Any] | None] = None
    #: the entry-point name in the group ``dcpx`` the installed distribution declares
    entry_point: ClassVar[str | None] = None

    pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

    # -- parametrisation --------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run every test that takes ``dcpx_factory`` once per configured variant."""
        if "dcpx_factory" in metafunc.fixturenames:
            values, ids = _variant_params(type(self))
            metafunc.parametrize("dcpx_factory", values, ids=ids)

    @pytest.fixture
    def dcpx_registered(self, dcpx_factory: Factory) -> Iterator[type]:
        """Make sure the process-wide plugin host resolves the transform's name to its class.

        An installed plugin is found through its entry point; a class that is not installed
        (still in development, or loading switched off) is registered in-process for the
        test.  Another distribution holding the name is a failure, not something to paper over."""
        cls = type(_make(dcpx_factory))
        host = dcpx.plugin_host()
        try:
            reg = host.lookup(cls.name)
        except dcpx.UnknownTransformError:
            reg = None
        if reg is not None and reg.cls is cls:
            yield cls
            return
        if reg is not None and reg.source != TORCH:
            pytest.fail(f"transform name {cls.name!r} is already registered by {reg.source} "
                        f"({reg.cls.__module__}.{reg.cls.__qualname__}), not by {cls.__module__}.{cls.__qualname__}")
        plugin_name = f"dcpx-testing:{cls.__module__}.{cls.__qualname__}"
        host.register(plugin_for(cls), name=plugin_name)
        try:
            yield cls
        finally:
            host.unregister(plugin_name)

    # -- the class and its descriptors ------------------------------------------------------
    def test_transform_class(self, dcpx_factory: Factory) -> None:
        t = _make(dcpx_factory)
        cls = type(t)
        assert isinstance(cls.name, str), f"{cls.__qualname__}.name must be a string"
        version = cls.version
        assert isinstance(version, int) and not isinstance(version, bool) and version >= 0, (
            f"{cls.__qualname__}.version must be a non-negative int, got {version!r}")
        desc = dcpx.parse_descriptor(f"{cls.name}/{version}")
        assert desc.domain is not None or cls.name in ExtensionRegistry().extensions, (
            f"transform name {cls.name!r} needs a domain (stream.<thing>@<your-domain>): "
            "only names torch itself defines may go without one")
        assert t.registry_name() == cls.name
        repr(t)

    def test_descriptor_is_canonical(self, dcpx_factory: Factory) -> None:
        t = _make(dcpx_factory)
        for label, tr in _bound_forms(t):
            text = tr.get_descriptor()
            assert isinstance(text, str), f"{label}: get_descriptor() returned {type(text).__name__}"
            desc = dcpx.parse_descriptor(text)  # strict: rejects non-canonical spellings
            assert desc.name == type(t).name, f"{label}: descriptor {text!r} names another transform"
            assert desc.version == type(tr).version, f"{label}: descriptor {text!r} has the wrong version"
            params = tr.params()
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), (
                f"{label}: params() must map str to str, got {params!r}")
            assert dict(desc.params) == params, f"{label}: descriptor {text!r} does not hold params() {params!r}"
            assert text == dcpx.format_descriptor(desc.name, desc.version, params)
            assert tr.get_descriptor() == text, f"{label}: get_descriptor() is not stable"

    def test_rebuild_through_registry(self, dcpx_factory: Factory, dcpx_registered: type) -> None:
        t = _make(dcpx_factory)
        host = dcpx.plugin_host()
        assert host.lookup(type(t).name).cls is dcpx_registered
        for label, tr in _bound_forms(t):
            text = tr.get_descriptor()
            rebuilt = host.from_descriptor(text)
            assert isinstance(rebuilt, dcpx_registered), f"{label}: registry rebuilt {rebuilt!r} from {text!r}"
            assert rebuilt.get_descriptor() == text, (
                f"{label}: plugin_host().from_descriptor({text!r}) describes itself as {rebuilt.get_descriptor()!r}")

    def test_rebuild_from_params(self, dcpx_factory: Factory) -> None:
        t = _make(dcpx_factory)
        cls = type(t)
        for label, tr in _bound_forms(t):
            text = tr.get_descriptor()
            desc = dcpx.parse_descriptor(text)
            for how, rebuilt in (
                ("from_params", cls.from_params(desc.version, dict(desc.params))),
                ("with_descriptor on the writer", tr.with_descriptor(desc)),
                ("with_descriptor on a fresh instance", _make(dcpx_factory).with_descriptor(desc)),
            ):
                assert isinstance(rebuilt, dcpx.Transform), f"{label}: {how} returned {rebuilt!r}"
                assert rebuilt.get_descriptor() == text, (
                    f"{label}: {how} of {text!r} describes itself as {rebuilt.get_descriptor()!r}")

    def test_rejects_unsupported_version(self, dcpx_factory: Factory, dcpx_registered: type) -> None:
        t = _make(dcpx_factory)
        for label, tr in _bound_forms(t):
            params = tr.params()
            for version in (type(tr).version + 1, type(tr).version + 1000):
                bad = dcpx.format_descriptor(type(tr).name, version, params)
                _expect_descriptor_error(dcpx_factory, dcpx_registered, bad, f"{label}: version {version}")

    def test_rejects_unknown_parameter(self, dcpx_factory: Factory, dcpx_registered: type) -> None:
        t = _make(dcpx_factory)
        for label, tr in _bound_forms(t):
            params = {**tr.params(), UNKNOWN_PARAM: "1"}
            bad = dcpx.format_descriptor(type(tr).name, type(tr).version, params)
            _expect_descriptor_error(dcpx_factory, dcpx_registered, bad, f"{label}: unknown parameter")

    # -- the chunk API ---------------------------------------------------------------------
    @pytest.mark.parametrize("kind", list(payloads.KINDS))
    def test_chunk_round_trip(self, dcpx_factory: Factory, kind: str) -> None:
        """Empty, tiny, odd and boundary sizes; random, compressible, weight-like, zero and
        special-value payloads; the only chunk of an item and a middle chunk."""
        t = _make(dcpx_factory)
        readers = _Readers(dcpx_factory)
        inner = (XorReference().get_descriptor(),)
        for case in (c for c in payloads.small_cases() if c.kind == kind):
            _round_trip(t, readers, case, inner if case.middle else ())

    @pytest.mark.parametrize("kind", list(payloads.KINDS))
    def test_chunk_round_trip_large(self, dcpx_factory: Factory, kind: str) -> None:
        """Around 1 MiB and a multi-MiB chunk, random and highly compressible."""
        t = _make(dcpx_factory)
        readers = _Readers(dcpx_factory)
        for case in payloads.large_cases(kind):
            _round_trip(t, readers, case, ())

    def test_decode_rejects_wrong_size(self, dcpx_factory: Factory) -> None:
        """``size`` is the exact output length: anything else is an error naming the item."""
        t = _make(dcpx_factory)
        readers = _Readers(dcpx_factory)
        for case in _edge_cases():
            chunk, text, encoded = _encode(t, case)
            reader = readers.get(text)
            wrong = {case.size + 1, 2 * case.size + 16}
            if case.size:
                wrong |= {case.size - 1, 0}
            for size in sorted(wrong):
                _expect_decode_error(reader, encoded, chunk, size, f"{case.label}: decode told size={size}")

    def test_decode_rejects_damaged_input(self, dcpx_factory: Factory) -> None:
        """Truncated or extended stored bytes are an error naming the item, not short or
        padded output."""
        t = _make(dcpx_factory)
        readers = _Readers(dcpx_factory)
        for case in _edge_cases():
            chunk, text, encoded = _encode(t, case)
            reader = readers.get(text)
            damaged = {"one trailing byte added": encoded + b"\0", "eight trailing bytes added": encoded + bytes(8)}
            if encoded:
                damaged["last byte dropped"] = encoded[:-1]
                damaged["cut in half"] = encoded[: len(encoded) // 2]
            for what, data in damaged.items():
                _expect_decode_error(reader, data, chunk, case.size, f"{case.label}: {what}")

    def test_integrity_claim(self, dcpx_factory: Factory) -> None:
        """A transform that sets ``verifies_integrity`` must detect any flipped bit."""
        t = _make(dcpx_factory)
        if not type(t).verifies_integrity:
            pytest.skip("verifies_integrity is False: decode does not claim to detect corruption")
        readers = _Readers(dcpx_factory)
        for case in _edge_cases():
            chunk, text, encoded = _encode(t, case)
            reader = readers.get(text)
            for pos in sorted({0, len(encoded) // 2, len(encoded) - 1}):
                flipped = bytearray(encoded)
                flipped[pos] ^= 0x10
                _expect_decode_error(reader, bytes(flipped), chunk, case.size, f"{case.label}: bit flipped at byte {pos}")

    def test_records_are_strings(self, dcpx_factory: Factory) -> None:
        """``chunk_record``/``item_record`` results go into a JSON manifest: str or None."""
        t = _make(dcpx_factory)
        for kind in payloads.KINDS:
            cases = [Case(kind, "weights" if kind != "bytes" else "compressible", 5000, m) for m in (False, True)]
            records = []
            for case in cases:
                chunk, text, encoded = _encode(t, case)
                bound = t.for_item(chunk.item)
                record = bound.chunk_record(memoryview(encoded), chunk)
                assert record is None or isinstance(record, str), f"{case.label}: chunk_record returned {record!r}"
                records.append(record)
            item = payloads.item_for(kind, 5000, True)
            result = t.for_item(item).item_record(item, records)
            assert result is None or isinstance(result, str), f"{kind} item: item_record returned {result!r}"

    # -- torch's stream API -----------------------------------------------------------------
    @pytest.mark.parametrize("case", [
        Case("bytes", "random", 0, False),
        Case("bytes", "compressible", 100, False),
        Case("float32", "weights", 300_001, False),
        Case("bytes", "compressible", (1 << 20) + 3, False),
    ], ids=lambda c: f"{c.pattern}-{c.size}")
    def test_stream_round_trip(self, dcpx_factory: Factory, case: Case) -> None:
        """``transform_to`` / ``transform_from`` as stock torch drives them: many writes of
        any size, close() flushes everything; reads of any size, then EOF stays EOF."""
        t = _make(dcpx_factory)
        raw = payloads.payload(case.kind, case.pattern, case.size)
        sink = _Sink()
        writer = t.transform_to(sink)
        for piece in _pieces(raw):
            writer.write(piece)
        writer.close()
        writer.close()  # closing twice is harmless, as for any Python stream
        encoded = sink.value()
        reader_side = _make(dcpx_factory).with_descriptor(dcpx.parse_descriptor(t.get_descriptor()))

        stream = reader_side.transform_from(io.BytesIO(encoded))
        got, sizes = bytearray(), [1, 7, 4096, 65536, 1 << 20, 3]
        for n in _cycle(sizes):
            piece = stream.read(n)
            assert len(piece) <= n, f"read({n}) returned {len(piece)} bytes"
            if not piece:
                break
            got += piece
            assert len(got) <= len(raw), f"stream decoded more than the {len(raw)} bytes written"
        _same_bytes(bytes(got), raw, f"stream round trip of {case.label}")
        assert stream.read() == b"" and stream.read(1) == b"", "reads after EOF must return b''"
        stream.close()

        for read_all in (lambda s: s.read(), lambda s: s.read(-1)):
            stream = reader_side.transform_from(io.BytesIO(encoded))
            _same_bytes(read_all(stream), raw, f"read-all of the stream of {case.label}")
            stream.close()

    # -- whole checkpoints ---------------------------------------------------------------------
    def test_save_load_round_trip(self, dcpx_factory: Factory, tmp_path: Path) -> None:
        """A real ``dcpx.save``/``dcpx.load``: several dtypes, a non-contiguous tensor, an
        empty tensor, non-tensor entries, and every tensor split into several chunks."""
        state = _state_dict()
        path = tmp_path / "checkpoint"
        dcpx.save(state, path, transforms=[_make(dcpx_factory)], chunk_size=STATE_CHUNK_SIZE)
        out = _blank_like(state)
        dcpx.load(out, path, transforms=[_make(dcpx_factory)])
        _assert_same(out, state)
        _assert_applied(path, [type(_make(dcpx_factory)).name], STATE_CHUNK_SIZE)

    @pytest.mark.parametrize("position", ["applied-first", "applied-last"])
    def test_chain_with_reference(self, dcpx_factory: Factory, tmp_path: Path, position: str) -> None:
        """Chained with ``stream.xor@dcpx-testing`` on either side, through save and load."""
        t, xor = _make(dcpx_factory), XorReference()
        chain = [t, xor] if position == "applied-first" else [xor, t]
        state = _state_dict()
        path = tmp_path / "checkpoint"
        dcpx.save(state, path, transforms=chain, chunk_size=CHAIN_CHUNK_SIZE)
        out = _blank_like(state)
        dcpx.load(out, path, transforms=[XorReference(), _make(dcpx_factory)])
        _assert_same(out, state)
        _assert_applied(path, [type(c).name for c in chain], CHAIN_CHUNK_SIZE)

    def test_torch_compatible(self, dcpx_factory: Factory, tmp_path: Path) -> None:
        """What ``torch_compatible()`` offers for compat mode, stock torch must load."""
        t = _make(dcpx_factory)
        ext = t.torch_compatible()
        if ext is None:
            pytest.skip("torch_compatible() is None: no form stock torch can read")
        assert isinstance(ext, StreamTransformExtension), f"torch_compatible() returned {ext!r}"
        assert ext.registry_name() in ExtensionRegistry().extensions, (
            f"torch_compatible() returned {ext.registry_name()!r}, which stock torch does not know")
        import torch.distributed.checkpoint as dcp

        state = {k: v for k, v in _state_dict().items() if isinstance(v, torch.Tensor)}
        dcpx.save(state, tmp_path / "compat", transforms=[t], compat=True)
        out = _blank_like(state)
        dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "compat"))
        _assert_same(out, state)

    # -- concurrency -----------------------------------------------------------------------------
    def test_thread_safety(self, dcpx_factory: Factory) -> None:
        """One instance (writer and reader alike) used from many threads at once, as the
        pipeline's thread pool does."""
        t = _make(dcpx_factory)
        readers = _Readers(dcpx_factory)
        cases = [Case(kind, pattern, 65_536 + 1_001 * i, i % 2 == 1)
                 for i, (kind, pattern) in enumerate((k, p) for k in payloads.KINDS for p in ("random", "weights"))]
        data = {c: payloads.payload(c.kind, c.pattern, c.size) for c in cases}
        threads = 8
        barrier = threading.Barrier(threads)

        def work(worker: int) -> list[str]:
            order = cases[:]
            random.Random(worker).shuffle(order)
            barrier.wait(timeout=30)
            problems = []
            for _ in range(2):
                for case in order:
                    chunk = payloads.chunk_for(case)
                    bound = t.for_item(chunk.item)
                    encoded = bytes(_flat(bound.encode(memoryview(data[case]), chunk), case.label))
                    decoded = readers.get(bound.get_descriptor()).decode(memoryview(encoded), chunk, case.size)
                    if bytes(_flat(decoded, case.label)) != data[case]:
                        problems.append(f"thread {worker}: {case.label}: round trip differs")
            return problems

        with ThreadPoolExecutor(threads) as pool:
            problems = [p for result in pool.map(work, range(threads)) for p in result]
        assert not problems, "\n".join(problems[:10])

    # -- packaging ----------------------------------------------------------------------------------
    def test_entry_point(self, dcpx_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
        """The installed distribution's entry point loads, registers the class, and no other
        installed distribution claims the entry-point name or the transform name."""
        name = type(self).entry_point
        if name is None:
            pytest.skip("set entry_point = '<name>' to check the installed distribution's entry point")
        cls = type(_make(dcpx_factory))
        eps = [ep for ep in importlib.metadata.entry_points(group="dcpx") if ep.name == name]
        assert eps, (f"no entry point {name!r} in the group 'dcpx': is the distribution installed "
                     "(pip install -e .) and does its pyproject declare [project.entry-points.dcpx]?")
        owners = sorted({f"{_dist(ep)} ({ep.value})" for ep in eps})
        assert len(owners) == 1, f"entry point {name!r} is declared by several distributions: {owners}"
        autoload_was_off = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
        allow_list = os.environ.get(ALLOW_ENV)
        monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
        monkeypatch.delenv(ALLOW_ENV, raising=False)

        fresh = PluginHost()  # what a new process sees: every installed plugin, loaded from entry points
        try:
            reg = fresh.lookup(cls.name)
        except dcpx.PluginError as exc:
            pytest.fail(f"loading the installed plugins failed: {exc}")
        failed = [f"{f.name} ({f.distribution}): {f.error}" for f in fresh.failures()]
        assert not [f for f in fresh.failures() if f.name == name], f"entry point {name!r} failed to load: {failed}"
        assert reg.cls is cls, (f"{cls.name!r} resolves to {reg.cls.__module__}.{reg.cls.__qualname__} "
                                f"from {reg.source}, not to {cls.__module__}.{cls.__qualname__}")
        assert reg.source == _dist(eps[0]), f"{cls.name!r} is registered by {reg.source}, not by {_dist(eps[0])}"
        info = {p.name: p for p in fresh.plugins()}[name]
        assert cls.name in info.transforms, f"entry point {name!r} registers {info.transforms}, not {cls.name!r}"
        if len(info.transforms) == 1:
            assert fresh.resolve_name(name) == cls.name, f"transforms=[{name!r}] does not select {cls.name!r}"
        if not autoload_was_off and allow_list is None:
            assert dcpx.plugin_host().lookup(cls.name).cls is cls, "the process-wide plugin host resolves another class"


# -- utilities (module level, so subclasses do not collect them) --------------------------------------
def _variant_params(cls: type) -> tuple[list[Any], list[str]]:
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


def _make(factory: Factory) -> dcpx.Transform:
    t = factory()
    assert isinstance(t, dcpx.Transform), f"the factory returned {t!r}, not a dcpx.Transform"
    return t


def _dist(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _bound_forms(t: dcpx.Transform) -> list[tuple[str, dcpx.Transform]]:
    """The transform as configured and as specialised for each kind of item."""
    forms = [("as configured", t)]
    for kind in payloads.KINDS:
        forms.append((f"for_item({kind} item)", t.for_item(payloads.item_for(kind, 4096, False))))
    for label, tr in forms:
        assert isinstance(tr, dcpx.Transform), f"{label} returned {tr!r}, not a dcpx.Transform"
        assert tr.name == t.name, f"{label} returned a transform named {tr.name!r}, not {t.name!r}"
    return forms


def _expect_descriptor_error(factory: Factory, cls: type, bad: str, label: str) -> None:
    desc = dcpx.parse_descriptor(bad)
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("from_params", lambda: cls.from_params(desc.version, dict(desc.params))),
        ("plugin_host().from_descriptor", lambda: dcpx.plugin_host().from_descriptor(bad)),
        ("with_descriptor", lambda: _make(factory).with_descriptor(desc)),
    ]
    for how, attempt in attempts:
        try:
            result = attempt()
        except dcpx.DescriptorError:
            continue
        except Exception as exc:
            pytest.fail(f"{label}: {how}({bad!r}) raised {type(exc).__name__}: {exc}; expected dcpx.DescriptorError")
        pytest.fail(f"{label}: {how}({bad!r}) accepted the descriptor and returned {result!r}")


class _Readers:
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
                reader = self._cache[text] = _make(self._factory).with_descriptor(dcpx.parse_descriptor(text))
            return reader


def _flat(buf: object, label: str) -> memoryview:
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        pytest.fail(f"{label}: returned {type(buf).__name__}, not a bytes-like buffer")
    assert view.c_contiguous, f"{label}: returned a non-contiguous buffer"
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _encode(t: dcpx.Transform, case: Case, inner: tuple[str, ...] = ()) -> tuple[Any, str, bytes]:
    """Encode ``case`` as the pipeline does; check that encode does not hand back (a view
    of) its input, which the pipeline reuses once encode returns."""
    raw = payloads.payload(case.kind, case.pattern, case.size)
    chunk = payloads.chunk_for(case, inner)
    bound = t.for_item(chunk.item)
    source = bytearray(raw)
    out = _flat(bound.encode(memoryview(source).toreadonly(), chunk), f"{case.label}: encode")
    before = bytes(out)
    source[:] = bytes(len(source))  # the caller reuses the buffer
    if bytes(out) != before:
        pytest.fail(f"{case.label}: encode returned a view of its input buffer, which the pipeline reuses; "
                    "return new memory")
    return chunk, bound.get_descriptor(), before


def _round_trip(t: dcpx.Transform, readers: _Readers, case: Case, inner: tuple[str, ...]) -> None:
    raw = payloads.payload(case.kind, case.pattern, case.size)
    chunk, text, encoded = _encode(t, case, inner)
    try:
        decoded = readers.get(text).decode(memoryview(encoded), chunk, case.size)
    except Exception as exc:
        pytest.fail(f"{case.label}: decode of what encode wrote ({text}) raised {type(exc).__name__}: {exc}")
    out = _flat(decoded, f"{case.label}: decode")
    assert out.nbytes == case.size, f"{case.label}: decoded {out.nbytes} bytes, expected {case.size}"
    _same_bytes(bytes(out), raw, f"{case.label}: round trip through {text}")
    # decode_into, as the pipeline calls it: into a slice of a larger buffer at an odd address
    dest = bytearray(case.size + 3)
    try:
        readers.get(text).decode_into(memoryview(encoded), chunk, memoryview(dest)[1:1 + case.size])
    except Exception as exc:
        pytest.fail(f"{case.label}: decode_into of what encode wrote ({text}) raised {type(exc).__name__}: {exc}")
    assert dest[0] == 0 and dest[-2:] == b"\0\0", f"{case.label}: decode_into wrote outside its buffer"
    _same_bytes(bytes(dest[1:1 + case.size]), raw, f"{case.label}: decode_into through {text}")


def _same_bytes(got: bytes, want: bytes, label: str) -> None:
    """Compare without pytest's byte-by-byte diff (payloads run to megabytes)."""
    if got == want:
        return
    if len(got) != len(want):
        pytest.fail(f"{label}: {len(got)} bytes, expected {len(want)}")
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    pytest.fail(f"{label}: bytes differ, first at offset {first} of {len(want)}")


def _expect_decode_error(reader: dcpx.Transform, data: bytes, chunk: Any, size: int, label: str) -> None:
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


def _edge_cases() -> list[Case]:
    return [
        Case("float32", "weights", 5000, False),
        Case("bytes", "random", 4097, True),
        Case("int64", "compressible", 0, False),
        Case("bfloat16", "random", 1, False),
        Case("bytes", "compressible", 70_000, True),
    ]


def _pieces(raw: bytes) -> Iterator[object]:
    """``raw`` as a mix of empty, tiny and large writes of different buffer types."""
    view, pos, step = memoryview(raw), 0, 0
    sizes = [0, 1, 6, 4089, 100_000, 1 << 20]
    while pos < len(raw):
        n = sizes[step % len(sizes)]
        piece = view[pos:pos + n]
        yield (bytes(piece), bytearray(piece), piece)[step % 3]
        pos += n
        step += 1


def _cycle(values: Sequence[int]) -> Iterator[int]:
    while True:
        yield from values


class _Sink(io.BytesIO):
    """Output stream that keeps its bytes when the transform closes it."""

    def close(self) -> None:
        self._final = self.getvalue()
        super().close()

    def value(self) -> bytes:
        return self.getvalue() if not self.closed else self._final


def _state_dict() -> dict[str, Any]:
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


def _blank_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {k: _blank_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank_like(v) for v in value]
    return type(value)()  # 0, 0.0, "" - replaced by the load


def _assert_same(got: Any, want: Any, where: str = "state_dict") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, (
            f"{where}: loaded {got!r:.80}, expected a {want.dtype} tensor of shape {tuple(want.shape)}")
        assert torch.equal(got, want), f"{where}: loaded values differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys differ"
        for k in want:
            _assert_same(got[k], want[k], f"{where}[{k!r}]")
    else:
        assert got == want, f"{where}: loaded {got!r}, expected {want!r}"


def _assert_applied(path: Path, names: list[str], chunk_size: int) -> None:
    """Every multi-chunk item records the chain, outermost first (the order of undoing it)."""
    from ..inspect import describe

    expected = list(reversed(names))
    big = [it for it in describe(os.fspath(path))["items"] if (it["raw_bytes"] or 0) > chunk_size]
    assert big, "the test state dict has no multi-chunk item"
    for it in big:
        recorded = [d.partition("/")[0] for d in it["descriptors"][1:]]
        assert recorded == expected, f"{it['fqn']}: recorded transforms {recorded}, expected {expected} (outermost first)"
