"""HoVLE ("Holistic Vision-Language Embedding"): holistic embedding module -> InternLM2, no projector.

Sizes: B batch; P tile slots per sample; S tile side (448); p patch (14); g = S / p
patch grid (32); s = 1 / downsample_ratio pixel-shuffle factor (2); D width (2048,
both parts); N token length; n = (g / s)^2 image tokens per tile for the LLM (256);
N_hd = N + (s^2 - 1) P n the HD stream ("post").

Inputs (the HoVLE conversation batch of evejax.data.pipeline): tokens [B, N] int32
with `img_context_token_id` at the image positions (n per real tile, tiles in slot
order; several images or packed samples are several runs), pixels [B, P, S, S, 3]
float32 (image.tile_image: channels last, normalised, real tiles first), segment_ids
[B, N] (1, 2, ... per packed sample, 0 = padding; default all 1), and optionally
tile_mask [B, P] bool (real tiles; default all), used only to check the placeholder
count on concrete inputs.

`HolisticEmbedding` (embedding_model):
  text: llm_text_embeddings [V_e, D] (its own table, not the LLM's);
  image: conv p x p stride p with bias + learned absolute positions (the grid part
  resized bicubically, as torch's F.interpolate, when a tile's grid differs from g),
  pixel shuffle (g, g, D) -> (g/s, g/s, s^2 D) (token (y, x) row-major, channel
  (s dy + dx) D + c) and Linear-GELU-Linear to D;
  8 causal InternLM2 layers (the shared core) over the mixed sequence, no final norm.
  "pre" (HoVLE): shuffle + projection before the layers; the N outputs are the LLM input.
  "post" (HoVLE-HD): the layers run on the HD stream, the token stream with every image
  placeholder repeated s^2 times (g^2 patch tokens per tile, as official chat code
  builds `hd_input_ids`), positions 0.. on it; image outputs are then shuffled and
  projected, and the LLM input takes them at its placeholders and the HD outputs of
  the text tokens elsewhere. Official code runs "post" at batch 1 only; this runs any
  batch and packed rows.
`HoVLE`: LLM input (optionally L2-normalised, no epsilon, as official) -> CausalLM
  -> logits [B, N, V] float32. `embed_inputs` gives the embedding-module outputs.
  Masks are causal within segments (padding respected, the reference semantics of
  hovle.md §6.4); positions restart in every segment. Dynamic-NTK RoPE, when
  configured, follows the batch's longest row, as transformers does for padded batches.
Generation (evejax.eval.generate): `__call__(..., decode=True)` runs left-padded prompts
  and fills two KV caches, the embedding layers' (over N, "post": N_hd) and the LLM's (over
  N), each as long as the input the model was initialised with (init at N + new tokens sizes
  them N + new and, "post", N_hd + new); `decode_step` then takes one text token per row
  through both, at its own position in each stream (`next_positions`). Official "post"
  decoding never extends its HD stream and fails at the second new token (hovle.md §6.8).

Parameters (Flax paths; stacked layers on axis 0; L_e = 8 embedding layers):
  embedding_model/vision_embeddings/class_embedding [1, 1, D] (unused, kept for the port)
  embedding_model/vision_embeddings/position_embedding [1, 1 + g^2, D] (index 0 unused)
  embedding_model/vision_embeddings/patch_embedding/{kernel [p, p, 3, D], bias [D]}
  embedding_model/llm_text_embeddings/embedding [V_e, D]
  embedding_model/encoder/layers/... [L_e, ...] (the InternLM2 layer of models/llm.py)
  embedding_model/pixel_shuffle_proj/fc1/{kernel [s^2 D, D], bias [D]}, fc2/{kernel [D, D], bias [D]}
  language_model/... (CausalLM: embed_tokens [V, D] is kept but unused, as official)
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from evejax.data import image as image_lib
from evejax.models import llm as llm_lib
from evejax.models import vit as vit_lib
from evejax.models.eve import Projector
from evejax.models.vit import bicubic_resize_matrix
from evejax.nn.layers import Dense, constrain, default_kernel_init, param_with_axes
from evejax.nn.transformer import TransformerConfig, TransformerStack

PIXEL_SHUFFLE_LOCS = ("pre", "post")
TILE_FITS = ("stretch", "pad")
# TransformerConfig fields a precision / memory override sets on both stacks.
_SHARED_TRANSFORMER_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "splash_block_q",
                              "splash_block_kv", "scan_unroll", "matmul_2d", "xla_causal_blocks")
_EMBEDDING_PREFIX = "embedding_"


@dataclasses.dataclass(frozen=True)
class HoVLEConfig:
    """One HoVLE model (reference/hovle.md; §6 where it corrects earlier sections).

    llm: InternLM2-chat-1.8B. embedding: the 8 embedding layers as an InternLM2
    LMConfig whose vocab_size is `llm_vocab_size`, the size of its own text table.
    Inferred, not read from the unavailable config.json (hovle.md §6.10): the
    embedding depth/heads/width, its RoPE (class defaults theta 10000, no scaling,
    max_position_embeddings 4096), pixel_shuffle_loc per release ("pre" HoVLE, "post"
    HoVLE-HD), normalize_encoder_output (class default False), llm_vocab_size 92553, no
    attention biases in either stack (embedding attention_bias class default False; the
    LLM's `bias` false as in InternLM2-chat-1.8B, while the InternLM2 class default is true).
    max_tiles: the official max_dynamic_patch (6), as config.data.max_tiles; a batch has
    `tile_slots` = max_tiles + 1 tile slots per row (the thumbnail; 1 at max_tiles 1). `embedding_drop_path` is the official
    drop_path_rate: the last embedding layer's, linearly less down to 0 at layer 0.
    tile_fit: how an image meets its tile canvas: "stretch" (official InternVL tiling) or "pad"
    (not official: letterboxed in whole LLM tokens, image.TilingConfig.pad_unit; `tiling()`).
    The official config.json has no such field (its code stretches), so `evejax export` cannot
    carry "pad" and an import reads "stretch": a model trained padded is answered padded from
    evejax checkpoints and workdirs, and by whoever pads its tiles the same way.
    """
    llm: llm_lib.LMConfig
    embedding: llm_lib.LMConfig
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    pixel_shuffle_loc: str = "pre"
    normalize_encoder_output: bool = False
    img_context_token_id: int = 92546
    max_tiles: int = 6
    tile_fit: str = "stretch"

    @property
    def shuffle(self) -> int:
        """s: the pixel-shuffle factor, 1 / downsample_ratio."""
        return int(round(1 / self.downsample_ratio))

    @property
    def grid(self) -> int:
        """g: patch grid side of a tile."""
        return self.image_size // self.patch_size

    @property
    def image_tokens_per_tile(self) -> int:
        """n: image tokens per tile in the LLM's stream (256)."""
        return (self.grid // self.shuffle) ** 2

    @property
    def tile_slots(self) -> int:
        """P: tile slots per row of a batch, grid tiles + thumbnail (evejax.data.pipeline)."""
        return self.max_tiles + 1 if self.max_tiles > 1 else 1

    def tiling(self) -> image_lib.TilingConfig:
        """The image tiling this model reads (evejax.data.image.tile_image)."""
        return image_lib.TilingConfig(tile_size=self.image_size, max_tiles=self.max_tiles,
                                      pad_unit=self.patch_size * self.shuffle if self.tile_fit == "pad" else 0)

    def encoder_length(self, text_len: int) -> int:
        """Tokens the embedding layers see for rows of `text_len` with `tile_slots` tiles."""
        if self.pixel_shuffle_loc == "pre":
            return text_len
        return text_len + (self.shuffle ** 2 - 1) * self.tile_slots * self.image_tokens_per_tile

    def validate(self) -> "HoVLEConfig":
        def need(ok, what):
            if not ok:
                raise ValueError(f"HoVLE config: {what}")

        need(self.pixel_shuffle_loc in PIXEL_SHUFFLE_LOCS,
             f"pixel_shuffle_loc={self.pixel_shuffle_loc!r} is not known; use one of {PIXEL_SHUFFLE_LOCS}")
        need(self.shuffle >= 1 and abs(self.shuffle * self.downsample_ratio - 1) < 1e-9,
             f"downsample_ratio={self.downsample_ratio} must be 1 / an integer")
        need(self.image_size % (self.patch_size * self.shuffle) == 0,
             f"image_size={self.image_size} must be a multiple of patch_size * {self.shuffle}")
        e, t = self.embedding.transformer, self.llm.transformer
        need(e.embed_dim == t.embed_dim,
             f"embedding width {e.embed_dim} != LLM width {t.embed_dim} (HoVLE has no projector)")
        need(0 <= self.img_context_token_id < self.embedding.vocab_size,
             f"img_context_token_id={self.img_context_token_id} is outside the embedding vocabulary "
             f"({self.embedding.vocab_size})")
        need(self.max_tiles >= 1, f"max_tiles={self.max_tiles} must be >= 1")
        need(self.tile_fit in TILE_FITS, f"tile_fit={self.tile_fit!r} is not known; use one of {TILE_FITS}")
        return self

    def replace(self, **kw) -> "HoVLEConfig":
        """Own fields; `embedding_<field>` for a TransformerConfig or LMConfig field of the
        embedding layers (embedding_num_layers, embedding_rope_base, embedding_vocab_size);
        other TransformerConfig fields and the LMConfig token fields (vocab_size, bos_id, eos_id,
        pad_id) go to the LLM, and dtype, param_dtype, remat, attention_impl, scan_unroll,
        matmul_2d and xla_causal_blocks also to the embedding layers."""
        own_fields = {f.name for f in dataclasses.fields(self)}
        t_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        lm_fields = {f.name for f in dataclasses.fields(llm_lib.LMConfig)} - {"transformer", "family"}
        e_fields = t_fields | lm_fields
        own, t_kw, e_kw, unknown = {}, {}, {}, []
        for k, v in kw.items():
            inner = k[len(_EMBEDDING_PREFIX):] if k.startswith(_EMBEDDING_PREFIX) else None
            if k in own_fields:
                own[k] = v
            elif k in t_fields or k in lm_fields:
                t_kw[k] = v
            elif inner in e_fields:
                e_kw[inner] = v
            else:
                unknown.append(k)
        if unknown:
            raise ValueError(f"HoVLE config has no field(s) {sorted(unknown)}")
        if t_kw:
            own.setdefault("llm", self.llm.replace(**t_kw))
            e_kw = {**{k: v for k, v in t_kw.items() if k in _SHARED_TRANSFORMER_FIELDS}, **e_kw}
        if e_kw:
            own.setdefault("embedding", self.embedding.replace(**e_kw))
        return dataclasses.replace(self, **own)


def _embedding_layers(vocab, d, layers, heads, kv_heads, mlp, max_pos=4096) -> llm_lib.LMConfig:
    # The official class defaults for the embedding's RoPE (hovle.md §4.2, §6.5), unverified.
    return llm_lib._internlm2(vocab, d, layers, heads, kv_heads, mlp, max_pos=max_pos).replace(
        rope_base=10000.0, rope_scaling=None)


SIZES = {
    # HoVLE (2.6B): 8 embedding layers + InternLM2-chat-1.8B (hovle.md §1, §4.3).
    "2.6b": lambda: HoVLEConfig(llm=llm_lib.get_config("internlm2_1_8b"),
                                embedding=_embedding_layers(92553, 2048, 8, 16, 8, 8192)),
    # HoVLE-HD: the same weights' shapes, shuffle after the layers (hovle.md §1.2, inferred).
    "2.6b_hd": lambda: HoVLEConfig(llm=llm_lib.get_config("internlm2_1_8b"),
                                   embedding=_embedding_layers(92553, 2048, 8, 16, 8, 8192),
                                   pixel_shuffle_loc="post"),
    # Tests: 56 px tiles (g 4, 4 LLM tokens per tile, HD 16); the embedding layers' RoPE
    # base differs from the LLM's so a mix-up shows.
    "tiny": lambda: HoVLEConfig(llm=llm_lib.get_config("internlm2_tiny", max_position_embeddings=512),
                                embedding=_embedding_layers(256, 64, 2, 4, 2, 128, max_pos=512).replace(
                                    rope_base=20000.0),
                                image_size=56, img_context_token_id=250, max_tiles=3),  # 4 slots
    # The ~110M HoVLE of `evejax bench hovle`: 12 InternLM2 layers of llama_110m's width split as
    # HoVLE's 8 + 24 (3 + 9), GQA 12 / 4, one 448 px tile (256 of a 512-token row), vocab 32000.
    "110m": lambda: HoVLEConfig(llm=llm_lib._internlm2(32000, 768, 9, 12, 4, 2048, max_pos=2048),
                                embedding=_embedding_layers(32000, 768, 3, 12, 4, 2048, max_pos=2048),
                                img_context_token_id=31999, max_tiles=1),
    # Demo scale (CPU minutes): 64 px tiles of 8 px patches (g 8, 16 LLM tokens per tile).
    "demo": lambda: HoVLEConfig(llm=llm_lib.get_config("internlm2_tiny", num_layers=4,
                                                       max_position_embeddings=2048),
                                embedding=_embedding_layers(256, 64, 2, 4, 2, 128, max_pos=2048),
                                image_size=64, patch_size=8, img_context_token_id=250, max_tiles=1),
}


def get_config(size: str, **overrides) -> HoVLEConfig:
    if size not in SIZES:
        raise ValueError(f"HoVLE size {size!r} is not known; use one of {sorted(SIZES)}")
    cfg = SIZES[size]()
    return (cfg.replace(**overrides) if overrides else cfg).validate()


def init_inputs(cfg: HoVLEConfig, batch: int = 1, abstract: bool = False) -> tuple:
    """(tokens [B, n + 2] with one tile's placeholders, pixels [B, 1, S, S, 3]) for `HoVLE(cfg).init`."""
    n, s = cfg.image_tokens_per_tile, cfg.image_size
    if abstract:
        return (jax.ShapeDtypeStruct((batch, n + 2), jnp.int32),
                jax.ShapeDtypeStruct((batch, 1, s, s, 3), jnp.float32))
    tokens = jnp.full((batch, n + 2), cfg.img_context_token_id, jnp.int32).at[:, 0].set(1).at[:, -1].set(2)
    return tokens, jnp.zeros((batch, 1, s, s, 3), jnp.float32)


def abstract_params(cfg: HoVLEConfig) -> dict:
    """HoVLE's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    from evejax.sharding import unbox

    init = lambda *a: HoVLE(cfg).init(jax.random.PRNGKey(0), *a)["params"]  # noqa: E731
    return unbox(jax.eval_shape(init, *init_inputs(cfg, abstract=True)))


def param_count(cfg: HoVLEConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))


def check_placeholders(cfg: HoVLEConfig, tokens, tile_mask, segment_ids=None) -> None:
    """Raises ValueError when a row's <IMG_CONTEXT> count is not its real tiles x n (host arrays;
    tile_mask [B, P] bool).

    The model runs this on concrete inputs; under jit it cannot, and then the
    k-th placeholder of a row simply reads image token k (the last one past the end).
    """
    tokens = np.asarray(tokens)
    valid = np.ones(tokens.shape, bool) if segment_ids is None else np.asarray(segment_ids) > 0
    counts = np.sum((tokens == cfg.img_context_token_id) & valid, axis=1)
    expected = np.sum(np.asarray(tile_mask), axis=1) * cfg.image_tokens_per_tile
    bad = np.flatnonzero(counts != expected)
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"HoVLE input row {b}: {int(counts[b])} <IMG_CONTEXT> tokens (id {cfg.img_context_token_id}) but "
            f"{int(expected[b] // cfg.image_tokens_per_tile)} tile(s) x {cfg.image_tokens_per_tile} image tokens "
            f"per tile = {int(expected[b])}; ({bad.size} row(s) differ) expand each image to "
            f"{cfg.image_tokens_per_tile} placeholders per tile, or pass the tile_mask of the real tiles")


def pixel_shuffle(x, grid: int, factor: int):
    """[..., g^2, C] row-major patches -> [..., (g / s)^2, s^2 C]: token (y, x) of the coarse grid,
    channel (s dy + dx) C + c (hovle.md §6.2)."""
    lead, c = x.shape[:-2], x.shape[-1]
    side = grid // factor
    x = x.reshape(*lead, side, factor, side, factor, c)
    x = jnp.moveaxis(x, -3, -4)  # [..., y, x, dy, dx, C]
    return x.reshape(*lead, side * side, factor * factor * c)


class VisionEmbeddings(nn.Module):
    """pixels [..., H, W, 3] -> patch tokens [..., (H / p)(W / p), D] (+ positions)."""
    width: int
    patch_size: int
    grid: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        *lead, height, width, channels = pixels.shape
        p, d = self.patch_size, self.width
        if height % p or width % p:
            raise ValueError(f"HoVLE tiles must be multiples of the patch {p}, got {height} x {width}")
        gh, gw = height // p, width // p
        patches = pixels.astype(self.dtype).reshape(*lead, gh, p, gw, p, channels)
        patches = jnp.moveaxis(patches, -4, -3)  # [..., gh, gw, p, p, 3]
        x = Dense((d,), (None, None, "conv_in"), ("embed",), use_bias=True, name="patch_embedding",
                  dtype=self.dtype, param_dtype=self.param_dtype)(patches)
        init = param_with_axes(default_kernel_init, (None, None, "embed"))
        self.param("class_embedding", init, (1, 1, d), self.param_dtype)
        positions = self.param("position_embedding", init, (1, 1 + self.grid ** 2, d), self.param_dtype)
        table = positions[0, 1:].astype(jnp.float32).reshape(self.grid, self.grid, d)
        if (gh, gw) != (self.grid, self.grid):
            table = jnp.einsum("hi,wj,ijd->hwd", bicubic_resize_matrix(self.grid, gh),
                               bicubic_resize_matrix(self.grid, gw), table)
        return (x + table.astype(self.dtype)).reshape(*lead, gh * gw, d)


class HolisticEmbedding(nn.Module):
    """The embedding module's parts; `HoVLE.embed_inputs` wires them (see the module docstring)."""
    cfg: HoVLEConfig

    def setup(self):
        cfg = self.cfg
        e = cfg.embedding.transformer
        kw = dict(dtype=jnp.dtype(e.dtype), param_dtype=jnp.dtype(e.param_dtype))
        self.vision_embeddings = VisionEmbeddings(e.embed_dim, cfg.patch_size, cfg.grid, **kw)
        self.llm_text_embeddings = nn.Embed(
            cfg.embedding.vocab_size, e.embed_dim, embedding_init=param_with_axes(default_kernel_init,
                                                                                  ("vocab", "embed")), **kw)
        self.encoder = TransformerStack(e)
        self.pixel_shuffle_proj = Projector(e.embed_dim, **kw)

    def text(self, ids):
        # Official: ids past the table (no special_token_maps) embed as row 0.
        return self.llm_text_embeddings(jnp.where((ids >= 0) & (ids < self.cfg.embedding.vocab_size), ids, 0))

    def patches(self, pixels):
        """[B, P, S, S, 3] -> [B, P, g^2, D]."""
        return self.vision_embeddings(pixels)

    def shuffle_project(self, patch_tokens):
        """[B, P, g'^2, D] (g' the tile's grid) -> [B, P, (g' / s)^2, D]."""
        grid = int(round(patch_tokens.shape[-2] ** 0.5))
        return self.pixel_shuffle_proj(pixel_shuffle(patch_tokens, grid, self.cfg.shuffle))

    def __call__(self, x, positions, segment_ids, deterministic: bool = True, decode: bool = False):
        e = self.cfg.embedding.transformer
        x = constrain(x, ("batch", "length", "act_embed"))
        # Official: layer i drops its branches with drop_path * i / (L - 1) (torch.linspace).
        rates = e.drop_path * jnp.linspace(0.0, 1.0, e.num_layers)
        return self.encoder(x, positions, segment_ids, decode=decode, deterministic=deterministic,
                            drop_path_rate=rates)[0]


class Embedded(NamedTuple):
    llm_inputs: jax.Array       # [B, N, D] what the LLM receives
    encoder_outputs: jax.Array  # [B, N, D] ("pre") or [B, N_hd, D] ("post"): the last embedding layer
    positions: jax.Array        # [B, N]
    segment_ids: jax.Array      # [B, N]


def _take(x, index):
    """x [B, M, ...] at index [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _place(values, is_image):
    """The k-th True of is_image [B, K] reads values[:, k]; [B, K, D] (clamped past the end)."""
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, values.shape[1] - 1)
    return _take(values, slot)


class HoVLE(nn.Module):
    """The HoVLE model (see the module docstring)."""
    cfg: HoVLEConfig

    def setup(self):
        self.cfg.validate()
        self.embedding_model = HolisticEmbedding(self.cfg)
        self.language_model = llm_lib.CausalLM(self.cfg.llm)

    def embed_inputs(self, tokens, pixels, segment_ids=None, tile_mask=None,
                     deterministic: bool = True, decode: bool = False) -> Embedded:
        cfg = self.cfg
        b, n = tokens.shape
        if pixels.ndim != 5 or pixels.shape[0] != b or pixels.shape[-1] != 3:
            raise ValueError(f"HoVLE takes pixels [B, P, S, S, 3] for tokens [B, N] = {tokens.shape}, "
                             f"got {pixels.shape}")
        if not any(isinstance(a, jax.core.Tracer) for a in (tokens, segment_ids, tile_mask)):
            mask = np.ones((b, pixels.shape[1]), bool) if tile_mask is None else tile_mask
            check_placeholders(cfg, tokens, mask, segment_ids)
        segment_ids = jnp.ones((b, n), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        emb = self.embedding_model
        is_image = (tokens == cfg.img_context_token_id) & (segment_ids > 0)
        patch_tokens = emb.patches(pixels)  # [B, P, g^2, D]
        positions = llm_lib.segment_positions(segment_ids)
        if cfg.pixel_shuffle_loc == "pre":
            image = emb.shuffle_project(patch_tokens).reshape(b, -1, patch_tokens.shape[-1])
            x = jnp.where(is_image[..., None], _place(image, is_image), emb.text(tokens))
            out = emb(x, positions, segment_ids, deterministic, decode)
            llm_inputs = out
        else:
            llm_inputs, out = self._post(tokens, segment_ids, is_image, patch_tokens, deterministic, decode)
        return Embedded(self._normalized(llm_inputs), out, positions, segment_ids)

    def _normalized(self, llm_inputs):
        if not self.cfg.normalize_encoder_output:
            return llm_inputs
        return llm_inputs / jnp.linalg.norm(llm_inputs, axis=-1, keepdims=True)

    def _post(self, tokens, segment_ids, is_image, patch_tokens, deterministic, decode):
        """HD stream: every placeholder repeated s^2 times, at static length N_hd."""
        emb, r2 = self.embedding_model, self.cfg.shuffle ** 2
        b, n = tokens.shape
        _, tiles, g2, d = patch_tokens.shape
        span = jnp.where(is_image, r2, 1)
        start = jnp.cumsum(span, axis=1) - span  # HD index of each token
        n_hd = n + (r2 - 1) * tiles * (g2 // r2)
        j = jnp.arange(n_hd)
        src = jax.vmap(lambda s: jnp.searchsorted(s, j, side="right") - 1)(start)
        inside = j[None, :] < (start[:, -1] + span[:, -1])[:, None]
        hd_segments = jnp.where(inside, _take(segment_ids, src), 0)
        hd_image = _take(is_image, src) & inside
        x = jnp.where(hd_image[..., None], _place(patch_tokens.reshape(b, tiles * g2, d), hd_image),
                      emb.text(_take(tokens, src)))
        out = emb(x, llm_lib.segment_positions(hd_segments), hd_segments, deterministic, decode)
        where = jax.vmap(lambda m: jnp.nonzero(m, size=tiles * g2, fill_value=0)[0])(hd_image)
        image = emb.shuffle_project(_take(out, where).reshape(b, tiles, g2, d)).reshape(b, -1, d)
        llm_inputs = jnp.where(is_image[..., None], _place(image, is_image), _take(out, start))
        return llm_inputs, out

    def __call__(self, tokens, pixels, segment_ids=None, tile_mask=None, *, deterministic: bool = True,
                 drop_path_rate=None, decode: bool = False):
        """-> logits [B, N, V] float32. `decode`: also fill both KV caches (module docstring)."""
        x = self.embed_inputs(tokens, pixels, segment_ids, tile_mask, deterministic, decode)
        if self.is_initializing():
            self.language_model.embed(tokens[:, :1])  # the unused tok_embeddings, kept for the port
        return self.language_model(inputs_embeds=x.llm_inputs, positions=x.positions,
                                   segment_ids=x.segment_ids, deterministic=deterministic,
                                   drop_path_rate=drop_path_rate, decode=decode)

    def decode_step(self, tokens, positions, encoder_positions):
        """tokens [B, 1] new text tokens -> logits [B, 1, V] float32, after a `decode=True` prompt.

        The token goes through llm_text_embeddings, the embedding layers (their cache; at
        `encoder_positions` of their stream) and the LLM (its cache; at `positions`).
        A generated <IMG_CONTEXT> id is text here: images come with the prompt only.
        """
        emb = self.embedding_model
        real = jnp.ones(tokens.shape, jnp.int32)
        x = self._normalized(emb(emb.text(tokens), encoder_positions, real, decode=True))
        return self.language_model(inputs_embeds=x, positions=positions, segment_ids=real, decode=True)


def next_positions(cfg: HoVLEConfig, tokens, segment_ids):
    """Positions [B] of the first token after left-padded prompts tokens [B, N] (segment_ids 1 =
    real, 0 = padding): (in the LLM's stream, in the embedding layers' stream). "post" counts
    each image placeholder s^2 times there, as the HD stream holds it."""
    real = segment_ids > 0
    llm = jnp.sum(real, axis=1).astype(jnp.int32)
    if cfg.pixel_shuffle_loc == "pre":
        return llm, llm
    images = jnp.sum(real & (tokens == cfg.img_context_token_id), axis=1).astype(jnp.int32)
    return llm, llm + (cfg.shuffle ** 2 - 1) * images


def supervised_mask(cfg: HoVLEConfig, targets, loss_mask, segment_ids):
    """The official loss mask: the data's loss_mask, never padding, an image placeholder or a
    negative (ignored) target."""
    return (loss_mask.astype(jnp.float32) * (segment_ids > 0) * (targets != cfg.img_context_token_id)
            * (targets >= 0))


def training_flops(cfg: HoVLEConfig, batch: int, text_len: int) -> dict[str, float]:
    """MaxText-style model FLOPs of one training step by part, for rows of `text_len` tokens and
    `tile_slots` tiles: the LLM over N, the embedding layers over N ("pre") or N_hd ("post"),
    and the vision part (conv on every tile, shuffle projection on every tile's tokens);
    6 FLOPs per multiply-add (forward + backward), as `llm.training_flops_per_step`."""
    d = cfg.llm.transformer.embed_dim
    r2 = cfg.shuffle ** 2
    vision_macs = cfg.tile_slots * (cfg.grid ** 2 * 3 * cfg.patch_size ** 2 * d
                                   + cfg.image_tokens_per_tile * (r2 * d * d + d * d))
    no_head = cfg.embedding.replace(vocab_size=0)
    return {"llm": llm_lib.training_flops_per_step(cfg.llm, batch, text_len),
            "embedding": llm_lib.training_flops_per_step(no_head, batch, cfg.encoder_length(text_len)),
            "vision": 6.0 * batch * vision_macs}


# ---- Stage 1: distillation on unpaired data (hovle.md §2) ------------------------------------
#
# `HoVLEDistill` is HoVLE plus a frozen vision teacher (`teacher`, models/vit.py InternVLTeacher),
# so its parameters are HoVLE's (embedding_model, language_model) and teacher/{vision_model, mlp1};
# a stage-1 checkpoint restores into HoVLE for stage 2 (the trainer restores partially).
#
#   image stream: pixels [B, P, S, S, 3] (tile_image, real tiles first), tile_mask [B, P] bool;
#     the embedding module reads a row of P n <IMG_CONTEXT> placeholders, no text (the tokens of
#     padding tiles are padding). Student x_I = what the LLM reads at the image positions: the
#     embedding outputs ("pre"), or the shuffled and projected outputs of the g^2 patch tokens per
#     tile ("post"; the distillation then trains the 8 layers on the HD stream and the projection
#     after them). Target z_I = teacher(tile) [n, E]: 256 tokens of 2048 per 448 px tile for
#     InternVL2-2B, token (y, x) of the same 2 x 2 patch block as the student's token (y, x); both
#     read the same ImageNet-normalised tiles, as InternVL and HoVLE preprocess alike.
#   text stream: text_tokens [B, T] random ids of the LLM vocabulary, text_segment_ids [B, T]
#     (1, 0 = padding row). Student x_T = the embedding outputs of the text-only row; target
#     z_T = the frozen LLM's embed_tokens(id).
#   Loss per stream: negative cosine similarity per token (+ 1), mean over the stream's real tokens.
#   Targets are computed under stop_gradient; the stage's trainable regexes freeze everything
#   but embedding_model, so the LLM and the teacher leave each step unchanged.
#
# `HoVLEDistill.anchored` runs the same model on the conversation batches of later stages: HoVLE's
# logits, plus the teacher's target for every image placeholder, so a stage can add a distill_image
# term to its CE (configs/hovle.py, the demo) with the teacher frozen and dropped after training.


@dataclasses.dataclass(frozen=True)
class HoVLEDistillConfig:
    """Stage-1 model: `hovle` and its frozen vision teacher. The teacher's tokens must be the
    LLM's image tokens: num_tokens = n per tile, feature_dim = D, image_size = S."""
    hovle: HoVLEConfig
    teacher: vit_lib.InternVLTeacherConfig | vit_lib.ClipTeacherConfig

    @property
    def image_size(self) -> int:
        return self.hovle.image_size

    @property
    def patch_size(self) -> int:
        return self.hovle.patch_size

    def unpaired_data(self) -> dict:
        """What the unpaired batch (evejax/data/unpaired.py) takes from the model: the tiling, and
        the text ids to draw (the ids both text tables have, less the image placeholder, whose
        text row the model never reads)."""
        h = self.hovle
        return dict(tiling=h.tiling(),
                    vocab_size=min(h.llm.vocab_size, h.embedding.vocab_size),
                    exclude_ids=(h.img_context_token_id,))

    def validate(self) -> "HoVLEDistillConfig":
        h, t = self.hovle.validate(), self.teacher.validate()
        d = h.llm.transformer.embed_dim
        if (t.image_size, t.num_tokens, t.feature_dim) != (h.image_size, h.image_tokens_per_tile, d):
            raise ValueError(
                f"HoVLE stage-1 teacher gives {t.num_tokens} x {t.feature_dim} features per "
                f"{t.image_size} px tile, but the LLM reads {h.image_tokens_per_tile} x {d} per "
                f"{h.image_size} px tile; pick a teacher (config.model.teacher, teacher_overrides) whose "
                "image_size, patch grid / downsample_ratio and llm_dim match")
        return self


class DistillOutput(NamedTuple):
    image_student: jax.Array   # [B, P n, D]
    image_target: jax.Array    # [B, P n, D] float32
    image_mask: jax.Array      # [B, P n] bool: real tiles' tokens
    text_student: jax.Array    # [B, T, D]
    text_target: jax.Array     # [B, T, D] float32
    text_mask: jax.Array       # [B, T] bool
    teacher_projection: jax.Array | None = None  # CLIP teacher: its projection's own loss, else None


class AnchoredOutput(NamedTuple):
    logits: jax.Array          # [B, N, V] float32
    llm_inputs: jax.Array      # [B, N, D]
    image_target: jax.Array    # [B, N, E] float32: the teacher's token at each image placeholder
    image_mask: jax.Array      # [B, N] bool: placeholders of real tiles


def negative_cosine(student, target, mask):
    """Mean over the True tokens of mask [...] of 1 - cos(student, target) ([..., D]); 0 when none.

    The paper's negative cosine similarity per token, plus 1: the same gradients, and a loss
    in [0, 2] that is 0 at a perfect match, so "halved" means something. The norms have an
    epsilon so a zero vector gives cos 0, not NaN."""
    s, z = student.astype(jnp.float32), target.astype(jnp.float32)
    cos = jnp.sum(s * z, -1) / jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(z, axis=-1), 1e-8)
    mask = mask.astype(jnp.float32)
    return jnp.sum((1.0 - cos) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def teacher_tokens_row_major(cfg: vit_lib.InternVLTeacherConfig, features):
    """[M, n, E] teacher tokens -> row-major over the tile's (y, x) grid, as HoVLE's; ps_version
    "v1" leaves InternVL's grid transposed."""
    if cfg.ps_version == "v2":
        return features
    side = cfg.vit.grid // cfg.shuffle
    m, _, e = features.shape
    return features.reshape(m, side, side, e).swapaxes(1, 2).reshape(m, side * side, e)


class HoVLEDistill(HoVLE):
    """(pixels, tile_mask, text_tokens, text_segment_ids) -> DistillOutput (see the section notes).

    With a CLIP teacher (vit.ClipTeacher) the target is its projected features under
    stop_gradient, so the distillation loss never moves the projection: trained by that loss
    jointly with the student, it could map every tile to one vector, which the student copies at
    zero loss having learnt nothing. The projection learns from its own objective instead,
    `teacher_projection`: 1 - cos between the CLIP features it projects (shuffled, 4 Dc) and
    their reconstruction from its output, per real tile token; a collapsed projection cannot
    reconstruct them, so it keeps what CLIP saw."""
    teacher_cfg: vit_lib.InternVLTeacherConfig | vit_lib.ClipTeacherConfig = None  # required

    def setup(self):
        if self.teacher_cfg is None:
            raise ValueError("HoVLEDistill needs teacher_cfg, the InternVL or CLIP teacher's config")
        super().setup()
        HoVLEDistillConfig(self.cfg, self.teacher_cfg).validate()
        clip = isinstance(self.teacher_cfg, vit_lib.ClipTeacherConfig)
        self.teacher = (vit_lib.ClipTeacher if clip else vit_lib.InternVLTeacher)(self.teacher_cfg)

    def _image_targets(self, pixels, tile_mask):
        """-> (target [B, P n, E] float32 under stop_gradient, CLIP teacher's projection loss or None)."""
        b, tiles = tile_mask.shape
        n = self.cfg.image_tokens_per_tile
        flat = pixels.reshape((b * tiles,) + pixels.shape[2:])
        projection_loss = None
        if isinstance(self.teacher_cfg, vit_lib.ClipTeacherConfig):
            target, clip_features = self.teacher(flat)
            rebuilt = self.teacher.reconstruct(target)
            projection_loss = negative_cosine(rebuilt.reshape(b, tiles * n, -1), clip_features.reshape(
                b, tiles * n, -1), jnp.repeat(tile_mask.astype(bool), n, axis=1))
        else:
            target = teacher_tokens_row_major(self.teacher_cfg, self.teacher(flat))
        return jax.lax.stop_gradient(target.astype(jnp.float32)).reshape(b, tiles * n, -1), projection_loss

    def __call__(self, pixels, tile_mask, text_tokens, text_segment_ids=None, *, deterministic: bool = True):
        cfg = self.cfg
        b, tiles = tile_mask.shape
        n = cfg.image_tokens_per_tile
        image_mask = jnp.repeat(tile_mask.astype(bool), n, axis=1)
        placeholders = jnp.full((b, tiles * n), cfg.img_context_token_id, jnp.int32)
        image = self.embed_inputs(placeholders, pixels, image_mask.astype(jnp.int32), tile_mask,
                                  deterministic).llm_inputs
        image_target, projection_loss = self._image_targets(pixels, tile_mask)

        text_segment_ids = (jnp.ones(text_tokens.shape, jnp.int32) if text_segment_ids is None
                            else text_segment_ids.astype(jnp.int32))
        emb = self.embedding_model
        text = emb(emb.text(text_tokens), llm_lib.segment_positions(text_segment_ids), text_segment_ids,
                   deterministic)
        # (normalize_encoder_output would scale text: the cosine does not see it)
        text_target = jax.lax.stop_gradient(self.language_model.embed(text_tokens).astype(jnp.float32))
        if self.is_initializing():  # the LLM's layers, unused in stage 1, kept for the next stages
            self.language_model(inputs_embeds=text[:, :1], segment_ids=text_segment_ids[:, :1])
        return DistillOutput(image, image_target, image_mask, text, text_target, text_segment_ids > 0,
                             projection_loss)

    def anchored(self, tokens, pixels, segment_ids=None, tile_mask=None, *, deterministic: bool = True):
        """The conversation batch of `HoVLE` -> AnchoredOutput: HoVLE's logits, and what the LLM reads
        at each image placeholder next to the frozen teacher's token for it (the k-th placeholder of
        a row, the k-th token of its tiles, as `embed_inputs` places them), for a distill_image term
        next to the CE in later stages (stage 1's teacher and projection, both frozen then)."""
        b, tiles = pixels.shape[:2]
        tile_mask = jnp.ones((b, tiles), bool) if tile_mask is None else tile_mask
        x = self.embed_inputs(tokens, pixels, segment_ids, tile_mask, deterministic)
        logits = self.language_model(inputs_embeds=x.llm_inputs, positions=x.positions,
                                     segment_ids=x.segment_ids, deterministic=deterministic)
        is_image = (tokens == self.cfg.img_context_token_id) & (x.segment_ids > 0)
        real_tokens = jnp.sum(tile_mask, axis=1, keepdims=True) * self.cfg.image_tokens_per_tile
        target = _place(self._image_targets(pixels, tile_mask)[0], is_image)
        return AnchoredOutput(logits, x.llm_inputs, target, is_image & (jnp.cumsum(is_image, axis=1) <= real_tokens))


def distill_init_inputs(cfg: HoVLEConfig, abstract: bool = False) -> tuple:
    """(pixels [1, 1, S, S, 3], tile_mask [1, 1], text_tokens [1, 4]) for `HoVLEDistill.init`."""
    s = cfg.image_size
    shapes = (((1, 1, s, s, 3), jnp.float32), ((1, 1), jnp.bool_), ((1, 4), jnp.int32))
    if abstract:
        return tuple(jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes)
    return tuple(jnp.ones(shape, dt) for shape, dt in shapes)


def _teacher_macs(t, tiles: int) -> tuple[float, float]:
    """(the frozen tower's, the projection's) multiply-adds of a teacher forward over `tiles` tiles."""
    clip = isinstance(t, vit_lib.ClipTeacherConfig)
    tower = t.clip if clip else t.vit
    v = tower.transformer
    tokens, d = 1 + t.num_patches, v.embed_dim
    layer = tokens * (4 * d * d + 2 * d * v.mlp_dim) + 2 * tokens * tokens * d
    projector = 0 if t.llm_dim is None else t.num_tokens * (t.shuffled_dim * t.llm_dim + t.llm_dim ** 2)
    return tiles * (t.num_patches * 3 * tower.patch_size ** 2 * d + v.num_layers * layer), tiles * projector


def distill_training_flops(cfg: HoVLEDistillConfig, batch: int, text_len: int) -> dict[str, float]:
    """Model FLOPs of one stage-1 step by part: the embedding layers over the image rows (P n
    tokens, HD length for "post") and the text rows (text_len), forward + backward (6 per
    multiply-add); the image embedding of every tile; the teacher forward only (2 per
    multiply-add), except a CLIP teacher's projection and reconstruction, which train (6).
    The LLM only looks up its embeddings."""
    h, t = cfg.hovle, cfg.teacher
    image_len = h.tile_slots * h.image_tokens_per_tile
    no_head = h.embedding.replace(vocab_size=0)
    clip = isinstance(t, vit_lib.ClipTeacherConfig)
    tower, projector = _teacher_macs(t, h.tile_slots)
    flops = {"embedding_image": llm_lib.training_flops_per_step(no_head, batch, h.encoder_length(image_len)),
             "embedding_text": llm_lib.training_flops_per_step(no_head, batch, text_len),
             "vision": training_flops(h, batch, image_len)["vision"],
             "teacher": 2.0 * batch * (tower + (0 if clip else projector))}
    if clip:  # projection + reconstruction (llm_dim -> shuffled_dim), forward and backward
        flops["teacher_projection"] = 6.0 * batch * (projector + h.tile_slots * t.num_tokens * t.llm_dim
                                                     * t.shuffled_dim)
    return flops


def anchored_training_flops(cfg: HoVLEDistillConfig, batch: int, text_len: int) -> dict[str, float]:
    """Model FLOPs of a step of `HoVLEDistill.anchored`: HoVLE's (`training_flops`) and the frozen
    teacher's forward with its projection (2 per multiply-add)."""
    return {**training_flops(cfg.hovle, batch, text_len),
            "teacher": 2.0 * batch * sum(_teacher_macs(cfg.teacher, cfg.hovle.tile_slots))}
