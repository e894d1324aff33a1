"""HF `CLIPVisionModel` <-> `evejax.models.vit.ClipViT`: one name table, both directions.

`rows()` is data for the shared machinery in `evejax.port.tables`: each row
maps an HF name (relative to the `vision_model.` scope; `{i}` = layer index)
to a Flax param path through a named, invertible transform. Layer rows are
stacked on axis 0 of the Flax param (the scanned stack's `layers` axis).

Full HF names are `prefix + "vision_model." + row` (`vision_model=True`, the
layout of hub checkpoints such as openai/clip-vit-large-patch14-336 and of
transformers < 5 state dicts) or `prefix + row` (`vision_model=False`, the
in-memory `CLIPVisionModel.state_dict()` of transformers 5, which strips the
scope on load). EVE's teacher lives under `prefix="model.vision_clip.backbone."`.

Arrays are numpy in both directions; PyTorch layouts: Linear weight [out, in],
Conv2d weight [D, C, p, p] (OIHW); Flax: kernel [in, out], conv kernel
[p, p, C, D] (HWIO), attention kernels split into heads ([D, N, H], [N, H, D]).

A standalone evejax CLIP checkpoint (what EVE's stage 1 imports as its `clip`
teacher with `stage.start.path="...,clip=DIR"`):

    DIR/model.json   the ClipViTConfig, format "evejax.clip"
    DIR/params/      the ClipViT parameter tree (Orbax)

    evejax import --family clip SRC OUT_DIR [--config config.json] [--param-dtype D] [--overwrite]
        SRC: a HF CLIPVisionModel or CLIPModel directory (e.g. a download of
        openai/clip-vit-large-patch14-336), shard index or weight file; the
        config is --config, else SRC's config.json (a CLIPConfig's
        vision_config is used). The text tower and projections are left out.
    evejax export CLIP_CKPT OUT_DIR [--dtype D] [--max-shard-size 5GB]
        config.json + safetensors loadable by transformers.CLIPVisionModel.

`save_checkpoint` / `load_checkpoint(dir, shardings=None) -> (cfg, params)`,
`import_clip` / `export_clip` are the same steps as functions.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from evejax.models.vit import ClipViT, ClipViTConfig, clip_vit
from evejax.nn.transformer import TransformerConfig
from evejax.port import checkpoint as lm_checkpoint
from evejax.port import io, tables
from evejax.port.command_line import export_command, export_parser, import_command, import_parser
from evejax.port.io import CheckpointError
from evejax.port.tables import FLAT_BIAS, LINEAR, LINEAR_FROM_HEADS, Row, Transform

CONV_OIHW_TO_HWIO = Transform(
    "conv_oihw_to_hwio",
    to_flax=lambda t, shapes: [t.transpose(2, 3, 1, 0)],
    to_torch=lambda arrays: arrays[0].transpose(3, 2, 0, 1),
    torch_shape=lambda shapes: (shapes[0][3], shapes[0][2], shapes[0][0], shapes[0][1]),
)


def _layer_rows() -> list[Row]:
    """One HF CLIPEncoderLayer (names relative to `encoder.layers.{i}.`)."""
    rows = []
    for name, path in (("q", "query"), ("k", "key"), ("v", "value")):
        rows += [Row(f"self_attn.{name}_proj.weight", f"attention/{path}/kernel", LINEAR),
                 Row(f"self_attn.{name}_proj.bias", f"attention/{path}/bias", FLAT_BIAS)]
    return rows + [
        Row("self_attn.out_proj.weight", "attention/out/kernel", LINEAR_FROM_HEADS),
        Row("self_attn.out_proj.bias", "attention/out/bias"),
        Row("layer_norm1.weight", "attention_norm/scale"),
        Row("layer_norm1.bias", "attention_norm/bias"),
        Row("mlp.fc1.weight", "mlp/wi/kernel", LINEAR),
        Row("mlp.fc1.bias", "mlp/wi/bias"),
        Row("mlp.fc2.weight", "mlp/wo/kernel", LINEAR),
        Row("mlp.fc2.bias", "mlp/wo/bias"),
        Row("layer_norm2.weight", "mlp_norm/scale"),
        Row("layer_norm2.bias", "mlp_norm/bias"),
    ]


def rows(*, prefix: str = "", vision_model: bool = True) -> list[Row]:
    """The whole CLIPVisionModel table, HF names under `_scope(prefix, vision_model)`."""
    table = ([Row("embeddings.class_embedding", "class_embedding"),
              Row("embeddings.patch_embedding.weight", "patch_embedding/kernel", CONV_OIHW_TO_HWIO),
              Row("embeddings.position_embedding.weight", "position_embedding"),
              Row("pre_layrnorm.weight", "pre_norm/scale"),
              Row("pre_layrnorm.bias", "pre_norm/bias")]
             + tables.prefixed(_layer_rows(), "encoder.layers.{i}.", "encoder/layers")
             + [Row("post_layernorm.weight", "post_norm/scale"),
                Row("post_layernorm.bias", "post_norm/bias")])
    return tables.prefixed(table, _scope(prefix, vision_model))


# A non-persistent buffer that older transformers versions still saved.
_IGNORED = "embeddings.position_ids"


def _scope(prefix: str, vision_model: bool) -> str:
    return prefix + ("vision_model." if vision_model else "")


def abstract_params(cfg: ClipViTConfig) -> dict:
    """ClipViT's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    from evejax.sharding import unbox

    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return unbox(jax.eval_shape(lambda x: ClipViT(cfg).init(jax.random.PRNGKey(0), x), pixels))["params"]


def torch_shapes(cfg: ClipViTConfig, *, prefix: str = "", vision_model: bool = True) -> dict[str, tuple]:
    """Full HF name -> shape of every tensor `cfg` needs, in state-dict order."""
    return tables.expected_torch_shapes(rows(prefix=prefix, vision_model=vision_model), abstract_params(cfg))


def to_flax(state_dict: Mapping[str, Any], cfg: ClipViTConfig, *, prefix: str = "",
            vision_model: bool = True) -> dict:
    """HF tensors -> the `params` tree of `ClipViT(cfg)` (nested dicts of numpy arrays).

    Only names under `prefix (+ "vision_model.")` are read, so a whole CLIPModel
    or EVE checkpoint can be passed; inside that scope every tensor must match
    the table (the `position_ids` buffer excepted), or CheckpointError lists
    all missing, unexpected and mis-shaped names.
    """
    scope = _scope(prefix, vision_model)
    scoped = {k: v for k, v in state_dict.items() if k.startswith(scope) and k != scope + _IGNORED}
    return tables.convert_to_flax(rows(prefix=prefix, vision_model=vision_model), scoped,
                                  abstract_params(cfg), source=f"the CLIP vision tower {scope!r}")


def to_torch(params: Mapping[str, Any], cfg: ClipViTConfig, *, prefix: str = "",
             vision_model: bool = True) -> dict[str, np.ndarray]:
    """The `params` tree of `ClipViT(cfg)` (boxed or not) -> HF state dict (numpy).

    The tree must hold exactly the model's paths and shapes; otherwise
    CheckpointError lists every difference.
    """
    return tables.convert_to_torch(rows(prefix=prefix, vision_model=vision_model), params,
                                   abstract_params(cfg))


# HF `hidden_act` <-> our activation names (evejax.nn.layers.ACTIVATIONS).
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
# CLIPVisionConfig's defaults, for hub configs that leave a field out.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5)


def hf_config(cfg: ClipViTConfig) -> dict:
    """The `config.json` dict of an HF `CLIPVisionModel` with `cfg`'s shapes."""
    t = cfg.transformer
    act = {ours: hf for hf, ours in _HF_ACTS.items()}.get(t.mlp_act)
    if act is None:
        raise CheckpointError(f"mlp_act {t.mlp_act!r} has no HF CLIP equivalent; use one of {sorted(_HF_ACTS.values())}")
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": t.embed_dim,
        "intermediate_size": t.mlp_dim,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": act,
        "layer_norm_eps": t.norm_eps,
        "attention_dropout": 0.0,
    }


def from_hf_config(hf: Mapping[str, Any], **overrides) -> ClipViTConfig:
    """A ClipViTConfig from a CLIPVisionConfig dict, or a CLIPConfig dict (its `vision_config`).

    `overrides` set TransformerConfig fields HF does not carry (dtype, remat, ...).
    """
    hf = {**_HF_DEFAULTS, **hf.get("vision_config", hf)}
    if hf["hidden_act"] not in _HF_ACTS:
        raise CheckpointError(f"CLIP hidden_act {hf['hidden_act']!r} is not supported; use one of {sorted(_HF_ACTS)}")
    cfg = clip_vit(hf["image_size"], hf["patch_size"], hf["hidden_size"], hf["num_hidden_layers"],
                   hf["num_attention_heads"], hf["intermediate_size"], mlp_act=_HF_ACTS[hf["hidden_act"]],
                   norm_eps=hf["layer_norm_eps"])
    cfg = cfg.replace(num_channels=hf["num_channels"], **overrides)
    return cfg.validate()


# ---- evejax CLIP checkpoints ----------------------------------------------------------

MODEL_JSON, PARAMS_DIR = lm_checkpoint.MODEL_JSON, lm_checkpoint.PARAMS_DIR
FORMAT = "evejax.clip"
VERSION = 1
# config.json model_type of the HF models whose vision tower import reads.
_HF_MODEL_TYPES = ("clip", "clip_vision_model")
_VISION_SCOPE = _scope("", True)


def config_to_json(cfg: ClipViTConfig) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(cfg)}


def config_from_json(data: Mapping[str, Any], source: str = MODEL_JSON) -> ClipViTConfig:
    data = lm_checkpoint.unwrap_format(data, FORMAT, VERSION, "CLIP", source)
    try:
        return ClipViTConfig(**{**data, "transformer": TransformerConfig(**data.get("transformer", {}))}).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: fields do not match this evejax version ({e})") from None


def save_checkpoint(directory: str | os.PathLike, cfg: ClipViTConfig, params: Any,
                    overwrite: bool = False) -> Path:
    """Writes model.json and params/ (Orbax) into `directory`; returns it."""
    return lm_checkpoint.write_checkpoint(directory, config_to_json(cfg), params, overwrite)


def load_checkpoint(directory: str | os.PathLike, shardings: Any = None) -> tuple[ClipViTConfig, Any]:
    """(ClipViTConfig, params) of an evejax CLIP checkpoint; params on one device unless
    `shardings` (a tree like the params) places them, e.g. on EVE's `clip` shardings."""
    cfg = config_from_json(*lm_checkpoint.read_model_json(
        directory, "CLIP checkpoint", "create one with `evejax import --family clip`"))
    return cfg, lm_checkpoint.restore_params(directory, abstract_params(cfg), shardings)


def import_clip(src: str | os.PathLike, out_dir: str | os.PathLike, *, config: str | os.PathLike | None = None,
                param_dtype: str = "float32", overwrite: bool = False) -> str:
    """HF CLIPVisionModel / CLIPModel weights -> evejax CLIP checkpoint in `out_dir`; returns a note.

    The weights may carry the `vision_model.` scope (hub checkpoints, CLIPModel,
    transformers < 5) or not (CLIPVisionModel saved by transformers 5); names
    outside the scope are left out. Everything is checked before anything is written.
    """
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    config_path = Path(config) if config else (src if src.is_dir() else src.parent) / io.CONFIG_NAME
    hf = io.load_config_json(config_path)
    if hf.get("model_type", "clip") not in _HF_MODEL_TYPES:
        raise CheckpointError(f"{config_path}: model_type {hf['model_type']!r} is not a CLIP model "
                              f"(expected one of {_HF_MODEL_TYPES})")
    if (Path(out_dir) / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; pass overwrite=True (--overwrite) "
                              "to replace it")
    cfg = from_hf_config(hf, param_dtype=param_dtype)
    state = io.load_state_dict(src)
    vision_model = any(k.startswith(_VISION_SCOPE) for k in state)
    left_out = sum(not k.startswith(_VISION_SCOPE) for k in state) if vision_model else 0
    params = to_flax(state, cfg, vision_model=vision_model)
    del state
    save_checkpoint(out_dir, cfg, params, overwrite=overwrite)
    t = cfg.transformer
    note = (f"CLIP vision tower ({t.num_layers} layers, width {t.embed_dim}, {cfg.image_size} px / patch "
            f"{cfg.patch_size}) -> {out_dir}")
    return note + (f"; left out {left_out} tensors outside {_VISION_SCOPE}*" if left_out else "")


def export_clip(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """evejax CLIP checkpoint -> out_dir/config.json + safetensors (hub names, `vision_model.*`)."""
    cfg, params = load_checkpoint(src)
    config = {**hf_config(cfg), "torch_dtype": dtype}  # refuses configs with no HF form before writing
    state = to_torch(jax.tree.map(np.asarray, params), cfg)
    del params
    return io.save_hf_checkpoint(state, config, out_dir, family="clip", dtype=dtype,
                                 max_shard_bytes=max_shard_bytes)


def import_main(argv) -> int:
    """`evejax import --family clip SRC OUT_DIR [--config C] [--param-dtype D] [--overwrite]`."""
    return import_command(argv, import_parser(
        "clip", "HF CLIP vision tower -> evejax CLIP checkpoint",
        "HF CLIPVisionModel or CLIPModel directory, shard index or weight file",
        config_help="config.json (CLIPVisionConfig or CLIPConfig) instead of SRC's"), import_clip)


def export_main(argv) -> int:
    """`evejax export CLIP_CKPT OUT_DIR [--dtype D] [--max-shard-size 5GB]`."""
    return export_command(argv, export_parser("CLIP", "evejax CLIP checkpoint -> HF CLIPVisionModel layout",
                                              "evejax CLIP checkpoint directory"), export_clip, "CLIPVisionModel")
