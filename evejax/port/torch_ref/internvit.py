"""Compact PyTorch reference of InternVL's vision side with the official parameter names.

Written from the facts of the official code (GitHub OpenGVLab/InternVL,
``internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py`` and
``modeling_internvl_chat.py``): ``InternVisionModel`` (InternViT-300M-448px) and
``InternVLChatModel.extract_feature`` with its ``mlp1`` projector (InternVL2-2B). Used to
prove that `evejax.models.vit.InternVLTeacher` and `evejax.port.internvit` agree with the
official layout. Only the InternViT-300M variant is written: LayerNorm (``norm_type
"layer_norm"``), no q/k normalisation, ``hidden_act "gelu"``; others raise.

Parameters (D = hidden_size, C = num_channels, p = patch_size, P = (image_size / p)^2,
F = intermediate_size, k = 1 / downsample_ratio, E = llm hidden size)::

    vision_model.embeddings.class_embedding            [1, 1, D]
    vision_model.embeddings.patch_embedding.weight     [D, C, p, p]   (Conv2d, stride p)
    vision_model.embeddings.patch_embedding.bias       [D]
    vision_model.embeddings.position_embedding         [1, 1 + P, D]
    vision_model.encoder.layers.{i}.attn.qkv.weight    [3 D, D]   rows (q|k|v, head, head_dim)
    vision_model.encoder.layers.{i}.attn.qkv.bias      [3 D]      (qkv_bias)
    vision_model.encoder.layers.{i}.attn.proj.weight   [D, D]
    vision_model.encoder.layers.{i}.attn.proj.bias     [D]
    vision_model.encoder.layers.{i}.mlp.fc1.weight     [F, D]     (+ .bias [F])
    vision_model.encoder.layers.{i}.mlp.fc2.weight     [D, F]     (+ .bias [D])
    vision_model.encoder.layers.{i}.norm1.weight       [D]        (+ .bias; eps layer_norm_eps)
    vision_model.encoder.layers.{i}.norm2.weight       [D]        (+ .bias)
    vision_model.encoder.layers.{i}.ls1                [D]        init initializer_factor
    vision_model.encoder.layers.{i}.ls2                [D]
    mlp1.0.weight, mlp1.0.bias                         [k^2 D]    LayerNorm, eps 1e-5
    mlp1.1.weight [E, k^2 D], mlp1.1.bias [E]                     Linear
    mlp1.3.weight [E, E],     mlp1.3.bias [E]                     Linear (mlp1.2 is GELU)

A bare ``InternVisionModel`` (the InternViT-300M-448px repository) has the same names
without ``vision_model.`` and no ``mlp1``.

Layer: ``x + ls1 * attn(norm1(x))``, then ``h + ls2 * mlp(norm2(h))``. Attention is
bidirectional, scale ``head_dim ** -0.5``, no RoPE. ``InternVisionModel.forward(pixels
[B, C, S, S])`` returns ``(last_hidden_state [B, 1 + P, D], hidden_states)``, the
latter ``L + 1`` tensors (embeddings, then every layer's output).
``InternVLVision.forward(pixels) -> [B, (g / k)^2, E]`` is ``extract_feature``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    raise ImportError("the PyTorch InternViT reference needs PyTorch: pip install 'evejax[torch]'") from None


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
    """The fields the official InternVisionModel reads, with the official class defaults
    (``configuration_intern_vit.py``, an InternViT-6B shape) for missing keys."""
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    initializer_factor: float = 0.1

    def __post_init__(self):
        if self.norm_type != "layer_norm" or self.qk_normalization or self.hidden_act != "gelu":
            raise ValueError(
                "only the InternViT-300M variant is supported (norm_type='layer_norm', qk_normalization=False, "
                f"hidden_act='gelu'); got norm_type={self.norm_type!r}, qk_normalization="
                f"{self.qk_normalization}, hidden_act={self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_hf_config_dict(cls, config: Mapping[str, Any]) -> "InternVisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_hf_config_dict(self) -> dict[str, Any]:
        return {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                **dataclasses.asdict(self), "dropout": 0.0, "attention_dropout": 0.0,
                "drop_path_rate": 0.0, "use_flash_attn": False}


@dataclasses.dataclass(frozen=True)
class InternVLVisionConfig:
    """InternVLChatConfig's fields that shape `extract_feature` (official defaults for missing
    keys: select_layer -1, downsample_ratio 0.5, ps_version 'v1'); `llm_hidden_size` is
    ``llm_config.hidden_size``."""
    vision: InternVisionConfig
    llm_hidden_size: int
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v1"
    force_image_size: Optional[int] = None


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, (cfg.image_size // cfg.patch_size) ** 2 + 1, d))

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values)  # [B, D, h, w]
        b, d, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        g = self.cfg.image_size // self.cfg.patch_size
        # The official code always resamples the grid positions bicubically to (h, w): the
        # identity at the native size.
        grid_pos = self.position_embedding[:, 1:].float().reshape(1, g, g, d).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.reshape(1, d, h * w).permute(0, 2, 1).to(patches.dtype)
        pos = torch.cat([self.position_embedding[:, :1], grid_pos], dim=1)
        return torch.cat([self.class_embedding.expand(b, 1, d).to(patches.dtype), patches], dim=1) + pos


class InternAttention(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn = InternAttention(cfg)
        self.mlp = InternMLP(cfg)
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ls1 = nn.Parameter(cfg.initializer_factor * torch.ones(d))
        self.ls2 = nn.Parameter(cfg.initializer_factor * torch.ones(d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x).to(x.dtype)) * self.ls1
        return x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x):
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return x, tuple(hidden)


class InternVisionModel(nn.Module):
    """pixel_values [B, C, S, S] -> (last_hidden_state [B, 1 + P, D], hidden_states (L + 1) x [B, 1 + P, D])."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixel_values):
        if pixel_values.dim() != 4:
            raise ValueError(f"wrong pixel_values size: {tuple(pixel_values.shape)}")
        return self.encoder(self.embeddings(pixel_values))


def pixel_shuffle(x, scale_factor: float = 0.5, ps_version: str = "v1"):
    """InternVLChatModel.pixel_shuffle: [N, W, H, C] -> [N, W s, H s, C / s^2]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x if ps_version == "v1" else x.permute(0, 2, 1, 3).contiguous()


class InternVLVision(nn.Module):
    """InternVLChatModel's vision side: pixel_values [B, C, S, S] -> extract_feature [B, T, E]."""

    def __init__(self, cfg: InternVLVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = InternVisionModel(cfg.vision)
        width = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.llm_hidden_size), nn.GELU(),
                                  nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size))

    def forward(self, pixel_values):
        last, hidden = self.vision_model(pixel_values)
        x = (last if self.cfg.select_layer == -1 else hidden[self.cfg.select_layer])[:, 1:, :]
        h = w = int(x.shape[1] ** 0.5)
        x = pixel_shuffle(x.reshape(x.shape[0], h, w, -1), self.cfg.downsample_ratio, self.cfg.ps_version)
        return self.mlp1(x.reshape(x.shape[0], -1, x.shape[-1]))
