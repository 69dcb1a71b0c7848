"""Each transform chain's standalone speed on the benchmark's own state dict, on one core.

Runs every chunk of every tensor through the same chunk path the writer and reader use
(``BoundChain.for_item``, ``encode_chunk``, ``decode_chunk`` into a destination buffer) on
the calling thread and adds up that thread's CPU time, so the figure is what one core can
do with no I/O and no pool: the pipeline's ceiling is this speed times the number of cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import dcpx
from dcpx.framing import chunk_count
from dcpx.pipeline import DEFAULT_CHUNK_SIZE, BoundChain, decode_chunk, encode_chunk, iter_chunks
from dcpx.tensor_bytes import tensor_bytes
from dcpx.transform import ChunkInfo, ItemInfo


@dataclass
class CodecSpeed:
    chain: tuple[str, ...]
    raw: int
    encoded: int
    encode_s: float
    decode_s: float

    @property
    def encode_bps(self) -> float:
        return self.raw / self.encode_s

    @property
    def decode_bps(self) -> float:
        return self.raw / self.decode_s


def codec_speed(state: dict[str, torch.Tensor], chain: tuple[str, ...], chunk_size: int = DEFAULT_CHUNK_SIZE,
                repeat: int = 1) -> CodecSpeed:
    """The best of ``repeat`` passes (encode and decode times each at their minimum), as the
    pipeline figures it is compared with are best-of-N."""
    runs = [_one_pass(state, chain, chunk_size) for _ in range(max(1, repeat))]
    best = runs[0]
    best.encode_s = min(r.encode_s for r in runs)
    best.decode_s = min(r.decode_s for r in runs)
    return best


def _one_pass(state: dict[str, torch.Tensor], chain: tuple[str, ...], chunk_size: int) -> CodecSpeed:
    """Encode then decode every chunk of ``state`` through ``chain`` on this thread; checks
    each round trip bit for bit (outside the timed calls)."""
    transforms = [dcpx.transform(name) for name in chain]
    dest = memoryview(bytearray(chunk_size))  # decoded in place, as a load decodes into its tensor
    raw = encoded = 0
    enc_s = dec_s = 0.0
    for fqn, tensor in state.items():
        data = tensor_bytes(tensor.contiguous())
        if not data.nbytes:
            continue
        item = ItemInfo(fqn, data.nbytes, tensor.dtype, tuple(tensor.shape), (0,) * tensor.dim(), "0" * 32)
        bound = BoundChain.for_item(transforms, item)
        count = chunk_count(data.nbytes, chunk_size)
        for k, offset, size in iter_chunks(data.nbytes, chunk_size):
            info = ChunkInfo(item, k, count, offset, size)
            piece = data[offset:offset + size]
            t0 = time.thread_time()
            enc = encode_chunk(bound, piece, info)
            t1 = time.thread_time()
            back = decode_chunk(bound, enc.data, info, enc.layer_sizes, out=dest[:size])
            t2 = time.thread_time()
            if memoryview(back).cast("B") != piece:
                raise SystemExit(f"{'+'.join(chain)}: {fqn} chunk {k} did not round-trip")
            enc_s, dec_s = enc_s + (t1 - t0), dec_s + (t2 - t1)
            raw += size
            encoded += memoryview(enc.data).nbytes
    return CodecSpeed(chain, raw, encoded, enc_s, dec_s)
