"""De-focus Mamba weights: the official `DefocusAttentionNetwork` `.pth` <-> evejax `DANClassifier` params.

The official names and layouts are `evejax.port.torch_ref.dan`'s (reference/dan.md §8, §12); one
table (`rows`) drives both directions (PyTorch layouts; Linear weight [out, in]):

    cls_token [1, 1, D]                        <-> cls_token [D]
    patch_embed.proj.weight [D, 3, p, p]       <-> patch_embed/kernel [p, p, 3, D]   (+ bias)
    blocks.{i}.norm.weight                     <-> blocks/norm/scale [L, D]
    blocks.{i}.mixer.{A_log, D, freq}          <-> blocks/mixer/{A_log, D, freq}
    blocks.{i}.mixer.conv1d.weight [E, 1, K]   <-> blocks/mixer/conv1d/kernel [L, K, E]  (+ bias)
    blocks.{i}.mixer.in_proj.weight [2E, D]    <-> blocks/mixer/in_proj/kernel [L, D, 2, E] (u, then gate)
    blocks.{i}.mixer.{x,dt,out}_proj.weight    <-> blocks/mixer/{x,dt,out}_proj/kernel (transposed; dt bias copied)
    norm.{weight, bias}                        <-> norm/{scale, bias}
    head.{weight, bias}, head2.*               <-> head/{kernel, bias}, head2/...     (head "linear", IN1k_cls)
    head.{0,2}.{weight, bias}, head2.*         <-> head/{fc1,fc2}/{kernel, bias}      (head "mlp", IN22k*)

Files. The released classification `.pth` (and the official `save_checkpoint_ema`) is a dict with
the raw weights under 'model' and the EMA weights under 'model_ema'; the official loaders
(`utils/utils.py` load_pretrained_ema / load_checkpoint_ema, for --pretrained / --resume) read
`ckpt['model']` into the model and, when present, `ckpt['model_ema']` into the timm ModelEma.
A bare state dict (name -> tensor) is read as the raw weights too. Files are read only with
`torch.load(weights_only=True)`: a training checkpoint whose pickle carries its yacs config is
refused with the command that strips it. The `.pth` holds no config: import takes an evejax size.

    evejax import --family dan SRC.pth OUT_DIR --size mamba_b [--ema] [--set FIELD=VALUE ...]
                  [--class-map map22kto1k.txt] [--param-dtype float32|bfloat16] [--overwrite]
        'model' (or with --ema 'model_ema') -> OUT_DIR/model.json (format "evejax.dan") + params/.
        --class-map keeps, in the file's order, the output rows of both heads' last layer that its
        lines name (one source class index a line), as the official tools/convert_22k_to_1k.py
        does with `classification/data/map22kto1k.txt` (the 22k pre-train -> 1k heads that the
        official 384 px fine-tune starts from; the official tool reads 'model_ema': pass --ema).
    evejax export DAN_CKPT|WORKDIR OUT.pth
        -> {'model': state_dict, 'model_ema': the workdir's EMA (config.train.ema_decay > 0), else
        the same} in float32, the layout of the release and of tools/convert_22k_to_1k.py: loads
        with strict=True into the official model built with the matching config.

`to_flax` / `to_torch` convert in memory; `import_dan` / `export_dan` are the commands as functions.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from evejax import atomic
from evejax.models import dan as dan_lib
from evejax.nn.mamba import MambaConfig
from evejax.port import checkpoint as lm_checkpoint
from evejax.port import io, tables
from evejax.port.clip import CONV_OIHW_TO_HWIO
from evejax.port.command_line import run_command
from evejax.port.io import CheckpointError
from evejax.port.tables import LINEAR, Row, Transform, unit_axes

FORMAT = "evejax.dan"
VERSION = 1
MODEL_JSON, PARAMS_DIR = lm_checkpoint.MODEL_JSON, lm_checkpoint.PARAMS_DIR
RAW_ENTRY, EMA_ENTRY = "model", "model_ema"

# Depthwise Conv1d weight [E, 1, K] <-> kernel [K, E].
DEPTHWISE_CONV1D = Transform(
    "depthwise_conv1d",
    to_flax=lambda t, shapes: [t[:, 0, :].T],
    to_torch=lambda arrays: arrays[0].T[:, None, :],
    torch_shape=lambda shapes: (shapes[0][1], 1, shapes[0][0]),
)


def block_rows() -> list[Row]:
    """One MambaBlock (names relative to `blocks.{i}.`, in the official state-dict order)."""
    return [
        Row("norm.weight", "norm/scale"),
        Row("mixer.A_log", "mixer/A_log"),
        Row("mixer.D", "mixer/D"),
        Row("mixer.freq", "mixer/freq"),
        Row("mixer.conv1d.weight", "mixer/conv1d/kernel", DEPTHWISE_CONV1D),
        Row("mixer.conv1d.bias", "mixer/conv1d/bias"),
        Row("mixer.in_proj.weight", "mixer/in_proj/kernel", LINEAR),
        Row("mixer.x_proj.weight", "mixer/x_proj/kernel", LINEAR),
        Row("mixer.dt_proj.weight", "mixer/dt_proj/kernel", LINEAR),
        Row("mixer.dt_proj.bias", "mixer/dt_proj/bias"),
        Row("mixer.out_proj.weight", "mixer/out_proj/kernel", LINEAR),
    ]


def head_rows(name: str, kind: str) -> list[Row]:
    """`head` or `head2`: one Linear (IN1k_cls) or Linear, Tanh, Linear (the IN-22k heads)."""
    layers = [("", "")] if kind == "linear" else [("0.", "fc1/"), ("2.", "fc2/")]
    return [row for torch_part, flax_part in layers for row in (
        Row(f"{name}.{torch_part}weight", f"{name}/{flax_part}kernel", LINEAR),
        Row(f"{name}.{torch_part}bias", f"{name}/{flax_part}bias"))]


def rows(cfg: dan_lib.DANConfig) -> list[Row]:
    return ([Row("cls_token", "cls_token", unit_axes(2)),
             Row("patch_embed.proj.weight", "patch_embed/kernel", CONV_OIHW_TO_HWIO),
             Row("patch_embed.proj.bias", "patch_embed/bias")]
            + tables.prefixed(block_rows(), "blocks.{i}.", "blocks")
            + [Row("norm.weight", "norm/scale"), Row("norm.bias", "norm/bias")]
            + head_rows("head", cfg.head) + head_rows("head2", cfg.head))


def official_shapes(cfg: dan_lib.DANConfig) -> dict[str, tuple]:
    """Official name -> shape of every tensor, in state-dict order (from shapes only)."""
    return tables.expected_torch_shapes(rows(cfg), dan_lib.abstract_params(cfg))


def to_flax(state: Mapping[str, Any], cfg: dan_lib.DANConfig, source: str | None = None) -> dict:
    """Official state dict (numpy) -> DANClassifier params; every missing, unexpected or
    mis-shaped tensor is listed in one CheckpointError first."""
    return tables.convert_to_flax(rows(cfg), state, dan_lib.abstract_params(cfg), source)


def to_torch(params: Mapping, cfg: dan_lib.DANConfig) -> dict[str, np.ndarray]:
    """DANClassifier params (boxed or not) -> official state dict (numpy), in state-dict order."""
    return tables.convert_to_torch(rows(cfg), params, dan_lib.abstract_params(cfg))


def official_config(cfg: dan_lib.DANConfig):
    """The official model fields of `cfg` (`MODEL.*`, `MODEL.MAMBA.*`, the factory's embed_dim and
    patch size) as the PyTorch reference's DefocusMambaConfig: the model an export loads into."""
    from evejax.port.torch_ref.dan import DefocusMambaConfig

    m = cfg.mamba
    return DefocusMambaConfig(
        embed_dim=m.embed_dim, patch_size=cfg.patch_size, num_classes=cfg.num_classes, depth=cfg.depth,
        head_type="IN1k_cls" if cfg.head == "linear" else "IN22kto1k_cls", state_size=m.state_size,
        conv_kernel=m.conv_kernel, intermediate_size=m.intermediate_size, time_step_rank=m.time_step_rank,
        time_step_scale=m.time_step_scale, time_step_max=m.time_step_max, time_step_min=m.time_step_min,
        time_step_floor=m.time_step_floor, layer_norm_epsilon=cfg.block_norm_eps, norm_eps=cfg.norm_eps,
        group_norm_size=m.group_norm_size, rope_scale_factor=m.rope_scale_factor,
        delta_scale_factor=m.delta_scale_factor, patch_embed_change_res=cfg.patch_order == "windows")


# ---- the official .pth ----------------------------------------------------------------

def read_official(path: str | os.PathLike, ema: bool = False) -> dict[str, np.ndarray]:
    """The raw ('model') or EMA ('model_ema') weights of an official classification `.pth`, or
    the weights of a bare state dict (raw only), as numpy; read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    obj = io.read_torch_pickle(path)
    entries = sorted(map(str, obj)) if isinstance(obj, dict) else []
    bare = isinstance(obj, dict) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())
    entry = EMA_ENTRY if ema else RAW_ENTRY
    if bare and not ema:
        return io.tensors_to_numpy(obj)
    if not isinstance(obj, dict) or not isinstance(obj.get(entry), dict):
        hint = ("import it without --ema for its raw weights" if ema and RAW_ENTRY in entries
                else "expected an official De-focus Mamba checkpoint (entries 'model' and 'model_ema')")
        what = f"entries {entries}" if entries and not bare else ("a bare state dict" if bare else type(obj).__name__)
        raise CheckpointError(f"{path}: has no {entry!r} entry ({what}); {hint}")
    tensors = obj[entry]
    odd = sorted(k for k, v in tensors.items() if not hasattr(v, "shape"))
    if odd:
        raise CheckpointError(f"{path}: {entry!r} holds non-tensor entries {odd[:10]}")
    return io.tensors_to_numpy(tensors)


def _check_output(path: str | os.PathLike) -> None:
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a directory; give the .pth file to write, e.g. {Path(path) / 'model.pth'}")


def write_official(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                   ema_state: Mapping[str, np.ndarray] | None = None) -> Path:
    """{'model': state, 'model_ema': ema_state (default: state)} as float32 torch tensors,
    written beside `path` and swapped in whole (evejax.atomic)."""
    import torch

    _check_output(path)
    as_torch = lambda sd: {k: torch.tensor(np.asarray(v, np.float32)) for k, v in sd.items()}  # noqa: E731
    tensors = as_torch(state)
    ema = tensors if ema_state is None else as_torch(ema_state)
    return atomic.write_file(path, lambda tmp: torch.save({RAW_ENTRY: tensors, EMA_ENTRY: ema}, tmp))


# ---- evejax DAN checkpoints -----------------------------------------------------------

def config_to_json(cfg: dan_lib.DANConfig) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(cfg)}


def config_from_json(data: Mapping[str, Any], source: str = MODEL_JSON) -> dan_lib.DANConfig:
    data = lm_checkpoint.unwrap_format(data, FORMAT, VERSION, "De-focus Mamba", source)
    try:
        mamba = MambaConfig(**data.pop("mamba"))
        return dan_lib.DANConfig(**{**data, "image_size": tuple(data["image_size"]), "mamba": mamba}).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: fields do not match this evejax version ({e})") from None


def save_checkpoint(directory: str | os.PathLike, cfg: dan_lib.DANConfig, params: Any,
                    overwrite: bool = False) -> Path:
    return lm_checkpoint.write_checkpoint(directory, config_to_json(cfg), params, overwrite)


def load_checkpoint(directory: str | os.PathLike, shardings: Any = None) -> tuple[dan_lib.DANConfig, Any]:
    """(DANConfig, params) of an evejax De-focus Mamba checkpoint."""
    cfg = config_from_json(*lm_checkpoint.read_model_json(
        directory, "De-focus Mamba checkpoint", "create one with `evejax import --family dan`"))
    return cfg, lm_checkpoint.restore_params(directory, dan_lib.abstract_params(cfg), shardings)


def model_config(size: str, overrides: Mapping[str, Any] | None = None) -> dan_lib.DANConfig:
    try:
        cfg = dan_lib.get_config(size, **dict(overrides or {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return _official_backbone(cfg, f"size {size!r}")


def _official_backbone(cfg: dan_lib.DANConfig, what: str) -> dan_lib.DANConfig:
    """cfg when it is a De-focus Mamba: the only DAN backbone with an official release."""
    if cfg.backbone != "mamba":
        mamba = sorted(name for name, make in dan_lib.SIZES.items() if make().backbone == "mamba")
        raise CheckpointError(f"{what} is a De-focus ViT, which has no official release and so no official "
                              f"weights or names to import or export; use a De-focus Mamba size ({', '.join(mamba)})")
    return cfg


def read_class_map(path: str | os.PathLike) -> np.ndarray:
    """The source class index of each kept class, one integer a line (the official map22kto1k.txt:
    1000 lines of 22k indices; it repeats 11136, so two 1k classes get the same row)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"class map {path}: no such file")
    lines = path.read_text().split()
    bad = [(i + 1, text) for i, text in enumerate(lines) if not text.isdigit()]
    if bad or not lines:
        raise CheckpointError(f"class map {path} must hold one non-negative integer a line; "
                              + (f"line {bad[0][0]} is {bad[0][1]!r}" if bad else "it is empty"))
    return np.array([int(text) for text in lines], np.int64)


def keep_classes(state: Mapping[str, np.ndarray], classes: np.ndarray, source: str = "class map"
                 ) -> dict[str, np.ndarray]:
    """`state` with the output rows of `head` and `head2` (their last Linear) cut to `classes`."""
    last = [name for name in state if name.rsplit(".", 1)[0] in ("head", "head2", "head.2", "head2.2")]
    if not last:
        raise CheckpointError("the weights have no head to cut to a class map")
    out = dict(state)
    for name in last:
        rows = np.asarray(state[name]).shape[0]
        if classes.max() >= rows:
            raise CheckpointError(f"{source} names class {int(classes.max())}, but {name} has {rows} rows")
        out[name] = np.asarray(state[name])[classes]
    return out


def import_dan(src: str | os.PathLike, out_dir: str | os.PathLike, *, size: str, ema: bool = False,
               overrides: Mapping[str, Any] | None = None, overwrite: bool = False,
               class_map: str | os.PathLike | None = None) -> str:
    """Official `.pth` -> evejax DAN checkpoint in `out_dir`; returns a note. The config, the
    out_dir and every tensor are checked before anything is written. With `class_map` the heads
    keep the rows it names (`keep_classes`); num_classes must be its length."""
    cfg = model_config(size, overrides)
    if (Path(out_dir) / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; pass overwrite=True (--overwrite) to replace it")
    state = read_official(src, ema)
    if class_map is not None:
        classes = read_class_map(class_map)
        if len(classes) != cfg.num_classes:
            raise CheckpointError(f"class map {class_map} keeps {len(classes)} classes, but size {size!r} has "
                                  f"num_classes={cfg.num_classes}; --set num_classes={len(classes)}")
        state = keep_classes(state, classes, f"class map {class_map}")
    params = to_flax(state, cfg, source=f"{src} [{EMA_ENTRY if ema else RAW_ENTRY!r}]")
    save_checkpoint(out_dir, cfg, params, overwrite=overwrite)
    return (f"De-focus Mamba {size} ({cfg.depth} blocks, width {cfg.embed_dim}, {cfg.num_classes} classes), "
            f"{'EMA' if ema else 'raw'} weights -> {out_dir}")


def export_dan(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """evejax DAN checkpoint, or a training workdir that trains "dan" (its newest checkpoint's
    params, and its EMA as 'model_ema' when the run keeps one), -> the official `.pth` at `out`.
    Without an EMA both entries hold the params: the official loader would otherwise leave
    timm's ModelEma at its random init."""
    _check_output(out)
    ema = None
    if lm_checkpoint.is_workdir(src):
        _, cfg, params, _ = lm_checkpoint.load_workdir(src, model_name="dan")
        try:
            ema = lm_checkpoint.load_workdir(src, weights="ema_params")[2]
        except FileNotFoundError:
            pass
    else:
        cfg, params = load_checkpoint(src)
    torch_state = lambda p: to_torch(jax.tree.map(np.asarray, p), cfg)  # noqa: E731
    return write_official(torch_state(params), out, None if ema is None else torch_state(ema))


# ---- command line ---------------------------------------------------------------------

def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes FIELD=VALUE, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def import_main(argv) -> int:
    """`evejax import --family dan SRC.pth OUT_DIR --size NAME [--ema] [--set F=V ...] ...`."""
    p = argparse.ArgumentParser(prog="evejax import --family dan",
                                description="official De-focus Mamba .pth -> evejax DAN checkpoint")
    p.add_argument("--family", choices=("dan",), default="dan", help="dan (the dispatch in port.commands)")
    p.add_argument("src", help="official classification .pth (entries 'model', 'model_ema') or a bare state dict")
    p.add_argument("out_dir", help="evejax checkpoint directory to create")
    p.add_argument("--size", required=True, choices=sorted(dan_lib.SIZES),
                   help="evejax size the weights are for (the .pth carries no config)")
    p.add_argument("--ema", action="store_true", help="import the EMA weights ('model_ema') instead of 'model'")
    p.add_argument("--set", dest="overrides", action="append", type=_assignment, default=[], metavar="FIELD=VALUE",
                   help="a DANConfig / MambaConfig field, e.g. num_classes=21841, image_size=192, "
                        "rope_scale_factor=1.0 (repeatable)")
    p.add_argument("--class-map", help="keep the head rows this file names, one source class a line "
                   "(official classification/data/map22kto1k.txt: 22k pre-train -> 1k)")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the parameters are stored in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT_DIR")
    args = p.parse_args(argv)
    overrides = {**dict(args.overrides), "param_dtype": args.param_dtype}
    return run_command("import", lambda: print("evejax import: " + import_dan(
        args.src, args.out_dir, size=args.size, ema=args.ema, overrides=overrides, overwrite=args.overwrite,
        class_map=args.class_map)))


def export_main(argv) -> int:
    """`evejax export DAN_CKPT OUT.pth`."""
    p = argparse.ArgumentParser(prog="evejax export (De-focus Mamba checkpoint)",
                                description="evejax DAN checkpoint or workdir -> official .pth {'model', 'model_ema'}")
    p.add_argument("src", help="evejax DAN checkpoint directory or training workdir (its newest checkpoint)")
    p.add_argument("out", help=".pth file to write (replaced whole if it exists)")
    args = p.parse_args(argv)
    return run_command("export", lambda: print(
        f"evejax export: De-focus Mamba weights as 'model' and 'model_ema' -> {export_dan(args.src, args.out)}"))
