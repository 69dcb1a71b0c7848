"""The ``dcpx`` command (also ``python -m dcpx``).

Exit codes: 0 success, 1 the checkpoint failed a check, 2 usage or input error (including
a checkpoint too damaged to read, whatever exception reading it raised).
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from .errors import DcpxError

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _progress(total: int | None, unit: str, quiet: bool, desc: str) -> tqdm:
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=quiet or not sys.stderr.isatty(), file=sys.stderr)


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import host

    h = host()
    plugins = [vars(p) | {"transforms": list(p.transforms), "hooks": list(p.hooks)} for p in h.plugins()]
    builtin = [{"name": r.name, "source": r.source} for r in h.registrations()]
    failures = [vars(f) for f in h.failures()]
    if args.json:
        print(json.dumps({"plugins": plugins, "transforms": builtin, "failures": failures}, indent=1))
        return EXIT_OK
    print("plugins:")
    for p in plugins:
        print(f"  {p['name']:<12} {p['distribution'] or '(in-process)'} {p['version'] or ''}")
        print(f"      transforms: {', '.join(p['transforms']) or '-'}   hooks: {', '.join(p['hooks'])}")
    if not plugins:
        print("  (none installed)")
    print("transforms:")
    for r in builtin:
        print(f"  {r['name']:<24} from {r['source']}")
    for f in failures:
        print(f"failed: {f['name']} ({f['distribution']}): {f['error']}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import describe, ratio

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return EXIT_OK
    print(_line(f"checkpoint   {args.path}"))
    print(_line(f"id           {info['checkpoint_id'] or '-'}   (manifest: {'yes' if info['manifest'] else 'no, stock DCP'})"))
    print(_line(f"written by   dcpx {info['dcpx_version'] or '-'}, torch {info['torch_version'] or '-'}"))
    print(_line(f"transforms   {', '.join(info['transforms']) or '(none)'}"))
    print(f"{'item':<48} {'dtype':<16} {'shape':<20} {'raw':>12} {'stored':>12} {'ratio':>6}")
    for it in info["items"]:
        raw = f"{it['raw_bytes']:,}" if it["raw_bytes"] is not None else "?"
        print(_line(f"{_line(it['fqn'])[:48]:<48} {str(it['dtype'] or 'bytes'):<16} {str(it['shape'] or ''):<20} "
                    f"{raw:>12} {it['stored_bytes']:>12,} {_ratio(ratio(it['stored_bytes'], it['raw_bytes'])):>6}"))
    t = info["totals"]
    print(f"total: {t['items']} items, {t['raw_bytes']:,} raw bytes, {t['stored_bytes']:,} stored ({_ratio(t['ratio'])})")
    return EXIT_OK


def _line(text: str) -> str:
    """One line of text output, its control characters escaped: names, descriptors and
    messages come from the checkpoint, and a forged one must not move the cursor, clear
    the screen or print a line of its own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _ratio(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_checkpoint

    with _progress(None, "item", args.quiet, "verify") as bar:  # .metadata is read once, by verify

        def start(total: int) -> None:
            bar.total = total
            bar.refresh()

        results = verify_checkpoint(args.path, on_item=lambda _c: bar.update(1), on_start=start, full=args.full)
    failed = [r for r in results if r.status == "failed"]
    missing = [r for r in results if r.status == "missing"]
    ok = [r for r in results if r.status == "ok"]
    if args.json:
        print(json.dumps({"ok": len(ok), "failed": [vars(r) for r in failed], "missing": [vars(r) for r in missing]}, indent=1))
    else:
        for r in failed:
            print(_line(f"FAILED  {r.fqn} {r.shard_offsets or ''} in {r.file}: {r.detail}"))
        for r in missing:
            print(_line(f"{'missing' if args.allow_missing else 'NO DIGEST'}  {r.fqn} {r.shard_offsets or ''} in {r.file}"))
        print(f"{len(ok)} verified, {len(failed)} failed, {len(missing)} without a digest")
    if failed or (missing and not args.allow_missing):
        if missing and not args.allow_missing and not args.json:
            print("items without a digest fail verification; pass --allow-missing to accept them", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        from dcpx_encrypt import keys
    except ImportError:
        print("dcpx keygen: the encrypt plugin is not installed (pip install dcpx-encrypt)", file=sys.stderr)
        return EXIT_ERROR
    key_id = keys.check_key_id(args.id or "default")
    print(keys.format_env(key_id, keys.generate_key()))
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConvertVerificationError, convert, transform_from_spec
    from .transform import transform_name

    transforms = [transform_from_spec(s) for arg in args.transform or () for s in arg.split(",") if s.strip()]
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, _progress(total, "B", args.quiet, stage))
        bar.update(done - bar.n)

    try:
        r = convert(args.src, args.dst, transforms=transforms, compat=args.compat, overwrite=args.overwrite, progress=progress)
    except ConvertVerificationError as exc:
        print(_line(f"dcpx convert: verification failed: {exc}"), file=sys.stderr)
        return EXIT_FAILED
    finally:
        for bar in bars.values():
            bar.close()
    chain = ", ".join(transform_name(t) for t in transforms) or "no transforms"
    ratio = r.stored_bytes / r.raw_bytes if r.raw_bytes else 1.0
    print(_line(f"converted {r.src} ({r.src_format}) -> {r.dst} ({r.dst_format}{', compat' if args.compat else ''}; {chain})"))
    print(f"{r.items} items, {r.raw_bytes:,} raw bytes -> {r.stored_bytes:,} stored ({ratio:.3f}); "
          f"every item verified; {r.seconds:.1f} s")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run

    if not 0 < args.seconds <= 3600:
        print("dcpx bench: --seconds must be between 0 and 3600", file=sys.stderr)
        return EXIT_ERROR
    report = run(seconds=args.seconds)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcpx", description="Inspect, verify and convert dcpx and stock DCP checkpoints; manage plugins and keys.")
    parser.set_defaults(reads_checkpoint=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins and transforms")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plugins)
    p = sub.add_parser("inspect", help="describe a checkpoint without keys or a model")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect, reads_checkpoint=True)
    p = sub.add_parser("verify", help="check every item's digest; exit 0 only if all verified")
    p.add_argument("path")
    p.add_argument("--allow-missing", action="store_true", help="accept (and list) items without a digest")
    p.add_argument("--full", action="store_true", help="undo every layer of every item, as a load does (needs every key)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_verify, reads_checkpoint=True)
    p = sub.add_parser("keygen", help="print a new 32-byte key in the form the encrypt plugin reads")
    p.add_argument("--id", default=None, help="key id (default: the single-key form)")
    p.set_defaults(fn=cmd_keygen)
    p = sub.add_parser("convert", help="re-encode a checkpoint (DCP directory, .pt or .safetensors) and verify the copy")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--transform", action="append", metavar="NAME",
                   help="transform for DST, innermost first; repeat or separate with commas; options as NAME:key=value")
    p.add_argument("--compat", action="store_true", help="write what stock torch reads")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_convert, reads_checkpoint=True)
    p = sub.add_parser("bench", help="encode/decode throughput of each installed transform on this machine")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seconds", type=float, default=20.0, help="time budget for all measurements (default 20)")
    p.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a checkpoint's names may hold what no encoding can print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return args.fn(args)
    except (DcpxError, OSError) as exc:
        print(_line(f"dcpx {args.command}: {exc}"), file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if not args.reads_checkpoint:
            raise  # a bug, not bad input: the traceback is what helps
        print(_line(f"dcpx {args.command}: {_subject(args)}: {_unexpected(exc)}"), file=sys.stderr)
        return EXIT_ERROR


def _subject(args: argparse.Namespace) -> str:
    return args.path if hasattr(args, "path") else f"{args.src} -> {args.dst}"


def _unexpected(exc: Exception, limit: int = 300) -> str:
    """One line for an exception no check foresaw, mostly damage dcpx does not check for:
    a traceback would tell the user nothing more, and would not say it is the input."""
    try:
        text = " ".join(str(exc).split())
    except Exception:  # e.g. ValueError(10**5000): even the message cannot be formatted
        text = "its message cannot be shown"
    text = text if len(text) <= limit else text[:limit] + " ..."
    return (f"cannot be read: unexpected {type(exc).__name__} ({text}); "
            "a damaged checkpoint no check recognised, or a bug in dcpx")


if __name__ == "__main__":
    sys.exit(main())
