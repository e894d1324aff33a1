"""PyTorch (CPU, float32) reference of EVE-v1's vision side, with the official parameter names.

Sizes: C = mm_hidden_size (1024), D = LLM width (4096), L = LLM layers (32),
Cc = CLIP teacher width (1024), S = EVE image side, T = teacher image side.

`VisionTokenizer` (PEL)
    in   pixel_values [B, 4, S, S]: CLIP-normalised RGB + validity mask
         (`evejax.data.image.AnyResImage.chw4()`), each image handled on its own
    out  per image: tokens [1 + h * (w + 1), C] = [CLS, row_0 patches, SPL, row_1, ...]
         and its pooled grid (h, w) of the valid region
`build_mm_projector`: [.., C] -> [.., D] (Linear, exact GELU, Linear)
`VisionCompressor` (PAL, training only)
    in   hidden_states: L + 1 tensors [B, N, D] (HF convention: 0 = embeddings,
         k = output of decoder layer k, L = after the final norm), image_starts
         (position of the image span per sample, None without image), grids
         [(h, w)], clip_features [B, (T/p)^2, Cc] (CLIP layer -2, CLS dropped),
         clip_mask [B, T, T] (the teacher view's validity mask)
    out  scalar loss: mean over images of 1 - mean_patches cos(pred, clip)
`EVEReference`: LLaMA (transformers `LlamaForCausalLM` parts) + the modules
    above, names as official `EVELlamaForCausalLM`; splices the projected image
    tokens where input_ids hold IMAGE_TOKEN_INDEX (-200), one image per sample,
    right padding; returns logits [B, N', V] (N' = N - 1 + image tokens) and,
    given CLIP features, the PAL loss.

The official training model also holds the frozen CLIP teacher, registered twice:
`model.vision_clip` and `model.vision_tower_compressor.clip_layer` are one `CLIPTeacher`
(HF CLIPVisionModel as `.backbone`). `EVEReference(..., teacher=CLIPVisionModel)` does
the same, so its state_dict names both copies; without a teacher,
`strip_teacher_keys` removes them from a checkpoint so the rest loads with strict=True.

`from_pretrained(directory)` builds an EVEReference from an EVE directory
(config.json + weights, e.g. `evejax export`) as official `from_pretrained` does: the
teacher from `mm_vision_tower_clip` (hub name or CLIPVisionModel directory) when
`requires_cliploss`, then the weights, a teacher saved once filling both registrations.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from evejax.data.text import IGNORE_INDEX, IMAGE_TOKEN_INDEX

# Official crop for an image whose mask is all zero (text-only sample): its
# tokens are spliced in with length 0, only to keep every parameter in the graph.
_TEXT_ONLY_CROP = 16


class LocalAttention(nn.Module):
    """CA1: each pooled cell attends over the pool x pool conv cells under it.

    [B, C, H, W] -> [B, (H // pool) * (W // pool), C]. The logit scale is
    C^-0.5 (full width, not head width), as official.
    """

    def __init__(self, dim: int, pool: int, num_heads: int = 8):
        super().__init__()
        self.pool, self.num_heads, self.scale = pool, num_heads, dim ** -0.5
        self.q = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=False))
        self.kv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim, bias=False))
        self.proj = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, height, width = features.shape
        s, heads = self.pool, self.num_heads
        h, w = height // s, width // s
        windows = features[:, :, :h * s, :w * s].reshape(b, c, h, s, w, s)
        windows = windows.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, s * s, c)
        pooled = F.avg_pool2d(features, s, s).flatten(2).transpose(1, 2)
        q = self.q(pooled).reshape(b, h * w, heads, c // heads)
        k, v = self.kv(windows).reshape(b, h * w, s * s, 2, heads, c // heads).unbind(3)
        attn = (torch.einsum("bphd,bpwhd->bpwh", q, k) * self.scale).softmax(dim=2)
        fused = torch.einsum("bpwh,bpwhd->bphd", attn, v).reshape(b, h * w, c)
        return pooled + self.proj(fused)


class GlobalAttention(nn.Module):
    """CA2: one query token (the CLS embedding) attends over all patches.

    query [B, 1, C], features [B, N, C] -> [B, 1, C]; scale C^-0.5.
    """

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.num_heads, self.scale = num_heads, dim ** -0.5
        self.q = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=False))
        self.kv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim, bias=False))
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        b, n, c = features.shape
        heads = self.num_heads
        q = self.q(query).reshape(b, heads, c // heads)
        k, v = self.kv(features).reshape(b, n, 2, heads, c // heads).unbind(2)
        attn = (torch.einsum("bhd,bnhd->bhn", q, k) * self.scale).softmax(dim=-1)
        return query + self.proj(torch.einsum("bhn,bnhd->bhd", attn, v).reshape(b, 1, c))


class VisionTokenizer(nn.Module):
    """PEL: conv patches -> crop to the valid cells -> CA1 -> CLS by CA2 -> SPL per row."""

    def __init__(self, hidden_size: int = 1024, patch_size: int = 14, pool: int = 2,
                 num_heads: int = 8):
        super().__init__()
        self.hidden_size, self.patch_size, self.pool = hidden_size, patch_size, pool
        self.patch_embedding = nn.Conv2d(3, hidden_size, kernel_size=patch_size,
                                         stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(hidden_size))
        self.split_embedding = nn.Parameter(torch.randn(hidden_size))
        self.local_attention = LocalAttention(hidden_size, pool, num_heads)
        self.global_attention = GlobalAttention(hidden_size, num_heads)

    def tokens_from_grid(self, grid: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Conv features of the valid region [C, H, W] -> ([1 + h * (w + 1), C], (h, w))."""
        c, height, width = grid.shape
        h, w = height // self.pool, width // self.pool
        patches = self.local_attention(grid[None])
        cls = self.global_attention(self.class_embedding.reshape(1, 1, c), patches)[0]
        rows = torch.cat([patches[0].reshape(h, w, c), self.split_embedding.expand(h, 1, c)], dim=1)
        return torch.cat([cls, rows.reshape(h * (w + 1), c)], dim=0), (h, w)

    def forward(self, pixel_values: torch.Tensor):
        """[B, 4, S, S] -> (list of B tensors [1 + h * (w + 1), C], list of B grids (h, w))."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 4:
            raise ValueError("VisionTokenizer takes [B, 4, S, S] (RGB + validity mask), got "
                             f"{tuple(pixel_values.shape)}")
        embeds = self.patch_embedding(pixel_values[:, :3])
        cell_mask = F.avg_pool2d(pixel_values[:, 3:], self.patch_size, self.patch_size)
        if torch.any(cell_mask % 1 != 0):
            raise ValueError(f"the validity mask does not cover whole {self.patch_size}-pixel "
                             "patches; preprocess with evejax.data.image.preprocess_anyres")
        tokens, grids = [], []
        for i in range(pixel_values.shape[0]):
            valid = torch.nonzero(cell_mask[i, 0])
            if len(valid) == 0:
                crop = embeds[i, :, :_TEXT_ONLY_CROP, :_TEXT_ONLY_CROP]
            else:
                (r0, c0), (r1, c1) = valid[0].tolist(), valid[-1].tolist()
                crop = embeds[i, :, r0:r1 + 1, c0:c1 + 1]
            seq, hw = self.tokens_from_grid(crop)
            tokens.append(seq)
            grids.append(hw)
        return tokens, grids


def build_mm_projector(mm_hidden_size: int = 1024, hidden_size: int = 4096) -> nn.Sequential:
    """Official "mlp2x_gelu": [.., C] -> [.., D]; nn.GELU is the exact (erf) form."""
    return nn.Sequential(nn.Linear(mm_hidden_size, hidden_size), nn.GELU(),
                         nn.Linear(hidden_size, hidden_size))


class VisionCompressor(nn.Module):
    """PAL: fuses taps of the LLM hidden states over the image span, regresses CLIP features.

    Taps are L, L - interval, ..., down to >= 0 (32, 28, ..., 0 for L = 32;
    8, 4, 0 for L = 8); tap j gets `norm_layer[j]` (LayerNorm + Linear D -> Cc).
    The projected last state (tap 0, after the final norm) is the query over
    the other projected taps (CA3, no K/V projections, scale Cc^-0.5), and
    pred = input_layer(state L) + output_layer(fused). `patch_ratio` average
    pools the EVE grid down to the CLIP grid (2 for HD).
    """

    def __init__(self, llm_size: int = 4096, clip_size: int = 1024, num_llm_layers: int = 32,
                 layer_interval: int = 4, num_heads: int = 8, patch_ratio: int = 1,
                 teacher_patch_size: int = 14):
        super().__init__()
        self.layer_taps = [num_llm_layers - k for k in range(0, num_llm_layers + 1, layer_interval)]
        self.num_heads, self.scale = num_heads, clip_size ** -0.5
        self.patch_ratio, self.teacher_patch_size = patch_ratio, teacher_patch_size
        self.norm_layer = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(llm_size), nn.Linear(llm_size, clip_size, bias=False))
            for _ in self.layer_taps)
        self.input_layer = nn.Linear(llm_size, clip_size)
        self.output_layer = nn.Linear(clip_size, clip_size)

    def predict(self, image_states: torch.Tensor) -> torch.Tensor:
        """Per-patch states of all layers [P, L + 1, D] -> predicted CLIP features [P, Cc]."""
        taps = torch.stack([norm(image_states[:, tap])
                            for norm, tap in zip(self.norm_layer, self.layer_taps)], dim=1)
        p, n_taps, c = taps.shape
        heads = self.num_heads
        query = taps[:, 0].reshape(p, heads, c // heads)
        keys = taps[:, 1:].reshape(p, n_taps - 1, heads, c // heads)
        attn = (torch.einsum("phd,pthd->pht", query, keys) * self.scale).softmax(dim=-1)
        fused = torch.einsum("pht,pthd->phd", attn, keys).reshape(p, c)
        return self.input_layer(image_states[:, -1]) + self.output_layer(fused)

    def image_states(self, states: torch.Tensor, start: int, grid: tuple[int, int]) -> torch.Tensor:
        """One sample's stacked states [N, L + 1, D] -> patch states [P, L + 1, D], CLS/SPL
        dropped, row-major, pooled by patch_ratio."""
        h, w = grid
        end = start + 1 + h * (w + 1)
        if end > states.shape[0]:
            raise ValueError(f"image span [{start}, {end}) runs past the sequence length "
                             f"{states.shape[0]}")
        span = states[start + 1:end].reshape(h, w + 1, *states.shape[1:])[:, :w]
        span = span.permute(2, 3, 0, 1)
        if self.patch_ratio > 1:
            span = F.avg_pool2d(span, self.patch_ratio, self.patch_ratio)
        return span.flatten(2).permute(2, 0, 1)

    def forward(self, hidden_states: Sequence[torch.Tensor], image_starts: Sequence[Optional[int]],
                grids: Sequence[tuple[int, int]], clip_features: torch.Tensor,
                clip_mask: torch.Tensor) -> torch.Tensor:
        if len(hidden_states) <= max(self.layer_taps):
            raise ValueError(f"PAL taps layers {self.layer_taps} but got {len(hidden_states)} "
                             "hidden states; pass all of them (output_hidden_states=True)")
        states = torch.stack(tuple(hidden_states), dim=2)
        cell_mask = F.avg_pool2d(clip_mask[:, None].to(states.dtype),
                                 self.teacher_patch_size, self.teacher_patch_size)
        if torch.any(cell_mask % 1 != 0):
            raise ValueError(f"the teacher mask does not cover whole {self.teacher_patch_size}-"
                             "pixel patches")
        total, count = states.new_zeros(()), 0
        # Samples without an image add 0; official adds 1 - cos(x, x.detach()) only
        # to keep the PAL in the ZeRO-3 graph.
        for i, (start, grid) in enumerate(zip(image_starts, grids)):
            if start is None:
                continue
            pred = self.predict(self.image_states(states[i], start, grid))
            target = clip_features[i][cell_mask[i, 0].flatten().bool()]
            if target.shape[0] != pred.shape[0]:
                raise ValueError(f"sample {i}: {pred.shape[0]} EVE patches but {target.shape[0]} "
                                 "valid CLIP patches; the two views must come from one "
                                 "preprocess_anyres call with matching sizes")
            total = total + 1 - F.cosine_similarity(pred, target, dim=-1).mean()
            count += 1
        return total / max(count, 1)


class CLIPTeacher(nn.Module):
    """Official CLIPVisionTower: a frozen CLIPVisionModel; pixel_values [B, 3, T, T] ->
    hidden_states[select_layer] without CLS, [B, (T / p)^2, Cc].

    Its weights are named `backbone.vision_model.*`, as transformers < 5 (the official
    code's) registers a CLIPVisionModel; transformers 5 drops that inner scope, so it is
    put back here.
    """

    def __init__(self, clip: CLIPVisionModel, select_layer: int = -2):
        super().__init__()
        self.backbone = nn.ModuleDict({"vision_model": clip.requires_grad_(False)})
        self.select_layer = select_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.backbone["vision_model"](pixel_values, output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]


def strip_teacher_keys(state_dict: dict, keep_pal: bool = True) -> dict:
    """Drops the frozen CLIP teacher (and, unless keep_pal, the PAL) from an official state dict."""
    drop = ("model.vision_clip.", "model.vision_tower_compressor.clip_layer.")
    if not keep_pal:
        drop += ("model.vision_tower_compressor.",)
    return {k: v for k, v in state_dict.items()
            if not k.startswith(drop) and not k.endswith("rotary_emb.inv_freq")}


@dataclasses.dataclass
class EVEReferenceOutput:
    logits: torch.Tensor
    attention_mask: torch.Tensor
    hidden_states: tuple
    labels: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    pal_loss: Optional[torch.Tensor] = None


class EVEReference(nn.Module):
    """Official `EVELlamaForCausalLM` layout: model.{embed_tokens, layers, norm, vision_tower,
    mm_projector, vision_tower_compressor}, lm_head."""

    def __init__(self, config: LlamaConfig, mm_hidden_size: int = 1024, patch_size: int = 14,
                 pool: int = 2, num_heads: int = 8, with_pal: bool = True,
                 clip_hidden_size: int = 1024, layer_interval: int = 4, pal_heads: int = 8,
                 patch_ratio: int = 1, teacher_patch_size: int = 14,
                 teacher: Optional[CLIPVisionModel] = None, teacher_layer: int = -2):
        super().__init__()
        llm = LlamaForCausalLM(config)
        self.config = config
        self.model, self.lm_head = llm.model, llm.lm_head
        self.model.vision_tower = VisionTokenizer(mm_hidden_size, patch_size, pool, num_heads)
        self.model.mm_projector = build_mm_projector(mm_hidden_size, config.hidden_size)
        self.with_pal = with_pal
        if with_pal:
            self.model.vision_tower_compressor = VisionCompressor(
                config.hidden_size, clip_hidden_size, config.num_hidden_layers, layer_interval,
                pal_heads, patch_ratio, teacher_patch_size)
            if teacher is not None:
                self.model.vision_clip = CLIPTeacher(teacher, teacher_layer)
                self.model.vision_tower_compressor.clip_layer = self.model.vision_clip

    def splice(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
               pixel_values: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None):
        """Text ids [B, N] with at most one -200 each -> (embeds [B, N', D], mask [B, N'],
        labels [B, N'] or None, image starts, grids). Rows are right padded with zeros."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        embed = self.model.embed_tokens
        rows, masks, new_labels, starts, grids = [], [], [], [], []
        for i, ids in enumerate(input_ids):
            where = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            n_real = int(attention_mask[i].sum())
            if len(where) > 1:
                raise ValueError(f"sample {i} has {len(where)} image placeholders; EVE takes one")
            if not where:
                rows.append(embed(ids))
                masks.append(n_real)
                new_labels.append(None if labels is None else labels[i])
                starts.append(None)
                grids.append(None)
                continue
            if pixel_values is None:
                raise ValueError(f"sample {i} has an image placeholder but pixel_values is None")
            s = where[0]
            tokens, (grid,) = self.model.vision_tower(pixel_values[i:i + 1])
            image = self.model.mm_projector(tokens[0])
            rows.append(torch.cat([embed(ids[:s]), image, embed(ids[s + 1:])], dim=0))
            masks.append(n_real - 1 + image.shape[0])
            if labels is not None:
                ignore = labels.new_full((image.shape[0],), IGNORE_INDEX)
                new_labels.append(torch.cat([labels[i, :s], ignore, labels[i, s + 1:]]))
            starts.append(s)
            grids.append(grid)
        width = max(r.shape[0] for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
        mask = torch.arange(width)[None] < torch.tensor(masks)[:, None]
        if labels is not None:
            new_labels = torch.stack([F.pad(l, (0, width - l.shape[0]), value=IGNORE_INDEX)
                                      for l in new_labels])
        else:
            new_labels = None
        return embeds, mask, new_labels, starts, grids

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                clip_features: Optional[torch.Tensor] = None,
                clip_mask: Optional[torch.Tensor] = None,
                teacher_pixels: Optional[torch.Tensor] = None) -> EVEReferenceOutput:
        """input_ids [B, N] (right padded), attention_mask [B, N], pixel_values [B, 4, S, S],
        labels [B, N] (IGNORE_INDEX = -100 where unsupervised), clip_features [B, P, Cc]
        or teacher_pixels [B, 3, T, T] for the registered teacher, clip_mask [B, T, T]."""
        if teacher_pixels is not None:
            if not hasattr(self.model, "vision_clip"):
                raise ValueError("teacher_pixels given but the model was built without a teacher")
            clip_features = self.model.vision_clip(teacher_pixels)
        embeds, mask, new_labels, starts, grids = self.splice(input_ids, attention_mask,
                                                              pixel_values, labels)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        logits = self.lm_head(out.last_hidden_state)
        result = EVEReferenceOutput(logits=logits, attention_mask=mask,
                                    hidden_states=out.hidden_states, labels=new_labels)
        if new_labels is not None:
            result.ce_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), new_labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX)
        if clip_features is not None:
            if not self.with_pal:
                raise ValueError("clip_features given but the model was built with with_pal=False")
            if clip_mask is None:
                raise ValueError("clip_features need clip_mask (the teacher view's validity mask)")
            result.pal_loss = self.model.vision_tower_compressor(
                out.hidden_states, starts, grids, clip_features, clip_mask)
        return result


def from_pretrained(directory) -> EVEReference:
    """EVEReference (eval mode) of an EVE directory: config.json + safetensors or .bin weights.

    Sizes: LLaMA from config.json; the PEL geometry from its "evejax" entry,
    else from the processor name (`...patch14-anypixel-672`, pool 2, 8 heads);
    with `requires_cliploss` the teacher is `CLIPVisionModel.from_pretrained(
    mm_vision_tower_clip)`, as the official builder makes it. Weights load
    strictly except that a teacher stored once (vision_clip or clip_layer) fills
    both registrations of the shared module.
    """
    import transformers

    from evejax.port import io

    config = io.load_config_json(directory)
    ours = config.get("evejax") or {}
    found = re.search(r"patch(\d+)-anypixel-(\d+)", str(config.get("mm_vision_tower", "")))
    patch = ours.get("patch_size", int(found.group(1)) if found else None)
    image = ours.get("image_size", int(found.group(2)) if found else None)
    if patch is None or image is None:
        raise ValueError(f"{directory}: config.json gives no PEL geometry (no 'evejax' entry and "
                         f"mm_vision_tower {config.get('mm_vision_tower')!r} is not ...patchP-anypixel-S)")
    llama_fields = set(transformers.LlamaConfig().to_dict()) - {"architectures", "model_type"}
    llama = LlamaConfig(**{k: v for k, v in config.items() if k in llama_fields}, attn_implementation="eager")
    pool = ours.get("pool", 2)
    kw = dict(mm_hidden_size=config["mm_hidden_size"], patch_size=patch, pool=pool,
              num_heads=ours.get("vision_heads", 8), with_pal=bool(config.get("requires_cliploss")))
    if kw["with_pal"]:
        teacher = CLIPVisionModel.from_pretrained(config["mm_vision_tower_clip"], attn_implementation="eager")
        t = teacher.config
        kw.update(clip_hidden_size=t.hidden_size, layer_interval=ours.get("pal_interval", 4),
                  pal_heads=ours.get("pal_heads", 8), teacher_patch_size=t.patch_size, teacher=teacher,
                  patch_ratio=(image // (patch * pool)) // (t.image_size // t.patch_size),
                  teacher_layer=config.get("mm_vision_select_layer", -2))
    model = EVEReference(llama, **kw).eval()
    state = {k: torch.from_numpy(v) for k, v in io.load_state_dict(directory).items()
             if not k.endswith("rotary_emb.inv_freq")}
    copies = ("model.vision_clip.", "model.vision_tower_compressor.clip_layer.")
    for have, other in (copies, copies[::-1]):
        for k in [k for k in state if k.startswith(have)]:
            state.setdefault(other + k[len(have):], state[k])
    model.load_state_dict(state, strict=True)
    return model
