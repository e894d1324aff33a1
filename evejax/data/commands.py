"""`evejax data`: data tools.

    evejax data convert SRC.jsonl --out DIR [--image-root DIR] [--embed-images] [--shards N] [--overwrite]
        LLaVA JSON list / JSONL -> DIR/data.array_record-0000k-of-0000N + DIR/info.json
        (format: evejax.data.sources). With --embed-images each record carries its
        image file's original bytes; otherwise its path, resolved at read time
        against config.data.image_root or the --image-root recorded in info.json.
        Unreadable records (and, with --embed-images, missing images) are skipped
        and counted in info.json. DIR is replaced only once the new shards are
        complete: a failed or killed conversion leaves the earlier one as it was.
        A DIR holding files other than shards and info.json is refused.

    evejax data inspect PATH [-n 3]
        PATH: a conversion directory, a shard glob, or a JSON / JSONL file: prints
        the record count and the first n records.

Errors a user can cause print one message and exit with status 1.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from evejax.data import sources


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evejax data", description="data tools")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="LLaVA JSON/JSONL -> ArrayRecord shards")
    c.add_argument("src", help="LLaVA JSON list or JSONL file")
    c.add_argument("--out", required=True, help="directory to write shards and info.json into")
    c.add_argument("--image-root", default=None, help="directory the records' image paths are relative to")
    c.add_argument("--embed-images", action="store_true", help="store image bytes in the records")
    c.add_argument("--shards", type=int, default=1, help="number of shards (default 1)")
    c.add_argument("--overwrite", action="store_true", help="replace a conversion already in --out")
    i = sub.add_parser("inspect", help="count and show records")
    i.add_argument("path", help="conversion directory, shard glob, or JSON / JSONL file")
    i.add_argument("-n", type=int, default=3, help="records to show (default 3)")
    return p


def _convert(args) -> int:
    existing = [e for pattern in sources.OUTPUTS for e in glob.glob(os.path.join(args.out, pattern))]
    if existing and not args.overwrite:
        raise FileExistsError(f"{args.out} already holds a conversion ({len(existing)} file(s)); pass "
                              "--overwrite to replace it or choose another --out")
    if args.image_root and "://" not in args.image_root and not os.path.isdir(args.image_root):
        raise FileNotFoundError(f"--image-root {args.image_root} is not a directory")
    info = sources.convert_conversations(args.src, args.out, args.image_root, args.embed_images, args.shards)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(info["skipped"].items())) or "none"
    print(f"{info['num_records']} records in {info['shards']} shard(s) at {args.out}; skipped: {skipped}")
    return 0


def _show(record: dict, image: bytes | None) -> str:
    shown = json.dumps(record, ensure_ascii=False)
    if len(shown) > 400:
        shown = shown[:400] + " ..."
    return shown + (f"  [+{len(image)} image bytes]" if image is not None else "")


def _inspect(args) -> int:
    if os.path.isfile(args.path) and not os.path.basename(args.path).startswith("data.array_record-"):
        source = sources.JsonConversations(args.path)
        print(f"{len(source)} records in {args.path}")
        for i in range(min(args.n, len(source))):
            try:
                print(f"[{i}] {_show(sources.parse_record(source[i]), None)}")
            except sources.BadRecord as e:
                print(f"[{i}] bad record: {e}")
        return 0
    info = sources.read_info(args.path) if os.path.isdir(args.path) else {}
    if info:
        print(json.dumps(info, indent=1))
    source = sources.arrayrecord_source(args.path)
    print(f"{len(source)} records in {len(sources.shard_paths(args.path))} shard(s)")
    for i in range(min(args.n, len(source))):
        try:
            print(f"[{i}] {_show(*sources.decode_record(source[i]))}")
        except sources.BadRecord as e:
            print(f"[{i}] bad record: {e}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"convert": _convert, "inspect": _inspect}[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"evejax data {args.command}: {e}", file=sys.stderr)
        return 1
