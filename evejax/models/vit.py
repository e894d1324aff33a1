"""Vision transformers on the shared core: the CLIP vision tower (EVE's PAL teacher) and
InternViT with InternVL's feature path (HoVLE's stage-1 teacher; see the InternViT section below).

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

Position embeddings are interpolated only with `interpolate_pos_encoding=True`,
as HF's flag (the grid part resized bicubically with PyTorch's kernel, as a
matrix: `jax.image.resize` does not reproduce it); otherwise an input of another
size raises (EVE always feeds the teacher 336 x 336).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from evejax.data.image import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from evejax.nn.layers import Dense, LayerNorm, activation, constrain, default_kernel_init, param_with_axes
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
            raise ValueError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
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
    # `evejax demo`'s teacher (configs/demo.py:teacher trains it): 32 px, patch 8, so each of its
    # 4 x 4 patches is one 16 px shapes cell. EVE "demo" and the HoVLE teacher "clip_demo" read it.
    "demo": lambda: clip_vit(32, 8, 32, 2, 4, 64),
}


def _sized(table, what: str, size: str, overrides):
    """The validated config of `size` in a size table, with overrides."""
    if size not in table:
        raise ValueError(f"{what} size {size!r} is not known; use one of {sorted(table)}")
    cfg = table[size]()
    return (cfg.replace(**overrides) if overrides else cfg).validate()


def _replace_nested(cfg, inner: str, kw):
    """`cfg` with its own fields taken from kw and the others handed to its `inner` config's replace."""
    own = {f.name for f in dataclasses.fields(cfg)} - {inner}
    nested = getattr(cfg, inner).replace(**{k: v for k, v in kw.items() if k not in own})
    return dataclasses.replace(cfg, **{inner: nested}, **{k: v for k, v in kw.items() if k in own})


def get_clip_config(size: str, **overrides) -> ClipViTConfig:
    return _sized(CLIP_SIZES, "CLIP ViT", size, overrides)


class ClipViTOutput(NamedTuple):
    last_hidden_state: jax.Array           # [B, 1 + P, D]
    pooler_output: jax.Array               # [B, D]
    hidden_states: Optional[jax.Array]     # [L + 1, B, 1 + P, D] or None


class ClipViT(nn.Module):
    """pixel_values [B, S, S, C] -> ClipViTOutput (see the module docstring)."""
    cfg: ClipViTConfig

    @nn.compact
    def __call__(self, pixel_values, *, return_hidden: bool = False, deterministic: bool = True,
                 interpolate_pos_encoding: bool = False):
        cfg = self.cfg.validate()
        t = cfg.transformer
        dtype, pdtype = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        x = _image_tokens(self, cfg, pixel_values, dtype, pdtype, False, "CLIP ViT", interpolate_pos_encoding)
        x = LayerNorm(eps=t.norm_eps, dtype=dtype, param_dtype=pdtype, name="pre_norm")(x)
        h, hidden = _encode(t, constrain(x, ("batch", "length", "act_embed")), deterministic, return_hidden)
        pooled = LayerNorm(eps=t.norm_eps, dtype=dtype, param_dtype=pdtype, name="post_norm")(h[:, 0])
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


# ---- InternViT and InternVL's vision feature path (HoVLE's stage-1 teacher) ----------------
#
# `InternViT` reproduces InternVL's `InternVisionModel` (OpenGVLab/InternViT-300M-448px):
#
#   pixel_values [B, S, S, C] float (NHWC, ImageNet-normalised; S = image_size)
#   -> patches: conv p x p, stride p, WITH bias           [B, P, D]
#   -> [CLS, patches] + position_embedding                 [B, 1 + P, D]   (no pre-norm)
#   -> encoder: L pre-norm layers (LayerNorm eps 1e-6, bidirectional attention, no RoPE,
#      exact-erf GELU MLP, biases everywhere, layer scale `ls1`/`ls2` on both branches)
#   -> last_hidden_state [B, 1 + P, D] (no final norm);
#      hidden_states [L + 1, B, 1 + P, D]: 0 = embeddings, k = output of layer k.
#
# `InternVLTeacher` is InternVL's `extract_feature` on top of it (InternVL2-2B):
#
#   hidden_states[select_layer]          [B, 1 + P, D]   (-1: the last layer)
#   -> drop CLS, rows of the grid        [B, g, g, D]    (g = S / p)
#   -> pixel shuffle by r = downsample_ratio (1 / r an integer k)
#                                        [B, g / k, g / k, D k^2]
#   -> mlp1: LayerNorm(eps 1e-5) -> Linear -> GELU (erf) -> Linear
#                                        [B, (g / k)^2, llm_dim]
#
# InternVL2-2B: S 448, p 14, g 32, k 2 -> 256 tokens of D k^2 = 4096 -> 2048, the width of
# InternLM2-1.8B's input embeddings. With `llm_dim=None` there is no projector (a bare
# InternViT-300M-448px checkpoint has none) and the features are the shuffled 4096-d tokens.
#
# Parameters (Flax paths): vision_model/{patch_embedding/{kernel [p, p, C, D], bias [D]},
# class_embedding [D], position_embedding [1 + P, D], encoder/layers/... as ClipViT's plus
# {attention,mlp}_layer_scale [L, D]}; mlp1/{norm/{scale,bias} [D k^2], fc1/{kernel [D k^2, E],
# bias [E]}, fc2/{kernel [E, E], bias [E]}} (E = llm_dim). `evejax.port.internvit` maps them
# to and from the official names.


@dataclasses.dataclass(frozen=True)
class InternViTConfig:
    image_size: int
    patch_size: int
    transformer: TransformerConfig
    num_channels: int = 3

    grid = ClipViTConfig.grid
    num_patches = ClipViTConfig.num_patches
    replace = ClipViTConfig.replace

    def validate(self) -> "InternViTConfig":
        t = self.transformer
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if t.num_heads * t.head_dim != t.embed_dim or t.num_kv_heads != t.num_heads:
            raise ValueError(f"InternViT needs num_heads x head_dim == embed_dim and no grouped KV heads; got "
                             f"{t.num_heads} x {t.head_dim} vs {t.embed_dim}, {t.num_kv_heads} KV heads")
        if (t.causal or t.rope_base is not None or t.norm != "layer" or t.mlp_gated or not t.mlp_bias
                or not t.out_bias or t.layer_scale_init is None):
            raise ValueError("an InternViT needs causal=False, rope_base=None, norm='layer', mlp_gated=False, "
                             "mlp_bias=True, out_bias=True and a layer_scale_init")
        return self


def intern_vit(image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp: int,
               **kw) -> InternViTConfig:
    """An InternViT config (layer-norm variant); `kw` overrides TransformerConfig fields."""
    fields = dict(
        num_layers=layers, embed_dim=width, num_heads=heads, num_kv_heads=heads, head_dim=width // heads,
        mlp_dim=mlp, mlp_act="gelu", mlp_gated=False, mlp_bias=True, norm="layer", norm_eps=1e-6,
        qkv_bias=True, out_bias=True, causal=False, rope_base=None, layer_scale_init=1.0)
    t = TransformerConfig(**{**fields, **kw})
    return InternViTConfig(image_size=image_size, patch_size=patch_size, transformer=t)


@dataclasses.dataclass(frozen=True)
class InternVLTeacherConfig:
    """InternVL's vision feature path: an InternViT, the layer read, pixel shuffle, projector.

    Why it is HoVLE's natural stage-1 teacher: with InternVL2-2B's weights its output already
    lives where InternLM2-1.8B reads its inputs (2048-d, 256 tokens per 448 px tile, the
    space InternVL2-2B's own LLM was trained on), so the embedding module is distilled to it
    directly; a CLIP teacher would need a learned projection into that space first.

    ps_version "v2" swaps height and width back after the shuffle (InternVL's 1.5 and 2.0
    training scripts set it); "v1", InternVLChatConfig's default, leaves the grid transposed.
    """
    vit: InternViTConfig
    llm_dim: Optional[int] = 2048
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    projector_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which mlp1 uses

    @property
    def shuffle(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def num_tokens(self) -> int:
        return (self.vit.grid // self.shuffle) ** 2

    @property
    def shuffled_dim(self) -> int:
        return self.vit.transformer.embed_dim * self.shuffle ** 2

    @property
    def feature_dim(self) -> int:
        return self.shuffled_dim if self.llm_dim is None else self.llm_dim

    @property
    def image_size(self) -> int:
        """The tile side the teacher reads."""
        return self.vit.image_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per tile at image_size."""
        return self.vit.num_patches

    def replace(self, **kw) -> "InternVLTeacherConfig":
        return _replace_nested(self, "vit", kw)

    def validate(self) -> "InternVLTeacherConfig":
        self.vit.validate()
        k, layers = self.shuffle, self.vit.transformer.num_layers
        if k < 1 or abs(1 / k - self.downsample_ratio) > 1e-9 or self.vit.grid % k:
            raise ValueError(f"downsample_ratio={self.downsample_ratio} must be 1/k for an integer k dividing "
                             f"the patch grid {self.vit.grid}")
        if not -(layers + 1) <= self.select_layer <= layers:
            raise ValueError(f"select_layer={self.select_layer} is outside the {layers + 1} hidden states")
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version {self.ps_version!r} is not known; use 'v1' or 'v2'")
        return self


INTERNVL_SIZES = {
    # InternVL2-2B's vision side: InternViT-300M-448px (24 layers, width 1024, 16 heads, MLP 4096,
    # layer scale init 1.0) + mlp1 to internlm2-chat-1_8b's 2048; last layer, shuffle 0.5, v2.
    "internvl2_2b": lambda: InternVLTeacherConfig(intern_vit(448, 14, 1024, 24, 16, 4096), llm_dim=2048),
    "tiny": lambda: InternVLTeacherConfig(intern_vit(32, 4, 32, 2, 4, 64), llm_dim=48),
}


def get_internvl_config(size: str, **overrides) -> InternVLTeacherConfig:
    return _sized(INTERNVL_SIZES, "InternVL teacher", size, overrides)


def _patch_embed(cfg, pixel_values, dtype, pdtype, use_bias: bool, what: str, any_size: bool = False):
    """[B, H, W, C] -> ([B, (H / p)(W / p), D], (H / p, W / p)): a stride-p conv with a p x p kernel,
    as one matmul per patch. H = W = image_size unless `any_size` (multiples of p)."""
    t = cfg.transformer
    b, height, width, channels = pixel_values.shape
    p = cfg.patch_size
    fits = (height % p == 0 and width % p == 0) if any_size else (height, width) == (cfg.image_size,) * 2
    if not fits or channels != cfg.num_channels:
        raise ValueError(
            f"{what} expects pixel_values [B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] "
            f"(NHWC{'; any multiple of the patch ' + str(p) if any_size else ''}), got "
            f"{tuple(pixel_values.shape)}; resize or pad the image"
            + ("" if any_size else " (position embeddings are not interpolated)"))
    gh, gw = height // p, width // p
    patches = pixel_values.astype(dtype).reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = Dense((t.embed_dim,), (None, None, "conv_in"), ("embed",), use_bias=use_bias,
              dtype=dtype, param_dtype=pdtype, name="patch_embedding")(patches)
    return x.reshape(b, gh * gw, t.embed_dim), (gh, gw)


def bicubic_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of torch's bicubic F.interpolate (align_corners=False, A = -0.75,
    border taps clamped): HF's interpolate_pos_encoding and HoVLE's position resize."""
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731 |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731 1 < |x| < 2
    out = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        src = (i + 0.5) * size_in / size_out - 0.5
        base = int(np.floor(src))
        t = src - base
        for k, w in zip(range(-1, 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            out[i, min(max(base + k, 0), size_in - 1)] += w
    return out.astype(np.float32)


def _image_tokens(module: nn.Module, cfg, pixel_values, dtype, pdtype, use_bias: bool, what: str,
                  interpolate: bool = False):
    """[B, H, W, C] -> [B, 1 + (H / p)(W / p), D]: the class token, then the patches, plus learned
    positions (`module`'s class_embedding [D] and position_embedding [1 + P, D]); with `interpolate`
    the grid part is resized bicubically to the input's grid, as HF's interpolate_pos_encoding."""
    t = cfg.transformer
    x, (gh, gw) = _patch_embed(cfg, pixel_values, dtype, pdtype, use_bias, what, interpolate)
    cls = module.param("class_embedding", param_with_axes(default_kernel_init, ("embed",)), (t.embed_dim,), pdtype)
    pos = module.param("position_embedding", param_with_axes(default_kernel_init, (None, "embed")),
                       (1 + cfg.num_patches, t.embed_dim), pdtype)
    if (gh, gw) != (cfg.grid, cfg.grid):
        grid = jnp.einsum("hi,wj,ijd->hwd", bicubic_resize_matrix(cfg.grid, gh), bicubic_resize_matrix(cfg.grid, gw),
                          pos[1:].astype(jnp.float32).reshape(cfg.grid, cfg.grid, -1))
        pos = jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(gh * gw, -1)], axis=0)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, t.embed_dim)), x], axis=1)
    return x + pos.astype(dtype)


def _encode(t: TransformerConfig, x, deterministic: bool, return_hidden: bool):
    """The encoder stack over one image per row (no padding): (last hidden [B, N, D], every
    hidden state [L + 1, B, N, D] with the input first, or None)."""
    segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    h, layer_out = TransformerStack(t, name="encoder")(
        x, positions, segment_ids, deterministic=deterministic, return_hidden=return_hidden)
    return h, (jnp.concatenate([x[None], layer_out], axis=0) if return_hidden else None)


class InternViTOutput(NamedTuple):
    last_hidden_state: jax.Array           # [B, 1 + P, D]
    hidden_states: Optional[jax.Array]     # [L + 1, B, 1 + P, D] or None


class InternViT(nn.Module):
    """pixel_values [B, S, S, C] -> InternViTOutput (see the InternViT notes above)."""
    cfg: InternViTConfig

    @nn.compact
    def __call__(self, pixel_values, *, return_hidden: bool = False, deterministic: bool = True):
        cfg = self.cfg.validate()
        t = cfg.transformer
        dtype, pdtype = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        x = _image_tokens(self, cfg, pixel_values, dtype, pdtype, True, "InternViT")
        h, hidden = _encode(t, constrain(x, ("batch", "length", "act_embed")), deterministic, return_hidden)
        return InternViTOutput(last_hidden_state=h, hidden_states=hidden)


def pixel_shuffle(x, ratio: float, version: str = "v2"):
    """InternVL's pixel shuffle: [B, A, A, C] -> [B, A r, A r, C / r^2] (r = ratio < 1).

    Pairs of neighbouring columns merge into channels first, then (after a transpose)
    pairs of rows, so a channel block of the output is ordered (row offset, column
    offset, C); "v2" transposes the grid back, "v1" leaves it transposed.
    """
    n, a, c = x.shape[0], x.shape[1], x.shape[-1]
    k = round(1 / ratio)
    x = x.reshape(n, a, a // k, c * k).transpose(0, 2, 1, 3)
    x = x.reshape(n, a // k, a // k, c * k * k)
    return x.transpose(0, 2, 1, 3) if version == "v2" else x


class InternVLTeacher(nn.Module):
    """pixel_values [B, S, S, C] -> features [B, T, E] (T = num_tokens, E = feature_dim)."""
    cfg: InternVLTeacherConfig

    @nn.compact
    def __call__(self, pixel_values, *, deterministic: bool = True):
        cfg = self.cfg.validate()
        t = cfg.vit.transformer
        dtype, pdtype = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        # Only the hidden states up to select_layer are needed, but the stack is scanned as a
        # whole; select_layer -1 (InternVL2) reads the last layer without stacking the others.
        out = InternViT(cfg.vit, name="vision_model")(
            pixel_values, return_hidden=cfg.select_layer != -1, deterministic=deterministic)
        h = out.last_hidden_state if cfg.select_layer == -1 else out.hidden_states[cfg.select_layer]
        g = cfg.vit.grid
        x = pixel_shuffle(h[:, 1:].reshape(h.shape[0], g, g, -1), cfg.downsample_ratio, cfg.ps_version)
        x = x.reshape(x.shape[0], cfg.num_tokens, cfg.shuffled_dim)
        if cfg.llm_dim is None:
            return x
        return Projector(cfg.llm_dim, cfg.projector_norm_eps, dtype, pdtype, name="mlp1")(x)


class Projector(nn.Module):
    """InternVL's `mlp1`: [..., Din] -> LayerNorm -> Linear -> GELU (erf) -> Linear -> [..., E]."""
    features: int
    norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        x = Dense((self.features,), ("vision_embed",), ("mlp",), name="fc1", **kw)(x)
        x = Dense((self.features,), ("mlp",), ("embed",), name="fc2", **kw)(activation("gelu")(x))
        return x


def teacher_features(cfg: InternVLTeacherConfig, params, pixel_values):
    """pixels [N, S, S, C] -> [N, T, E]: the frozen teacher inside a training step (no gradient)."""
    params = jax.lax.stop_gradient(params)
    return InternVLTeacher(cfg).apply({"params": params}, pixel_values)


# ---- CLIP with a learned projection: the alternative stage-1 teacher of HoVLE ---------------
#
# `ClipTeacher` gives CLIP's patch features in the geometry where HoVLE's LLM reads image tokens:
#
#   pixel_values [B, S, S, C] (S = image_size, 448: HoVLE's tile; ImageNet-normalised as the
#   student reads it, turned into CLIP's normalisation by an exact per-channel affine map)
#   -> with view_size V set, the tile average-pooled by S / V to V (CLIP reads a coarser view);
#      else V = S
#   -> ClipViT at V: the checkpoint's position grid g0 (24 for CLIP-L/14-336) resized bicubically
#      to g = V / p (32), as HF's interpolate_pos_encoding (no resize when g = g0)
#   -> hidden_states[select_layer] without CLS  [B, g, g, Dc]  (-2: LLaVA's and EVE's layer)
#   -> InternVL's pixel shuffle ("v2", row-major) [B, (g / k)^2, Dc k^2]   (256 x 4096)
#   -> projection (LayerNorm -> Linear -> GELU -> Linear, as mlp1)  [B, n, E]  (E = llm_dim, 2048)
#
# `reconstruct` maps features [.., E] back to [.., Dc k^2] (one Linear): the projection's own
# objective (HoVLEDistill): it trains the projection to keep what CLIP saw, while the
# distillation loss never reaches it (stop_gradient), so it cannot shrink that loss by
# collapsing. Parameters: clip/... (ClipViT's, as `evejax import --family clip` writes them),
# projection/{norm/{scale, bias} [Dc k^2], fc1/{kernel [Dc k^2, E], bias [E]}, fc2/{kernel [E, E],
# bias [E]}}, reconstruction/{kernel [E, Dc k^2], bias [Dc k^2]}.


@dataclasses.dataclass(frozen=True)
class ClipTeacherConfig:
    """CLIP (frozen) + pixel shuffle + a learned projection to the LLM's width."""
    clip: ClipViTConfig
    image_size: int = 448
    llm_dim: int = 2048
    select_layer: int = -2
    downsample_ratio: float = 0.5
    projector_norm_eps: float = 1e-5
    view_size: Optional[int] = None  # the side CLIP reads the tile at (average-pooled); None: image_size

    @property
    def shuffle(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def view(self) -> int:
        return self.image_size if self.view_size is None else self.view_size

    @property
    def grid(self) -> int:
        return self.view // self.clip.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_tokens(self) -> int:
        return (self.grid // self.shuffle) ** 2

    @property
    def shuffled_dim(self) -> int:
        return self.clip.transformer.embed_dim * self.shuffle ** 2

    @property
    def feature_dim(self) -> int:
        return self.llm_dim

    def replace(self, **kw) -> "ClipTeacherConfig":
        return _replace_nested(self, "clip", kw)

    def validate(self) -> "ClipTeacherConfig":
        self.clip.validate()
        k, layers = self.shuffle, self.clip.transformer.num_layers
        if self.image_size % self.view:
            raise ValueError(f"CLIP teacher: view_size={self.view_size} must divide image_size={self.image_size} "
                             "(the tile is average-pooled to it)")
        if self.view % self.clip.patch_size or self.grid % k or abs(1 / k - self.downsample_ratio) > 1e-9:
            raise ValueError(f"CLIP teacher: the view of {self.view} px must give a patch grid (patch "
                             f"{self.clip.patch_size}) that downsample_ratio={self.downsample_ratio} = 1/k divides")
        if not -(layers + 1) <= self.select_layer <= layers:
            raise ValueError(f"select_layer={self.select_layer} is outside the {layers + 1} hidden states")
        return self


CLIP_TEACHER_SIZES = {
    # openai/clip-vit-large-patch14-336 (EVE's teacher, `evejax import --family clip`) on HoVLE's
    # 448 px tiles: its 24 x 24 position grid resized to 32 x 32, layer -2, shuffle 0.5 -> 256 tokens
    # of 4096 -> 2048 (InternLM2-1.8B's width). The 336 px model needs the smaller resize (24 -> 32,
    # against 16 -> 32 for CLIP-L/14 at 224).
    "clip_l14_336": lambda: ClipTeacherConfig(CLIP_SIZES["L/14-336"](), image_size=448, llm_dim=2048),
    # Tests: tiny HoVLE's 56 px tiles; a 3 x 3 position grid resized to 4 x 4 -> 4 tokens of 128 -> 64.
    "clip_tiny": lambda: ClipTeacherConfig(clip_vit(42, 14, 32, 2, 4, 64), image_size=56, llm_dim=64),
    # HoVLE "demo" (64 px tiles, 16 tokens, width 64): CLIP "demo" (EVE demo's teacher) reading the
    # tile pooled to 32 px, so each of its 4 x 4 patches is one 16 px shapes cell (of a square image),
    # as in its training; no shuffle: 16 tokens of 32 -> 64.
    "clip_demo": lambda: ClipTeacherConfig(CLIP_SIZES["demo"](), image_size=64, view_size=32,
                                           downsample_ratio=1.0, llm_dim=64),
}


def get_clip_teacher_config(size: str, **overrides) -> ClipTeacherConfig:
    return _sized(CLIP_TEACHER_SIZES, "CLIP teacher", size, overrides)


class ClipTeacher(nn.Module):
    """pixel_values [B, S, S, C] -> (features [B, n, E], shuffled CLIP features [B, n, Dc k^2]);
    `reconstruct(features)` -> [B, n, Dc k^2] (see the notes above)."""
    cfg: ClipTeacherConfig

    def setup(self):
        cfg = self.cfg.validate()
        t = cfg.clip.transformer
        kw = dict(dtype=jnp.dtype(t.dtype), param_dtype=jnp.dtype(t.param_dtype))
        self.clip = ClipViT(cfg.clip)
        self.projection = Projector(cfg.llm_dim, cfg.projector_norm_eps, **kw)
        self.reconstruction = Dense((cfg.shuffled_dim,), ("embed",), ("vision_embed",), use_bias=True, **kw)

    def __call__(self, pixel_values, *, deterministic: bool = True):
        cfg = self.cfg
        # HoVLE's tiles are ImageNet-normalised; CLIP was trained on its own statistics.
        scale = np.asarray(IMAGENET_STD) / np.asarray(CLIP_STD)
        shift = (np.asarray(IMAGENET_MEAN) - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
        pixel_values = pixel_values * scale.astype(np.float32) + shift.astype(np.float32)
        if cfg.view != cfg.image_size:
            b, f, v = pixel_values.shape[0], cfg.image_size // cfg.view, cfg.view
            pixel_values = pixel_values.reshape(b, v, f, v, f, -1).mean(axis=(2, 4))
        out = self.clip(pixel_values, return_hidden=True, deterministic=deterministic, interpolate_pos_encoding=True)
        h = out.hidden_states[cfg.select_layer][:, 1:]
        x = pixel_shuffle(h.reshape(h.shape[0], cfg.grid, cfg.grid, -1), cfg.downsample_ratio, "v2")
        # CLIP stays frozen: no gradient flows back into it (nor its backward pass is computed).
        x = jax.lax.stop_gradient(x.reshape(x.shape[0], cfg.num_tokens, cfg.shuffled_dim))
        return self.projection(x), x

    def reconstruct(self, features):
        return self.reconstruction(features)
