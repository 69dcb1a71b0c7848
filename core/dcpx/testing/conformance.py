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
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import pytest
import torch
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

import dcpx

from ..plugins import TORCH, PluginHost
from . import payloads
from .conformance_support import (
    Factory, Readers, Sink, assert_applied, assert_same, blank_like, bound_forms, cycle, dist_name, edge_cases,
    encode_case, expect_decode_error, expect_descriptor_error, flat_bytes, make_transform, mixed_writes, round_trip,
    same_bytes, sample_state_dict, variant_params,
)
from .payloads import Case
from .reference import XorReference, plugin_for

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
            values, ids = variant_params(type(self))
            metafunc.parametrize("dcpx_factory", values, ids=ids)

    @pytest.fixture
    def dcpx_registered(self, dcpx_factory: Factory) -> Iterator[type]:
        """Make sure the process-wide plugin host resolves the transform's name to its class.

        An installed plugin is found through its entry point; a class that is not installed
        (still in development, or loading switched off) is registered in-process for the
        test.  Another distribution holding the name is a failure, not something to paper over."""
        cls = type(make_transform(dcpx_factory))
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
        t = make_transform(dcpx_factory)
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
        t = make_transform(dcpx_factory)
        for label, tr in bound_forms(t):
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
        t = make_transform(dcpx_factory)
        host = dcpx.plugin_host()
        assert host.lookup(type(t).name).cls is dcpx_registered
        for label, tr in bound_forms(t):
            text = tr.get_descriptor()
            rebuilt = host.from_descriptor(text)
            assert isinstance(rebuilt, dcpx_registered), f"{label}: registry rebuilt {rebuilt!r} from {text!r}"
            assert rebuilt.get_descriptor() == text, (
                f"{label}: plugin_host().from_descriptor({text!r}) describes itself as {rebuilt.get_descriptor()!r}")

    def test_rebuild_from_params(self, dcpx_factory: Factory) -> None:
        t = make_transform(dcpx_factory)
        cls = type(t)
        for label, tr in bound_forms(t):
            text = tr.get_descriptor()
            desc = dcpx.parse_descriptor(text)
            for how, rebuilt in (
                ("from_params", cls.from_params(desc.version, dict(desc.params))),
                ("with_descriptor on the writer", tr.with_descriptor(desc)),
                ("with_descriptor on a fresh instance", make_transform(dcpx_factory).with_descriptor(desc)),
            ):
                assert isinstance(rebuilt, dcpx.Transform), f"{label}: {how} returned {rebuilt!r}"
                assert rebuilt.get_descriptor() == text, (
                    f"{label}: {how} of {text!r} describes itself as {rebuilt.get_descriptor()!r}")

    def test_rejects_unsupported_version(self, dcpx_factory: Factory, dcpx_registered: type) -> None:
        t = make_transform(dcpx_factory)
        for label, tr in bound_forms(t):
            params = tr.params()
            for version in (type(tr).version + 1, type(tr).version + 1000):
                bad = dcpx.format_descriptor(type(tr).name, version, params)
                expect_descriptor_error(dcpx_factory, dcpx_registered, bad, f"{label}: version {version}")

    def test_rejects_unknown_parameter(self, dcpx_factory: Factory, dcpx_registered: type) -> None:
        t = make_transform(dcpx_factory)
        for label, tr in bound_forms(t):
            params = {**tr.params(), UNKNOWN_PARAM: "1"}
            bad = dcpx.format_descriptor(type(tr).name, type(tr).version, params)
            expect_descriptor_error(dcpx_factory, dcpx_registered, bad, f"{label}: unknown parameter")

    # -- the chunk API ---------------------------------------------------------------------
    @pytest.mark.parametrize("kind", list(payloads.KINDS))
    def test_chunk_round_trip(self, dcpx_factory: Factory, kind: str) -> None:
        """Empty, tiny, odd and boundary sizes; random, compressible, weight-like, zero and
        special-value payloads; the only chunk of an item and a middle chunk."""
        t = make_transform(dcpx_factory)
        readers = Readers(dcpx_factory)
        inner = (XorReference().get_descriptor(),)
        for case in (c for c in payloads.small_cases() if c.kind == kind):
            round_trip(t, readers, case, inner if case.middle else ())

    @pytest.mark.parametrize("kind", list(payloads.KINDS))
    def test_chunk_round_trip_large(self, dcpx_factory: Factory, kind: str) -> None:
        """Around 1 MiB and a multi-MiB chunk, random and highly compressible."""
        t = make_transform(dcpx_factory)
        readers = Readers(dcpx_factory)
        for case in payloads.large_cases(kind):
            round_trip(t, readers, case, ())

    def test_decode_rejects_wrong_size(self, dcpx_factory: Factory) -> None:
        """``size`` is the exact output length: anything else is an error naming the item."""
        t = make_transform(dcpx_factory)
        readers = Readers(dcpx_factory)
        for case in edge_cases():
            chunk, text, encoded = encode_case(t, case)
            reader = readers.get(text)
            wrong = {case.size + 1, 2 * case.size + 16}
            if case.size:
                wrong |= {case.size - 1, 0}
            for size in sorted(wrong):
                expect_decode_error(reader, encoded, chunk, size, f"{case.label}: decode told size={size}")

    def test_decode_rejects_damaged_input(self, dcpx_factory: Factory) -> None:
        """Truncated or extended stored bytes are an error naming the item, not short or
        padded output."""
        t = make_transform(dcpx_factory)
        readers = Readers(dcpx_factory)
        for case in edge_cases():
            chunk, text, encoded = encode_case(t, case)
            reader = readers.get(text)
            damaged = {"one trailing byte added": encoded + b"\0", "eight trailing bytes added": encoded + bytes(8)}
            if encoded:
                damaged["last byte dropped"] = encoded[:-1]
                damaged["cut in half"] = encoded[: len(encoded) // 2]
            for what, data in damaged.items():
                expect_decode_error(reader, data, chunk, case.size, f"{case.label}: {what}")

    def test_integrity_claim(self, dcpx_factory: Factory) -> None:
        """A transform that sets ``verifies_integrity`` must detect any flipped bit."""
        t = make_transform(dcpx_factory)
        if not type(t).verifies_integrity:
            pytest.skip("verifies_integrity is False: decode does not claim to detect corruption")
        readers = Readers(dcpx_factory)
        for case in edge_cases():
            chunk, text, encoded = encode_case(t, case)
            reader = readers.get(text)
            for pos in sorted({0, len(encoded) // 2, len(encoded) - 1}):
                flipped = bytearray(encoded)
                flipped[pos] ^= 0x10
                expect_decode_error(reader, bytes(flipped), chunk, case.size, f"{case.label}: bit flipped at byte {pos}")

    def test_records_are_strings(self, dcpx_factory: Factory) -> None:
        """``chunk_record``/``item_record`` results go into a JSON manifest: str or None."""
        t = make_transform(dcpx_factory)
        for kind in payloads.KINDS:
            cases = [Case(kind, "weights" if kind != "bytes" else "compressible", 5000, m) for m in (False, True)]
            records = []
            for case in cases:
                chunk, text, encoded = encode_case(t, case)
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
        t = make_transform(dcpx_factory)
        raw = payloads.payload(case.kind, case.pattern, case.size)
        sink = Sink()
        writer = t.transform_to(sink)
        for piece in mixed_writes(raw):
            writer.write(piece)
        writer.close()
        writer.close()  # closing twice is harmless, as for any Python stream
        encoded = sink.value()
        reader_side = make_transform(dcpx_factory).with_descriptor(dcpx.parse_descriptor(t.get_descriptor()))

        stream = reader_side.transform_from(io.BytesIO(encoded))
        got, sizes = bytearray(), [1, 7, 4096, 65536, 1 << 20, 3]
        for n in cycle(sizes):
            piece = stream.read(n)
            assert len(piece) <= n, f"read({n}) returned {len(piece)} bytes"
            if not piece:
                break
            got += piece
            assert len(got) <= len(raw), f"stream decoded more than the {len(raw)} bytes written"
        same_bytes(bytes(got), raw, f"stream round trip of {case.label}")
        assert stream.read() == b"" and stream.read(1) == b"", "reads after EOF must return b''"
        stream.close()

        for read_all in (lambda s: s.read(), lambda s: s.read(-1)):
            stream = reader_side.transform_from(io.BytesIO(encoded))
            same_bytes(read_all(stream), raw, f"read-all of the stream of {case.label}")
            stream.close()

    # -- whole checkpoints ---------------------------------------------------------------------
    def test_save_load_round_trip(self, dcpx_factory: Factory, tmp_path: Path) -> None:
        """A real ``dcpx.save``/``dcpx.load``: several dtypes, a non-contiguous tensor, an
        empty tensor, non-tensor entries, and every tensor split into several chunks."""
        state = sample_state_dict()
        path = tmp_path / "checkpoint"
        dcpx.save(state, path, transforms=[make_transform(dcpx_factory)], chunk_size=STATE_CHUNK_SIZE)
        out = blank_like(state)
        dcpx.load(out, path, transforms=[make_transform(dcpx_factory)])
        assert_same(out, state)
        assert_applied(path, [type(make_transform(dcpx_factory)).name], STATE_CHUNK_SIZE)

    @pytest.mark.parametrize("position", ["applied-first", "applied-last"])
    def test_chain_with_reference(self, dcpx_factory: Factory, tmp_path: Path, position: str) -> None:
        """Chained with ``stream.xor@dcpx-testing`` on either side, through save and load."""
        t, xor = make_transform(dcpx_factory), XorReference()
        chain = [t, xor] if position == "applied-first" else [xor, t]
        state = sample_state_dict()
        path = tmp_path / "checkpoint"
        dcpx.save(state, path, transforms=chain, chunk_size=CHAIN_CHUNK_SIZE)
        out = blank_like(state)
        dcpx.load(out, path, transforms=[XorReference(), make_transform(dcpx_factory)])
        assert_same(out, state)
        assert_applied(path, [type(c).name for c in chain], CHAIN_CHUNK_SIZE)

    def test_torch_compatible(self, dcpx_factory: Factory, tmp_path: Path) -> None:
        """What ``torch_compatible()`` offers for compat mode, stock torch must load."""
        t = make_transform(dcpx_factory)
        ext = t.torch_compatible()
        if ext is None:
            pytest.skip("torch_compatible() is None: no form stock torch can read")
        assert isinstance(ext, StreamTransformExtension), f"torch_compatible() returned {ext!r}"
        assert ext.registry_name() in ExtensionRegistry().extensions, (
            f"torch_compatible() returned {ext.registry_name()!r}, which stock torch does not know")
        import torch.distributed.checkpoint as dcp

        state = {k: v for k, v in sample_state_dict().items() if isinstance(v, torch.Tensor)}
        dcpx.save(state, tmp_path / "compat", transforms=[t], compat=True)
        out = blank_like(state)
        dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "compat"))
        assert_same(out, state)

    # -- concurrency -----------------------------------------------------------------------------
    def test_thread_safety(self, dcpx_factory: Factory) -> None:
        """One instance (writer and reader alike) used from many threads at once, as the
        pipeline's thread pool does."""
        t = make_transform(dcpx_factory)
        readers = Readers(dcpx_factory)
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
                    encoded = bytes(flat_bytes(bound.encode(memoryview(data[case]), chunk), case.label))
                    decoded = readers.get(bound.get_descriptor()).decode(memoryview(encoded), chunk, case.size)
                    if bytes(flat_bytes(decoded, case.label)) != data[case]:
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
        cls = type(make_transform(dcpx_factory))
        eps = [ep for ep in importlib.metadata.entry_points(group="dcpx") if ep.name == name]
        assert eps, (f"no entry point {name!r} in the group 'dcpx': is the distribution installed "
                     "(pip install -e .) and does its pyproject declare [project.entry-points.dcpx]?")
        owners = sorted({f"{dist_name(ep)} ({ep.value})" for ep in eps})
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
        assert reg.source == dist_name(eps[0]), f"{cls.name!r} is registered by {reg.source}, not by {dist_name(eps[0])}"
        info = {p.name: p for p in fresh.plugins()}[name]
        assert cls.name in info.transforms, f"entry point {name!r} registers {info.transforms}, not {cls.name!r}"
        if len(info.transforms) == 1:
            assert fresh.resolve_name(name) == cls.name, f"transforms=[{name!r}] does not select {cls.name!r}"
        if not autoload_was_off and allow_list is None:
            assert dcpx.plugin_host().lookup(cls.name).cls is cls, "the process-wide plugin host resolves another class"
