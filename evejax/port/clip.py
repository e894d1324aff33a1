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
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from evejax.models.vit import ClipViT, ClipViTConfig, clip_vit
from evejax.port import tables
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
