"""Reading ``.metadata`` and non-tensor entries without running code from the checkpoint.

``.metadata`` is a pickle of DCP's own ``Metadata`` so that stock tools keep reading it.
Plain ``pickle.load`` would execute any callable named in the file; this unpickler admits
only DCP metadata types, torch dtypes/sizes/layouts/memory formats and plain containers,
and refuses everything else *before* any object is built.  Plugins that store their own
types in metadata add them through the ``dcpx_safe_globals`` hook.
"""

from __future__ import annotations

import enum
import io
import pickle
from typing import Any, Callable, Iterable

import torch

from .errors import UnsafeCheckpointError
from .gc_pause import gc_paused
from .pickle_nesting import MAX_TUPLE_NESTING

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: set[tuple[str, str]] = {
    (_DCP_METADATA, n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    # older checkpoints carry the sharded-tensor era's TensorProperties (data only)
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "tuple"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "complex"),
}
_TORCH_ATTRS = (torch.dtype, torch.layout, torch.memory_format)


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it to store bytes, and nothing more
    (another codec could be asked to import its module)."""
    if type(text) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r:.40}: pickles store bytes as latin1")
    return text.encode("latin1")


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    """``complex`` as pickles build it, from two numbers (from a string of a million digits
    it would take seconds)."""
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise UnsafeCheckpointError("refusing complex() of anything but two numbers")
    return complex(real, imag)


def _empty_bytes() -> bytes:
    """``bytes()`` as pickle protocol 2 stores ``b""`` (``bytes(n)`` would allocate n bytes)."""
    return b""


# what an admitted global resolves to, where not the global itself
_SUBSTITUTES: dict[tuple[str, str], Any] = {
    ("builtins", "complex"): _complex,
    ("__builtin__", "complex"): _complex,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
# DCP's idiom for arbitrary extra state is an ``io.BytesIO`` value, which its save planner
# pickles (protocol 2, as torch.save does) as an object; torch's weights-only unpickler
# refuses the class.  A buffer of bytes runs no code, so entries of plain values and buffers
# are read with these admitted too.
BUFFER_GLOBALS = frozenset(
    {("_io", "BytesIO"), *_SUBSTITUTES}
    | {("__builtin__", n) for n in ("set", "frozenset", "tuple", "list", "dict", "complex")}
)

# Tuples nest at most MAX_TUPLE_NESTING deep, as in any pickle dcpx reads (see pickle_nesting:
# hashing deeper ones crashes the interpreter).  DCP metadata nests tuples two or three deep.
# Allowed callables such as ``list`` can copy one memoised string or list again and again,
# a few bytes of pickle for every megabyte built.  Everything they return together may hold
# this many elements per byte of the file (plus a floor), which no real metadata approaches.
_BUILT_PER_BYTE = 2
_BUILT_FLOOR = 1 << 20
_SIZED = (str, bytes, bytearray, tuple, list, dict, set, frozenset)


# The pure-Python unpickler keeps its memo in a dict: the C one sizes an array from the
# memo index in the stream, so a forged index allocates gigabytes before anything fails.
class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO, size: int, where: str, extra: set[tuple[str, str]]) -> None:
        super().__init__(file)
        self._file = file
        self._size = size
        self._where = where
        self._extra = extra
        self._buildable: set[type] = set()
        self._nested: dict[int, tuple[tuple[Any, ...], int]] = {}  # id -> (tuple, depth >= 2)
        self._build_budget = _BUILT_PER_BYTE * size + _BUILT_FLOOR

    def find_class(self, module: str, name: str) -> Any:
        admitted = (module, name) in _ALLOWED or (module, name) in self._extra
        if admitted and (module, name) in _SUBSTITUTES:
            return _SUBSTITUTES[module, name]
        if admitted:
            found = super().find_class(module, name)
            if isinstance(found, type) and not issubclass(found, enum.Enum):
                self._buildable.add(found)
            return found
        # vars(), not getattr: torch's module __getattr__ imports submodules on demand
        if module == "torch" and isinstance(found := vars(torch).get(name), _TORCH_ATTRS):
            return found
        raise UnsafeCheckpointError(
            f"{self._where}: refusing to load {module}.{name}; only DCP metadata types are allowed "
            f"(a plugin can allow its own types with the dcpx_safe_globals hook)"
        )

    def _load_build(self) -> None:
        """BUILD sets attributes, so it may only fill in an object this pickle created from an
        allowed class.  On a class, an enum member or a torch singleton it would change state
        shared by the whole process (``Metadata.__eq__``, say) before anything is checked."""
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if type(target) not in self._buildable:
            what = f"the class {target.__qualname__}" if isinstance(target, type) else f"a {type(target).__qualname__}"
            raise UnsafeCheckpointError(
                f"{self._where}: refusing to set attributes on {what}; metadata may only fill in "
                "new objects of DCP metadata types"
            )
        self._charge(self._state_cost(self.stack[-1]))  # a buffer's state is copied into it
        super().load_build()

    def _state_cost(self, state: Any) -> int:
        """Check what BUILD is to set, and return what it copies (as ``_cost`` counts it).
        The attributes it sets must be data: a special name would change the object's class
        or dict, and a callable would be what the stock handlers of later opcodes call
        (``obj.append``, ``obj.add``, ``obj.__setstate__``) with whatever the pickle likes."""
        cost = 0
        for part in state if type(state) is tuple else (state,):  # (dict, slots), a buffer's (bytes, pos, dict)
            if type(part) is not dict:
                cost += len(part) if isinstance(part, _SIZED) else 0
                continue
            cost += len(part)
            for key, value in part.items():
                if type(key) is not str or key.startswith("__") or callable(value):
                    raise UnsafeCheckpointError(
                        f"{self._where}: refusing to set attribute {key!r:.60} to a {type(value).__qualname__}; "
                        "metadata sets data attributes only"
                    )
                if isinstance(value, _SIZED):
                    cost += len(value)
        return cost

    def _load_bytearray8(self) -> None:
        """The stock handler allocates and zeroes the declared length before reading it: a
        12-byte file could claim terabytes."""
        declared = self._declared_length("a bytearray")
        data = self.read(declared)
        if len(data) != declared:
            raise UnsafeCheckpointError(f"{self._where}: pickle data was truncated")
        self.append(bytearray(data))

    def _skip_frame(self) -> None:
        """A frame only groups whole opcodes (see ``load``): its length is checked, not used."""
        self._declared_length("a pickle frame")

    def _declared_length(self, what: str) -> int:
        """The 8-byte length that follows the opcode, refused if the file cannot hold it."""
        length = int.from_bytes(self.read(8), "little")
        if length > self._size:
            raise UnsafeCheckpointError(
                f"{self._where}: {what} claims {length} bytes, more than the whole "
                f"{self._size}-byte file (truncated or forged)"
            )
        return length

    def _admit_tuple(self, value: tuple[Any, ...]) -> None:
        """Record how deeply ``value`` nests tuples (only those nesting at all are kept, and
        kept alive, so that ids stay unique while the pickle loads)."""
        nested, inner = self._nested, 0
        for e in value:
            if type(e) is tuple:
                known = nested.get(id(e))
                inner = max(inner, known[1] if known is not None else 1)
        if inner:
            if inner >= MAX_TUPLE_NESTING:
                raise UnsafeCheckpointError(f"{self._where}: tuples nested more than {MAX_TUPLE_NESTING} deep")
            nested[id(value)] = (value, inner + 1)

    def _charge(self, amount: int) -> None:
        self._build_budget -= amount
        if self._build_budget < 0:
            raise UnsafeCheckpointError(
                f"{self._where}: the pickle builds far more than its {self._size} bytes hold "
                "(containers copied over and over: forged)"
            )

    def _admit_built(self) -> None:
        """Charge what an allowed callable just returned (top of the stack) to the budget."""
        value = self.stack[-1]
        if isinstance(value, _SIZED):
            self._charge(len(value))
            if type(value) is tuple:
                self._admit_tuple(value)

    def _load_tuple(self) -> None:
        value = tuple(self.pop_mark())
        self.append(value)
        self._admit_tuple(value)

    # TUPLE1-3 build most of metadata's 100,000 tuples, almost none holding a tuple: test inline
    def _load_tuple1(self) -> None:
        stack = self.stack
        stack[-1] = value = (a := stack[-1],)
        if type(a) is tuple:
            self._admit_tuple(value)

    def _load_tuple2(self) -> None:
        stack = self.stack
        stack[-2:] = [value := (a := stack[-2], b := stack[-1])]
        if type(a) is tuple or type(b) is tuple:
            self._admit_tuple(value)

    def _load_tuple3(self) -> None:
        stack = self.stack
        stack[-3:] = [value := (a := stack[-3], b := stack[-2], c := stack[-1])]
        if type(a) is tuple or type(b) is tuple or type(c) is tuple:
            self._admit_tuple(value)

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch[pickle.FRAME[0]] = _skip_frame
    dispatch[pickle.TUPLE[0]] = _load_tuple
    dispatch[pickle.TUPLE1[0]] = _load_tuple1
    dispatch[pickle.TUPLE2[0]] = _load_tuple2
    dispatch[pickle.TUPLE3[0]] = _load_tuple3

    def load(self) -> Any:
        """Run the opcodes straight off the in-memory file.  The stock loop reads through a
        frame layer that copies every frame once more and costs a Python call per read;
        skipping it takes a third off reading the ``.metadata`` of a large checkpoint."""
        self.read, self.readline, self.readinto = self._file.read, self._file.readline, self._file.readinto
        self.metastack, self.stack = [], []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self._file.read, self.dispatch
        try:
            while opcode := read(1):
                handler = dispatch.get(opcode[0])
                if handler is None:
                    raise UnsafeCheckpointError(
                        f"{self._where}: invalid pickle opcode {opcode!r} at byte {self._file.tell() - 1}")
                handler(self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]  # how STOP hands back the result
            return stop.value
        raise UnsafeCheckpointError(f"{self._where}: pickle data was truncated (no STOP opcode)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._where}: persistent ids are not allowed in checkpoint metadata")


def _cost(value: Any) -> int:
    """What a call may copy out of ``value``: its length and that of each element, one level
    deep (``PosixPath(*[s] * n)`` joins n copies of one memoised string)."""
    kind = type(value)
    if kind is dict:
        value = value.values()
    elif kind is not tuple and kind is not list:
        return len(value) if isinstance(value, _SIZED) else 0
    cost = len(value)
    for element in value:
        if isinstance(element, _SIZED):
            cost += len(element)
    return cost


def _charging(handler: Callable[[Any], None], args: Callable[[list[Any]], Any]) -> Callable[[_RestrictedUnpickler], None]:
    """``handler`` with the arguments it is about to call with (``args`` of the stack)
    charged to the budget before the call, and what it returns after."""
    def run(self: _RestrictedUnpickler) -> None:
        self._charge(_cost(args(self.stack)))
        handler(self)
        self._admit_built()
    return run


# the opcodes that call an allowed callable and push what it returns, with where its arguments are
for _op, _args in ((pickle.REDUCE, lambda s: s[-1]), (pickle.NEWOBJ, lambda s: s[-1]),
                   (pickle.NEWOBJ_EX, lambda s: (*s[-2], *s[-1].values())),
                   (pickle.OBJ, lambda s: s), (pickle.INST, lambda s: s)):  # OBJ/INST: all since the mark
    _RestrictedUnpickler.dispatch[_op[0]] = _charging(_RestrictedUnpickler.dispatch[_op[0]], _args)


def safe_loads(data: bytes, where: str, extra: Iterable[tuple[str, str]] = ()) -> Any:
    """Unpickle ``data`` admitting only allow-listed globals; any failure is a dcpx error."""
    try:
        with gc_paused():
            return _RestrictedUnpickler(io.BytesIO(data), len(data), where, set(extra)).load()
    except UnsafeCheckpointError as exc:
        if str(exc).startswith(f"{where}:"):
            raise
        raise UnsafeCheckpointError(f"{where}: {exc}") from exc  # a substitute's refusal: say where
    except Exception as exc:  # truncated or garbled pickles raise many kinds of errors
        raise UnsafeCheckpointError(f"{where}: metadata is not a valid pickle ({type(exc).__name__}: {exc})") from exc


def plugin_safe_globals() -> set[tuple[str, str]]:
    from .plugins import host

    extra: set[tuple[str, str]] = set()
    for pairs in host().pm.hook.dcpx_safe_globals():
        extra.update((str(m), str(n)) for m, n in pairs or ())
    return extra
