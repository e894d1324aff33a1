"""Compact PyTorch reference of HoVLE (``InternVLChatModel`` with a ``HolisticEmbedding``) with the
official parameter names, written from the facts of reference/hovle.md (§6 where it corrects
earlier sections); the parity tests run it against evejax.models.hovle.

Parameters (D width, g = image_size / patch_size, p patch, V_e llm_vocab_size, s = 1 /
downsample_ratio; the layers are the InternLM2 reference's ``InternLM2DecoderLayer``)::

    embedding_model.vision_embeddings.class_embedding        [1, 1, D]   (unused, as official)
    embedding_model.vision_embeddings.patch_embedding.weight [D, 3, p, p] (+ .bias [D])
    embedding_model.vision_embeddings.position_embedding     [1, 1 + g^2, D]
    embedding_model.llm_text_embeddings.weight               [V_e, D]
    embedding_model.encoder.{i}.<InternLM2 layer names>
    embedding_model.pixel_shuffle_proj.0.weight [D, s^2 D] (+ .bias), .2.weight [D, D] (+ .bias)
    language_model.<InternLM2ForCausalLM names>

``InternVLChatModel.generate`` is greedy decoding at batch 1 (cached "pre" as official, or by
full recomputation). ``InternVLChatModel.forward(pixel_values [T, 3, S, S], input_ids [B, N], hd_input_ids [1, N_hd]
for "post")`` -> logits [B, N, V] float32, or with ``return_embeddings`` (logits, LLM inputs
[B, N, D], embedding-module outputs [B, N or N_hd, D]). As official: the embedding layers are
causal over the whole mixed sequence (no padding here), positions 0..; "post" runs at batch 1,
takes the shuffled + projected HD image outputs at the ``<IMG_CONTEXT>`` positions of
``input_ids`` and, in order, the HD outputs of the other tokens everywhere else.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from evejax.port.torch_ref.internlm2 import (InternLM2Config, InternLM2DecoderLayer, InternLM2ForCausalLM,
                                             rotary_cos_sin)


@dataclasses.dataclass(frozen=True)
class HolisticEmbeddingConfig:
    """The ``embedding_config`` fields the official modeling code reads, with the official class
    defaults (configuration_holistic_embedding.py, hovle.md §4.2) for missing keys."""
    num_hidden_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    llm_vocab_size: int = 92553
    llm_hidden_size: int = 2048
    downsample_ratio: float = 0.5
    img_context_token_id: int = 92546
    pixel_shuffle_loc: str = "pre"
    use_pixel_shuffle_proj: bool = True
    special_token_maps: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    use_ls: bool = False

    def layer_config(self) -> InternLM2Config:
        """The InternLM2 reference config its decoder layers read."""
        return InternLM2Config(
            vocab_size=self.llm_vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            bias=self.attention_bias, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)

    def to_hf_config_dict(self) -> dict[str, Any]:
        return {"architectures": ["HolisticEmbedding"], "model_type": "holistic_embedding",
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
                "special_token_maps": dict(self.special_token_maps)}

    @classmethod
    def from_hf_config_dict(cls, config: Mapping[str, Any]) -> "HolisticEmbeddingConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def pixel_shuffle(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """[T, g, g, C] -> [T, g s', g s', C / s'^2] (s' = scale_factor), the InternVL view/permute order."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


class VisionEmbeddings(nn.Module):
    def __init__(self, config: HolisticEmbeddingConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.grid = config.image_size // p
        self.class_embedding = nn.Parameter(torch.randn(1, 1, d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, H, W] -> [T, (H / p)(W / p), D]."""
        x = self.patch_embedding(pixel_values)
        _, d, gh, gw = x.shape
        grid = self.position_embedding[:, 1:].float().reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, d, gh * gw).permute(0, 2, 1).to(x.dtype)
        return x.flatten(2).transpose(1, 2) + grid


class HolisticEmbedding(nn.Module):
    def __init__(self, config: HolisticEmbeddingConfig):
        super().__init__()
        if config.special_token_maps:
            raise ValueError("the reference has no special_text_embeddings; special_token_maps must be empty")
        self.config = config
        d = config.hidden_size
        self.vision_embeddings = VisionEmbeddings(config)
        self.llm_text_embeddings = nn.Embedding(config.llm_vocab_size, config.llm_hidden_size)
        self.encoder = nn.ModuleList(InternLM2DecoderLayer(config.layer_config())
                                     for _ in range(config.num_hidden_layers))
        inner = d * int(1 / config.downsample_ratio) ** 2
        self.pixel_shuffle_proj = nn.Sequential(nn.Linear(inner, d), nn.GELU(), nn.Linear(d, d))

    def shuffle_project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, g^2, D] -> [T, (g s')^2, D]."""
        t, g2, d = tokens.shape
        g = int(round(g2 ** 0.5))
        x = pixel_shuffle(tokens.contiguous().reshape(t, g, g, d), self.config.downsample_ratio)
        return self.pixel_shuffle_proj(x.reshape(t, -1, x.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                caches: list | None = None) -> torch.Tensor:
        """input_ids [B, L], pixel_values [T, 3, S, S] -> last hidden states [B, L, D] (no final norm).
        ``caches``: one list per layer, the KV cache the InternLM2 reference layers fill; the
        new tokens take positions P.. after the P cached ones."""
        cfg = self.config
        ids = torch.where(input_ids < cfg.llm_vocab_size, input_ids, torch.zeros_like(input_ids))
        h = self.llm_text_embeddings(ids)
        if pixel_values is not None:
            image = self.vision_embeddings(pixel_values)
            if cfg.pixel_shuffle_loc == "pre":
                image = self.shuffle_project(image)
            selected = input_ids == cfg.img_context_token_id
            image = image.reshape(-1, h.shape[-1])
            if int(selected.sum()) != image.shape[0]:
                raise ValueError(f"{int(selected.sum())} <IMG_CONTEXT> tokens for {image.shape[0]} image tokens")
            h = h.clone()
            h[selected] = image.to(h.dtype)
        b, length, _ = h.shape
        layer_cfg = cfg.layer_config()
        caches = [[] for _ in self.encoder] if caches is None else caches
        cached = caches[0][0][0].shape[2] if caches[0] else 0
        positions = torch.arange(cached, cached + length).expand(b, length)
        cos, sin = rotary_cos_sin(layer_cfg, positions, seq_len=cached + length)
        allowed = torch.ones(length, cached + length, dtype=torch.bool).tril(cached)[None, None]
        for layer, cache in zip(self.encoder, caches):
            h = layer(h, cos, sin, allowed, cache)
        return h


class InternVLChatModel(nn.Module):
    def __init__(self, embedding_config: HolisticEmbeddingConfig, llm_config: InternLM2Config,
                 normalize_encoder_output: bool = False):
        super().__init__()
        self.embedding_model = HolisticEmbedding(embedding_config)
        self.language_model = InternLM2ForCausalLM(llm_config)
        self.normalize_encoder_output = normalize_encoder_output
        self.img_context_token_id = embedding_config.img_context_token_id

    def forward(self, pixel_values, input_ids, hd_input_ids=None, return_embeddings: bool = False):
        emb = self.embedding_model
        if emb.config.pixel_shuffle_loc == "pre":
            out = emb(input_ids, pixel_values)
            inputs = out
        else:
            if input_ids.shape[0] != 1 or hd_input_ids is None:
                raise ValueError("'post' runs at batch 1 with hd_input_ids, as official")
            out = emb(hd_input_ids, pixel_values)
            hd_image = hd_input_ids[0] == emb.config.img_context_token_id
            tiles = pixel_values.shape[0]
            image = emb.shuffle_project(out[0][hd_image].reshape(tiles, -1, out.shape[-1])).reshape(-1, out.shape[-1])
            selected = input_ids[0] == self.img_context_token_id
            inputs = torch.zeros(1, input_ids.shape[1], out.shape[-1], dtype=out.dtype)
            inputs[0, selected] = image
            inputs[0, ~selected] = out[0][~hd_image]
        if self.normalize_encoder_output:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        logits = self.language_model(inputs_embeds=inputs)
        return (logits, inputs, out) if return_embeddings else logits

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, max_new_tokens: int, hd_input_ids=None,
                 eos_token_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding at batch 1 -> the new tokens [1, n].

        ``use_cache`` ("pre" only), the official cached branch (hovle.md §4.4, §6.8): the prompt
        once, then each new token through llm_text_embeddings, the embedding layers (their own
        cache) and the LLM (its cache). Without it every step recomputes the whole forward,
        images included, the new token appended to input_ids and, "post", to hd_input_ids
        (official generate never extends hd_input_ids, so its "post" fails at the second token).
        """
        emb = self.embedding_model
        if use_cache and emb.config.pixel_shuffle_loc != "pre":
            raise ValueError("the official cached decoding runs 'pre' only; pass use_cache=False for 'post'")
        new = []
        encoder_caches, llm_caches = [[] for _ in emb.encoder], []
        for step in range(max_new_tokens):
            if not use_cache:
                logits = self(pixel_values, input_ids, hd_input_ids)
            else:
                inputs = (emb(input_ids[:, -1:], caches=encoder_caches) if step
                          else emb(input_ids, pixel_values, caches=encoder_caches))
                if self.normalize_encoder_output:
                    inputs = inputs / inputs.norm(dim=-1, keepdim=True)
                logits = self.language_model(inputs_embeds=inputs, past_key_values=llm_caches)
            token = logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            input_ids = torch.cat([input_ids, token], dim=-1)
            if hd_input_ids is not None:
                hd_input_ids = torch.cat([hd_input_ids, token], dim=-1)
            if eos_token_id is not None and int(token) == eos_token_id:
                break
        return torch.cat(new, dim=-1)
