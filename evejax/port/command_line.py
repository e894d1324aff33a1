"""Command-line pieces shared by every converter's `evejax import` / `evejax export`.

    parse_size("5GB") -> 5_000_000_000     the --max-shard-size argument type
    run_command("export", body) -> 0 | 1  runs body(); a user error prints one line, status 1

It sits below port.commands and the family converters (port.eve, port.clip),
so they all use it without importing each other.
"""
from __future__ import annotations

import argparse
import re
import sys

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
