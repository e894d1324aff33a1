"""De-focus Attention Networks classifiers (arXiv 2406.04342; official `DefocusAttentionNetwork`).

DANClassifier: pixels [B, H, W, 3] (NHWC, ImageNet-normalised) -> DANOutput:
  logits [B, C] float32 (`head` on the class token: the prediction) and
  token_logits [B, P, C] float32 (`head2` on every image token: the auxiliary loss).

  patches: conv p x p, stride p, with bias, raster order     [B, P, D]   (P = H/p * W/p)
  -> [patches, cls_token] (the class token LAST, the only token that sees every patch)
  -> right-padded to a multiple of `pad_length_to` (exact: every block is causal)
  -> `depth` blocks, drop path on each residual branch at rate r * i / (depth - 1)
  -> norm (LayerNorm, eps 1e-6) -> head(token P), head2(tokens 0..P-1)

Mamba block (no MLP): x <- x + drop_path(MambaMixer(RMSNorm(x))), the residual in float32.
No position embedding: positions enter through the conv, the decay and the rotation of B, C.

Parameters (Flax paths; blocks stacked on axis 0) -> official state-dict names:
  patch_embed/kernel [p, p, 3, D] (HWIO), bias [D]   <- patch_embed.proj.weight (OIHW), .bias
  cls_token [D]                                        <- cls_token [1, 1, D]
  blocks/norm/scale [L, D]                             <- blocks.{i}.norm.weight
  blocks/mixer/... [L, ...]                            <- blocks.{i}.mixer.... (nn/mamba.py)
  norm/{scale, bias} [D]                               <- norm.weight, norm.bias
  head/{kernel [D, C], bias [C]}, head2/...            <- head.weight, head.bias, head2.*
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
from evejax.nn.transformer import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class DANConfig:
    image_size: tuple[int, int]  # (H, W)
    patch_size: int
    num_classes: int
    depth: int
    mamba: MambaConfig
    head: str = "linear"         # "linear" (official IN1k_cls) or "mlp" (IN22k*: Linear, Tanh, Linear)
    drop_path: float = 0.0       # the maximum drop-path rate when a step gives none
    block_norm_eps: float = 1e-5
    norm_eps: float = 1e-6
    pad_length_to: int = 1       # e.g. 8 or 128 on TPU: 197 tokens are prime
    remat: str = "full"

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def embed_dim(self) -> int:
        return self.mamba.embed_dim

    def replace(self, **kw) -> "DANConfig":
        if "image_size" in kw and isinstance(kw["image_size"], int):
            kw["image_size"] = (kw["image_size"], kw["image_size"])
        own_fields = {f.name for f in dataclasses.fields(self)}
        m_fields = {f.name for f in dataclasses.fields(MambaConfig)}
        own = {k: v for k, v in kw.items() if k in own_fields}
        m_kw = {k: v for k, v in kw.items() if k in m_fields and k not in own_fields}
        unknown = set(kw) - own_fields - m_fields
        if unknown:
            raise ValueError(f"DAN config has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, mamba=dataclasses.replace(self.mamba, **m_kw), **own)

    def validate(self) -> "DANConfig":
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"DAN image size {h}x{w} is not divisible by the patch size {self.patch_size}; "
                             "crop or pad the image to a multiple of it")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"DAN head {self.head!r} is not known; use 'linear' or 'mlp'")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r} is not known; use one of {sorted(REMAT_POLICIES)}")
        self.mamba.validate()
        return self


def _mamba(d: int, e: int, depth: int, image: int = 224, **kw) -> DANConfig:
    m_fields = {f.name for f in dataclasses.fields(MambaConfig)}
    mamba = MambaConfig(embed_dim=d, intermediate_size=e, **{k: v for k, v in kw.items() if k in m_fields})
    return DANConfig(image_size=(image, image), patch_size=16, num_classes=1000, depth=depth, mamba=mamba,
                     **{k: v for k, v in kw.items() if k not in m_fields})


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
        dtype, pdtype = jnp.dtype(cfg.mamba.dtype), jnp.dtype(cfg.mamba.param_dtype)
        d, p = cfg.embed_dim, cfg.patch_size
        b, height, width, channels = pixels.shape
        if (height, width) != cfg.image_size:
            raise ValueError(f"DAN expects pixels [B, {cfg.image_size[0]}, {cfg.image_size[1]}, 3], got "
                             f"{tuple(pixels.shape)}; set image_size (and rope/delta_scale_factor) for this size")
        gh, gw = cfg.grid
        patches = pixels.astype(dtype).reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x = Dense((d,), (None, None, "conv_in"), ("embed",), use_bias=True, dtype=dtype, param_dtype=pdtype,
                  kernel_init=_torch_default_init(p * p * channels), name="patch_embed")(patches)
        cls = self.param("cls_token", param_with_axes(default_kernel_init, ("embed",)), (d,), pdtype)
        x = jnp.concatenate([x.reshape(b, gh * gw, d), jnp.broadcast_to(cls.astype(dtype), (b, 1, d))], axis=1)
        length = x.shape[1]
        x = jnp.pad(x, ((0, 0), (0, -length % cfg.pad_length_to), (0, 0)))
        x = constrain(x.astype(jnp.float32), ("batch", "length", "act_embed"))

        rate = cfg.drop_path if drop_path_rate is None else drop_path_rate
        block = MambaBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=0, length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})(
            cfg, deterministic=deterministic, name="blocks")(x, drop_path_rates(rate, cfg.depth))
        x = LayerNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")(x[:, :length])
        head = lambda name: _Head(cfg.num_classes, cfg.head, dtype, pdtype, name=name)  # noqa: E731
        return DANOutput(logits=head("head")(x[:, -1]), token_logits=head("head2")(x[:, :-1]))


class _Head(nn.Module):
    """[..., D] -> [..., C] float32: Linear (kernel [D, C], bias [C]) or, `kind="mlp"`,
    fc1 [D, 3D] -> tanh -> fc2 [3D, C] (the official IN-22k heads)."""
    num_classes: int
    kind: str
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        if self.kind == "mlp":
            x = jnp.tanh(Dense((3 * x.shape[-1],), ("embed",), ("mlp",), use_bias=True, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="fc1")(x))
            return Dense((self.num_classes,), ("mlp",), (None,), use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="fc2")(x).astype(jnp.float32)
        kernel = self.param("kernel", param_with_axes(default_kernel_init, ("embed", None)),
                            (x.shape[-1], self.num_classes), self.param_dtype)
        bias = self.param("bias", param_with_axes(nn.initializers.zeros, (None,)), (self.num_classes,),
                          self.param_dtype)
        return (jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)).astype(jnp.float32)


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
    """Model FLOPs of one forward+backward step: 6 x multiply-adds (matmuls, the conv, the scan
    counted as 3 E N per token: decay, injection, read-out; head2 on every image token)."""
    m, d = cfg.mamba, cfg.embed_dim
    e, n, r, k = m.intermediate_size, m.state_size, m.time_step_rank, m.conv_kernel
    tokens = cfg.num_patches + 1
    block = d * 2 * e + e * k + e * (r + 2 * n) + r * e + 3 * e * n + e * d
    head = d * cfg.num_classes if cfg.head == "linear" else d * 3 * d + 3 * d * cfg.num_classes
    macs = cfg.num_patches * 3 * cfg.patch_size ** 2 * d + cfg.depth * tokens * block + tokens * head
    return 6.0 * batch * macs
