"""evejax.hostmem: with freed memory kept, repeated XLA:CPU executions stop taking page faults."""
import json
import os
import statistics
import subprocess
import sys

import pytest

# A fresh process per mode: the setting must come before JAX starts its threads.
PROBE = """
import json
from evejax import hostmem
mode = hostmem.keep_freed_memory()
import time
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
# A 64 MiB temporary per call, as a train step has (its state is donated).
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x)[::-1].T @ jnp.ones((4096, 8)), axis=0))
faults = []
for _ in range(10):
    start = hostmem.minor_page_faults()
    f(x).block_until_ready()
    time.sleep(0.1)  # XLA frees a call's buffers after it returns
    faults.append(hostmem.minor_page_faults() - start)
print(json.dumps(dict(mode=mode, faults=faults)))
"""


def _probe(malloc: str) -> dict:
    env = dict(os.environ, EVEJAX_MALLOC=malloc, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_ends_page_faults():
    system, keep = _probe("system"), _probe("keep")
    if keep["mode"].startswith("system allocator (not glibc)"):
        pytest.skip("not glibc: evejax leaves this allocator alone")
    assert system["mode"] == "system allocator (EVEJAX_MALLOC=system)"
    assert keep["mode"].startswith("glibc malloc keeps freed memory")
    pages = 4096 * 4096 * 4 // 4096  # the 64 MiB temporary, in 4 KiB pages
    # The system allocator maps every call's temporary anew; kept memory is
    # reused once the heap has grown to hold what is alive at once (a few calls).
    # Medians of the last four calls: a single late regrowth of the heap is allowed.
    assert statistics.median(system["faults"][6:]) > pages // 2, system
    assert statistics.median(keep["faults"][6:]) < pages // 50, keep


def test_cli_sets_it_up_for_cpu_runs():
    code = "from evejax import cli, hostmem; cli.main(['--help']); print(hostmem._mode)"
    for platforms, want in (("cpu", ("glibc malloc keeps", "system allocator (not glibc)")), ("tpu", "None")):
        env = dict(os.environ, JAX_PLATFORMS=platforms, EVEJAX_MALLOC="keep")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1].startswith(want), (platforms, out.stdout)
