"""Where a compiled XLA:CPU step spends its time, by part of the model and kind of op.

`profile(run, hlo_text)` calls `run()` (one step, waited for) under `jax.profiler.trace`,
reads the thunks XLA:CPU ran from the trace (one event per HLO instruction of the
compiled step, named as in `compiled.as_text()`), and sums their seconds per row:

  part   from the instruction's op_name: the AdamW update (outside the gradient), the
         LM head, the loss (softmax/CE over the vocabulary), the attention core (scores,
         softmax, mask), the attention projections, the MLP, norms, the embedding, the
         layer scan's slicing of stacked weights and saved activations, else "other"
  kind   "matmul" when the instruction is or fuses a dot/convolution, else "other ops"

with each matmul row's FLOPs (`plan._matmul_flops`: what XLA runs, recomputation and
masked attention scores included), so its GFLOP/s can be held against the machine's peak.
The rows' seconds add up to the thunks' busy time, which exceeds the step's wall time
where XLA ran thunks side by side.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

from evejax import plan

# First match wins; patterns are searched in the op_name with "jit(step)/" dropped.
PARTS = (
    ("AdamW update, clipping", r"^(?!.*(jvp|transpose)\().*\S"),
    ("LM head", r"lm_head"),
    ("loss (softmax/CE over vocab)", r"^(transpose\()?jvp\(\)"),
    ("attention projections", r"/attention/(query|key|value|out)/"),
    ("attention core (scores, softmax)", r"/attention/"),
    ("MLP", r"/mlp/"),
    ("norms", r"norm"),
    ("embedding", r"embed"),
    ("drop path (its RNG runs at rate 0 too)", r"DropPath"),
    ("layer scan slicing", r"dynamic_(update_)?index_in_dim|dynamic_(update_)?slice"),
)


@dataclasses.dataclass
class Row:
    part: str
    kind: str          # "matmul" | "other ops"
    seconds: float     # thunk time summed over the step
    flops: float       # matmul FLOPs of those thunks
    thunks: int


def _instructions(hlo_text: str) -> tuple[dict, dict]:
    """name -> (opcode, called computations, op_name, operands text); computation -> instruction names."""
    info, computations, current = {}, {}, None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = plan._COMPUTATION.match(line)
            current = m.group(1) if m else None
            computations.setdefault(current, [])
            continue
        m = current and plan._INSTRUCTION.match(line)
        if m:
            name, type_text, opcode, rest = m.groups()
            op_name = re.search(r'op_name="([^"]*)"', rest)
            info[name] = (opcode, re.findall(r"calls=%([\w.\-]+)", rest), op_name.group(1) if op_name else "",
                          type_text, rest)
            computations[current].append(name)
    return info, computations


def _flops(name: str, info: dict, computations: dict, shapes: dict) -> float:
    opcode, called, _, _, rest = info[name]
    if opcode in ("dot", "convolution"):
        return plan._matmul_flops(opcode, shapes[name], rest, shapes)
    return sum(_flops(n, info, computations, shapes) for c in called for n in computations.get(c, []))


def part_of(op_name: str) -> str:
    path = op_name.replace("jit(step)/", "", 1)
    return next((label for label, pattern in PARTS if re.search(pattern, path)), "other")


def profile(run: Callable[[], object], hlo_text: str) -> list[Row]:
    """Rows (part, kind) of one call of `run`, most seconds first."""
    import jax

    info, computations = _instructions(hlo_text)
    shapes = {name: plan._arrays(i[3]) for name, i in info.items()}
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run()
        traces = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "perfetto_trace.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no perfetto trace under {tmp}")
        with gzip.open(traces[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    rows: dict[tuple[str, str], Row] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in info:
            continue
        flops = _flops(e["name"], info, computations, shapes)
        key = (part_of(info[e["name"]][2]), "matmul" if flops else "other ops")
        row = rows.setdefault(key, Row(*key, 0.0, 0.0, 0))
        row.seconds += e["dur"] / 1e6
        row.flops += flops
        row.thunks += 1
    return sorted(rows.values(), key=lambda r: -r.seconds)


def format_rows(rows: list[Row], peak_flops: float) -> str:
    busy = sum(r.seconds for r in rows)
    matmul_s, matmul_flops = (sum(getattr(r, k) for r in rows if r.kind == "matmul") for k in ("seconds", "flops"))
    width = max(len(r.part) for r in rows)
    lines = [f"{'part':{width}s}  {'kind':9s}  {'ms/step':>8s}  {'share':>6s}  {'GFLOP/s':>7s}  {'of peak':>7s}  thunks"]
    for r in rows:
        rate = r.flops / r.seconds if r.flops and r.seconds else 0.0
        lines.append(f"{r.part:{width}s}  {r.kind:9s}  {1e3 * r.seconds:8.1f}  {r.seconds / busy:6.1%}  "
                     + (f"{rate / 1e9:7.1f}  {rate / peak_flops:7.0%}" if rate else f"{'':7s}  {'':7s}")
                     + f"  {r.thunks:6d}")
    lines.append(f"busy {busy:.3f} s/step: matmuls {matmul_s / busy:.1%} of it at "
                 f"{matmul_flops / max(matmul_s, 1e-12) / 1e9:.1f} GFLOP/s ({matmul_flops:.4g} FLOPs, "
                 f"recomputation and masked scores included), other ops {1 - matmul_s / busy:.1%}; "
                 f"peak {peak_flops / 1e9:.1f} GFLOP/s")
    return "\n".join(lines)
