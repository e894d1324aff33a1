"""`evejax plan`: ahead-of-time compile of the sharded train step for a TPU slice.

  evejax plan configs/llm.py:vicuna_7b --topology v5p-64
  evejax plan configs/llm.py:vicuna_7b --topology v5p-64 --search
  evejax plan configs/llm.py:tiny --topology v4-8 --batch-per-chip 16 --remat none --config.mesh.data=-1

No TPU is needed: libtpu describes a virtual slice (`jax.experimental.topologies`)
whose compile-only devices carry the real chip layout, and the step that
`evejax train` runs (loss + gradients + AdamW, via `registry.build` and
`train/step.py`) is lowered on abstract shapes and compiled for it. Nothing
is allocated, so a 7B plan runs in about 1.5 GB of host memory.

A step of G rows (G = batch per chip x chips) runs in `train.accum_steps` = a
micro-batches of G / a rows, which must divide over the data-parallel chips
(slice x data x fsdp), as `evejax train` requires: a smaller micro-batch leaves
chips without rows and XLA all-reduces the activations instead of sharding them,
so such a plan is refused before compiling.

For each (remat policy, batch per chip) the plan reports, per chip:
  memory    from `compiled.memory_analysis()`: arguments (state shard + batch
            shard), outputs not aliased to donated arguments, temporaries,
            generated code; total = arguments + unaliased outputs + temporaries,
            compared with the chip's HBM. When the compiler itself runs out of
            HBM it stops early; the row then shows its estimate of temporaries.
  FLOPs     XLA's count from `compiled.cost_analysis()`, which counts the body
            of the scanned layer stack once, so it is not the model's; and the
            MaxText-style model FLOPs (`ModelSpec.flops_per_step`, matmuls
            only, causal attention halved, remat not counted), from which the
            step time and tokens/s/chip at an assumed MFU follow.

`--search` finds, per remat policy, the largest micro-batch per chip that fits
at the config's `accum_steps` (m rows per chip per micro-batch: global batch
m x chips x accum_steps), so every probe is a step `evejax train` would run. Each
probe is one compile (about 30 s CPU for the 7B step with the fast setting), so
the search does not walk powers of two: memory is close to affine in the batch
size, and it guesses the boundary from the line through the probes nearest it,
bracketed and bisected when a guess is off.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

# Compile-only devices come from libtpu whatever JAX's own backend is; keeping
# that backend on CPU means a plan never takes a local TPU away from a running
# job, and the multi-process lock of libtpu is not needed for compiling.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 1 << 30

# libtpu prints these when it starts outside a TPU VM; they say nothing about the plan.
_LIBTPU_NOISE = re.compile(
    r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|"
    r"Source Location Trace|libtpu_init_utils|Failed to find host bounds")


@dataclasses.dataclass(frozen=True)
class ChipType:
    generation: str       # as in the Cloud TPU name: v4, v5p, v5e, v6e
    libtpu_prefix: str    # how libtpu names it in a topology string
    cores_per_name: int   # v4-N and v5p-N count TensorCores (2 per chip), v5e/v6e-N count chips
    torus_dims: int
    chip_config: str      # v4/v5p run both cores of a chip as one device ("megacore")
    hbm_bytes: int
    peak_flops: float     # bf16 FLOP/s per chip


CHIPS = {
    "v4": ChipType("v4", "v4", 2, 3, "megacore", 32 * GiB, 275e12),
    "v5p": ChipType("v5p", "v5", 2, 3, "megacore", 95 * GiB, 459e12),
    "v5e": ChipType("v5e", "v5e", 1, 2, "default", 16 * GiB, 197e12),
    "v6e": ChipType("v6e", "v6e", 1, 2, "default", 32 * GiB, 918e12),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: ChipType
    shape: tuple[int, ...]   # chips along each torus dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        # Full slices close their rings: every dimension of a v4/v5p cube of
        # side >= 4, the 16-chip sides of v5e/v6e pods.
        full = 4 if self.chip.torus_dims == 3 else 16
        dims = tuple(self.shape) + (1,) * (3 - len(self.shape))
        if self.chip.torus_dims == 3 and min(dims) < 4:
            return (False, False, False)
        return tuple(d >= full for d in dims)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        dims = tuple(self.shape) + (1,) * (3 - len(self.shape))
        return tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))


def parse_topology(name: str) -> Topology:
    """`v5p-64` -> 32 chips as 2x4x4; `v5e-256` -> 256 chips as 16x16.

    Slices grow by doubling their shortest side (the last one among equals),
    which gives Cloud TPU's shapes for power-of-two sizes: v4/v5p 2x2x1, 2x2x2,
    2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; v5e/v6e 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16.
    """
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    generation = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or generation not in CHIPS:
        raise ValueError(f"topology {name!r} is not known; use <type>-<size> with type one of "
                         f"{sorted(CHIPS)}, e.g. v5p-64, v4-128, v5e-256, v6e-256")
    chip = CHIPS[generation]
    size = int(m.group(2))
    chips, rest = divmod(size, chip.cores_per_name)
    smallest = 4 if chip.torus_dims == 3 else 1
    if rest or chips < smallest or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if chip.cores_per_name == 2 else "chips"
        raise ValueError(f"topology {name!r}: {generation}-N counts {unit}; planning supports "
                         f"power-of-two slices of at least {smallest * chip.cores_per_name}")
    shape = [2, 2, 1] if chip.torus_dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        i = max(j for j, d in enumerate(shape) if d == min(shape))
        shape[i] *= 2
    return Topology(name.strip().lower(), chip, tuple(shape))


@contextlib.contextmanager
def _quiet_libtpu():
    """Runs a block with fd 2 captured, then passes on what is not libtpu's start-up noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip() and not _LIBTPU_NOISE.search(line):
                    print(line, file=sys.stderr)


def virtual_devices(topo: Topology) -> list:
    """Compile-only devices of the slice (needs libtpu, not a TPU)."""
    from jax.experimental import topologies

    with _quiet_libtpu():
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.libtpu_name, chip_config_name=topo.chip.chip_config,
            chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1, wrap=topo.wrap)
    return list(desc.devices)


# Bidirectional ICI bandwidth per chip, bytes/s, as Cloud TPU publishes it.
ICI_BANDWIDTH = {
    "v4": 300e9,   # unverified: 2,400 Gbps "interchip interconnect BW" of the older v4 page
    "v5p": 1200e9,  # docs.cloud.google.com/tpu/docs/v5p: "Bidirectional ICI bandwidth per chip 1200 GBps"
    "v5e": 400e9,   # docs.cloud.google.com/tpu/docs/v5e: "Bidirectional ICI bandwidth (per chip) 400 GBps"
    "v6e": 800e9,   # unverified: twice v5e's, as Google's Trillium announcement states
}

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "collective-permute", "all-reduce", "all-to-all")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"(?:calls|to_apply|body|branch_computations|called_computations)=\{?([^}\s,]+(?:,\s*%[\w.\-]+)*)")


def _arrays(type_text: str) -> list[tuple[str, list[int]]]:
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(type_text)
            if t in _DTYPE_BYTES]


def _bytes(arrays) -> int:
    return sum(_DTYPE_BYTES[t] * math.prod(dims) for t, dims in arrays)


def _group_size(attrs: str, num_devices: int) -> int:
    """Devices in one replica group, from any of the three forms XLA prints."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip("' "))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    return num_devices


@dataclasses.dataclass
class StepCost:
    """What the compiled step does per chip, the scanned layer body counted once per layer."""
    collectives: dict          # kind -> [count, bytes sent per chip]
    matmul_flops: float        # dot/convolution FLOPs XLA runs (remat recomputation included)

    @property
    def collective_bytes(self) -> float:
        return sum(b for _, b in self.collectives.values())


def step_cost(hlo_text: str, num_devices: int) -> StepCost:
    """Collectives and matmul FLOPs of optimised HLO text, each weighed by how often it runs.

    A computation runs as often as its callers, times the trip count of a
    while loop whose body it is (XLA's `known_trip_count`, else read from
    the loop's counter: `_trip_count`). Bytes sent per chip
    follow the ring algorithms over a group of n: all-gather (n-1)/n of its
    result, reduce-scatter (n-1) x its result, all-reduce 2(n-1)/n, all-to-all
    (n-1)/n, collective-permute its whole result. Custom calls (the splash
    kernel) hide their FLOPs from this count.
    """
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    shapes: dict[str, list] = {}
    constants: dict[str, int] = {}
    defs: dict[str, tuple[str, str]] = {}   # instruction -> (opcode, operands and attributes)
    roots: dict[str, str] = {}
    order, current, entry = [], None, None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                order.append(current)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        m = current and _INSTRUCTION.match(line)
        if m:
            name, type_text, opcode, rest = m.groups()
            shapes[name] = _arrays(type_text)
            computations[current].append((name, type_text, opcode, rest))
            defs[name] = (opcode, rest)
            if line.lstrip().startswith("ROOT"):
                roots[current] = name
            if opcode == "constant" and re.fullmatch(r"[su](32|64)\[\]\S*", type_text):
                constants[name] = int(rest.split(")")[0])
    runs = {c: 0 for c in computations}
    runs[entry] = 1
    # Callees are printed before their callers, so callers are done first in reverse.
    for comp in reversed(order):
        for _, _, opcode, rest in computations[comp]:
            if opcode in ("async-done", "async-update"):  # the same computation as its async-start
                continue
            trips = _trip_count(rest, computations, constants, defs, roots) if opcode == "while" else 1
            for m in _CALLED.finditer(rest):
                for callee in re.findall(r"%?([\w.\-]+)", m.group(1)):
                    if callee in runs:
                        runs[callee] += runs[comp] * (trips if m.group(0).startswith("body") else 1)
    collectives = {k: [0, 0.0] for k in COLLECTIVE_KINDS}
    flops = 0.0
    for comp, instructions in computations.items():
        times = runs[comp]
        if not times:
            continue
        for name, type_text, opcode, rest in instructions:
            kind = opcode[:-6] if opcode.endswith("-start") else opcode
            if kind in COLLECTIVE_KINDS:
                arrays = shapes[name]
                if opcode.endswith("-start") and kind == "all-gather":
                    arrays = arrays[len(arrays) // 2:]   # (operands, results)
                elif opcode.endswith("-start") and kind == "collective-permute":
                    arrays = arrays[:1]                   # (operand, result, contexts)
                n = _group_size(rest, num_devices)
                size = _bytes(arrays)
                sent = {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
                        "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n,
                        "collective-permute": size}[kind]
                collectives[kind][0] += times
                collectives[kind][1] += times * sent
            elif opcode in ("dot", "convolution"):
                flops += times * _matmul_flops(opcode, shapes[name], rest, shapes)
    return StepCost(collectives, flops)


def _trip_count(attrs: str, computations, constants, defs, roots) -> int:
    """XLA:CPU writes `known_trip_count`; XLA:TPU leaves the loop's condition `i < N` to be read,
    with i's start in the loop's initial tuple and its step in the body's root tuple. Scans count
    from 0 by 1, but the windowed (collective) matmul loops that FSDP gets on a large ring are
    unrolled to count by 2: read as steps of 1, their dots and permutes were counted twice."""
    m = re.search(r'known_trip_count":\{"n":"(\d+)"', attrs)
    if m:
        return int(m.group(1))
    condition, body = (re.search(key + r"=%?([\w.\-]+)", attrs) for key in ("condition", "body"))
    for _, _, opcode, rest in computations.get(condition.group(1), []) if condition else []:
        counter_bound = _operands(rest)
        if opcode != "compare" or "direction=LT" not in rest or len(counter_bound) != 2 \
                or counter_bound[1] not in constants:
            continue
        index = _tuple_index(defs.get(counter_bound[0]))
        initial = _tuple_operand(defs, (_operands(attrs) or [None])[0], index)
        start = constants.get(initial, 0)
        update = defs.get(_tuple_operand(defs, roots.get(body.group(1)) if body else None, index))
        step = 1
        if update and update[0] == "add":
            summands = _operands(update[1])
            if any(_tuple_index(defs.get(o)) == index for o in summands):
                step = next((constants[o] for o in summands if o in constants), 1)
        return max(0, -(-(constants[counter_bound[1]] - start) // max(step, 1)))
    return 1


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")")[0])


def _tuple_index(definition) -> Optional[int]:
    """k when the instruction is get-tuple-element(..., index=k)."""
    m = definition and definition[0] == "get-tuple-element" and re.search(r"index=(\d+)", definition[1])
    return int(m.group(1)) if m else None


def _tuple_operand(defs, name: Optional[str], index: Optional[int]) -> Optional[str]:
    """The name of operand `index` of the tuple instruction `name`."""
    definition = defs.get(name)
    if index is None or not definition or definition[0] != "tuple":
        return None
    operands = _operands(definition[1])
    return operands[index] if index < len(operands) else None


def _matmul_flops(opcode, result, rest, shapes) -> float:
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    out = math.prod(result[0][1]) if result else 0
    if opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        lhs = shapes.get(operands[0]) if operands else None
        if not (m and lhs):
            return 0.0
        return 2.0 * out * math.prod(lhs[0][1][int(i)] for i in m.group(1).split(",") if i)
    # XLA:TPU writes batched dots as convolutions whose batch dimensions are
    # dilated or padded windows; as XLA's cost analysis does, only window taps
    # that land on a real input element count.
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    lhs = shapes.get(operands[0]) if operands else None
    rhs = shapes.get(operands[1]) if len(operands) > 1 else None
    if not (m and lhs and rhs and result):
        return 0.0
    lhs_labels, rhs_labels, out_labels = m.groups()
    lhs_dims, rhs_dims, out_dims = lhs[0][1], rhs[0][1], result[0][1]
    spatial = [c for c in out_labels if c.isdigit()]
    window = lambda key, default: ([int(v) for v in re.search(key + r"=([\dx_\-]+)", rest).group(1).replace("_", "x").split("x")]  # noqa: E731
                                   if re.search(key + r"=", rest) else default)
    n = len(spatial)
    strides, lhs_dil, rhs_dil = window("stride", [1] * n), window("lhs_dilate", [1] * n), window("rhs_dilate", [1] * n)
    pads = window("pad", [0] * 2 * n)
    taps = 1
    for d, c in enumerate(spatial):
        size_in, k = lhs_dims[lhs_labels.index(c)], rhs_dims[rhs_labels.index(c)]
        extent = (size_in - 1) * lhs_dil[d] + 1
        taps *= sum(1 for o in range(out_dims[out_labels.index(c)]) for j in range(k)
                    if 0 <= (p := o * strides[d] + j * rhs_dil[d] - pads[2 * d]) < extent and p % lhs_dil[d] == 0)
    return 2.0 * out_dims[out_labels.index("b")] * out_dims[out_labels.index("f")] * rhs_dims[rhs_labels.index("i")] * taps


@dataclasses.dataclass
class Plan:
    remat: str
    batch_per_chip: int
    global_batch: int
    seq_len: int
    fits: bool
    total_bytes: Optional[int]         # None when not even an estimate is known
    argument_bytes: Optional[int] = None
    output_bytes: Optional[int] = None  # outputs not aliased to donated arguments
    temp_bytes: Optional[int] = None
    code_bytes: Optional[int] = None
    xla_flops: Optional[float] = None   # per chip, scanned layer body counted once
    model_flops: float = 0.0            # per chip
    compile_seconds: float = 0.0
    note: str = ""                      # why it does not fit, when the compiler said so
    cost: Optional[StepCost] = None     # per chip, from the compiled step
    mesh: str = ""                      # e.g. "data=2 fsdp=16"
    attention: str = ""                 # the attention impl compiled
    accum_steps: int = 1                # micro-batches per step

    @property
    def micro_batch_per_chip(self) -> int:
        return self.batch_per_chip // self.accum_steps

    def estimate(self, chip: ChipType) -> Optional[tuple[float, float]]:
        """(step seconds, MFU): the larger of compute at peak (XLA's matmul FLOPs, or the model's
        when the kernels hide more) and collective bytes over the ICI bandwidth; no overlap loss,
        no memory-bound time, so an upper bound on MFU."""
        if self.cost is None or not self.model_flops:
            return None
        seconds = max(max(self.cost.matmul_flops, self.model_flops) / chip.peak_flops,
                      self.cost.collective_bytes / ICI_BANDWIDTH[chip.generation])
        return seconds, self.model_flops / (seconds * chip.peak_flops)


@dataclasses.dataclass
class Planner:
    """Compiles the train step of `config` on `topo` for given (remat, batch per chip, seq_len).

    `effort` "fast" lowers XLA's optimisation effort for execution time
    (`exec_time_optimization_effort=-1`): the 7B step compiles about 3x
    faster and its temporaries come out a few percent larger (22.7 vs 21.9
    GB on v5p-64 at batch 8, full remat), so fast probes err on the safe side.
    """
    config: object
    topo: Topology
    devices: list
    effort: str = "default"

    def __post_init__(self):
        from evejax import sharding

        try:
            self.mesh_sizes = sharding.mesh_shape(dict(self.config.mesh), self.topo.chips)
        except ValueError as e:
            raise ValueError(f"config.mesh {dict(self.config.mesh)} does not fit {self.topo.name} "
                             f"({self.topo.chips} chips): {e}") from None
        self.mesh_sizes_label = " ".join(f"{k}={v}" for k, v in self.mesh_sizes.items() if v > 1) or "1 chip"
        self.data_parallel = sharding.data_parallel_size(sharding.make_mesh(self.mesh_sizes, self.devices))
        self.accum_steps = int(self.config.get("train", {}).get("accum_steps", 1))
        self.compiles = 0
        self.compile_seconds = 0.0

    def check_batch(self, batch_per_chip: int) -> None:
        """Raises ValueError when the step's micro-batches do not divide over the data-parallel chips."""
        global_batch, accum = batch_per_chip * self.topo.chips, self.accum_steps
        if global_batch % accum == 0 and (global_batch // accum) % self.data_parallel == 0:
            return
        smallest = self.data_parallel * accum
        raise ValueError(
            f"{batch_per_chip} rows per chip on {self.topo.chips} chips is a global batch of {global_batch} "
            f"in train.accum_steps={accum} micro-batches of {global_batch / accum:g} rows, which do not "
            f"divide over the {self.data_parallel} data-parallel chips ({self.mesh_sizes_label}): XLA would "
            f"leave chips without rows and all-reduce activations, a step `evejax train` refuses. Use a "
            f"global batch that is a multiple of {smallest} (--batch-per-chip a multiple of "
            f"{max(1, smallest // self.topo.chips)}) or fewer micro-batches (--config.train.accum_steps)")

    def model_config(self, remat: str, attention: Optional[str] = None):
        config = copy.deepcopy(self.config)
        with config.unlocked():
            extra = dict(remat=remat, **({"attention_impl": attention} if attention else {}))
            config.model.overrides = dict(config.model.get("overrides", {}) or {}, **extra)
        return config

    def optimizer(self):
        from evejax.train import step

        o = self.config.get("optim", {})
        return step.adamw(o.get("lr", 1e-4), b1=o.get("b1", 0.9), b2=o.get("b2", 0.999),
                          eps=o.get("eps", 1e-8), weight_decay=o.get("weight_decay", 0.0),
                          clip_norm=o.get("clip_norm", 1.0))

    def __call__(self, remat: str, batch_per_chip: int, seq_len: int,
                 attention: Optional[str] = None) -> Plan:
        import jax
        import jax.numpy as jnp

        from evejax import sharding
        from evejax.models import registry
        from evejax.train import optimizer as optimizer_lib
        from evejax.train import step

        self.check_batch(batch_per_chip)
        model_config = self.model_config(remat, attention).model
        spec = registry.build(model_config)
        mesh = sharding.make_mesh(self.mesh_sizes, self.devices)
        global_batch = batch_per_chip * self.topo.chips
        optimizer = self.optimizer()
        train_cfg = self.config.get("train", {})
        ema_decay = float(train_cfg.get("ema_decay", 0.0))
        boxed, state_sh = step.abstract_state(spec.module, spec.init_args, spec.init_kwargs, optimizer, mesh,
                                              ema=ema_decay > 0)
        params = sharding.unbox(boxed)
        state = step.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                opt_state=jax.eval_shape(optimizer.init, params),
                                rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
                                ema_params=params if ema_decay > 0 else None)
        scalars = optimizer_lib.batch_schedules(train_cfg)
        batch = {k: v for k, v in spec.batch_specs(global_batch, seq_len).items() if k not in scalars}
        batch_sh = jax.tree.map(lambda s: sharding.batch_sharding(mesh, len(s.shape)), batch)
        accum = self.accum_steps
        plan = Plan(remat, batch_per_chip, global_batch, seq_len, fits=False, total_bytes=None,
                    model_flops=spec.flops_per_step(global_batch, seq_len) / self.topo.chips,
                    mesh=self.mesh_sizes_label,
                    attention=(model_config.get("overrides", {}) or {}).get("attention_impl", "xla"),
                    accum_steps=accum)
        options = {"exec_time_optimization_effort": -1.0} if self.effort == "fast" else {}
        start = time.perf_counter()
        try:
            with sharding.rules_context(mesh):
                train_step = step.make_train_step(spec.loss_fn, optimizer, state_sh, batch_sh,
                                                  accum_steps=accum, ema_decay=ema_decay,
                                                  batch_scalars=scalars)
                lowered = train_step.lower(state, batch)
            with _quiet_libtpu():
                compiled = lowered.compile(compiler_options=options)
        except Exception as e:  # the compiler's out-of-memory is a result, not a failure
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            plan.note = _first_line(str(e))
            temps = _required_bytes(str(e))
            if temps is not None:
                plan.temp_bytes = temps
                plan.argument_bytes = _shard_bytes(state, state_sh) + _shard_bytes(batch, batch_sh)
                plan.total_bytes = plan.argument_bytes + temps
            return self._timed(plan, start)
        mem = compiled.memory_analysis()
        plan.argument_bytes = int(mem.argument_size_in_bytes)
        plan.output_bytes = int(mem.output_size_in_bytes - mem.alias_size_in_bytes)
        plan.temp_bytes = int(mem.temp_size_in_bytes)
        plan.code_bytes = int(mem.generated_code_size_in_bytes)
        plan.total_bytes = plan.argument_bytes + plan.output_bytes + plan.temp_bytes
        plan.fits = plan.total_bytes <= self.topo.chip.hbm_bytes
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        plan.xla_flops = float(cost.get("flops", 0.0)) if cost else None
        plan.cost = step_cost(compiled.as_text(), self.topo.chips)
        return self._timed(plan, start)

    def _timed(self, plan: Plan, start: float) -> Plan:
        plan.compile_seconds = time.perf_counter() - start
        self.compiles += 1
        self.compile_seconds += plan.compile_seconds
        return plan


def _shard_bytes(shapes, shardings) -> int:
    import jax
    import numpy as np

    return sum(math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
               for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _required_bytes(message: str) -> Optional[int]:
    """The compiler's estimate of temporaries in an out-of-HBM error, e.g. "(639.87G)"."""
    m = (re.search(r"required for HLO temporaries \((\d+(?:\.\d+)?)([KMGT]?)", message)
         or re.search(r"Used (\d+(?:\.\d+)?)([KMGT]?)", message))
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:200] if message.strip() else ""


def largest_fitting(probe: Callable[[int], Plan], hbm_bytes: int,
                    max_batch: int) -> tuple[Optional[Plan], list[Plan]]:
    """The largest batch in [1, max_batch] whose plan fits, and every probe made.

    Keeps a bracket (largest fitting, smallest failing batch). After a probe
    that fits, the next batch is read off the line through the two largest
    fitting probes (memory grows close to linearly with the batch); after one
    that does not, the line overshot and the next probe bisects the bracket.
    The compiler's own estimate for a batch that does not fit is too rough
    to use.
    """
    probes: dict[int, Plan] = {}
    lo, hi = 0, max_batch + 1
    batch = 1
    while True:
        plan = probes[batch] = probe(batch)
        lo, hi = (batch, hi) if plan.fits else (lo, batch)
        if hi - lo <= 1:
            break
        guess = _secant_guess(probes, hbm_bytes) if plan.fits else None
        batch = min(max((lo + hi) // 2 if guess is None else guess, lo + 1), hi - 1)
    return probes.get(lo), [probes[b] for b in sorted(probes)]


def _secant_guess(probes: dict, hbm_bytes: int) -> Optional[int]:
    """Largest batch predicted to fit, from the fitting probes' measured totals."""
    known = sorted((b, p.total_bytes) for b, p in probes.items() if p.fits)
    if not known:
        return None
    if len(known) == 1:  # one probe: assume everything but the state grows with the batch
        (b, total), = known
        fixed = probes[b].argument_bytes or 0
        per_row = max(total - fixed, 1) / b
        return int((hbm_bytes - fixed) // per_row)
    (b0, m0), (b1, m1) = known[-2:]
    slope = (m1 - m0) / (b1 - b0)
    return None if slope <= 0 else b1 + int((hbm_bytes - m1) // slope)


# Less recomputation first: at equal batch the earlier policy is faster.
POLICY_ORDER = ("none", "save_dots", "save_dots_no_batch", "minimal", "save_qkv", "full")


def recommend(best: dict, chip: Optional[ChipType] = None) -> Optional[Plan]:
    """Best estimated tokens/s/chip; then the largest batch per chip; then the policy that recomputes least."""
    fitting = [p for p in best.values() if p is not None]
    if not fitting:
        return None

    def tokens_per_second(p):
        est = p.estimate(chip) if chip else None
        return p.batch_per_chip * p.seq_len / est[0] if est else 0.0

    return max(fitting, key=lambda p: (tokens_per_second(p), p.batch_per_chip, -POLICY_ORDER.index(p.remat)))


def _size(n: Optional[int], prefix: str = "") -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", GiB), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{prefix}{n / scale:.2f}{unit}"
    return f"{prefix}{n}B"


_KIND_HEADS = {"all-gather": "AG", "reduce-scatter": "RS", "collective-permute": "CP", "all-reduce": "AR",
               "all-to-all": "A2A"}


def format_table(plans: Sequence[Plan], topo: Topology, mfu: float,
                 labels: Optional[Sequence[str]] = None) -> str:
    hbm = topo.chip.hbm_bytes
    head = ["", "mesh", "attention", "remat", "micro/chip", "accum", "batch/chip", "global batch",
            "args", "out", "temp", "code", "total", "% HBM", "fits", "XLA FLOPs", "model FLOPs",
            *(f"{h} bytes" for h in _KIND_HEADS.values()), "est step s", "est MFU", "est tok/s/chip",
            f"step s @{mfu:.0%}", f"tok/s/chip @{mfu:.0%}", "compile s"]
    rows = []
    for i, p in enumerate(plans):
        step_s = p.model_flops / (mfu * topo.chip.peak_flops)
        est = p.estimate(topo.chip)
        kinds = [_size(int(p.cost.collectives[k][1])) + f" ({p.cost.collectives[k][0]})" if p.cost else "-"
                 for k in _KIND_HEADS]
        rows.append([
            labels[i] if labels else "", p.mesh, p.attention, p.remat, str(p.micro_batch_per_chip),
            str(p.accum_steps), str(p.batch_per_chip), str(p.global_batch),
            _size(p.argument_bytes), _size(p.output_bytes), _size(p.temp_bytes), _size(p.code_bytes),
            _size(p.total_bytes, "" if p.output_bytes is not None else "~"),
            "-" if p.total_bytes is None else f"{100 * p.total_bytes / hbm:.0f}",
            "yes" if p.fits else "no",
            "-" if p.xla_flops is None else f"{p.xla_flops:.3g}",
            f"{p.model_flops:.3g}", *kinds,
            "-" if est is None else f"{est[0]:.3g}", "-" if est is None else f"{est[1]:.0%}",
            "-" if est is None else f"{p.batch_per_chip * p.seq_len / est[0]:,.0f}",
            f"{step_s:.3g}", f"{p.batch_per_chip * p.seq_len / step_s:,.0f}", f"{p.compile_seconds:.0f}"])
    if not labels:
        head, rows = head[1:], [r[1:] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


NOTES = """\
micro/chip: rows per chip in each of the step's accum (train.accum_steps) micro-batches;
  batch/chip = micro/chip x accum, rows per chip per step; global batch = batch/chip x chips.
memory per chip (K/M/G = 2^10/2^20/2^30 bytes): args = state shard + batch shard; out = outputs not aliased to the donated state;
  total = args + out + temp (code listed apart); fits = total <= {hbm:.0f} GiB HBM of a {gen} chip.
  "~" marks the compiler's estimate when it stopped early for lack of HBM.
XLA FLOPs: compiled.cost_analysis() per chip. XLA counts the scanned layer body once, so this is
  not the model's count. model FLOPs: MaxText-style matmul FLOPs per chip of one step (6 x params x
  tokens + causal attention), remat recomputation not counted; step time and tokens/s/chip assume
  {mfu:.0%} MFU of the {peak:.0f} TFLOP/s bf16 peak.
collectives (AG all-gather, RS reduce-scatter, CP collective-permute (what a decomposed reduce-scatter
  becomes), AR all-reduce, A2A all-to-all): bytes sent per chip per step (count in brackets), read from
  the compiled HLO with the scanned layer body counted once per layer (ring algorithms: AG (n-1)/n of
  the result, RS (n-1) x the result, AR 2(n-1)/n, CP the result).
est step s = max(compute at peak, collective bytes / {ici:.0f} GB/s bidirectional ICI per chip (ICI_BANDWIDTH
  in plan.py)); compute = the larger of XLA's matmul FLOPs (HLO dots and convolutions per layer, remat
  recomputation included; the splash kernel's are hidden) and the model FLOPs. No overlap loss or
  memory-bound time is counted, so est MFU (model FLOPs / (est step s x peak)) is an upper bound."""


def _config_batch_line(choice: Plan, global_batch: int, chips: int) -> str:
    """How the config's global batch (a training hyperparameter, kept) splits at the recommended micro-batch:
    the most rows per chip per micro-batch, up to the recommended, that divide it."""
    head = f"config's global batch {global_batch} ({choice.accum_steps} micro-batches in the config)"
    rows = next((m for m in range(choice.micro_batch_per_chip, 0, -1) if global_batch % (m * chips) == 0), None)
    if rows is None:
        return f"{head}: not a whole number of micro-batches of at least one row per chip"
    return (f"{head}: {rows} rows per chip per micro-batch (recommended: {choice.micro_batch_per_chip}) "
            f"with --config.train.accum_steps={global_batch // (rows * chips)}")


def _parse(argv):
    from evejax.config import split_overrides
    from evejax.nn.transformer import REMAT_POLICIES

    p = argparse.ArgumentParser(prog="evejax plan", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="config spec, e.g. configs/llm.py:vicuna_7b")
    p.add_argument("--topology", required=True, help="v5p-64, v4-128, v5e-256, v6e-256, ...")
    p.add_argument("--batch-per-chip", type=int, help="rows per chip per step, all micro-batches together; "
                   "default: config.data.global_batch / chips")
    p.add_argument("--seq-len", type=int, help="default: config.data.seq_len")
    p.add_argument("--remat", choices=sorted(REMAT_POLICIES), help="default: the config's")
    p.add_argument("--search", action="store_true",
                   help="largest micro-batch per chip that fits at the config's train.accum_steps, "
                   "for each policy in --policies")
    p.add_argument("--policies", default="none,save_dots,minimal,save_qkv,full",
                   help="comma-separated remat policies for --search")
    p.add_argument("--meshes", help="--search over these meshes, ';'-separated, e.g. "
                   "'fsdp=-1;data=2,fsdp=-1;fsdp=-1,tensor=4'; default: the config's mesh")
    p.add_argument("--attention", help="--search over these attention impls, comma-separated "
                   "(xla, splash, ...); default: the config's")
    p.add_argument("--max-batch-per-chip", type=int, default=512,
                   help="upper end of --search, in rows per chip per micro-batch")
    p.add_argument("--mfu", type=float, default=0.5, help="assumed MFU for step time and tokens/s")
    p.add_argument("--effort", choices=("fast", "default"),
                   help="XLA optimisation effort; default: fast for search probes, default otherwise")
    overrides, rest = split_overrides(argv)
    return p.parse_args(rest), overrides


def _with_mesh(config, mesh: dict):
    config = copy.deepcopy(config)
    with config.unlocked():
        config.mesh = mesh
    return config


def main(argv=None) -> int:
    """Exit status: 0 fits, 1 does not fit (or, with --search, nothing fits), 2 bad arguments."""
    args, overrides = _parse(list(sys.argv[1:] if argv is None else argv))
    from evejax import config as config_lib
    from evejax import sharding
    from evejax.nn.transformer import ATTENTION_IMPLS, REMAT_POLICIES

    try:
        topo = parse_topology(args.topology)
        config = config_lib.apply_overrides(config_lib.load(args.config), overrides)
        policies = [s.strip() for s in args.policies.split(",") if s.strip()]
        unknown = [s for s in policies if s not in REMAT_POLICIES]
        if unknown:
            raise ValueError(f"--policies: {unknown} not known; use {sorted(REMAT_POLICIES)}")
        planner = Planner(config, topo, virtual_devices(topo))
        meshes = [sharding.parse_mesh(m) for m in (args.meshes or "").split(";") if m.strip()] if args.search else []
        if meshes:
            planner = Planner(_with_mesh(config, meshes.pop(0)), topo, planner.devices)
        impls = [a.strip() for a in (args.attention or "").split(",") if a.strip()] or [None]
        bad = [a for a in impls if a is not None and a not in ATTENTION_IMPLS]
        if bad:
            raise ValueError(f"--attention: {bad} not known; use {list(ATTENTION_IMPLS)}")
        for m in meshes:
            Planner(_with_mesh(config, m), topo, planner.devices)  # a mesh that does not fit fails here
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"evejax plan: {e}", file=sys.stderr)
        return 2
    data = config.get("data", {})
    seq_len = args.seq_len or int(data.get("seq_len", 2048))
    remat = args.remat or (config.model.get("overrides", {}) or {}).get("remat", "full")
    mesh = " ".join(f"{k}={v}" for k, v in planner.mesh_sizes.items())
    print(f"evejax plan {args.config} on {topo.name}: {topo.chips} chips "
          f"({topo.libtpu_name}, {topo.chip.chip_config}), HBM {topo.chip.hbm_bytes / GiB:.0f} GiB/chip, "
          f"peak {topo.chip.peak_flops / 1e12:.0f} TFLOP/s/chip bf16")
    print(f"mesh {mesh}; seq len {seq_len}")
    notes = NOTES.format(hbm=topo.chip.hbm_bytes / GiB, gen=topo.chip.generation, mfu=args.mfu,
                         peak=topo.chip.peak_flops / 1e12, ici=ICI_BANDWIDTH[topo.chip.generation] / 1e9)
    if not args.search:
        planner.effort = args.effort or "default"
        batch = args.batch_per_chip or max(1, int(data.get("global_batch", topo.chips)) // topo.chips)
        try:
            planner.check_batch(batch)
        except ValueError as e:
            print(f"evejax plan: {e}", file=sys.stderr)
            return 2
        plan = planner(remat, batch, seq_len, impls[0])
        print(format_table([plan], topo, args.mfu))
        if plan.note:
            print(f"compiler: {plan.note}")
        print(notes)
        return 0 if plan.fits else 1

    start = time.perf_counter()
    planners = [planner] + [Planner(_with_mesh(config, m), topo, planner.devices) for m in meshes]
    best, rows, labels = {}, [], []
    for mesh_planner in planners:
        mesh_planner.effort = args.effort or "fast"
        accum = mesh_planner.accum_steps
        for attention in impls:
            for policy in policies:
                # Probing micro-batch rows per chip keeps every micro-batch a whole number of rows per chip.
                fit, probes = largest_fitting(lambda m: mesh_planner(policy, m * accum, seq_len, attention),
                                              topo.chip.hbm_bytes, args.max_batch_per_chip)
                best[(id(mesh_planner), attention, policy)] = fit
                rows.append(fit or probes[0])
                labels.append(f"{len(probes)} probes" + (
                    " (cap)" if fit and fit.micro_batch_per_chip == args.max_batch_per_chip else ""))
                implied = (f": micro-batch {fit.global_batch // accum} rows, x {accum} (accum_steps) = "
                           f"global batch {fit.global_batch}" if fit else "")
                print(f"  {rows[-1].mesh} {rows[-1].attention} {policy}: largest micro-batch per chip "
                      f"{fit.micro_batch_per_chip if fit else 0}{implied} "
                      f"(probed {', '.join(str(p.micro_batch_per_chip) for p in probes)})", flush=True)
    choice = recommend(best, topo.chip)
    if choice is not None and args.effort is None:
        # Probes ran at the fast setting; the recommendation is compiled as training will compile it.
        chosen = next(q for q in planners if q.mesh_sizes_label == choice.mesh)
        chosen.effort = "default"
        confirmed = chosen(choice.remat, choice.batch_per_chip, seq_len, choice.attention)
        while not confirmed.fits and confirmed.micro_batch_per_chip > 1:
            confirmed = chosen(choice.remat, confirmed.batch_per_chip - confirmed.accum_steps, seq_len,
                               choice.attention)
        choice = confirmed if confirmed.fits else None
    if choice is not None:
        rows.append(choice)
        labels.append("recommended")
    print(format_table(rows, topo, args.mfu, labels))
    compiles = sum(q.compiles for q in planners)
    print(f"{compiles} compiles in {time.perf_counter() - start:.0f} s "
          f"({sum(q.compile_seconds for q in planners):.0f} s compiling); probes at effort {args.effort or 'fast'}"
          + ("" if args.effort else ", the recommended row at default effort"))
    print("recommended: the best estimated tokens/s/chip among the plans that fit, then the largest batch "
          "per chip, then the policy that recomputes least" + ("" if choice else ": nothing fits"))
    if choice is not None and data.get("global_batch"):
        print(_config_batch_line(choice, int(data.get("global_batch", 0)), topo.chips))
    print(notes)
    return 0 if choice is not None else 1
