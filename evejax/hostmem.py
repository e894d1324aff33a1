"""Host memory on CPU runs: keep freed memory in the process.

XLA:CPU allocates an execution's temporaries afresh on every call and frees them
when it ends. glibc serves blocks over its mmap threshold (at most 32 MiB) with
`mmap`, and a thread other than the main one allocates from its own arena, which
also falls back to `mmap` for blocks larger than its 64 MiB heaps. Each step
therefore maps its temporaries anew and the kernel zero-fills every page on first
touch: the 110M bench step (1.8 GB of temporaries) took ~600,000 page faults and
~1.6 s of system time per step, and eager PyTorch pays the same way for its
activations.

`keep_freed_memory()` makes glibc serve every block from the main heap (one
arena, no `mmap`) and never trim it, so from the second step on a step reuses
the pages of the one before: no page faults, the same peak. It must run before
the threads that allocate exist (before JAX or torch start their thread pools);
the `evejax` command calls it first thing for CPU runs. `EVEJAX_MALLOC=system`
leaves the allocator alone.
"""
from __future__ import annotations

import ctypes
import os

ENV = "EVEJAX_MALLOC"
# mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_mode = None


def keep_freed_memory() -> str:
    """Sets glibc malloc to one arena, no mmap, no trimming. Returns the mode in effect
    (a line for logs); idempotent."""
    global _mode
    if _mode is not None:
        return _mode
    if os.environ.get(ENV, "keep") == "system":
        _mode = f"system allocator ({ENV}=system)"
        return _mode
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        _mode = "system allocator (not glibc)"
        return _mode
    # -1 is SIZE_MAX to glibc's size_t threshold: never give the heap's top back.
    ok = all(libc.mallopt(p, v) == 1 for p, v in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    if not ok:
        raise RuntimeError(f"glibc mallopt refused a setting; set {ENV}=system to run without it")
    _mode = "glibc malloc keeps freed memory (one arena, no mmap, no trim)"
    return _mode


def minor_page_faults() -> int:
    """Minor page faults of this process so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
