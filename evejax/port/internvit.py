"""InternVL's vision side <-> `evejax.models.vit.InternVLTeacher`: one name table, both directions.

Two official layouts are read and written (names in `evejax.port.torch_ref.internvit`):

- an InternVL checkpoint (InternVL2-2B): `vision_model.*` (InternViT-300M-448px) and `mlp1.*`
  (the projector into the LLM's input space); `language_model.*` and anything else outside
  those scopes is left out, counted in the note;
- a bare `InternVisionModel` (the InternViT-300M-448px repository): the same vision names with
  no `vision_model.` scope and no projector; the teacher then has `llm_dim=None` and reads
  InternVL2's vision path (last layer, pixel shuffle 0.5, ps_version "v2").

Shapes (D width, N heads, H head dim, C channels, p patch, P patches, F MLP, E llm width):

    embeddings.class_embedding [1, 1, D]            <-> class_embedding [D]
    embeddings.patch_embedding.weight [D, C, p, p]  <-> patch_embedding/kernel [p, p, C, D]
    embeddings.position_embedding [1, 1 + P, D]     <-> position_embedding [1 + P, D]
    encoder.layers.{i}.attn.qkv.weight [3 N H, D]   <-> attention/{query,key,value}/kernel [D, N, H]
        (rows: q | k | v, each head-major; the bias [3 N H] likewise <-> [N, H] each)
    encoder.layers.{i}.ls1 / ls2 [D]                <-> {attention,mlp}_layer_scale [D]
    mlp1.1.weight [E, 4D], mlp1.3.weight [E, E]     <-> mlp1/fc1, mlp1/fc2 kernels (transposed)

An evejax InternVL teacher checkpoint:

    DIR/model.json   the InternVLTeacherConfig, format "evejax.internvl"
    DIR/params/      the InternVLTeacher parameter tree (Orbax)

    evejax import --family internvit SRC OUT_DIR [--config config.json] [--param-dtype D] [--overwrite]
        SRC: an InternVL (e.g. InternVL2-2B) or InternViT-300M-448px directory, shard index
        or weight file; the config is --config, else SRC's config.json.
    evejax export INTERNVL_CKPT OUT_DIR [--dtype D] [--max-shard-size 5GB]
        safetensors + config.json in the layout it came from: with a projector, the
        `vision_model.*` + `mlp1.*` tensors of an InternVL checkpoint (its config.json carries
        the vision fields and llm_config.hidden_size only: merge them into a full InternVL
        checkpoint to load it as InternVLChatModel); without, an InternVisionModel directory
        for the official remote code.

`to_flax` / `to_torch` convert in memory; `import_internvit` / `export_internvit` are the
commands as functions.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from evejax.models.vit import InternViTConfig, InternVLTeacher, InternVLTeacherConfig, intern_vit
from evejax.nn.transformer import TransformerConfig
from evejax.port import checkpoint as lm_checkpoint
from evejax.port import io, tables
from evejax.port.clip import CONV_OIHW_TO_HWIO
from evejax.port.command_line import export_command, export_parser, import_command, import_parser
from evejax.port.io import CheckpointError
from evejax.port.tables import LINEAR, LINEAR_FROM_HEADS, Row, Transform, unit_axes


def _qkv_to_flax(t, shapes):
    # weight [3 N H, D] -> three [N H, D] -> [D, N, H]; bias [3 N H] -> three [N, H]
    return [np.moveaxis(part, 0, -1).reshape(shape) for part, shape in zip(t.reshape(3, -1, *t.shape[1:]), shapes)]


def _qkv_to_torch(arrays):
    return np.concatenate([np.moveaxis(a.reshape(*a.shape[:-2], -1), -1, 0) for a in arrays], axis=0)


# InternAttention's fused projection: q, k and v stacked whole (not grouped per head).
STACKED_QKV = Transform("stacked_qkv", to_flax=_qkv_to_flax, to_torch=_qkv_to_torch,
                        torch_shape=lambda shapes: (3 * shapes[0][-2] * shapes[0][-1], *shapes[0][:-2]))

VISION_SCOPE, PROJECTOR_SCOPE = "vision_model.", "mlp1."


def _layer_rows(t: TransformerConfig) -> list[Row]:
    """One InternVisionEncoderLayer (names relative to `encoder.layers.{i}.`, in state-dict order)."""
    qkv = lambda leaf: tuple(f"attention/{name}/{leaf}" for name in ("query", "key", "value"))  # noqa: E731
    return [
        Row("ls1", "attention_layer_scale"),
        Row("ls2", "mlp_layer_scale"),
        Row("attn.qkv.weight", qkv("kernel"), STACKED_QKV),
        *([Row("attn.qkv.bias", qkv("bias"), STACKED_QKV)] if t.qkv_bias else []),
        Row("attn.proj.weight", "attention/out/kernel", LINEAR_FROM_HEADS),
        Row("attn.proj.bias", "attention/out/bias"),
        Row("mlp.fc1.weight", "mlp/wi/kernel", LINEAR),
        Row("mlp.fc1.bias", "mlp/wi/bias"),
        Row("mlp.fc2.weight", "mlp/wo/kernel", LINEAR),
        Row("mlp.fc2.bias", "mlp/wo/bias"),
        Row("norm1.weight", "attention_norm/scale"),
        Row("norm1.bias", "attention_norm/bias"),
        Row("norm2.weight", "mlp_norm/scale"),
        Row("norm2.bias", "mlp_norm/bias"),
    ]


def vision_rows(t: TransformerConfig) -> list[Row]:
    """InternVisionModel (names without a scope) <-> InternViT."""
    return ([Row("embeddings.class_embedding", "class_embedding", unit_axes(2)),
             Row("embeddings.position_embedding", "position_embedding", unit_axes(1)),
             Row("embeddings.patch_embedding.weight", "patch_embedding/kernel", CONV_OIHW_TO_HWIO),
             Row("embeddings.patch_embedding.bias", "patch_embedding/bias")]
            + tables.prefixed(_layer_rows(t), "encoder.layers.{i}.", "encoder/layers"))


def rows(cfg: InternVLTeacherConfig) -> list[Row]:
    """The whole table: with a projector the InternVL names (`vision_model.*`, `mlp1.*`), else
    the bare InternVisionModel names."""
    vision = vision_rows(cfg.vit.transformer)
    if cfg.llm_dim is None:
        return tables.prefixed(vision, "", "vision_model")
    return tables.prefixed(vision, VISION_SCOPE, "vision_model") + [
        Row("mlp1.0.weight", "mlp1/norm/scale"),
        Row("mlp1.0.bias", "mlp1/norm/bias"),
        Row("mlp1.1.weight", "mlp1/fc1/kernel", LINEAR),
        Row("mlp1.1.bias", "mlp1/fc1/bias"),
        Row("mlp1.3.weight", "mlp1/fc2/kernel", LINEAR),
        Row("mlp1.3.bias", "mlp1/fc2/bias"),
    ]


def abstract_params(cfg: InternVLTeacherConfig) -> dict:
    """InternVLTeacher's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    from evejax.sharding import unbox

    v = cfg.vit
    pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return unbox(jax.eval_shape(lambda x: InternVLTeacher(cfg).init(jax.random.PRNGKey(0), x), pixels))["params"]


def param_count(cfg: InternVLTeacherConfig) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params(cfg)))


def torch_shapes(cfg: InternVLTeacherConfig) -> dict[str, tuple]:
    """Official name -> shape of every tensor `cfg` needs, in state-dict order."""
    return tables.expected_torch_shapes(rows(cfg), abstract_params(cfg))


def _in_scope(cfg: InternVLTeacherConfig, name: str) -> bool:
    return cfg.llm_dim is None or name.startswith((VISION_SCOPE, PROJECTOR_SCOPE))


def to_flax(state_dict: Mapping[str, Any], cfg: InternVLTeacherConfig, source: str | None = None) -> dict:
    """Official tensors -> the `params` tree of `InternVLTeacher(cfg)` (numpy).

    With a projector only `vision_model.*` and `mlp1.*` are read (a whole InternVL checkpoint
    can be passed); inside them, or in a bare InternVisionModel state dict, every tensor must
    match the table, or CheckpointError lists all missing, unexpected and mis-shaped names.
    """
    scoped = {k: v for k, v in state_dict.items() if _in_scope(cfg, k)}
    return tables.convert_to_flax(rows(cfg), scoped, abstract_params(cfg),
                                  source=source or "the InternVL vision tensors")


def to_torch(params: Mapping[str, Any], cfg: InternVLTeacherConfig) -> dict[str, np.ndarray]:
    """The `params` tree of `InternVLTeacher(cfg)` (boxed or not) -> official state dict (numpy)."""
    return tables.convert_to_torch(rows(cfg), params, abstract_params(cfg))


# ---- config.json <-> InternVLTeacherConfig -----------------------------------------------

def _vision_config(hf: Mapping[str, Any]):
    from evejax.port.torch_ref.internvit import InternVisionConfig

    try:
        return InternVisionConfig.from_hf_config_dict(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json is not a supported InternViT config: {e}") from None


def from_hf_config(hf: Mapping[str, Any], **overrides) -> InternVLTeacherConfig:
    """An InternVLChatConfig dict (vision_config + llm_config.hidden_size + the feature-path
    fields, official defaults for missing ones) or a bare InternVisionConfig dict (no projector).
    `overrides` set TransformerConfig fields HF does not carry (dtype, param_dtype, ...)."""
    from evejax.port.torch_ref.internvit import InternVLVisionConfig

    if "vision_config" not in hf:  # a bare InternVisionModel: InternVL2's path, no projector
        ref, llm_dim, path = _vision_config(hf), None, {}
    else:
        ref = _vision_config(hf["vision_config"])
        llm = hf.get("llm_config") or {}
        if "hidden_size" not in llm:
            raise CheckpointError("config.json: an InternVL config needs llm_config.hidden_size (the projector's "
                                  "output width)")
        names = {f.name for f in dataclasses.fields(InternVLVisionConfig)} - {"vision", "llm_hidden_size"}
        chat = InternVLVisionConfig(ref, llm["hidden_size"], **{k: hf[k] for k in names if k in hf})
        if chat.force_image_size not in (None, ref.image_size):
            raise CheckpointError(f"config.json: force_image_size={chat.force_image_size} differs from the vision "
                                  f"image_size={ref.image_size}; resized position embeddings are not supported")
        llm_dim = int(chat.llm_hidden_size)
        path = dict(select_layer=int(chat.select_layer), downsample_ratio=float(chat.downsample_ratio),
                    ps_version=chat.ps_version)
    vit = intern_vit(ref.image_size, ref.patch_size, ref.hidden_size, ref.num_hidden_layers,
                     ref.num_attention_heads, ref.intermediate_size, norm_eps=float(ref.layer_norm_eps),
                     qkv_bias=bool(ref.qkv_bias), layer_scale_init=float(ref.initializer_factor))
    cfg = InternVLTeacherConfig(dataclasses.replace(vit, num_channels=ref.num_channels), llm_dim=llm_dim, **path)
    try:
        return (cfg.replace(**overrides) if overrides else cfg).validate()
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def hf_config(cfg: InternVLTeacherConfig) -> dict:
    """The config.json of the layout `to_torch` writes (see the module docstring)."""
    from evejax.port.torch_ref.internvit import InternVisionConfig

    v, t = cfg.vit, cfg.vit.transformer
    vision = InternVisionConfig(
        num_channels=v.num_channels, patch_size=v.patch_size, image_size=v.image_size, qkv_bias=t.qkv_bias,
        hidden_size=t.embed_dim, num_attention_heads=t.num_heads, intermediate_size=t.mlp_dim,
        qk_normalization=False, num_hidden_layers=t.num_layers, hidden_act="gelu", norm_type="layer_norm",
        layer_norm_eps=t.norm_eps, initializer_factor=t.layer_scale_init).to_hf_config_dict()
    if cfg.llm_dim is None:
        return vision
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "vision_config": vision,
            "llm_config": {"hidden_size": cfg.llm_dim}, "select_layer": cfg.select_layer,
            "downsample_ratio": cfg.downsample_ratio, "ps_version": cfg.ps_version,
            "force_image_size": v.image_size}


# ---- evejax InternVL teacher checkpoints --------------------------------------------------

MODEL_JSON, PARAMS_DIR = lm_checkpoint.MODEL_JSON, lm_checkpoint.PARAMS_DIR
FORMAT = "evejax.internvl"
VERSION = 1


def config_to_json(cfg: InternVLTeacherConfig) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(cfg)}


def config_from_json(data: Mapping[str, Any], source: str = MODEL_JSON) -> InternVLTeacherConfig:
    data = lm_checkpoint.unwrap_format(data, FORMAT, VERSION, "InternVL teacher", source)
    try:
        vit = dict(data.pop("vit"))
        vit = InternViTConfig(**{**vit, "transformer": TransformerConfig(**vit.get("transformer", {}))})
        return InternVLTeacherConfig(vit=vit, **data).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: fields do not match this evejax version ({e})") from None


def save_checkpoint(directory: str | os.PathLike, cfg: InternVLTeacherConfig, params: Any,
                    overwrite: bool = False) -> Path:
    return lm_checkpoint.write_checkpoint(directory, config_to_json(cfg), params, overwrite)


def load_checkpoint(directory: str | os.PathLike, shardings: Any = None) -> tuple[InternVLTeacherConfig, Any]:
    """(InternVLTeacherConfig, params) of an evejax InternVL teacher checkpoint."""
    cfg = config_from_json(*lm_checkpoint.read_model_json(
        directory, "InternVL teacher checkpoint", "create one with `evejax import --family internvit`"))
    return cfg, lm_checkpoint.restore_params(directory, abstract_params(cfg), shardings)


def import_internvit(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                     config: str | os.PathLike | None = None, param_dtype: str = "float32",
                     overwrite: bool = False) -> str:
    """InternVL / InternViT weights -> evejax InternVL teacher checkpoint in `out_dir`; returns a note.
    Everything is checked before anything is written."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    config_path = Path(config) if config else (src if src.is_dir() else src.parent) / io.CONFIG_NAME
    cfg = from_hf_config(io.load_config_json(config_path), param_dtype=param_dtype)
    if (Path(out_dir) / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; pass overwrite=True (--overwrite) "
                              "to replace it")
    state = io.load_state_dict(src)
    left_out = sum(not _in_scope(cfg, k) for k in state)
    params = to_flax(state, cfg, source=str(src))
    del state
    save_checkpoint(out_dir, cfg, params, overwrite=overwrite)
    t = cfg.vit.transformer
    what = "InternViT + mlp1 projector" if cfg.llm_dim else "InternViT (no projector)"
    note = (f"{what} ({t.num_layers} layers, width {t.embed_dim}, {cfg.vit.image_size} px -> "
            f"{cfg.num_tokens} tokens x {cfg.feature_dim}) -> {out_dir}")
    return note + (f"; left out {left_out} tensors outside {VISION_SCOPE}* and {PROJECTOR_SCOPE}*"
                   if left_out else "")


def export_internvit(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                     max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """evejax InternVL teacher checkpoint -> out_dir/config.json + safetensors (official names)."""
    cfg, params = load_checkpoint(src)
    state = to_torch(jax.tree.map(np.asarray, params), cfg)
    del params
    return io.save_hf_checkpoint(state, {**hf_config(cfg), "torch_dtype": dtype}, out_dir, family="internvit",
                                 dtype=dtype, max_shard_bytes=max_shard_bytes)


def import_main(argv) -> int:
    """`evejax import --family internvit SRC OUT_DIR [--config C] [--param-dtype D] [--overwrite]`."""
    return import_command(argv, import_parser(
        "internvit", "InternVL vision side (InternViT + mlp1) -> evejax InternVL teacher",
        "InternVL or InternViT directory, shard index or weight file",
        config_help="config.json (InternVLChatConfig or InternVisionConfig) instead of SRC's"), import_internvit)


def export_main(argv) -> int:
    """`evejax export INTERNVL_CKPT OUT_DIR [--dtype D] [--max-shard-size 5GB]`."""
    return export_command(argv, export_parser("InternVL teacher",
                                              "evejax InternVL teacher checkpoint -> official InternVL names",
                                              "evejax InternVL teacher checkpoint directory"),
                          export_internvit, "InternVL vision side")
