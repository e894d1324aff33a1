"""Meshes, logical-axis rules and shardings.

Models name the axes of every parameter and activation with logical names
(`batch`, `embed`, `heads`, ...). One table, `LOGICAL_RULES`, maps them onto the
mesh axes `slice` (across pod slices, DCN), `data`, `fsdp` and `tensor`. The
jitted step is the only place where the resulting shardings are applied.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "fsdp", "tensor")

# Parameters are sharded over `fsdp` on their model dimension and over `tensor`
# on heads / mlp / vocab; batches over every data-like axis. Activations only
# constrain batch and the tensor-parallel dimension, the rest stays replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("slice", "data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def maybe_initialize_distributed() -> None:
    """Joins the multi-host job when one is running (set by launch/tpu_vm.sh)."""
    if os.environ.get("EVEJAX_DISTRIBUTED") == "1" and jax.process_count() == 1:
        jax.distributed.initialize()


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves `-1` ("the rest of the devices") and checks the product.

    `spec` maps some of MESH_AXES to sizes; missing axes get 1.
    """
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not known; use {MESH_AXES}")
    sizes = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {dict(spec)} does not fit {num_devices} devices: the fixed axes "
                f"multiply to {fixed}, which does not divide {num_devices}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {dict(spec)} has {fixed} devices but {num_devices} are available; "
            "set one axis to -1 to take the rest")
    return sizes


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=-1' (a command line's mesh) -> {'slice': 1, 'data': 2, 'fsdp': -1, 'tensor': 1}:
    config.mesh's form, axes not named 1, -1 the rest of the devices (`mesh_shape`)."""
    try:
        spec = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv.strip())}
    except ValueError:
        spec = {}
    if not spec:
        raise ValueError(f"mesh {text!r} is not axis=size,... over {MESH_AXES} (-1: the rest of the "
                         "devices); e.g. data=2,fsdp=-1")
    return {**{a: 1 for a in MESH_AXES}, **spec}


def make_mesh(spec: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES in that order."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform == "tpu" and num_slices > 1:
        if sizes["slice"] != num_slices:
            raise ValueError(f"mesh slice={sizes['slice']} but the devices span {num_slices} slices")
        per_slice = (1,) + shape[1:]
        dcn = (num_slices,) + (1,) * (len(shape) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule in the sharding table")


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> P:
    """PartitionSpec for one array.

    A mesh axis that does not divide its dimension, or that an earlier
    dimension already uses, is dropped for that dimension: small configs (4
    heads on tensor=8) then replicate instead of failing to compile.
    """
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        keep = []
        size = 1
        for axis in _mesh_axes_for(name, rules):
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            keep.append(axis)
            size *= n
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) shapes.

    Leaves without logical names are replicated. The output tree has the boxes
    removed, matching `nn.unbox(tree)`.
    """
    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            value = leaf.value
            spec = logical_to_spec(leaf.names, value.shape, mesh, rules)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def unbox(tree: Any) -> Any:
    """Strips `nn.Partitioned` boxes without applying sharding constraints."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=LOGICAL_RULES) -> NamedSharding:
    """Sharding of a batch array: leading dimension over all data-like axes."""
    axes = tuple(a for a in _mesh_axes_for("batch", rules) if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of a batch into global arrays on the mesh."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in host_batch.items()
    }


def data_parallel_size(mesh: Mesh, rules=LOGICAL_RULES) -> int:
    return math.prod(mesh.shape[a] for a in _mesh_axes_for("batch", rules))


def rules_context(mesh: Mesh, rules=LOGICAL_RULES):
    """Context under which linen's logical constraints resolve against `mesh`."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack
