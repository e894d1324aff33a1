"""Command-line pieces shared by every converter's `evejax import` / `evejax export`.

    parse_size("5GB") -> 5_000_000_000     the --max-shard-size argument type
    run_command("export", body) -> 0 | 1  runs body(); a user error prints one line, status 1
    import_parser / export_parser          the arguments every family's import / export takes
    weight_files(files, out_dir)           how many safetensors files an export wrote in out_dir

It sits below port.commands and the family converters (port.eve, port.clip, ...),
so they all use it without importing each other.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from evejax.port.io import CheckpointError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """"5GB" (powers of 10, as transformers reads them), "2GiB", "100KB" or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r} is not understood; write e.g. 5GB, 500MB, 2GiB or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])


def run_command(command: str, body) -> int:
    """Runs a command body; errors a user can cause print one line and give status 1."""
    try:
        body()
    except (CheckpointError, FileNotFoundError) as e:
        print(f"evejax {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def import_parser(family: str, description: str, src_help: str,
                  config_help: str = "config.json to use instead of the one found with SRC") -> argparse.ArgumentParser:
    """`evejax import --family FAMILY SRC OUT_DIR [--config C] [--param-dtype D] [--overwrite]`."""
    p = argparse.ArgumentParser(prog=f"evejax import --family {family}", description=description)
    p.add_argument("--family", choices=(family,), default=family, help=f"{family} (the dispatch in port.commands)")
    p.add_argument("src", help=src_help)
    p.add_argument("out_dir", help="evejax checkpoint directory to create")
    p.add_argument("--config", help=config_help)
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the parameters are stored in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT_DIR")
    return p


def export_parser(what: str, description: str, src_help: str,
                  out_help: str = "directory for config.json and safetensors files") -> argparse.ArgumentParser:
    """`evejax export CKPT OUT_DIR [--dtype D] [--max-shard-size 5GB]`."""
    p = argparse.ArgumentParser(prog=f"evejax export ({what} checkpoint)", description=description)
    p.add_argument("src", help=src_help)
    p.add_argument("out_dir", help=out_help)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the written tensors")
    p.add_argument("--max-shard-size", default="5GB", type=parse_size,
                   help="largest safetensors file, e.g. 5GB, 500MB; bigger models are sharded")
    return p


def weight_files(files, out_dir) -> int:
    """The number of safetensors files among `files` that lie directly in `out_dir`."""
    out = Path(out_dir).absolute()
    return sum(1 for f in files if f.suffix == ".safetensors" and Path(f).parent.absolute() == out)


def import_command(argv, parser: argparse.ArgumentParser, importer) -> int:
    """`evejax import` through an `import_parser`: prints the note(s) of
    importer(src, out_dir, config=, param_dtype=, overwrite=), a string or several."""
    args = parser.parse_args(argv)

    def body():
        notes = importer(args.src, args.out_dir, config=args.config, param_dtype=args.param_dtype,
                         overwrite=args.overwrite)
        for note in [notes] if isinstance(notes, str) else notes:
            print(f"evejax import: {note}")

    return run_command("import", body)


def export_command(argv, parser: argparse.ArgumentParser, exporter, what: str, after: str = "") -> int:
    """`evejax export` through an `export_parser`: exporter(src, out_dir, dtype=, max_shard_bytes=)
    -> the written files, counted in one line naming `what` (then `after`)."""
    args = parser.parse_args(argv)

    def body():
        files = exporter(args.src, args.out_dir, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
        print(f"evejax export: {what} in {weight_files(files, args.out_dir)} safetensors file(s) -> "
              f"{args.out_dir}{after}")

    return run_command("export", body)
