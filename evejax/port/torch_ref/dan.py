"""Compact PyTorch reference of De-focus Mamba (`DefocusAttentionNetwork` with `MambaBlock`s) with
the official parameter names, written from the facts of reference/dan.md (§2, §3, §8, §11, §12:
`classification/models/` of OpenGVLab/De-focus-Attention-Networks at 9406511). The CUDA kernels
are replaced by plain PyTorch: `causal_conv1d_fn` by the depthwise Conv1d with its right end cut
(the official fallback, bit-identical per §12) and `selective_scan_fn` by a sequential scan
(`selective_scan`: mamba_ssm's `selective_scan_ref`, the CPU path the official code has, with its
token slicing chosen by `scan_slicing`).

Parameters (d embed_dim, E intermediate_size, N state_size, R time_step_rank, k conv_kernel,
p patch_size, C num_classes), in the official state-dict order::

    cls_token                              [1, 1, d]
    patch_embed.proj.weight                [d, 3, p, p]   (+ .bias [d])
    blocks.{i}.norm.weight                 [d]
    blocks.{i}.mixer.A_log                 [E, N]
    blocks.{i}.mixer.D                     [E]
    blocks.{i}.mixer.freq                  [N]            (use_rope)
    blocks.{i}.mixer.conv1d.weight         [E, 1, k]      (+ .bias [E])
    blocks.{i}.mixer.in_proj.weight        [2E, d]
    blocks.{i}.mixer.x_proj.weight         [R + 2N, E]
    blocks.{i}.mixer.dt_proj.weight        [E, R]         (+ .bias [E])
    blocks.{i}.mixer.out_proj.weight       [d, E]
    norm.weight, norm.bias                 [d]
    head.weight [C, d], head.bias          (head_type IN1k_cls)
    head.0.* [3d, d], head.2.* [C, 3d]     (IN22k_cls, IN22kto1k_cls: Linear, Tanh, Linear)
    head2.*                                like head (use_aux_loss)

`DefocusAttentionNetwork.forward(images [B, 3, H, W])`, H and W multiples of p, evaluation only
(no drop path): with `use_aux_loss` the official output [B, H W / p^2 + 1, C], `head2` on every
image token then `head` on the class token (last); without, `head(class token)` [B, C]. The class
token is appended after the raster-ordered patches; no position embedding.
"""
from __future__ import annotations

import dataclasses
import math

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    raise ImportError("the PyTorch De-focus Mamba reference needs PyTorch: pip install 'evejax[torch]'") from None

HEAD_TYPES = ("IN1k_cls", "IN22k_cls", "IN22kto1k_cls")
SCAN_SLICINGS = ("time_major", "mamba_ssm")
EMBED_DIMS = {"defocus_mamba_small": 384, "defocus_mamba_base": 768, "defocus_mamba_large": 1024}


@dataclasses.dataclass(frozen=True)
class DefocusMambaConfig:
    """The official `MODEL.*` and `MODEL.MAMBA.*` fields the Mamba path reads, with the
    `utils/config.py` defaults except where every released yaml sets a value (use_rope True,
    group_norm_size 64); `embed_dim` and `patch_size` are what the factory fixes."""
    embed_dim: int = 768
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    depth: int = 24
    head_type: str = "IN1k_cls"
    use_aux_loss: bool = True
    use_rope: bool = True
    patch_embed_change_res: bool = False
    state_size: int = 16
    conv_kernel: int = 4
    intermediate_size: int = 1536
    time_step_rank: int = 48
    time_step_scale: float = 1.0
    time_step_max: float = 0.1
    time_step_min: float = 0.001
    time_step_floor: float = 1e-4
    use_conv_bias: bool = True
    use_bias: bool = False
    layer_norm_epsilon: float = 1e-5  # the blocks' RMSNorm
    norm_eps: float = 1e-6  # the final LayerNorm (the factories' partial(nn.LayerNorm, eps=1e-6))
    group_norm_size: int = 64
    rope_scale_factor: float = 1.0
    delta_scale_factor: float = 1.0
    scan_slicing: str = "time_major"  # not an official field: how `selective_scan` takes each token

    def __post_init__(self):
        problems = [what for what, bad in (
            (f"head_type {self.head_type!r} is not one of {HEAD_TYPES}", self.head_type not in HEAD_TYPES),
            (f"group_norm_size {self.group_norm_size} must divide intermediate_size {self.intermediate_size}",
             self.group_norm_size <= 0 or self.intermediate_size % self.group_norm_size),
            (f"state_size {self.state_size} must be even (RoPE pairs)", self.use_rope and self.state_size % 2),
            (f"scan_slicing {self.scan_slicing!r} is not one of {SCAN_SLICINGS}", self.scan_slicing not in SCAN_SLICINGS),
        ) if bad]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def small(cls, **kw):  # the README's 25.1M (dan.md §11: intermediate_size 768)
        return cls(**{"embed_dim": 384, "intermediate_size": 768, **kw})

    @classmethod
    def base(cls, **kw):  # configs/defocus_mamba_base.yaml
        return cls(**kw)

    @classmethod
    def large(cls, **kw):  # configs/defocus_mamba_large.yaml (IN-22k -> 1k fine-tune at 384)
        return cls(**{"embed_dim": 1024, "depth": 48, "intermediate_size": 2048, "head_type": "IN22kto1k_cls",
                      "delta_scale_factor": 2.0, "rope_scale_factor": 4.0, **kw})

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official name -> shape, in state-dict order (from the config alone)."""
        d, e, n, r, k, p = (self.embed_dim, self.intermediate_size, self.state_size, self.time_step_rank,
                            self.conv_kernel, self.patch_size)
        shapes = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, self.in_chans, p, p),
                  "patch_embed.proj.bias": (d,)}
        block = {"norm.weight": (d,), "mixer.A_log": (e, n), "mixer.D": (e,),
                 **({"mixer.freq": (n,)} if self.use_rope else {}),
                 "mixer.conv1d.weight": (e, 1, k), **({"mixer.conv1d.bias": (e,)} if self.use_conv_bias else {}),
                 "mixer.in_proj.weight": (2 * e, d), **({"mixer.in_proj.bias": (2 * e,)} if self.use_bias else {}),
                 "mixer.x_proj.weight": (r + 2 * n, e), "mixer.dt_proj.weight": (e, r), "mixer.dt_proj.bias": (e,),
                 "mixer.out_proj.weight": (d, e), **({"mixer.out_proj.bias": (d,)} if self.use_bias else {})}
        for i in range(self.depth):
            shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
        shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
        c = self.num_classes
        head = ({"weight": (c, d), "bias": (c,)} if self.head_type == "IN1k_cls" else
                {"0.weight": (3 * d, d), "0.bias": (3 * d,), "2.weight": (c, 3 * d), "2.bias": (c,)})
        for name in ("head", "head2") if self.use_aux_loss else ("head",):
            shapes.update({f"{name}.{leaf}": shape for leaf, shape in head.items()})
        return shapes


def selective_scan(u, delta, A, B, C, slicing: str = "time_major"):
    """`selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False)`
    in float32, one step at a time: u, delta [b, E, L], A [E, N], B, C [b, N, L] -> y [b, E, L].

        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   h_{-1} = 0;   y_t = sum_n C_t[n] h_t[:, n]

    Both slicings run mamba_ssm's `selective_scan_ref` loop: decay and drive for all tokens at
    once, then per token one multiply-add of the state [b, E, N] and one contraction with C_t.
    "mamba_ssm" takes token t as `selective_scan_ref` does, `decay[:, :, t]` of [b, E, L, N]; the
    backward of each such select writes a zero tensor the size of all of [b, E, L, N] and adds it
    to the others, so its backward is quadratic in L (Mamba-B at 224 px, batch 2: ~23 s a block,
    two thirds of it in those fills). "time_major" lays decay and drive out as [L, b, E, N] and
    takes tokens with `unbind`, whose backward is one stack: the same forward arithmetic, a
    backward linear in L.
    """
    if slicing not in SCAN_SLICINGS:
        raise ValueError(f"scan slicing {slicing!r} is not one of {SCAN_SLICINGS}")
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    if slicing == "mamba_ssm":
        decay = torch.exp(torch.einsum("bel,en->beln", delta, A))
        drive = torch.einsum("bel,bnl,bel->beln", delta, B, u)
        for t in range(u.shape[2]):
            h = decay[:, :, t] * h + drive[:, :, t]
            ys.append(torch.einsum("ben,bn->be", h, C[:, :, t]))
        return torch.stack(ys, dim=-1)
    decay = torch.exp(torch.einsum("bel,en->lben", delta, A)).contiguous()
    drive = torch.einsum("bel,bnl,bel->lben", delta, B, u).contiguous()
    for decay_t, drive_t, c_t in zip(decay.unbind(0), drive.unbind(0), C.unbind(2)):
        h = decay_t * h + drive_t
        ys.append(torch.einsum("ben,bn->be", h, c_t))
    return torch.stack(ys, dim=-1)


class MambaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MambaMixer(nn.Module):
    """[b, L, d] -> [b, L, d]. Registration order fixes the state-dict order: A_log, D, freq
    (direct parameters first), then conv1d, in_proj, x_proj, dt_proj, out_proj."""

    def __init__(self, config: DefocusMambaConfig):
        super().__init__()
        self.config = c = config
        e, n = c.intermediate_size, c.state_size
        self.conv1d = nn.Conv1d(e, e, c.conv_kernel, groups=e, padding=c.conv_kernel - 1, bias=c.use_conv_bias)
        self.in_proj = nn.Linear(c.embed_dim, 2 * e, bias=c.use_bias)
        self.x_proj = nn.Linear(e, c.time_step_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(c.time_step_rank, e, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, c.embed_dim, bias=c.use_bias)
        if c.use_rope:
            exponent = -torch.arange(1, n + 1) / n
            self.freq = nn.Parameter((100.0 ** exponent - 0.01) / (1 - 0.01))

    def rope(self, x):
        """x [b, L, N]: pair (2j, 2j+1) turned by angles t / rope_scale_factor * freq[2j], freq[2j+1]
        (16 distinct frequencies, not one per pair: dan.md §2 step 4). Positions 0..L-1."""
        positions = torch.arange(x.shape[1], dtype=x.dtype) / self.config.rope_scale_factor
        angle = positions[:, None] * self.freq[None, :]
        partner = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * torch.cos(angle) + partner * torch.sin(angle)

    def forward(self, hidden_states):
        c = self.config
        length = hidden_states.shape[1]
        u, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)       # [b, E, L] each
        u = F.silu(self.conv1d(u)[..., :length])
        time_step, B, C = self.x_proj(u.transpose(1, 2)).split([c.time_step_rank, c.state_size, c.state_size], -1)
        if c.use_rope:
            B, C = self.rope(B), self.rope(C)
        delta = F.softplus(self.dt_proj.weight @ time_step.transpose(1, 2) + self.dt_proj.bias.float()[None, :, None])
        delta = delta / c.delta_scale_factor
        A = -torch.exp(self.A_log.float())
        y = selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), c.scan_slicing)
        # Per-token RMS over groups of group_norm_size channels, no affine ("retnet groupnorm").
        b, e, _ = y.shape
        y = y.view(b, e // c.group_norm_size, c.group_norm_size, length).float()
        y = (y * torch.rsqrt(y.pow(2).mean(2, keepdim=True) + 1e-6)).view(b, e, length)
        y = (y + u * self.D.float()[None, :, None]) * F.silu(gate.float())
        return self.out_proj(y.to(u.dtype).transpose(1, 2))


class MambaBlock(nn.Module):
    def __init__(self, config: DefocusMambaConfig):
        super().__init__()
        self.norm = MambaRMSNorm(config.embed_dim, config.layer_norm_epsilon)
        self.mixer = MambaMixer(config)

    def forward(self, x):
        return x.float() + self.mixer(self.norm(x))  # residual_in_fp32


class PatchEmbed(nn.Module):
    """[b, 3, H, W] -> [b, H W / p^2, d]: raster order, or with `change_res` 2 x 2 windows in
    raster order, raster inside each (PatchEmbedChangeRes, ratio 2)."""

    def __init__(self, config: DefocusMambaConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, p, stride=p)
        self.change_res = config.patch_embed_change_res

    def forward(self, images):
        x = self.proj(images)
        b, d, h, w = x.shape
        if self.change_res:
            return x.view(b, d, 2, h // 2, 2, w // 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, d)
        return x.flatten(2).transpose(1, 2)


def _head(config: DefocusMambaConfig) -> nn.Module:
    d, c = config.embed_dim, config.num_classes
    if config.head_type == "IN1k_cls":
        return nn.Linear(d, c)
    return nn.Sequential(nn.Linear(d, 3 * d), nn.Tanh(), nn.Linear(3 * d, c))


class DefocusAttentionNetwork(nn.Module):
    def __init__(self, config: DefocusMambaConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.blocks = nn.ModuleList(MambaBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.head = _head(c)
        if c.use_aux_loss:
            self.head2 = _head(c)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The official init (`_init_weights` then `_init_mamba_weights`, dan.md §2): Linear weights
        N(0, 0.02) cut at +-2 (absolute, as timm), biases 0; dt_proj.weight U(+-R^-1/2 scale), its bias
        softplus^-1 of dt log-spaced over [time_step_min, time_step_max]; cls_token like the Linears;
        the convs keep the PyTorch default."""
        c = self.config
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        dt = torch.exp(torch.linspace(math.log(c.time_step_min), math.log(c.time_step_max), c.intermediate_size))
        dt = dt.clamp(min=c.time_step_floor)
        bound = c.time_step_rank ** -0.5 * c.time_step_scale
        for block in self.blocks:
            nn.init.uniform_(block.mixer.dt_proj.weight, -bound, bound)
            block.mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, images):
        x = self.patch_embed(images)
        x = torch.cat((x, self.cls_token.expand(x.shape[0], -1, -1)), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if not self.config.use_aux_loss:
            return self.head(x[:, -1])
        return torch.cat((self.head2(x[:, :-1]), self.head(x[:, -1:])), dim=1)
