"""`evejax <command> ...`: each command lives in its own module with a `main(argv)`.

Modules are imported only when their command runs, so `evejax --help` is fast
and a command's optional dependencies (torch, libtpu) are needed only by it.
"""
from __future__ import annotations

import glob
import importlib
import os
import sys

COMMANDS = {
    "train": ("evejax.train.trainer", "train a model from a config (stages chain by config)"),
    "eval": ("evejax.eval.classify",
             "evaluate a checkpoint: shapes VQA (EVE, HoVLE), --bench the papers' benchmarks, --tfds-dir classifiers"),
    "generate": ("evejax.eval.generate", "greedy generation from a checkpoint"),
    "import": ("evejax.port.commands", "convert official PyTorch weights into an evejax checkpoint"),
    "export": ("evejax.port.commands", "write an evejax checkpoint in the official PyTorch layout"),
    "plan": ("evejax.plan",
             "AOT-compile the sharded train step for a TPU topology: memory, FLOPs, collectives, est. MFU"),
    "bench": ("evejax.bench", "speed benchmarks (lm, hovle, dan, data)"),
    "data": ("evejax.data.commands", "data tools (convert to ArrayRecord, inspect)"),
    "demo": ("evejax.demo", "the built-in end-to-end demo on generated data"),
    "viz": ("evejax.viz", "attention maps and over-focus of a causal (De-focus) ViT; the counting experiment"),
}


def usage() -> str:
    lines = ["usage: evejax <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _default_to_cpu_without_accelerators() -> None:
    """With libtpu installed but no TPU attached, JAX probes for TPU workers and
    prints pages of warnings; a machine with no accelerator device files runs on
    the CPU directly. JAX_PLATFORMS set by the user always wins."""
    if "JAX_PLATFORMS" in os.environ:
        return
    if any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _default_to_cpu_without_accelerators()
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        from evejax import hostmem

        hostmem.keep_freed_memory()  # before JAX starts its threads
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"evejax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, f"{name}_main", None) or module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
