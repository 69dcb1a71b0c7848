"""How deeply a pickle nests tuples, found by walking its opcodes without building anything.

Python hashes a tuple (or frozenset) by hashing its items, recursively in C with no depth
check, so a pickle of a few hundred KB that nests tuples 200,000 deep crashes the interpreter
(SIGSEGV, no exception) the moment an unpickler uses one as a dict key or set item; torch's
weights-only unpickler does that like any other.  ``check_nesting`` refuses such a pickle
before ``torch.load`` sees it.  It keeps a depth per stack value instead of the value: a tuple
or frozenset is one deeper than its deepest item, a list, dict or set as deep as its deepest
item (updated as items are added, and shared with the memo, as the value is), and whatever a
call returns one deeper than its arguments.
"""

from __future__ import annotations

import re

from .errors import UnsafeCheckpointError

# DCP's own values nest tuples two or three deep, and a tensor is rebuilt by a few calls.
MAX_TUPLE_NESTING = 64

# opcode -> bytes of argument that follow it ...
_FIXED = {ord(c): n for c, n in {"K": 1, "h": 1, "q": 1, "\x80": 1, "\x82": 1, "M": 2, "\x83": 2, "J": 4,
                                 "j": 4, "r": 4, "\x84": 4, "G": 8, "\x95": 8}.items()}
# ... or bytes of the little-endian length of the payload that follows
_SIZED = {ord(c): n for c, n in {"U": 1, "\x8c": 1, "C": 1, "\x8a": 1, "T": 4, "X": 4, "B": 4, "\x8b": 4,
                                 "\x8d": 8, "\x8e": 8, "\x96": 8}.items()}
# ... or lines (text protocols)
_LINES = {ord(c): n for c, n in {"I": 1, "L": 1, "F": 1, "S": 1, "V": 1, "g": 1, "p": 1, "P": 1,
                                 "c": 2, "i": 2}.items()}
_ATOMS = frozenset(b"NIJKLMFGSTUVXBC\x88\x89\x8a\x8b\x8c\x8d\x8e\x96]})\x8fcP\x82\x83\x84\x97")
_TUPLE_N = {0x85: 1, 0x86: 2, 0x87: 3}
_CALLS = {ord("R"): 2, 0x81: 2, 0x92: 3}  # REDUCE, NEWOBJ, NEWOBJ_EX
_LOOKUPS = {0x93: 2, ord("Q"): 1}  # STACK_GLOBAL, BINPERSID: a class or a storage
# every opcode that can make a value deeper than what it is made of: no more of these bytes
# than the limit, and there is nothing to walk
_DEEPENING = [bytes([op]) for op in (ord("t"), 0x85, 0x86, 0x87, 0x91, *_CALLS, ord("o"), ord("i"))]
_INTO = {ord("a"): 1, ord("s"): 2, ord("b"): 1}  # APPEND, SETITEM, BUILD: into the value below
_GET = {ord("g"), ord("h"), ord("j")}
_NEWLINE = re.compile(b"\n")
_PUT = {ord("p"), ord("q"), ord("r")}


class _Cell:
    """The depth of one value, shared by the stack and the memo as the value is."""

    __slots__ = ("depth",)

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth


def check_nesting(data: bytes | memoryview, where: str) -> None:
    """Raise ``UnsafeCheckpointError`` if the pickle in ``data`` nests tuples more than
    ``MAX_TUPLE_NESTING`` deep.  Stops quietly where the stream stops being a pickle it can
    follow: an unpickler fails at that same opcode, having built only what was walked.  The
    walk costs about what torch's weights-only unpickler does, so it is skipped where ``data``
    holds too few bytes that could be opcodes making values deeper."""
    view = memoryview(data).cast("B")
    if _deepening_bytes(view) <= MAX_TUPLE_NESTING:
        return
    try:
        _walk(view, where)
    except (IndexError, ValueError, KeyError):
        return  # a malformed stream: the unpickler fails at the same place


def _deepening_bytes(view: memoryview, block: int = 1 << 20) -> int:
    """How many bytes of ``view`` could be opcodes that deepen, counted a block at a time (a
    buffer entry's pickle can be as large as the entry)."""
    total = 0
    for at in range(0, len(view), block):
        part = bytes(view[at:at + block])
        total += sum(part.count(op) for op in _DEEPENING)
        if total > MAX_TUPLE_NESTING:
            break
    return total


def _walk(data: memoryview, where: str) -> None:
    stack: list[_Cell] = []
    marks: list[int] = []
    memo: dict[int, _Cell] = {}

    def made(depth: int) -> _Cell:
        if depth > MAX_TUPLE_NESTING:
            raise UnsafeCheckpointError(f"{where}: its pickle nests tuples more than {MAX_TUPLE_NESTING} deep")
        return _Cell(depth)

    def popmark() -> list[_Cell]:
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def popn(k: int) -> list[_Cell]:
        if len(stack) < k:
            raise IndexError("stack underflow")
        items = stack[len(stack) - k:]
        del stack[len(stack) - k:]
        return items

    def deepest(cells: list[_Cell]) -> int:
        return max((c.depth for c in cells), default=0)

    pos, end = 0, len(data)
    while pos < end:
        op = data[pos]
        pos += 1
        arg = b""
        if op in _FIXED:
            arg, pos = bytes(data[pos:pos + _FIXED[op]]), pos + _FIXED[op]
        elif op in _SIZED:
            n = _SIZED[op]
            pos += n + int.from_bytes(bytes(data[pos:pos + n]), "little")
        elif op in _LINES:
            for _ in range(_LINES[op]):
                found = _NEWLINE.search(data, pos)
                if found is None:
                    return
                arg, pos = bytes(data[pos:found.start()]), found.end()
        if op == ord("."):  # STOP
            return
        if op in _ATOMS:
            stack.append(_Cell())
        elif op == ord("("):  # MARK
            marks.append(len(stack))
        elif op in (ord("t"), 0x91):  # TUPLE, FROZENSET
            stack.append(made(1 + deepest(popmark())))
        elif op in _TUPLE_N:
            stack.append(made(1 + deepest(popn(_TUPLE_N[op]))))
        elif op in (ord("l"), ord("d")):  # LIST, DICT
            stack.append(made(deepest(popmark())))
        elif op in _INTO:
            items = popn(_INTO[op])
            stack[-1].depth = made(max(stack[-1].depth, deepest(items))).depth
        elif op in (ord("e"), ord("u"), 0x90):  # APPENDS, SETITEMS, ADDITEMS
            items = popmark()
            stack[-1].depth = made(max(stack[-1].depth, deepest(items))).depth
        elif op in _CALLS:
            stack.append(made(1 + deepest(popn(_CALLS[op]))))
        elif op in _LOOKUPS:
            popn(_LOOKUPS[op])
            stack.append(_Cell())
        elif op in (ord("o"), ord("i")):  # OBJ, INST
            stack.append(made(1 + deepest(popmark())))
        elif op == ord("0"):  # POP
            popn(1)
        elif op == ord("1"):  # POP_MARK
            popmark()
        elif op == ord("2"):  # DUP
            stack.append(stack[-1])
        elif op in _PUT:
            memo[int(arg) if op == ord("p") else int.from_bytes(arg, "little")] = stack[-1]
        elif op == 0x94:  # MEMOIZE
            memo[len(memo)] = stack[-1]
        elif op in _GET:
            stack.append(memo[int(arg) if op == ord("g") else int.from_bytes(arg, "little")])
        elif op not in (0x95, 0x98, 0x80):  # FRAME, READONLY_BUFFER, PROTO: nothing to track
            return  # not an opcode this walk knows: the unpickler stops here too
