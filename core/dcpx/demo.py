"""The dcpx demo: train a small model, checkpoint it through every installed transform,
restore it into a fresh model and optimizer, and prove the round trip is bit-exact.

Run with ``python -m dcpx.demo [DIR]`` (``make demo`` does this on a fresh clone).
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import dcpx
from dcpx.api import SafeLoadPlanner, unwrap_errors
from dcpx.commit import METADATA

# Preferred position in a chain: compress first, then encrypt, then checksum the result.
_ORDER = {"stream.zstd": 0, "stream.encrypt@dcpx": 1, "stream.checksum@dcpx": 2}


def installed_chain() -> list[str]:
    """Every transform installed plugins provide (torch's built-in zstd only as a fallback)."""
    regs = dcpx.plugin_host().registrations()
    names = [r.name for r in regs if r.source != "torch"] or [r.name for r in regs]
    return sorted(names, key=lambda n: (_ORDER.get(n, 3), n))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int = 30) -> float:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=gen)
    y = (x[:, :10].argmax(dim=1) + (x[:, 10] > 0).long()) % 10
    loss = torch.tensor(0.0)
    for _ in range(steps):
        optim.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
    return loss.item()


def _flatten(sd: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _equal(a: dict, b: dict) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    bad = [k for k in fa if k not in fb]
    for k, v in fa.items():
        w = fb.get(k)
        if isinstance(v, torch.Tensor):
            if not (isinstance(w, torch.Tensor) and v.dtype == w.dtype and v.shape == w.shape and torch.equal(v, w)):
                bad.append(k)
        elif v != w:
            bad.append(k)
    return bad


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if "DCPX_ENCRYPT_KEY" not in os.environ and "stream.encrypt@dcpx" in installed_chain():
        os.environ["DCPX_ENCRYPT_KEY"] = base64.b64encode(os.urandom(32)).decode()
        print("demo: generated a throwaway encryption key in DCPX_ENCRYPT_KEY")
    chain = installed_chain()
    path = argv[0] if argv else tempfile.mkdtemp(prefix="dcpx-demo-")

    model = make_model()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    loss = train(model, optim)
    print(f"trained {sum(p.numel() for p in model.parameters()):,} parameters for 30 steps "
          f"in {time.perf_counter() - t0:.2f}s (loss {loss:.3f})")
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "step": 30}

    t0 = time.perf_counter()
    with unwrap_errors():
        dcp.save(state, storage_writer=dcpx.FileSystemWriter(path, transforms=chain))
    save_s = time.perf_counter() - t0

    fresh_model = make_model(seed=1)
    fresh_optim = torch.optim.AdamW(fresh_model.parameters(), lr=3e-3)
    train(fresh_model, fresh_optim, steps=1)  # optimizer state must exist to be loaded into
    fmsd, fosd = get_state_dict(fresh_model, fresh_optim)
    restored = {"model": fmsd, "optim": fosd, "step": 0}
    t0 = time.perf_counter()
    with unwrap_errors():
        dcp.load(restored, storage_reader=dcpx.FileSystemReader(path), planner=SafeLoadPlanner())
    load_s = time.perf_counter() - t0
    set_state_dict(fresh_model, fresh_optim, model_state_dict=restored["model"], optim_state_dict=restored["optim"])

    bad = _equal(state, restored) + _equal({"m": model.state_dict()}, {"m": fresh_model.state_dict()})
    items, raw, stored = _sizes(path)
    rows = [
        ("checkpoint", path),
        ("transforms", " -> ".join(chain) or "(none)"),
        ("items", f"{items}"),
        ("raw bytes", f"{raw:,}"),
        ("stored bytes", f"{stored:,} ({stored / max(raw, 1):.3f} of raw)"),
        ("save time", f"{save_s * 1000:.1f} ms"),
        ("load time", f"{load_s * 1000:.1f} ms"),
        ("bit-exact", "yes" if not bad else f"NO: {bad[:5]}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows))
    return 0 if not bad else 1


def _sizes(path: str) -> tuple[int, int, int]:
    from dcpx.checkpoint_files import load_manifest, load_metadata

    metadata, data = load_metadata(path, METADATA)
    manifest = load_manifest(path, metadata, data) or {"items": []}
    items = manifest["items"]
    return len(items), sum(i["raw_size"] for i in items), sum(i["length"] for i in items)


if __name__ == "__main__":
    sys.exit(main())
