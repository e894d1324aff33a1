"""De-focus Attention Networks classifiers (arXiv 2406.04342; official `DefocusAttentionNetwork`).

DANClassifier: pixels [B, H, W, 3] (NHWC, ImageNet-normalised) -> DANOutput:
  logits [B, C] float32 (`head` on the class token: the prediction) and
  token_logits [B, P, C] float32 (`head2` on every image token: the auxiliary loss).

  patches: conv p x p, stride p, with bias, raster order     [B, P, D]   (P = H/p * W/p)
    (`patch_order="windows"`: the official PatchEmbedChangeRes (MODEL.patch_embed_change_res):
    the 2 x 2 windows of the grid one after the other in raster order, each raster inside)
  -> [patches, cls_token] (the class token LAST, the only token that sees every patch)
  -> right-padded to a multiple of `pad_length_to` (exact: every block is causal)
  -> `depth` blocks, drop path on each residual branch at rate r * i / (depth - 1)
  -> norm (LayerNorm, eps 1e-6) -> head(token P), head2(tokens 0..P-1)

Mamba block (no MLP): x <- x + drop_path(MambaMixer(RMSNorm(x))), the residual in float32.
No position embedding: positions enter through the conv, the decay and the rotation of B, C.
`backbone="vit"`: the De-focus ViT, the shared core (nn/transformer.py) with causal de-focus
attention (nn/attention.py: learned per-head decay and rotation, DAN Eq. 8); no official code
exists, so its choices are stated in `_vit` and nn/attention.py.

Parameters (Flax paths; blocks stacked on axis 0) -> official state-dict names:
  patch_embed/kernel [p, p, 3, D] (HWIO), bias [D]   <- patch_embed.proj.weight (OIHW), .bias
  cls_token [D]                                        <- cls_token [1, 1, D]
  blocks/norm/scale [L, D]                             <- blocks.{i}.norm.weight
  blocks/mixer/... [L, ...]                            <- blocks.{i}.mixer.... (nn/mamba.py)
  norm/{scale, bias} [D]                               <- norm.weight, norm.bias
  head/{kernel [D, C], bias [C]}, head2/...            <- head.weight, head.bias, head2.*
  ViT: blocks/layers/... as the shared core's (models/llm.py lists them), plus
  blocks/layers/attention/defocus_decay [L, N] (lambda_hat) and defocus_freq [L, N, H/2] (theta)
  with head="mlp" (the IN-22k heads, Large): head/fc1/{kernel [D, 3D], bias} <- head.0.*,
    head/fc2/{kernel [3D, C], bias} <- head.2.* (and head2 the same)
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from evejax.nn.layers import Dense, DropPath, LayerNorm, RMSNorm, constrain, default_kernel_init, param_with_axes
from evejax.nn.mamba import MambaConfig, MambaMixer
from evejax.nn.transformer import REMAT_POLICIES, TransformerConfig, TransformerStack


PATCH_ORDERS = ("raster", "windows")


@dataclasses.dataclass(frozen=True)
class DANConfig:
    image_size: tuple[int, int]  # (H, W)
    patch_size: int
    num_classes: int
    depth: int
    backbone: str = "mamba"      # "mamba" (blocks from `mamba`) or "vit" (the shared core, `transformer`)
    mamba: Optional[MambaConfig] = None
    transformer: Optional[TransformerConfig] = None
    head: str = "linear"         # "linear" (official IN1k_cls) or "mlp" (IN22k*: Linear, Tanh, Linear)
    drop_path: float = 0.0       # the maximum drop-path rate when a step gives none
    block_norm_eps: float = 1e-5  # the Mamba blocks' RMSNorm
    norm_eps: float = 1e-6
    pad_length_to: int = 1       # e.g. 8 or 128 on TPU: 197 tokens are prime
    remat: str = "full"
    # Token order; the official code never resizes any weight for a new resolution (there is no
    # position embedding, and patch 16 at every size): the model is built at the new size with its
    # rope/delta scale factors and this order, then the weights load unchanged. No released yaml
    # sets patch_embed_change_res, so "raster" is the released models' order.
    patch_order: str = "raster"

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def blocks(self):
        """The backbone's own config: MambaConfig or TransformerConfig."""
        return self.mamba if self.backbone == "mamba" else self.transformer

    @property
    def embed_dim(self) -> int:
        return self.blocks.embed_dim

    @property
    def dtype(self):
        return jnp.dtype(self.blocks.dtype)

    @property
    def param_dtype(self):
        return jnp.dtype(self.blocks.param_dtype)

    def replace(self, **kw) -> "DANConfig":
        """Own fields, else the backbone's (MambaConfig or TransformerConfig; num_layers is depth)."""
        if isinstance(kw.get("image_size"), int):
            kw["image_size"] = (kw["image_size"],) * 2
        if "num_layers" in kw:
            kw["depth"] = kw.pop("num_layers")
        own_fields = {f.name for f in dataclasses.fields(self)}
        own = {k: v for k, v in kw.items() if k in own_fields}
        sub = {k: v for k, v in kw.items() if k not in own_fields}
        inner = self.blocks
        unknown = set(sub) - {f.name for f in dataclasses.fields(inner)}
        if unknown:
            raise ValueError(f"DAN config ({self.backbone}) has no field(s) {sorted(unknown)}")
        if self.backbone == "vit":
            sub.update(num_layers=own.get("depth", self.depth), remat=own.get("remat", self.remat))
        inner = dataclasses.replace(inner, **sub)
        return dataclasses.replace(self, **own, **{"mamba" if self.backbone == "mamba" else "transformer": inner})

    def validate(self) -> "DANConfig":
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"DAN image size {h}x{w} is not divisible by the patch size {self.patch_size}; "
                             "crop or pad the image to a multiple of it")
        if self.patch_order not in PATCH_ORDERS:
            raise ValueError(f"DAN patch_order {self.patch_order!r} is not known; use one of {PATCH_ORDERS}")
        if self.patch_order == "windows" and (self.grid[0] % 2 or self.grid[1] % 2):
            raise ValueError(f"patch_order 'windows' splits the {self.grid[0]}x{self.grid[1]} patch grid into "
                             "2 x 2 windows: both sides need an even number of patches")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"DAN head {self.head!r} is not known; use 'linear' or 'mlp'")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r} is not known; use one of {sorted(REMAT_POLICIES)}")
        if self.backbone not in ("mamba", "vit") or self.blocks is None:
            raise ValueError(f"DAN backbone {self.backbone!r} needs 'mamba' with a MambaConfig or 'vit' with a "
                             "TransformerConfig")
        if self.backbone == "mamba":
            self.mamba.validate()
        else:
            t = self.transformer.validate()
            if not t.causal or t.num_layers != self.depth or t.num_heads * t.head_dim != t.embed_dim:
                raise ValueError("a De-focus ViT needs causal=True, num_layers == depth and "
                                 "num_heads x head_dim == embed_dim")
        return self


def _mamba(d: int, e: int, depth: int, image: int = 224, **kw) -> DANConfig:
    m_fields = {f.name for f in dataclasses.fields(MambaConfig)}
    mamba = MambaConfig(embed_dim=d, intermediate_size=e, **{k: v for k, v in kw.items() if k in m_fields})
    return DANConfig(image_size=(image, image), patch_size=16, num_classes=1000, depth=depth, mamba=mamba,
                     **{k: v for k, v in kw.items() if k not in m_fields})


def _vit(d: int, heads: int, depth: int, image: int = 224, **kw) -> DANConfig:
    """DeiT shapes (reference/dan.md §4: De-focus ViT-S/B = DeiT-S/B + head2) on the shared core:
    LayerNorm eps 1e-6, GELU MLP of 4d, biases everywhere, causal de-focus attention with
    interleaved pairs (RetNet's layout). No position embedding (the official class has
    use_pos_embed False; no ViT code was released, so this is inferred). Counts: S 22,362,392 (paper 22.4M), B 87,190,112 (paper 87.4M)."""
    t = TransformerConfig(num_layers=depth, embed_dim=d, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                          mlp_dim=4 * d, mlp_act="gelu", mlp_gated=False, mlp_bias=True, norm="layer",
                          norm_eps=1e-6, qkv_bias=True, out_bias=True, causal=True, rope_base=10000.0,
                          rope_layout="interleaved", defocus="scale")
    return DANConfig(image_size=(image, image), patch_size=16, num_classes=1000, depth=depth, backbone="vit",
                     transformer=t, **kw)


SIZES = {
    # reference/dan.md §4 and §12. Counts include both heads.
    # Small: no official config; the yaml default intermediate_size 1536 gives 49.1M parameters,
    # intermediate_size 768 gives the README's 25.1M (25,092,944), so Small uses 768.
    "mamba_s": lambda: _mamba(384, 768, 24, drop_path=0.75),
    # Base: defocus_mamba_base.yaml (drop path 0.1 -> 0.75 per epoch); 92,650,832.
    "mamba_b": lambda: _mamba(768, 1536, 24, drop_path=0.75),
    # Large, the IN-1k fine-tune (defocus_mamba_large.yaml): 384 px, MLP heads, rope/delta scale 4/2
    # for the 192 -> 384 transfer, drop path 0.1 -> 0.7; 330,117,840. The IN-21k pre-train is
    # `image_size=192, num_classes=21841, rope_scale_factor=1, delta_scale_factor=1, drop_path=0.4`.
    "mamba_l": lambda: _mamba(1024, 2048, 48, image=384, head="mlp", rope_scale_factor=4.0,
                              delta_scale_factor=2.0, drop_path=0.7),
    "mamba_tiny": lambda: dataclasses.replace(
        _mamba(32, 64, 2, image=32, state_size=8, time_step_rank=4, group_norm_size=16, scan_chunk=8),
        patch_size=8, num_classes=10),
    # De-focus ViT-S/B (paper Table 1: 22.4M, 87.4M; drop path as the Mamba recipe, paper 0.1 -> 0.7).
    # DeiT-S's 6 heads; the broken official factory `defocus_deit_small` asks for 12.
    "vit_s": lambda: _vit(384, 6, 12, drop_path=0.7),
    "vit_b": lambda: _vit(768, 12, 12, drop_path=0.7),
    "vit_tiny": lambda: dataclasses.replace(_vit(32, 4, 2, image=32), patch_size=8, num_classes=10),
}


def get_config(size: str, **overrides) -> DANConfig:
    if size not in SIZES:
        raise ValueError(f"DAN size {size!r} is not known; use one of {sorted(SIZES)}")
    cfg = SIZES[size]()
    return (cfg.replace(**overrides) if overrides else cfg).validate()


def drop_path_rates(max_rate, depth: int):
    """[depth] float32: r * i / (depth - 1), 0 at the first block and r at the last (torch.linspace(0, r, depth))."""
    return jnp.asarray(max_rate, jnp.float32) * (jnp.arange(depth, dtype=jnp.float32) / max(depth - 1, 1))


class DANOutput(NamedTuple):
    logits: jax.Array        # [B, C] float32
    token_logits: jax.Array  # [B, P, C] float32


class MambaBlock(nn.Module):
    """x [B, T, D] float32 -> x + drop_path(mixer(norm(x))); called by nn.scan as (carry, rate)."""
    cfg: DANConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, rate):
        m = self.cfg.mamba
        x = constrain(x, ("batch", "length", "act_embed"))
        h = RMSNorm(eps=self.cfg.block_norm_eps, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                    name="norm")(x)
        h = MambaMixer(m, name="mixer")(h)
        return x + DropPath()(h, rate, deterministic=self.deterministic).astype(jnp.float32), None


def _torch_default_init(fan_in: int):
    # PyTorch's Conv2d default for weight and bias: U(+-1/sqrt(fan_in)).
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0, 1.0) / math.sqrt(fan_in)


class DANClassifier(nn.Module):
    """pixels [B, H, W, 3] -> DANOutput (see the module docstring).

    `drop_path_rate`: the maximum rate (a traced scalar is fine: a per-epoch schedule does not
    recompile); None uses `cfg.drop_path`. It only acts with deterministic=False.
    """
    cfg: DANConfig

    @nn.compact
    def __call__(self, pixels, *, deterministic: bool = True, drop_path_rate=None):
        cfg = self.cfg.validate()
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        d, p = cfg.embed_dim, cfg.patch_size
        b, height, width, channels = pixels.shape
        if (height, width) != cfg.image_size:
            raise ValueError(f"DAN expects pixels [B, {cfg.image_size[0]}, {cfg.image_size[1]}, 3], got "
                             f"{tuple(pixels.shape)}; set image_size (and rope/delta_scale_factor) for this size")
        gh, gw = cfg.grid
        patches = pixels.astype(dtype).reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x = Dense((d,), (None, None, "conv_in"), ("embed",), use_bias=True, dtype=dtype, param_dtype=pdtype,
                  kernel_init=_torch_default_init(p * p * channels), flatten=cfg.blocks.matmul_2d,
                  name="patch_embed")(patches)
        cls = self.param("cls_token", param_with_axes(default_kernel_init, ("embed",)), (d,), pdtype)
        if cfg.patch_order == "windows":
            x = x.reshape(b, 2, gh // 2, 2, gw // 2, d).transpose(0, 1, 3, 2, 4, 5)
        x = jnp.concatenate([x.reshape(b, gh * gw, d), jnp.broadcast_to(cls.astype(dtype), (b, 1, d))], axis=1)
        length = x.shape[1]
        x = jnp.pad(x, ((0, 0), (0, -length % cfg.pad_length_to), (0, 0)))
        rates = drop_path_rates(cfg.drop_path if drop_path_rate is None else drop_path_rate, cfg.depth)
        if cfg.backbone == "vit":
            x = constrain(x, ("batch", "length", "act_embed"))
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
            x, _ = TransformerStack(cfg.transformer, name="blocks")(
                x, positions, jnp.ones(x.shape[:2], jnp.int32), deterministic=deterministic, drop_path_rate=rates)
        else:
            x = constrain(x.astype(jnp.float32), ("batch", "length", "act_embed"))
            block = MambaBlock
            if cfg.remat != "none":
                block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                           in_axes=0, length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})(
                cfg, deterministic=deterministic, name="blocks")(x, rates)
        x = LayerNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")(x[:, :length])
        return DANOutput(logits=self._head("head", x[:, -1]), token_logits=self._head("head2", x[:, :-1]))

    def _head(self, name: str, x):
        """[..., D] -> [..., C] float32: Linear, or fc1 [D, 3D] -> tanh -> fc2 (the official IN-22k heads)."""
        kw = dict(use_bias=True, dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
                  flatten=self.cfg.blocks.matmul_2d)
        classes = (self.cfg.num_classes,)
        if self.cfg.head == "linear":
            return Dense(classes, ("embed",), (None,), name=name, **kw)(x).astype(jnp.float32)
        return _MLPHead(classes, kw, name=name)(x)


class _MLPHead(nn.Module):
    classes: tuple
    kw: dict

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(Dense((3 * x.shape[-1],), ("embed",), ("mlp",), name="fc1", **self.kw)(x))
        return Dense(self.classes, ("mlp",), (None,), name="fc2", **self.kw)(h).astype(jnp.float32)


def init_inputs(cfg: DANConfig, batch: int = 1, abstract: bool = False) -> tuple:
    """(pixels [B, H, W, 3],) for `DANClassifier(cfg).init`."""
    shape = (batch, *cfg.image_size, 3)
    return (jax.ShapeDtypeStruct(shape, jnp.float32),) if abstract else (jnp.zeros(shape, jnp.float32),)


def abstract_params(cfg: DANConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (nothing allocated)."""
    from evejax.sharding import unbox

    init = lambda *a: DANClassifier(cfg).init(jax.random.PRNGKey(0), *a)["params"]  # noqa: E731
    return unbox(jax.eval_shape(init, *init_inputs(cfg, abstract=True)))


def param_count(cfg: DANConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))


def classification_loss(out: DANOutput, targets, weights):
    """The official loss mix: (CE(head(cls)) + mean over image tokens of CE(head2(token))) / 2.

    targets [B, C] float32 class probabilities (one-hot, smoothed or mixed), weights [B] (0 for a
    padding row). Returns (loss, ce, aux_ce, weight), each CE the weighted mean over rows.
    """
    weights = weights.astype(jnp.float32)
    weight = jnp.sum(weights)
    ce_rows = optax.softmax_cross_entropy(out.logits, targets)
    aux_rows = jnp.mean(optax.softmax_cross_entropy(out.token_logits, targets[:, None]), axis=1)
    mean = lambda v: jnp.sum(v * weights) / jnp.maximum(weight, 1.0)  # noqa: E731
    ce, aux_ce = mean(ce_rows), mean(aux_rows)
    return (ce + aux_ce) / 2, ce, aux_ce, weight


def training_flops(cfg: DANConfig, batch: int) -> float:
    """Model FLOPs of one forward+backward step: 6 x multiply-adds (matmuls; Mamba: the conv and
    the scan counted as 3 E N per token: decay, injection, read-out; ViT: causal attention scores
    and values, halved; head2 on every image token)."""
    d, tokens = cfg.embed_dim, cfg.num_patches + 1
    if cfg.backbone == "vit":
        block = 4 * d * d + 2 * d * cfg.transformer.mlp_dim + tokens * d
    else:
        m = cfg.mamba
        e, n, r, k = m.intermediate_size, m.state_size, m.time_step_rank, m.conv_kernel
        block = d * 2 * e + e * k + e * (r + 2 * n) + r * e + 3 * e * n + e * d
    head = d * cfg.num_classes if cfg.head == "linear" else d * 3 * d + 3 * d * cfg.num_classes
    macs = cfg.num_patches * 3 * cfg.patch_size ** 2 * d + cfg.depth * tokens * block + tokens * head
    return 6.0 * batch * macs
