"""EVE (EVEv1, "Unveiling Encoder-Free Vision-Language Models"): PEL + LLM (+ PAL and CLIP teacher).

Sizes: B batch; S EVE canvas side (672, HD 1344); p patch (14); G = S / p conv
grid; pool the CA1 window (2); Gp = G / pool pooled grid; C vision width (1024);
D LLM width (4096); L LLM layers; M = 1 + Gp (Gp + 1) image-token slots (601,
HD 2353); N text length; T = N - 1 + M LLM length; Tt teacher side (336), pt
teacher patch (14), Gt = Tt / pt, Cc teacher width (1024).

Everything has static shapes: a batch of images sits on a fixed S x S canvas
with a validity mask (`evejax.data.image.preprocess_anyres`), and every
data-dependent length (the valid crop, the image span, the spliced sequence)
is a mask plus a gather over fixed-size arrays.

`VisionTokenizer` (Patch Embedding Layer without its FFN)
    pixels [B, S, S, 3], pixel_mask [B, S, S]
    -> ImageTokens(tokens [B, M, C], valid [B, M], grid [B, 2] = (h, w))
    Valid tokens come first, in official order [CLS, row_0 patches, SPL,
    row_1, ..., SPL] (1 + h (w + 1) of them); an image whose mask is all zero
    has none.
`Projector` ("mlp2x_gelu"): [.., C] -> [.., D], Linear, exact GELU, Linear.
`PatchAligningLayer` (PAL, training only)
    tap states [n_taps, .., D] (tap 0 = the last hidden state) -> [.., Cc]
`EVE`
    tokens [B, N] int32 (IMAGE_TOKEN_INDEX = -200 marks the image, at most one
    per row), segment_ids [B, N] (1, 2, ... per packed sample, 0 = padding; a
    bool mask works for one sample per row), pixels, pixel_mask, and for
    training teacher_pixels [B, Tt, Tt, 3], teacher_mask [B, Tt, Tt]
    -> EVEOutput(logits [B, T, V] float32, segment_ids [B, T], source [B, T]
       (index into the text, -1 for image tokens and padding), target_source
       [B, T] (index of the text target each position predicts, -1 for none),
       pal_loss scalar or None)
    Row b holds text[:s], the image tokens, text[s + 1:], then padding: the
    official right-padded splice, at the fixed width T that official code
    reaches when the largest possible image is in the batch. Positions restart
    in every segment (0, 1, ... for one sample per row, as official).
    The batch is the conversation batch of `evejax.data.pipeline` (tokens,
    targets, loss_mask, segment_ids, ...), N its seq_len.

Parameters (top level): vision_tokenizer, mm_projector, llm (CausalLM) and,
when `cfg.clip` is set, vision_compressor (PAL) and clip (ClipViT teacher).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from evejax.data.image import AnyResConfig
from evejax.data.text import IMAGE_TOKEN_INDEX
from evejax.models import llm as llm_lib
from evejax.models import vit
from evejax.nn.layers import Dense, LayerNorm, activation, constrain, default_kernel_init, param_with_axes

# TransformerConfig fields that a precision / memory override sets on the teacher too.
_SHARED_TRANSFORMER_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "splash_block_q",
                              "splash_block_kv", "scan_unroll")


@dataclasses.dataclass(frozen=True)
class EVEConfig:
    """One EVE model. `clip=None` is the inference model (no PAL, no teacher).

    The vision parts compute in the LLM's dtype and store parameters in its
    param_dtype. Official values: patch 14, pool 2, 8 heads in CA1/CA2/CA3, PAL
    taps every 4th hidden state, teacher layer -2 (`mm_vision_select_layer`).

    teacher_image_size / teacher_patch_size are the teacher's view sizes, which
    also set where preprocessing pads the EVE view (`anyres()`); they are taken
    from `clip` when it is set and kept when the teacher is dropped, so an
    inference config still preprocesses as the model was trained.
    """
    llm: llm_lib.LMConfig
    clip: Optional[vit.ClipViTConfig]
    image_size: int = 672
    patch_size: int = 14
    pool: int = 2
    vision_width: int = 1024
    vision_heads: int = 8
    pal_interval: int = 4
    pal_heads: int = 8
    teacher_layer: int = -2
    teacher_image_size: Optional[int] = None
    teacher_patch_size: Optional[int] = None

    def __post_init__(self):
        if self.clip is not None:
            # Frozen dataclass: fill the view sizes once, so equal models compare equal.
            for name, value in (("teacher_image_size", self.clip.image_size),
                                ("teacher_patch_size", self.clip.patch_size)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)

    @property
    def with_pal(self) -> bool:
        return self.clip is not None

    @property
    def grid(self) -> int:
        """Gp: pooled grid side of the canvas."""
        return self.image_size // (self.patch_size * self.pool)

    @property
    def max_image_tokens(self) -> int:
        return 1 + self.grid * (self.grid + 1)

    @property
    def patch_ratio(self) -> int:
        """EVE pooled cells per teacher patch along a side (1; 2 for HD)."""
        return self.grid // self.clip.grid

    @property
    def layer_taps(self) -> tuple[int, ...]:
        """Hidden-state indices the PAL reads, last first: L, L - interval, ..., >= 0."""
        n = self.llm.transformer.num_layers
        return tuple(n - k for k in range(0, n + 1, self.pal_interval))

    def llm_length(self, text_len: int) -> int:
        """T: the spliced sequence length for text rows of `text_len` ids."""
        return text_len - 1 + self.max_image_tokens

    def anyres(self) -> AnyResConfig:
        """The preprocessing that feeds this model (teacher view sized for its CLIP)."""
        if self.teacher_image_size is None or self.teacher_patch_size is None:
            raise ValueError("this inference EVE config has no teacher view sizes, which set the preprocessing "
                             "(it predates them); set teacher_image_size and teacher_patch_size (in a "
                             "checkpoint's model.json), or drop the teacher again from the training config")
        return AnyResConfig(image_size=self.image_size, patch_size=self.patch_size, pool=self.pool,
                            teacher_image_size=self.teacher_image_size,
                            teacher_patch_size=self.teacher_patch_size)

    def validate(self) -> "EVEConfig":
        def need(ok, what):
            if not ok:
                raise ValueError(f"EVE config: {what}")

        need(self.image_size % (self.patch_size * self.pool) == 0,
             f"image_size={self.image_size} must be a multiple of patch_size * pool = "
             f"{self.patch_size * self.pool}")
        need(self.vision_width % self.vision_heads == 0,
             f"vision_width={self.vision_width} is not a multiple of vision_heads={self.vision_heads}")
        if self.with_pal:
            need((self.teacher_image_size, self.teacher_patch_size) == (self.clip.image_size, self.clip.patch_size),
                 f"teacher view {self.teacher_image_size} px / patch {self.teacher_patch_size} differs from "
                 f"the CLIP teacher's {self.clip.image_size} px / patch {self.clip.patch_size}")
            cc = self.clip.transformer.embed_dim
            need(cc % self.pal_heads == 0, f"teacher width {cc} is not a multiple of pal_heads={self.pal_heads}")
            need(self.grid % self.clip.grid == 0,
                 f"the pooled grid {self.grid} must be a whole multiple of the teacher grid "
                 f"{self.clip.grid} (patch_ratio)")
            n = self.clip.transformer.num_layers
            need(-(n + 1) <= self.teacher_layer <= n,
                 f"teacher_layer={self.teacher_layer} is not a hidden-state index of a {n}-layer CLIP")
        return self

    def replace(self, **kw) -> "EVEConfig":
        """Own fields, `with_pal=False` (drop PAL + teacher), or TransformerConfig fields.

        TransformerConfig fields go to the LLM; dtype, param_dtype, remat,
        attention_impl and scan_unroll also go to the teacher.
        """
        cfg = self
        if "with_pal" in kw:
            keep = kw.pop("with_pal")
            if keep and not cfg.with_pal:
                raise ValueError("with_pal=True needs a teacher config; start from a training size")
            if not keep:
                cfg = dataclasses.replace(cfg, clip=None)
        t_fields = {f.name for f in dataclasses.fields(vit.TransformerConfig)}
        t_kw = {k: v for k, v in kw.items() if k in t_fields}
        own = {k: v for k, v in kw.items() if k not in t_fields}
        unknown = set(own) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"EVE config has no field(s) {sorted(unknown)}")
        if t_kw:
            own.setdefault("llm", cfg.llm.replace(**t_kw))
            shared = {k: v for k, v in t_kw.items() if k in _SHARED_TRANSFORMER_FIELDS}
            if cfg.clip is not None and shared:
                own.setdefault("clip", cfg.clip.replace(**shared))
        if own.get("clip") is not None:
            # A new teacher brings its own view sizes unless they are given too.
            own.setdefault("teacher_image_size", None)
            own.setdefault("teacher_patch_size", None)
        return dataclasses.replace(cfg, **own)


SIZES = {
    # EVE-7B: Vicuna-7B v1.5 + PEL C=1024 + PAL + CLIP-ViT-L/14-336 teacher (reference/eve.md §1).
    "7b": lambda: EVEConfig(llm=llm_lib.get_config("vicuna_7b"), clip=vit.get_clip_config("L/14-336")),
    # EVE-7B-HD: 1344 long edge; the 48 x 48 pooled grid is pooled by 2 onto CLIP's 24 x 24.
    "7b_hd": lambda: EVEConfig(llm=llm_lib.get_config("vicuna_7b"), clip=vit.get_clip_config("L/14-336"),
                               image_size=1344),
    # Tests: 8 LLM layers so the PAL has 3 taps (8, 4, 0); an 8 x 8 pooled grid on an 8 x 8
    # teacher grid, so valid bands can start off the origin; widths all differ to catch mix-ups.
    "tiny": lambda: EVEConfig(llm=llm_lib.get_config("llama_tiny", num_layers=8),
                              clip=vit.clip_vit(32, 4, 32, 2, 4, 64), image_size=64, patch_size=4,
                              vision_width=48),
    # `evejax demo` (configs/demo.py sets the LLM): patch 8 on a 64 px canvas, so a pooled token
    # covers 16 x 16 pixels, about one generated shape; a 4 x 4 grid on the 32 px teacher's 4 x 4.
    "demo": lambda: EVEConfig(llm=llm_lib.get_config("llama_tiny", num_layers=4),
                              clip=vit.get_clip_config("demo"), image_size=64, patch_size=8,
                              vision_width=64),
}


def get_config(size: str, **overrides) -> EVEConfig:
    if size not in SIZES:
        raise ValueError(f"EVE size {size!r} is not known; use one of {sorted(SIZES)}")
    cfg = SIZES[size]()
    return (cfg.replace(**overrides) if overrides else cfg).validate()


def init_inputs(cfg: EVEConfig, batch: int = 1, text_len: int = 2, abstract: bool = False) -> tuple:
    """Example inputs for `EVE(cfg).init`: (tokens, segment_ids, pixels, pixel_mask) and, for a
    training config, (teacher_pixels, teacher_mask); zeros, or ShapeDtypeStructs if `abstract`."""
    make = jax.ShapeDtypeStruct if abstract else jnp.zeros
    s = cfg.image_size
    args = (make((batch, text_len), jnp.int32), make((batch, text_len), jnp.int32),
            make((batch, s, s, 3), jnp.float32), make((batch, s, s), jnp.float32))
    if cfg.with_pal:
        t = cfg.clip.image_size
        args += (make((batch, t, t, 3), jnp.float32), make((batch, t, t), jnp.float32))
    return args


# ---- geometry helpers (pure functions on masks and indices) ---------------------------

def cell_validity(mask, patch: int):
    """Pixel mask [B, H, W] -> [B, H / patch, W / patch] bool: cells with any valid pixel.

    Official code takes the non-zero entries of the average-pooled mask.
    """
    b, height, width = mask.shape
    cells = mask.reshape(b, height // patch, patch, width // patch, patch)
    return jnp.any(cells != 0, axis=(2, 4))


def valid_box(cells):
    """Official crop of a cell mask [B, R, K] -> (row0, col0, rows, cols), each [B] int32.

    Official crops from the first non-zero cell to the last one in row-major
    order: rows row0..row1 and columns col0 (first valid column of row0) to
    col1 (last valid column of row1). An all-zero mask gives rows = cols = 0.
    """
    r, k = cells.shape[1:]
    any_row = jnp.any(cells, axis=2)
    has = jnp.any(any_row, axis=1)
    row0 = jnp.argmax(any_row, axis=1)
    row1 = r - 1 - jnp.argmax(any_row[:, ::-1], axis=1)
    first_row = jnp.take_along_axis(cells, row0[:, None, None], axis=1)[:, 0]
    last_row = jnp.take_along_axis(cells, row1[:, None, None], axis=1)[:, 0]
    col0 = jnp.argmax(first_row, axis=1)
    col1 = k - 1 - jnp.argmax(last_row[:, ::-1], axis=1)
    rows = jnp.where(has, row1 - row0 + 1, 0)
    cols = jnp.where(has, jnp.maximum(col1 - col0 + 1, 0), 0)
    return tuple(x.astype(jnp.int32) for x in (row0, col0, rows, cols))


def shift_to_origin(x, row0, col0):
    """x [B, R, K, ...] -> the same grid read from (row0, col0) on, so the crop starts at (0, 0).

    Cells past the crop hold clamped copies; callers mask them.
    """
    r, k = x.shape[1:3]
    rows = jnp.clip(row0[:, None] + jnp.arange(r), 0, r - 1)
    cols = jnp.clip(col0[:, None] + jnp.arange(k), 0, k - 1)
    x = jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)
    return jnp.take_along_axis(x, cols.reshape((cols.shape[0], 1, k) + (1,) * (x.ndim - 3)), axis=2)


def gather_text(x, source, fill=0):
    """Per-text-token values x [B, N, ...] -> spliced layout [B, T, ...]; `fill` where source < 0."""
    idx = jnp.maximum(source, 0)
    out = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    keep = (source >= 0).reshape(source.shape + (1,) * (x.ndim - 2))
    return jnp.where(keep, out, jnp.asarray(fill, x.dtype))


# ---- Patch Embedding Layer ------------------------------------------------------------

class NormLinear(nn.Module):
    """Official `Sequential(LayerNorm, Linear_noBias)`: [.., C] -> [.., features]."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(name="norm", **kw)(x)
        return Dense((self.features,), ("vision_embed",), (None,), name="linear", **kw)(x)


def _split_heads(x, num_heads: int):
    return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


class _CrossAttention(nn.Module):
    """CA1 / CA2 projections: q = NormLinear(C), kv = NormLinear(2C) (K = first C outputs,
    heads are contiguous blocks), proj = Linear(C -> C) with bias. Logits use the
    full-width scale C^-0.5, as official."""
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def attend(self, query, keys_from, reduce):
        """query [.., C], keys_from [.., K, C] -> proj(sum_k softmax(reduce(logits)) v) [.., C].

        `reduce(logits [.., heads, K]) -> logits` applies masks.
        """
        c = query.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = _split_heads(NormLinear(c, name="q", **kw)(query), self.num_heads)
        kv = NormLinear(2 * c, name="kv", **kw)(keys_from)
        k, v = _split_heads(kv[..., :c], self.num_heads), _split_heads(kv[..., c:], self.num_heads)
        logits = jnp.einsum("...hd,...khd->...hk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
        probs = jax.nn.softmax(reduce(logits), axis=-1).astype(v.dtype)
        fused = jnp.einsum("...hk,...khd->...hd", probs, v).reshape(query.shape[:-1] + (c,))
        return Dense((c,), (None,), ("vision_embed",), use_bias=True, name="proj", **kw)(fused)


class LocalAttention(_CrossAttention):
    """CA1: windows [B, Gp, Gp, pool * pool, C] -> [B, Gp, Gp, C]. Each window's mean (the
    official average pool) is the query over the window's conv cells; output =
    pooled + attention."""

    @nn.compact
    def __call__(self, windows):
        pooled = jnp.mean(windows, axis=-2)
        return pooled + self.attend(pooled, windows, lambda logits: logits)


class GlobalAttention(_CrossAttention):
    """CA2: query [C] (the CLS embedding), patches [B, P, C], valid [B, P] -> [B, C];
    softmax over the valid patches only; output = query + attention."""

    @nn.compact
    def __call__(self, query, patches, valid):
        queries = jnp.broadcast_to(query, (patches.shape[0], query.shape[-1]))
        masked = lambda logits: jnp.where(valid[:, None, :], logits, jnp.finfo(jnp.float32).min)  # noqa: E731
        return query + self.attend(queries, patches, masked)


class ImageTokens(NamedTuple):
    tokens: jax.Array   # [B, M, C] (or [B, M, D] after the projector)
    valid: jax.Array    # [B, M] bool, valid slots first
    grid: jax.Array     # [B, 2] int32 (h, w); (0, 0) for an empty mask


class VisionTokenizer(nn.Module):
    """PEL up to the FFN (see the module docstring).

    conv p x p / stride p without bias over the canvas -> official crop to the
    valid cells (moved to the origin by a gather; the crop's rows and columns
    are floored to whole pool windows, as official pooling does) -> CA1 per
    pool x pool window -> CLS by CA2 over the valid patches -> SPL after each
    row. Padding cells are computed but never reach a valid token.
    """
    width: int
    patch_size: int
    pool: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels, pixel_mask) -> ImageTokens:
        b, height, width, channels = pixels.shape
        p, s, c = self.patch_size, self.pool, self.width
        if height % (p * s) or width % (p * s) or pixel_mask.shape != (b, height, width):
            raise ValueError(f"VisionTokenizer takes pixels [B, H, W, 3] with H, W multiples of "
                             f"{p * s} and pixel_mask [B, H, W]; got {pixels.shape}, {pixel_mask.shape}")
        g_h, g_w = height // p, width // p
        gp_h, gp_w = g_h // s, g_w // s
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # A stride-p conv with a p x p kernel is one matmul over each patch's pixels.
        patches = pixels.astype(self.dtype).reshape(b, g_h, p, g_w, p, channels).transpose(0, 1, 3, 2, 4, 5)
        cells = Dense((c,), (None, None, "conv_in"), ("vision_embed",), name="patch_embedding", **kw)(patches)

        row0, col0, rows, cols = valid_box(cell_validity(pixel_mask, p))
        cells = shift_to_origin(cells, row0, col0)
        h, w = rows // s, cols // s
        grid = jnp.stack([h, w], axis=1)
        windows = cells.reshape(b, gp_h, s, gp_w, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gp_h, gp_w, s * s, c)
        windows = constrain(windows, ("batch", None, None, None, "act_embed"))
        grid_patches = LocalAttention(self.num_heads, name="local_attention", **kw)(windows)
        flat = grid_patches.reshape(b, gp_h * gp_w, c)
        patch_valid = ((jnp.arange(gp_h)[:, None] < h[:, None, None])
                       & (jnp.arange(gp_w)[None, :] < w[:, None, None])).reshape(b, gp_h * gp_w)

        init = param_with_axes(default_kernel_init, ("vision_embed",))
        cls_embedding = self.param("class_embedding", init, (c,), self.param_dtype).astype(self.dtype)
        split_embedding = self.param("split_embedding", init, (c,), self.param_dtype).astype(self.dtype)
        cls = GlobalAttention(self.num_heads, name="global_attention", **kw)(cls_embedding, flat, patch_valid)

        # Slot t: 0 = CLS; t - 1 = r (w + 1) + j is patch (r, j) for j < w, SPL for j = w.
        slots = 1 + gp_h * (gp_w + 1)
        k = jnp.arange(slots)[None, :] - 1
        row, col = k // (w[:, None] + 1), k % (w[:, None] + 1)
        index = jnp.clip(row * gp_w + col, 0, gp_h * gp_w - 1)
        from_grid = jnp.take_along_axis(flat, index[..., None], axis=1)
        tokens = jnp.where((col == w[:, None])[..., None], split_embedding, from_grid)
        tokens = jnp.where((k < 0)[..., None], cls[:, None, :], tokens)
        count = jnp.where((h > 0) & (w > 0), 1 + h * (w + 1), 0)
        valid = jnp.arange(slots)[None, :] < count[:, None]
        tokens = constrain(tokens, ("batch", "length", "act_embed"))
        return ImageTokens(tokens=tokens, valid=valid, grid=grid)


class Projector(nn.Module):
    """Official `mm_projector` "mlp2x_gelu": [.., C] -> [.., D]; GELU is the exact erf form."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense((self.features,), ("vision_embed",), ("mlp",), name="fc1", **kw)(x)
        x = activation("gelu")(x)
        return Dense((self.features,), ("mlp",), ("embed",), name="fc2", **kw)(x)


# ---- Patch Aligning Layer -------------------------------------------------------------

class PatchAligningLayer(nn.Module):
    """PAL: tap states [n_taps, .., D] (tap 0 = state L, after the final norm) -> [.., Cc].

    Tap j: LayerNorm_j + Linear_j (no bias) to Cc (official `norm_layer[j]`,
    stacked here on a leading axis). CA3: projected tap 0 is the query over
    the other projected taps, no K/V projections, scale Cc^-0.5; the output
    is input_layer(state L) + output_layer(attention).
    """
    num_taps: int
    width: int
    num_heads: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, states):
        n, d, cc = self.num_taps, states.shape[-1], self.width
        if states.shape[0] != n:
            raise ValueError(f"PAL expects {n} tap states on axis 0, got {states.shape}")
        scale = self.param("norm_scale", param_with_axes(nn.initializers.ones, ("layers", "norm")),
                           (n, d), self.param_dtype)
        bias = self.param("norm_bias", param_with_axes(nn.initializers.zeros, ("layers", "norm")),
                          (n, d), self.param_dtype)
        kernel = self.param("tap_proj", param_with_axes(default_kernel_init, ("layers", "embed", "vision_embed")),
                            (n, d, cc), self.param_dtype)
        expand = lambda a: a.reshape((n,) + (1,) * (states.ndim - 2) + (d,))  # noqa: E731
        x32 = states.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * expand(scale) + expand(bias)).astype(self.dtype)
        taps = jnp.einsum("n...d,ndc->n...c", normed, kernel.astype(self.dtype))

        heads = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, cc // self.num_heads))  # noqa: E731
        query, keys = heads(taps[0]), heads(taps[1:])
        logits = jnp.einsum("...hd,n...hd->...hn", query, keys, preferred_element_type=jnp.float32) * cc ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(keys.dtype)
        fused = jnp.einsum("...hn,n...hd->...hd", probs, keys).reshape(query.shape[:-2] + (cc,))
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        direct = Dense((cc,), ("embed",), ("vision_embed",), name="input_layer", **kw)(states[0])
        return direct + Dense((cc,), (None,), ("vision_embed",), name="output_layer", **kw)(fused)


def cosine_alignment_loss(pred, target, valid, eps: float = 1e-8):
    """Official PAL loss: mean over images with any valid patch of 1 - mean_patches cos(pred, target).

    pred/target [B, P, Cc], valid [B, P]. Norms are clamped at eps one by one,
    as torch's cosine_similarity; images without valid patches add nothing.
    """
    p32, t32 = pred.astype(jnp.float32), target.astype(jnp.float32)
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)  # noqa: E731
    cos = jnp.sum(unit(p32) * unit(t32), axis=-1)
    count = jnp.sum(valid, axis=1)
    has = count > 0
    per_image = 1.0 - jnp.sum(jnp.where(valid, cos, 0.0), axis=1) / jnp.maximum(count, 1)
    return jnp.sum(jnp.where(has, per_image, 0.0)) / jnp.maximum(jnp.sum(has), 1)


# ---- the model ------------------------------------------------------------------------

class Spliced(NamedTuple):
    embeds: jax.Array         # [B, T, D]
    segment_ids: jax.Array    # [B, T] int32, the text's segments; image tokens take the placeholder's
    positions: jax.Array      # [B, T] int32, 0, 1, ... restarting in every segment
    source: jax.Array         # [B, T] int32, text index of the input token, -1 for image and padding
    target_source: jax.Array  # [B, T] int32, text index whose target this position predicts, or -1
    image_start: jax.Array    # [B] int32, position of CLS (meaningful where has_image)
    has_image: jax.Array      # [B] bool
    grid: jax.Array           # [B, 2] int32


class EVEOutput(NamedTuple):
    logits: jax.Array          # [B, T, V] float32
    segment_ids: jax.Array     # [B, T]
    source: jax.Array          # [B, T]
    target_source: jax.Array   # [B, T]
    pal_loss: Optional[jax.Array]


class EVE(nn.Module):
    """The EVE model (see the module docstring)."""
    cfg: EVEConfig

    def setup(self):
        cfg = self.cfg.validate()
        t = cfg.llm.transformer
        kw = dict(dtype=jnp.dtype(t.dtype), param_dtype=jnp.dtype(t.param_dtype))
        self.vision_tokenizer = VisionTokenizer(cfg.vision_width, cfg.patch_size, cfg.pool,
                                                cfg.vision_heads, **kw)
        self.mm_projector = Projector(t.embed_dim, **kw)
        self.llm = llm_lib.CausalLM(cfg.llm)
        if cfg.with_pal:
            self.vision_compressor = PatchAligningLayer(len(cfg.layer_taps), cfg.clip.transformer.embed_dim,
                                                        cfg.pal_heads, **kw)
            self.clip = vit.ClipViT(cfg.clip)

    def encode_images(self, pixels, pixel_mask) -> ImageTokens:
        """pixels [B, S, S, 3], pixel_mask [B, S, S] -> projected tokens [B, M, D], valid, grid."""
        if pixels.shape[1:3] != (self.cfg.image_size,) * 2:
            raise ValueError(f"EVE takes a {self.cfg.image_size} x {self.cfg.image_size} canvas, got pixels "
                             f"{pixels.shape}; preprocess with the config's anyres()")
        image = self.vision_tokenizer(pixels, pixel_mask)
        return image._replace(tokens=self.mm_projector(image.tokens))

    def embed_inputs(self, tokens, segment_ids, pixels, pixel_mask) -> Spliced:
        """The official splice at static shapes: T = N - 1 + M (see the module docstring).

        The row's first IMAGE_TOKEN_INDEX (inside a segment) is replaced by the
        image tokens and everything after it moves right, so packed rows (several
        segments, one image) work too. Targets follow the packer's convention
        (token k predicts targets[k]): the last image token takes the
        placeholder's target (the text after the image), the other image
        tokens predict nothing, as official labels say. A row without a
        placeholder, or with an empty image mask, keeps its text (the
        placeholder is then dropped). Further placeholders (official code
        refuses them; `evejax.data` never makes them) embed as token 0.
        """
        image = self.encode_images(pixels, pixel_mask)
        b, n = tokens.shape
        m = image.tokens.shape[1]
        length = n - 1 + m
        segment_ids = segment_ids.astype(jnp.int32)
        is_placeholder = (tokens == IMAGE_TOKEN_INDEX) & (segment_ids > 0)
        has_placeholder = jnp.any(is_placeholder, axis=1)
        n_image = jnp.sum(image.valid, axis=1)
        has_image = has_placeholder & (n_image > 0)
        start = jnp.where(has_placeholder, jnp.argmax(is_placeholder, axis=1), n).astype(jnp.int32)
        n_image = jnp.where(has_image, n_image, 0)

        pos = jnp.arange(length)[None, :]
        in_image = (pos >= start[:, None]) & (pos < (start + n_image)[:, None])
        after = pos >= (start + n_image)[:, None]
        src = jnp.where(after, pos - n_image[:, None] + has_placeholder[:, None], pos)
        source = jnp.where(in_image | (src >= n), -1, src).astype(jnp.int32)
        last_image = has_image[:, None] & (pos == (start + n_image - 1)[:, None])
        target_source = jnp.where(last_image, start[:, None], source).astype(jnp.int32)
        placeholder_segment = jnp.take_along_axis(segment_ids, jnp.minimum(start, n - 1)[:, None], axis=1)
        segments = jnp.where(in_image, placeholder_segment, gather_text(segment_ids, source, fill=0))

        ids = gather_text(jnp.where(tokens < 0, 0, tokens), source, fill=0)
        text = self.llm.embed(ids)
        slot = jnp.clip(pos - start[:, None], 0, m - 1)
        image_part = jnp.take_along_axis(image.tokens, slot[..., None], axis=1).astype(text.dtype)
        embeds = jnp.where(in_image[..., None], image_part, text)
        return Spliced(embeds=embeds, segment_ids=segments, positions=llm_lib.segment_positions(segments),
                       source=source, target_source=target_source, image_start=start, has_image=has_image,
                       grid=image.grid)

    def __call__(self, tokens, segment_ids, pixels, pixel_mask, teacher_pixels=None, teacher_mask=None, *,
                 deterministic: bool = True, drop_path_rate=None) -> EVEOutput:
        cfg = self.cfg
        training = teacher_pixels is not None
        if training and not cfg.with_pal:
            raise ValueError("teacher inputs were given to the inference EVE (clip=None), which has no PAL")
        if cfg.with_pal and not training and self.is_initializing():
            raise ValueError("initialise the training EVE with teacher_pixels and teacher_mask, so the PAL "
                             "and the teacher get parameters")
        x = self.embed_inputs(tokens, segment_ids, pixels, pixel_mask)
        out = self.llm(inputs_embeds=x.embeds, positions=x.positions, segment_ids=x.segment_ids,
                       deterministic=deterministic, return_hidden=training, drop_path_rate=drop_path_rate)
        logits, pal_loss = out, None
        if training:
            logits, hidden = out
            pal_loss = self.patch_alignment_loss(hidden, x, teacher_pixels, teacher_mask)
        return EVEOutput(logits=logits, segment_ids=x.segment_ids, source=x.source,
                         target_source=x.target_source, pal_loss=pal_loss)

    def patch_alignment_loss(self, hidden, x: Spliced, teacher_pixels, teacher_mask):
        """hidden [L + 1, B, T, D] -> the PAL loss against the frozen teacher's layer features.

        Patch (i, j) of the image sits at image_start + 1 + i (w + 1) + j; the
        pooled grid is average-pooled by patch_ratio onto the teacher grid
        (floor, as official), and teacher patches are moved to the origin of
        the teacher view's valid box, so both sides are row-major over the
        same h' x w' cells.
        """
        cfg = self.cfg
        gp, r, gt = cfg.grid, cfg.patch_ratio, cfg.clip.grid
        b = hidden.shape[1]
        h, w = x.grid[:, 0], x.grid[:, 1]
        i, j = jnp.arange(gp)[:, None], jnp.arange(gp)[None, :]
        where = x.image_start[:, None, None] + 1 + i * (w[:, None, None] + 1) + j
        where = jnp.clip(where, 0, hidden.shape[2] - 1).reshape(b, gp * gp)
        taps = hidden[jnp.asarray(cfg.layer_taps)]
        states = jnp.take_along_axis(taps, where[None, :, :, None], axis=2)
        states = states.reshape(len(cfg.layer_taps), b, gt, r, gt, r, -1).mean(axis=(3, 5))
        states = states.reshape(len(cfg.layer_taps), b, gt * gt, -1)
        pred = self.vision_compressor(states)

        teacher = self.clip(teacher_pixels, return_hidden=True, deterministic=True).hidden_states
        features = jax.lax.stop_gradient(teacher[cfg.teacher_layer][:, 1:])
        t_row0, t_col0, t_rows, t_cols = valid_box(cell_validity(teacher_mask, cfg.clip.patch_size))
        features = shift_to_origin(features.reshape(b, gt, gt, -1), t_row0, t_col0).reshape(b, gt * gt, -1)
        ti, tj = jnp.arange(gt)[:, None], jnp.arange(gt)[None, :]

        def inside(rows, cols):
            return (ti < rows[:, None, None]) & (tj < cols[:, None, None])

        # Both views come from one preprocess_anyres call, so the two boxes agree;
        # the intersection keeps a mismatched record from reading padding.
        valid = inside(h // r, w // r) & inside(t_rows, t_cols) & x.has_image[:, None, None]
        return cosine_alignment_loss(pred, features, valid.reshape(b, gt * gt))


# ---- FLOPs ----------------------------------------------------------------------------

def training_flops(cfg: EVEConfig, batch: int, text_len: int) -> dict[str, float]:
    """MaxText-style model FLOPs of one training step, by part (sum them for the step).

    llm: `llm.training_flops_per_step` at the spliced length T = text_len - 1 + M.
    pel (conv, CA1, CA2 and projector over every canvas cell and token slot, as
    computed) and pal: 6 FLOPs per multiply-add (forward + backward).
    teacher: the frozen CLIP's forward only, 2 FLOPs per multiply-add.
    Attention scores and values count as matmuls; norms and softmax do not.
    """
    t = cfg.llm.transformer
    c, d, p = cfg.vision_width, t.embed_dim, cfg.patch_size
    g2 = (cfg.image_size // p) ** 2
    cells = cfg.grid ** 2
    window = cfg.pool ** 2
    pel_macs = (g2 * 3 * p * p * c                                        # conv
                + cells * c * c + cells * window * 2 * c * c            # CA1 q, kv
                + 2 * cells * window * c + cells * c * c                # CA1 scores, values, proj
                + c * c + cells * 2 * c * c + 2 * cells * c + c * c     # CA2 q, kv, scores+values, proj
                + cfg.max_image_tokens * (c * d + d * d))               # projector
    parts = {"llm": llm_lib.training_flops_per_step(cfg.llm, batch, cfg.llm_length(text_len)),
             "pel": 6.0 * batch * pel_macs, "pal": 0.0, "teacher": 0.0}
    if cfg.with_pal:
        ct = cfg.clip.transformer
        cc, n_taps, patches = ct.embed_dim, len(cfg.layer_taps), cfg.clip.num_patches
        pal_macs = patches * (n_taps * d * cc + d * cc + 2 * (n_taps - 1) * cc + cc * cc)
        parts["pal"] = 6.0 * batch * pal_macs
        tokens = 1 + patches
        layer_macs = tokens * (4 * cc * cc + 2 * cc * ct.mlp_dim) + 2 * tokens * tokens * cc
        clip_macs = patches * 3 * cfg.clip.patch_size ** 2 * cc + ct.num_layers * layer_macs
        parts["teacher"] = 2.0 * batch * clip_macs
    return parts
