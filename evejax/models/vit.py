"""Vision transformers on the shared core: the CLIP vision tower (EVE's PAL teacher).

`ClipViT` reproduces HF `CLIPVisionModel` (openai/clip-vit-large-patch14-336):

  pixel_values [B, S, S, C] float (NHWC, CLIP-normalised; S = image_size)
  -> patches: conv p x p, stride p, no bias   [B, P, D]   (P = (S / p)^2, row-major)
  -> [CLS, patches] + position_embedding      [B, 1 + P, D]
  -> pre_norm (HF `pre_layrnorm`)
  -> encoder: L pre-norm layers (LayerNorm eps 1e-5, bidirectional attention,
     no RoPE, quick_gelu MLP, biases on q/k/v/out and both MLP matmuls)
  -> last_hidden_state [B, 1 + P, D] (no norm, as HF),
     pooler_output = post_norm(last_hidden_state[:, 0]) [B, D].

With `return_hidden=True` also `hidden_states` [L + 1, B, 1 + P, D] in the HF
convention: 0 = embeddings after `pre_norm`, k = output of layer k (so
index L = last_hidden_state, and EVE's teacher features are
`hidden_states[-2][:, 1:]`).

Parameters (Flax paths, stacked layers on axis 0; N heads, H = D / N, F mlp):
  patch_embedding/kernel [p, p, C, D] (HWIO); class_embedding [D];
  position_embedding [1 + P, D]; pre_norm/{scale,bias} [D];
  encoder/layers/{attention_norm,mlp_norm}/{scale,bias} [L, D];
  encoder/layers/attention/{query,key,value}/kernel [L, D, N, H], .../bias [L, N, H];
  encoder/layers/attention/out/kernel [L, N, H, D], .../bias [L, D];
  encoder/layers/mlp/wi/{kernel [L, D, F], bias [L, F]};
  encoder/layers/mlp/wo/{kernel [L, F, D], bias [L, D]};
  post_norm/{scale,bias} [D].
`evejax.port.clip` maps these to and from the HF names.

`ClipClassifier`: pixel_values [B, S, S, C] -> logits [B, num_classes] float32,
a linear `head` on the pooled output of a ClipViT named `clip` (so its
parameters drop into EVE's `clip` teacher slot as they are); trains a small
teacher from class labels when no pre-trained CLIP fits.

Position embeddings are not interpolated: an input of another size raises.
(HF interpolates bicubically with PyTorch's kernel, which `jax.image.resize`
does not reproduce exactly, and EVE always feeds the teacher 336 x 336.)
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from evejax.nn.layers import Dense, LayerNorm, constrain, default_kernel_init, param_with_axes
from evejax.nn.transformer import TransformerConfig, TransformerStack


@dataclasses.dataclass(frozen=True)
class ClipViTConfig:
    image_size: int
    patch_size: int
    transformer: TransformerConfig
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def replace(self, **kw) -> "ClipViTConfig":
        t_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        t_kw = {k: v for k, v in kw.items() if k in t_fields}
        own = {k: v for k, v in kw.items() if k not in t_fields}
        unknown = set(own) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"CLIP ViT config has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, transformer=self.transformer.replace(**t_kw), **own)

    def validate(self) -> "ClipViTConfig":
        t = self.transformer
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if t.num_heads * t.head_dim != t.embed_dim:
            raise ValueError(f"num_heads={t.num_heads} x head_dim={t.head_dim} != embed_dim={t.embed_dim}")
        if t.causal or t.rope_base is not None or t.norm != "layer" or t.mlp_gated:
            raise ValueError("a CLIP ViT needs causal=False, rope_base=None, norm='layer', mlp_gated=False")
        return self


def clip_vit(image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp: int,
             **kw) -> ClipViTConfig:
    """A CLIP vision config; `kw` overrides TransformerConfig fields (dtype, remat, ...)."""
    fields = dict(
        num_layers=layers, embed_dim=width, num_heads=heads, num_kv_heads=heads,
        head_dim=width // heads, mlp_dim=mlp, mlp_act="quick_gelu", mlp_gated=False, mlp_bias=True,
        norm="layer", norm_eps=1e-5, qkv_bias=True, out_bias=True, causal=False, rope_base=None)
    t = TransformerConfig(**{**fields, **kw})
    return ClipViTConfig(image_size=image_size, patch_size=patch_size, transformer=t)


CLIP_SIZES = {
    # openai/clip-vit-large-patch14-336, EVE's PAL teacher (reference/eve.md §1.3).
    "L/14-336": lambda: clip_vit(336, 14, 1024, 24, 16, 4096),
    "tiny": lambda: clip_vit(16, 4, 32, 2, 4, 64),
}


def get_clip_config(size: str, **overrides) -> ClipViTConfig:
    if size not in CLIP_SIZES:
        raise ValueError(f"CLIP ViT size {size!r} is not known; use one of {sorted(CLIP_SIZES)}")
    cfg = CLIP_SIZES[size]()
    return (cfg.replace(**overrides) if overrides else cfg).validate()


class ClipViTOutput(NamedTuple):
    last_hidden_state: jax.Array           # [B, 1 + P, D]
    pooler_output: jax.Array               # [B, D]
    hidden_states: Optional[jax.Array]     # [L + 1, B, 1 + P, D] or None


class ClipViT(nn.Module):
    """pixel_values [B, S, S, C] -> ClipViTOutput (see the module docstring)."""
    cfg: ClipViTConfig

    @nn.compact
    def __call__(self, pixel_values, *, return_hidden: bool = False, deterministic: bool = True):
        cfg = self.cfg.validate()
        t = cfg.transformer
        dtype, pdtype = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        b, height, width, channels = pixel_values.shape
        if (height, width, channels) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"CLIP ViT expects pixel_values [B, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.num_channels}] (NHWC), got {tuple(pixel_values.shape)}; resize or pad the "
                "image (position embeddings are not interpolated)")

        # A stride-p conv with a p x p kernel is one matmul over each patch's pixels.
        p, g = cfg.patch_size, cfg.grid
        patches = pixel_values.astype(dtype).reshape(b, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x = Dense((t.embed_dim,), (None, None, "conv_in"), ("embed",), use_bias=False,
                  dtype=dtype, param_dtype=pdtype, name="patch_embedding")(patches)
        x = x.reshape(b, cfg.num_patches, t.embed_dim)

        cls = self.param("class_embedding", param_with_axes(default_kernel_init, ("embed",)),
                         (t.embed_dim,), pdtype)
        pos = self.param("position_embedding", param_with_axes(default_kernel_init, (None, "embed")),
                         (1 + cfg.num_patches, t.embed_dim), pdtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, t.embed_dim)), x], axis=1)
        x = x + pos.astype(dtype)
        x = LayerNorm(eps=t.norm_eps, dtype=dtype, param_dtype=pdtype, name="pre_norm")(x)
        x = constrain(x, ("batch", "length", "act_embed"))

        segment_ids = jnp.ones(x.shape[:2], jnp.int32)  # one image per row, no padding
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        h, layer_out = TransformerStack(t, name="encoder")(
            x, positions, segment_ids, deterministic=deterministic, return_hidden=return_hidden)
        pooled = LayerNorm(eps=t.norm_eps, dtype=dtype, param_dtype=pdtype, name="post_norm")(h[:, 0])
        hidden = jnp.concatenate([x[None], layer_out], axis=0) if return_hidden else None
        return ClipViTOutput(last_hidden_state=h, pooler_output=pooled, hidden_states=hidden)


class ClipClassifier(nn.Module):
    """pixel_values [B, S, S, C] -> logits [B, num_classes] float32 (see the module docstring)."""
    cfg: ClipViTConfig
    num_classes: int

    @nn.compact
    def __call__(self, pixel_values, *, deterministic: bool = True):
        t = self.cfg.transformer
        pooled = ClipViT(self.cfg, name="clip")(pixel_values, deterministic=deterministic).pooler_output
        head = Dense((self.num_classes,), ("embed",), (None,), use_bias=True, dtype=jnp.dtype(t.dtype),
                     param_dtype=jnp.dtype(t.param_dtype), name="head")
        return head(pooled).astype(jnp.float32)
