"""`evejax bench`: a training step (or generation) of evejax against its PyTorch counterpart. `data` is
evejax/data/bench.py.

  evejax bench lm|hovle|dan|generate [--size S] [--overrides k=v,...] [--batch B] [--seq-len T] [--steps 2]
                  [--repeats 5] [--warmup 3] [--variant remat=full,scan_unroll=1 ...] [--threads N]
                  [--reference k=v,...]   (dan: scan=time_major|mamba_ssm)

Each entry of `BENCHES` times one training step (forward + backward + AdamW with
global-norm clipping at 1.0, float32, the same host batch) of a registry model
(evejax.models.registry) in evejax and of its PyTorch counterpart (eager,
`torch.optim.AdamW`):

  lm     an evejax CausalLM against transformers' LlamaForCausalLM built with the same
         shapes (its own random init), random next-token batch [B, T]
  hovle  evejax HoVLE against evejax/port/torch_ref/hovle.py `InternVLChatModel` holding
         the evejax step's initial weights, moved by evejax.port.hovle.to_torch; rows of
         T tokens with one run of <IMG_CONTEXT> placeholders (n per tile, every tile slot
         real) and the tiles' pixels; the CE of both is over hovle.supervised_mask
  dan    an evejax De-focus Mamba classifier against evejax/port/torch_ref/dan.py
         `DefocusAttentionNetwork` (its selective scan mamba_ssm's selective_scan_ref loop,
         tokens sliced time-major, or as selective_scan_ref does with --reference
         scan=mamba_ssm: a backward quadratic in the length) holding the evejax
         step's initial weights (evejax.port.dan.to_torch); random pixels [B, H, W, 3]
         and labels [B]; the registry's loss, (class-token CE + mean token CE) / 2, on
         both sides; no drop path (the reference has none); rates in images/s
  generate  batched greedy decoding of an inference EVE (default: the demo's, `DEMO_EVE_OVERRIDES`),
         --batch prompts (default 16) of held-out shapes questions (several image sizes and prompt
         lengths), --seq-len new tokens per row (default 32, no stop id), as evaluate.Answerer
         decodes (the spliced prompt, then greedy_generate with the KV cache), against the
         reference EVE of evejax/port/torch_ref/eve.py (transformers LLaMA + the official vision
         modules, as the demo's PyTorch answerer builds it) holding the same weights, its splice
         left-padded into transformers' cached greedy `generate`; rates in new tokens/s over the
         whole call (image and prompt included); the table says how many rows' tokens are equal

A family plugs in as one `Bench` (its registry name, a numpy batch both steps read,
the port's to_torch, the reference module and its loss, the evejax step's options).
A `Bench.part` (dan: the selective scan) is also timed alone in every repeat, forward +
backward at the step's shapes, as many calls as one step makes, in both frameworks;
the table gives it per step and as a share of the step's median. An entry that times something
other than a training step brings its own runs (`Bench.jax_run`, `Bench.torch_run`: generate),
whose outputs the table compares.

Both run on this machine's CPU with one thread per core, each framework in its own
worker process that sets up host memory first (`evejax.hostmem`: freed memory stays
in the process, so steps after the first take no page faults; set
EVEJAX_MALLOC=system to measure without). After warm-up the runs are measured
alternately, evejax then PyTorch, `--repeats` times, each measurement `--steps`
steps, so drifting background load hits both alike; medians are reported, with the
minor page faults per step. With shared weights the table also gives both first
losses, equal when the two steps compute the same thing.

Peak FLOP/s: a 2048 x 2048 x 2048 float32 matmul in both frameworks, timed
inside every repeat (medians); the higher of the two is the machine's peak.
Model FLOPs per step are the registry's `flops_per_step` (MaxText's count).

The evejax side uses the entry's options (`BENCH_OPTIONS` for the transformers,
`DAN_OPTIONS`), ordinary config fields a training config can set too; `--variant`
adds evejax runs with other options to the same alternation, to measure a choice.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

# The evejax step's options on CPU, chosen by alternating measurements of the
# 110M step on 2 cores (CPU seconds per step, medians):
#   matmul_2d        one 2-D matmul per projection: the weight gradients need no
#                    transposing copies of the activations (-20% step time).
#   remat            "save_dots_no_batch" keeps the projections' outputs and
#                    recomputes attention: 10.7 s against 11.6 "none", 12.0
#                    "full", 11.6 "minimal", 10.8 "save_dots" (measured with
#                    the system allocator, when every touched page of the
#                    temporaries was a page fault). With evejax.hostmem's kept
#                    memory the three leading choices are within noise:
#                    5.95 s against 6.10 "none" and 5.91 "save_dots".
#   scan_unroll      1: unrolling the 12 layers gave 11.4 s against 10.7.
#   attention_impl   "xla" (4-D einsum softmax); "dot" 12.9 s.
# XLA:CPU flags tried and left at their defaults: YNNPACK fusions limited to
# dots or disabled (11.6 s against 11.1), --xla_cpu_use_onednn, single-threaded
# Eigen; glibc huge pages for the temporaries (GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
# 14.8 s). Fusing q/k/v or gate/up kernels into one matmul was 3-7% slower.
# Host memory: evejax.hostmem (used by both workers) took the step from 8.14 to
# 5.95 s and PyTorch's from 10.82 to 9.46 (against an EVEJAX_MALLOC=system run).
BENCH_OPTIONS = dict(matmul_2d=True, remat="save_dots_no_batch", scan_unroll=1, attention_impl="xla")

# The De-focus Mamba-B step's options (DANConfig / MambaConfig fields). The scan, forward + backward
# of one block at batch 2 alone (ms, medians of 3, a loaded machine): chunked with chunk 1: 617,
# 2: 440, 4: 1075, 8: 1683, 32: 4317; associative 4216 (each chunk's associative scan does
# O(log chunk) passes over [B, chunk, E, N] states; the sequential loop between chunks is cheap on CPU).
# Re-measured 29 Nov at load ~12 (medians of 5): chunk 2 585 ms, without its chunk remat 632, chunk 1
# 707, chunk 4 961, state [B, c, N, E] 511-549 (within the noise). At depth 4 the step with
# remat "none" (4.82 s), "save_dots_no_batch" (3.85) or matmul_2d (5.53 against 5.73) was not
# clearly faster than this (3.96): README, `evejax bench dan`.
# 29 Nov, scan "tokens" (nn/mamba's custom-VJP scan), load ~10, torch 1 thread, depth 4 (s/step,
# medians of 3): chunked 4.48, tokens 3.24, tokens with remat "none" 3.22 or "save_dots_no_batch"
# 3.21 (within the noise; "full" keeps the least memory), torch 4.06. The scan alone, one block:
# chunked 297 ms, tokens 135 (medians of 9, load ~8). Quiet (load ~2, torch 2 threads, depth 24,
# medians of 5, one run): tokens with remat "full" 4.816 s, "none" 4.380, "full" + matmul_2d 4.473,
# torch 4.973. No remat, as the eager reference (which keeps its activations): the same work.
DAN_OPTIONS = dict(remat="none", scan="tokens")


def parse_options(text: str) -> dict:
    """"remat=full,scan_unroll=1" -> {"remat": "full", "scan_unroll": 1}."""
    import ast

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"variant item {item!r} must look like key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model name with what sets its matmul speed: the x86 family/model numbers (a VM's
    "AMD EPYC" names no generation) and the widest vector unit, e.g. "AMD EPYC (family 25 model 17,
    AVX-512)". Reads /proc/cpuinfo unless given its text; else what `platform` knows."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = next((fields[k] for k in ("model name", "Model", "Hardware") if fields.get(k)), "")
    if not name:
        return platform.processor() or "unknown CPU model"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    vector = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"),
                                             ("asimd", "NEON")) if flag in flags), "")
    detail = ", ".join(filter(None, [f"family {fields['cpu family']} model {fields['model']}"
                                     if fields.get("cpu family") and fields.get("model") else "", vector]))
    return f"{name} ({detail})" if detail else name


def _seconds_per_call(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def model_config(bench: "Bench", size: str, overrides: Optional[dict] = None):
    """config.model of a bench run, for evejax.models.registry.build."""
    import ml_collections

    return ml_collections.ConfigDict(dict(name=bench.model, size=size, overrides=dict(overrides or {})))


class JaxStep:
    """The evejax train step of a registry model on one CPU device; `step()` runs and waits for one step."""

    def __init__(self, model_cfg, host_batch: dict, seed: int = 0):
        import jax

        from evejax import sharding
        from evejax.models import registry
        from evejax.train import step

        spec = registry.build(model_cfg)
        self.spec, self.config = spec, spec.config
        optimizer = step.adamw(1e-4)
        mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
        _, shardings = step.abstract_state(spec.module, spec.init_args, spec.init_kwargs, optimizer, mesh)
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host_batch.items()}
        with sharding.rules_context(mesh):
            self.state = step.init_state(spec.module, spec.init_args, spec.init_kwargs, optimizer, shardings,
                                         jax.random.PRNGKey(seed))
            self.train_step = step.make_train_step(spec.loss_fn, optimizer, shardings, batch_sh)
        self.batch = jax.device_put(host_batch, batch_sh)
        self.first_loss = self.loss = None

    outputs = None  # what a run produces besides its loss (generation: the tokens)

    def flops(self, batch: int, seq_len: int) -> float:
        return self.spec.flops_per_step(batch, seq_len)

    def params(self) -> dict:
        """The current parameters as host numpy arrays."""
        import jax

        return jax.tree.map(np.asarray, self.state.params)

    def step(self):
        import jax

        self.state, metrics = self.train_step(self.state, self.batch)
        self.loss = float(jax.block_until_ready(metrics["loss"]))
        if self.first_loss is None:
            self.first_loss = self.loss


class TorchStep:
    """A PyTorch module's training step: `loss_of(model)` -> scalar, backward, clipping at 1.0, AdamW."""

    def __init__(self, model, loss_of: Callable[[Any], Any], label: str, config=None):
        import torch

        self.model, self.loss_of, self.config = model.float().train(), loss_of, config
        try:  # the fused CPU kernel where this torch has it: the strongest eager baseline
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
            kind = "fused"
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
            kind = "foreach"
        self.label = f"{label}, AdamW {kind}"
        self.first_loss = self.loss = None

    outputs = None

    def step(self):
        import torch

        loss = self.loss_of(self.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())
        if self.first_loss is None:
            self.first_loss = self.loss


def masked_cross_entropy(logits, targets, mask):
    """The torch twin of losses.cross_entropy: mean token CE over mask [B, T]."""
    import torch.nn.functional as F

    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (nll * mask.flatten()).sum() / mask.sum().clamp(min=1.0)


@dataclasses.dataclass(frozen=True)
class Bench:
    """One `evejax bench NAME` entry. `batch(cfg, B, T, seed)` is the numpy batch both steps read;
    `reference(cfg, state, batch)` -> (torch module, loss_of(module) -> scalar tensor), `state`
    the official state dict of the evejax step's initial weights (`to_torch(params, cfg)`), or
    None when `to_torch` is None and the reference keeps its own init; `describe(cfg)` names the
    shapes in the headline; rates count `unit`s, `units(B, T)` per step."""
    model: str                                   # registry family, config.model.name
    size: str                                    # default --size
    batch: Callable[[Any, int, int, int], dict]
    reference: Callable[[Any, Optional[dict], dict], tuple]
    describe: Callable[[Any], str]
    to_torch: Optional[Callable[[dict, Any], dict]] = None
    unit: str = "tokens"
    units: Callable[[int, int], int] = lambda batch, seq_len: batch * seq_len
    shape: Callable[[int, int], str] = lambda batch, seq_len: f"{batch} x {seq_len}"  # the batch, in the headline
    options: dict = dataclasses.field(default_factory=lambda: dict(BENCH_OPTIONS))  # the evejax step's
    overrides: dict = dataclasses.field(default_factory=dict)  # both sides, under --overrides
    # A piece of the step timed alone in the same run: `part(kind, cfg, B, T)` -> (fn, k), k calls of
    # fn ("jax" or "torch") being what one step spends on it; `part_name` names it in the table.
    part: Optional[Callable[[str, Any, int, int], tuple]] = None
    part_name: str = ""
    default_batch: int = 4                       # default --batch
    default_steps: int = 2                       # default --steps
    default_warmup: int = 3                      # default --warmup
    # Keyword arguments of `reference` and of the torch `part`, with their defaults (--reference k=v).
    reference_options: dict = dataclasses.field(default_factory=dict)
    default_seq_len: int = 512                   # default --seq-len
    work: str = "float32, forward + backward + AdamW"  # what a step does, in the headline
    flops_note: str = "the registry's flops_per_step, MaxText's count"  # where the model FLOPs come from
    # What runs instead of a training step: jax_run(model_cfg, numpy batch, seed) and
    # torch_run(cfg, state, numpy batch), objects with step(), flops(B, T) (evejax), label (PyTorch),
    # first_loss / loss (None for no loss) and outputs (compared between the frameworks).
    jax_run: Optional[Callable] = None
    torch_run: Optional[Callable] = None

    def jax_step(self, size: str, batch: int, seq_len: int, options: dict, overrides: Optional[dict] = None,
                 seed: int = 0):
        model_cfg = model_config(self, size, {**self.overrides, **(overrides or {}), **options})
        from evejax.models import registry

        cfg = registry.build(model_cfg).config
        return (self.jax_run or JaxStep)(model_cfg, self.batch(cfg, batch, seq_len, seed), seed)

    def torch_step(self, size: str, batch: int, seq_len: int, state: Optional[dict],
                   overrides: Optional[dict] = None, seed: int = 0, reference_options: Optional[dict] = None
                   ) -> TorchStep:
        import torch

        from evejax.models import registry

        cfg = registry.build(model_config(self, size, {**self.overrides, **(overrides or {})})).config
        torch.manual_seed(seed)
        host_batch = self.batch(cfg, batch, seq_len, seed)
        if self.torch_run:
            return self.torch_run(cfg, state, host_batch)
        model, loss_of, label = self.reference(cfg, state, host_batch, **(reference_options or {}))
        return TorchStep(model, loss_of, label, cfg)


def _lm_batch(cfg, batch: int, seq_len: int, seed: int) -> dict:
    from evejax.models import losses

    return losses.dummy_lm_batch(batch, seq_len, cfg.vocab_size, seed)


def _lm_reference(cfg, state, batch):
    import torch
    import transformers

    t = cfg.transformer
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=t.embed_dim, intermediate_size=t.mlp_dim,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.norm_eps,
        max_position_embeddings=max(t.max_position_embeddings, batch["tokens"].shape[1]), rope_theta=t.rope_base,
        tie_word_embeddings=False, attention_dropout=0.0)
    model = transformers.LlamaForCausalLM(hf)
    tokens, targets = (torch.from_numpy(batch[k]).long() for k in ("tokens", "targets"))
    mask = torch.from_numpy(batch["loss_mask"])
    loss_of = lambda m: masked_cross_entropy(m(input_ids=tokens).logits, targets, mask)  # noqa: E731
    return model, loss_of, f"LlamaForCausalLM eager, attention {model.config._attn_implementation}"


def _lm_describe(cfg) -> str:
    t = cfg.transformer
    return (f"d {t.embed_dim}, {t.num_layers} layers, {t.num_heads} heads, SwiGLU {t.mlp_dim}, "
            f"vocab {cfg.vocab_size}")


def _hovle_batch(cfg, batch: int, seq_len: int, seed: int) -> dict:
    """Rows [bos, 3 text ids, P n <IMG_CONTEXT>, text ids...] of seq_len + 1 tokens (inputs and
    next-token targets), every tile slot a real tile of random pixels, no padding."""
    image = cfg.tile_slots * cfg.image_tokens_per_tile
    if seq_len < image + 5:
        raise ValueError(f"--seq-len {seq_len} cannot hold {cfg.tile_slots} tile(s) x {cfg.image_tokens_per_tile} "
                         f"image tokens and 5 text tokens; use --seq-len >= {image + 5}")
    rng = np.random.default_rng(seed)
    text = rng.integers(3, min(cfg.llm.vocab_size, cfg.embedding.vocab_size), (batch, seq_len + 1 - image))
    text = np.where(text == cfg.img_context_token_id, 3, text)
    text[:, 0] = 1
    rows = np.concatenate([text[:, :4], np.full((batch, image), cfg.img_context_token_id), text[:, 4:]], 1)
    rows = rows.astype(np.int32)
    s = cfg.image_size
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": np.ones((batch, seq_len), np.int32),
            "loss_mask": np.ones((batch, seq_len), np.float32),
            "pixels": rng.standard_normal((batch, cfg.tile_slots, s, s, 3), dtype=np.float32),
            "tile_mask": np.ones((batch, cfg.tile_slots), bool)}


def _hovle_reference(cfg, state, batch):
    import torch

    from evejax.models import hovle
    from evejax.port import hovle as hovle_port
    from evejax.port.torch_ref.hovle import HolisticEmbeddingConfig, InternVLChatModel
    from evejax.port.torch_ref.internlm2 import InternLM2Config

    official = hovle_port.hf_config(cfg)
    model = InternVLChatModel(HolisticEmbeddingConfig.from_hf_config_dict(official["embedding_config"]),
                              InternLM2Config.from_hf_config_dict(official["llm_config"]),
                              official["normalize_encoder_output"])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    if cfg.pixel_shuffle_loc != "pre":
        raise ValueError("the HoVLE bench runs 'pre' (HoVLE): the reference runs 'post' at batch 1 only")
    pixels = torch.from_numpy(batch["pixels"]).flatten(0, 1).permute(0, 3, 1, 2).contiguous()
    tokens, targets = (torch.from_numpy(batch[k]).long() for k in ("tokens", "targets"))
    mask = torch.from_numpy(np.asarray(hovle.supervised_mask(cfg, batch["targets"], batch["loss_mask"],
                                                             batch["segment_ids"]), np.float32))
    loss_of = lambda m: masked_cross_entropy(m(pixels, tokens), targets, mask)  # noqa: E731
    return model, loss_of, ("InternVLChatModel (evejax/port/torch_ref/hovle.py) eager, the evejax step's "
                            "initial weights moved by evejax.port.hovle.to_torch")


def _hovle_to_torch(params, cfg) -> dict:
    from evejax.port import hovle as hovle_port

    return hovle_port.to_torch(params, cfg)


def _hovle_describe(cfg) -> str:
    e, t = cfg.embedding.transformer, cfg.llm.transformer
    return (f"embedding {e.num_layers} + LLM {t.num_layers} InternLM2 layers, d {t.embed_dim}, "
            f"{t.num_heads} heads / {t.num_kv_heads} KV, SwiGLU {t.mlp_dim}, vocab {cfg.llm.vocab_size}; "
            f"{cfg.tile_slots} tile(s) of {cfg.image_size} px -> {cfg.image_tokens_per_tile} image tokens each, "
            f"'{cfg.pixel_shuffle_loc}'")


def _dan_batch(cfg, batch: int, seq_len: int, seed: int) -> dict:
    """Random normalised pixels [B, H, W, 3] and labels [B] (seq_len is not used)."""
    rng = np.random.default_rng(seed)
    return {"pixels": rng.standard_normal((batch, *cfg.image_size, 3), dtype=np.float32),
            "label": rng.integers(0, cfg.num_classes, batch).astype(np.int32)}


def _dan_reference(cfg, state, batch, scan: str = "time_major"):
    import dataclasses

    import torch
    import torch.nn.functional as F

    from evejax.port import dan as dan_port
    from evejax.port.torch_ref.dan import DefocusAttentionNetwork

    model = DefocusAttentionNetwork(dataclasses.replace(dan_port.official_config(cfg), scan_slicing=scan))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    pixels = torch.from_numpy(batch["pixels"]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(batch["label"]).long()

    def loss_of(m):  # the registry's dan loss: (CE of head(class token) + mean token CE of head2) / 2
        out = m(pixels)  # [B, P + 1, C]: head2 on the P image tokens, head on the class token (last)
        tokens = out[:, :-1]
        aux = F.cross_entropy(tokens.flatten(0, 1), labels.repeat_interleave(tokens.shape[1]))
        return (F.cross_entropy(out[:, -1], labels) + aux) / 2

    return model, loss_of, (f"DefocusAttentionNetwork (evejax/port/torch_ref/dan.py; its selective scan mamba_ssm's "
                            f"selective_scan_ref loop, slicing {scan!r}) eager, the evejax step's initial weights "
                            "moved by evejax.port.dan.to_torch")


def _dan_to_torch(params, cfg) -> dict:
    from evejax.port import dan as dan_port

    return dan_port.to_torch(params, cfg)


def _dan_describe(cfg) -> str:
    m = cfg.mamba
    return (f"d {m.embed_dim}, {cfg.depth} Mamba blocks, E {m.intermediate_size}, N {m.state_size}, "
            f"R {m.time_step_rank}; {cfg.image_size[0]}x{cfg.image_size[1]} px / {cfg.patch_size} -> "
            f"{cfg.num_patches + 1} tokens, {cfg.num_classes} classes, head + head2")


def _dan_scan(kind: str, cfg, batch: int, seq_len: int, scan: str = "time_major") -> tuple:
    """One block's selective scan, forward + backward (gradients for delta, u, B, C and A as the
    step needs them), at the step's shapes; `depth` of them make a step. The evejax one is
    nn/mamba's scan with the step's scan options, jitted, its forward run twice when the step
    rematerialises the blocks (as the step does by default); the PyTorch one the reference's sequential scan
    with the reference's slicing `scan`."""
    m = cfg.mamba
    length, e, n = cfg.num_patches + 1, m.intermediate_size, m.state_size
    length += -length % cfg.pad_length_to
    rng = np.random.default_rng(0)
    delta = rng.uniform(m.time_step_min, m.time_step_max, (batch, length, e)).astype(np.float32)
    u, cotangent = (rng.standard_normal((batch, length, e), dtype=np.float32) for _ in range(2))
    b_mat, c_mat = (rng.standard_normal((batch, length, n), dtype=np.float32) for _ in range(2))
    a = -np.broadcast_to(np.arange(1, n + 1, dtype=np.float32), (e, n))
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        from evejax.nn import mamba

        scan = lambda *xs: mamba.selective_scan(*xs, scan=m.scan, chunk=m.scan_chunk)  # noqa: E731
        if cfg.remat != "none":
            scan = jax.checkpoint(scan)
        grads = jax.jit(jax.grad(lambda *xs: jnp.vdot(scan(*xs), cotangent), argnums=(0, 1, 2, 3, 4)))
        inputs = [jnp.asarray(x) for x in (delta, u, b_mat, c_mat, a)]
        return (lambda: jax.block_until_ready(grads(*inputs))), cfg.depth
    import torch

    from evejax.port.torch_ref.dan import selective_scan

    channels_first = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))  # noqa: E731
    inputs = [channels_first(x).requires_grad_() for x in (u, delta, b_mat, c_mat)]
    a_t, g = torch.from_numpy(a.copy()).requires_grad_(), channels_first(cotangent)

    def forward_backward():
        u_t, delta_t, b_t, c_t = inputs
        selective_scan(u_t, delta_t, a_t, b_t, c_t, scan).backward(g)
        for x in (*inputs, a_t):
            x.grad = None

    return forward_backward, cfg.depth


# ---- generate: batched greedy decoding of an inference EVE ----------------------------------

# The demo's EVE (configs/demo.py EVE_OVERRIDES on size "demo"), inference form (no PAL, no teacher).
DEMO_EVE_OVERRIDES = dict(dtype="float32", remat="none", embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4,
                          head_dim=32, mlp_dim=256, matmul_2d=True, with_pal=False)


def _eve_prompts(cfg, batch: int, max_new: int, seed: int) -> dict:
    """The first `batch` held-out shapes questions (images of several sizes, prompts of several
    lengths) as evaluate.Answerer asks them (vicuna_v1, any-res view): right-padded text ids with
    the image placeholder (tokens, segment_ids), the view (pixels, pixel_mask) and its official
    layout (pixel_values [B, 4, S, S]); `max_new` new tokens per row (seed: the weights' only)."""
    from evejax.data import image as image_lib
    from evejax.data import shapes
    from evejax.eval import evaluate

    questions = evaluate.heldout_questions(batch)
    prompts = [evaluate.prompt_ids(q.question, shapes.tokenizer()) for q in questions]
    width = max(map(len, prompts))
    tokens, segment_ids = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)], segment_ids[row, :len(ids)] = ids, 1
    views = [image_lib.preprocess_anyres(q.image, cfg.anyres(), with_teacher=False) for q in questions]
    return dict(tokens=tokens, segment_ids=segment_ids, pixels=np.stack([v.pixels for v in views]),
                pixel_mask=np.stack([v.mask for v in views]), pixel_values=np.stack([v.chw4() for v in views]),
                max_new=max_new)


class JaxGenerate:
    """evejax: the spliced prompt (evaluate._left_padded_prompt), then greedy_generate with the KV
    cache, `max_new` tokens per row (no stop id), as evaluate.Answerer answers; random weights."""
    first_loss = loss = None

    def __init__(self, model_cfg, host_batch: dict, seed: int = 0):
        import jax

        from evejax import sharding
        from evejax.models import registry

        self.spec = registry.build(model_cfg)
        self.config, self.batch = self.spec.config, host_batch
        shapes = sharding.unbox(jax.eval_shape(lambda: self.spec.module.init(jax.random.PRNGKey(0),
                                                                             *self.spec.init_args)["params"]))
        # normal(0, 0.5) weights, as the tests' random EVEs: the init's near-uniform logits repeat one id,
        # which would make "the same tokens" say little
        rng = np.random.default_rng(seed)
        self.weights = jax.tree.map(lambda a: jax.numpy.asarray(rng.normal(0, 0.5, a.shape).astype(a.dtype)), shapes)
        self.outputs = None

    def params(self) -> dict:
        import jax

        return jax.tree.map(np.asarray, self.weights)

    def flops(self, batch: int, seq_len: int) -> float:
        """Forward FLOPs over the prompt and the new tokens: a training step's at that length / 3."""
        return self.spec.flops_per_step(batch, self.batch["tokens"].shape[1] + seq_len) / 3

    def step(self):
        from evejax.eval import evaluate
        from evejax.eval.generate import greedy_generate
        from evejax.models import llm

        b = self.batch
        embeds, mask = evaluate._left_padded_prompt(self.weights, b["tokens"], b["segment_ids"], b["pixels"],
                                                    b["pixel_mask"], cfg=self.config)
        self.outputs = np.asarray(greedy_generate(llm.CausalLM(self.config.llm), self.weights["llm"], None, mask,
                                                  int(b["max_new"]), None, inputs_embeds=embeds))


class TorchGenerate:
    """PyTorch: the reference EVE (transformers LLaMA + the official vision modules of
    evejax/port/torch_ref/eve.py, as the demo's PyTorch answerer builds it) holding the evejax
    weights; its splice, rows moved to the right end (left padding), then transformers' greedy
    `generate` with its KV cache over the spliced embeddings, `max_new` tokens per row."""
    first_loss = loss = None

    def __init__(self, cfg, state, host_batch: dict):
        import torch
        import transformers

        from evejax.port import eve as eve_port
        from evejax.port.torch_ref import eve as ref

        official = eve_port.hf_config(cfg)
        fields = set(transformers.LlamaConfig().to_dict()) - {"architectures", "model_type"}
        llama = transformers.LlamaConfig(**{k: v for k, v in official.items() if k in fields})
        geometry = official["evejax"]
        self.model = ref.EVEReference(llama, mm_hidden_size=official["mm_hidden_size"],
                                      patch_size=geometry["patch_size"], pool=geometry["pool"],
                                      num_heads=geometry["vision_heads"], with_pal=False).eval()
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
        self.lm = transformers.LlamaForCausalLM(llama).eval()
        self.lm.model, self.lm.lm_head = self.model.model, self.model.lm_head  # the same modules
        self.lm.generation_config.eos_token_id = None  # every row runs to max_new, as the evejax side
        self.lm.generation_config.pad_token_id = 0
        self.batch, self.config, self.outputs = host_batch, cfg, None
        self.label = (f"EVEReference (evejax/port/torch_ref/eve.py) + transformers LlamaForCausalLM.generate, "
                      f"KV cache, attention {self.lm.config._attn_implementation}, the evejax weights")

    def step(self):
        import torch

        b = self.batch
        with torch.no_grad():
            embeds, mask, *_ = self.model.splice(torch.from_numpy(b["tokens"]).long(),
                                                 torch.from_numpy(b["segment_ids"]).bool(),
                                                 torch.from_numpy(b["pixel_values"]))
            shift = mask.shape[1] - mask.sum(1)
            embeds = torch.stack([torch.roll(e, int(k), 0) for e, k in zip(embeds, shift)])
            mask = torch.stack([torch.roll(m, int(k), 0) for m, k in zip(mask, shift)]).long()
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=int(b["max_new"]),
                                   min_new_tokens=int(b["max_new"]), do_sample=False, use_cache=True)
        self.outputs = out.numpy()


def _eve_describe(cfg) -> str:
    t = cfg.llm.transformer
    return (f"LLM d {t.embed_dim}, {t.num_layers} layers, {t.num_heads} heads, SwiGLU {t.mlp_dim}, vocab "
            f"{cfg.llm.vocab_size}; PEL width {cfg.vision_width}, {cfg.image_size} px canvas, patch {cfg.patch_size}")


def _eve_to_torch(params, cfg) -> dict:
    from evejax.port import eve as eve_port

    return eve_port.to_torch(params, cfg)


BENCHES: dict[str, Bench] = {
    # xla_causal_blocks 4: the causal scores in 4 query blocks, the masked key blocks skipped. The attention
    # core's forward + backward at this size alone (B 4, T 512, 12 heads of 64; medians of 7, alternating, load 5):
    # 0.585 s, 2 blocks 0.461, 4 blocks 0.388; the whole step (medians of 3 at load 5-9, noisy): 34.2 s,
    # 2 blocks 30.8, 4 blocks 32.2.
    "lm": Bench(model="llm", size="llama_110m", batch=_lm_batch, reference=_lm_reference, describe=_lm_describe,
                options=dict(BENCH_OPTIONS, xla_causal_blocks=4)),
    "hovle": Bench(model="hovle", size="110m", batch=_hovle_batch, reference=_hovle_reference,
                   describe=_hovle_describe, to_torch=_hovle_to_torch),
    # The reference has no drop path; DAN_OPTIONS below.
    "dan": Bench(model="dan", size="mamba_b", batch=_dan_batch, reference=_dan_reference, describe=_dan_describe,
                 to_torch=_dan_to_torch, unit="images", units=lambda batch, seq_len: batch,
                 shape=lambda batch, seq_len: f"{batch} images", options=dict(DAN_OPTIONS),
                 overrides=dict(drop_path=0.0), part=_dan_scan, part_name="scan", default_batch=2,
                 default_steps=1, default_warmup=1,  # a step takes tens of seconds: minutes in all
                 reference_options=dict(scan="time_major")),
    # seq_len: new tokens per row; the rate counts new tokens over the whole call (prompt included)
    "generate": Bench(model="eve", size="demo", batch=_eve_prompts, reference=None, describe=_eve_describe,
                      to_torch=_eve_to_torch, shape=lambda batch, seq_len: f"{batch} prompts x {seq_len} new tokens",
                      options={}, overrides=DEMO_EVE_OVERRIDES, default_batch=16, default_seq_len=32,
                      work="float32, batched greedy decoding with a KV cache (image + prompt in, new tokens out)",
                      flops_note="forward over the prompt and the new tokens: the registry's count at that "
                      "length / 3",
                      jax_run=JaxGenerate, torch_run=TorchGenerate),
}


def matmul_timer(kind: str, n: int) -> Callable[[], object]:
    """Runs one n x n x n float32 matmul to completion in "jax" or "torch"."""
    import numpy as np

    a, b = (np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for _ in range(2))
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        matmul, ja, jb = jax.jit(jnp.matmul), jnp.asarray(a), jnp.asarray(b)
        return lambda: matmul(ja, jb).block_until_ready()
    import torch

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return lambda: torch.mm(ta, tb)


@dataclasses.dataclass
class BenchResult:
    bench: str                     # the BENCHES entry
    size: str
    describe: str                  # the model's shapes
    unit: str                      # what a rate counts
    units_per_step: int
    batch: int
    seq_len: int
    steps: int
    repeats: int
    threads: int
    xla_flags: str
    cpu: str                       # the CPU model
    torch_label: str               # the PyTorch side: module, attention, optimizer, weights
    same_weights: bool             # both start from the same weights
    allocator: str                 # host malloc mode of the workers (evejax.hostmem)
    flops_per_step: float
    matmul_size: int
    jax_matmul_flops: float        # median FLOP/s of the matmul, per framework
    torch_matmul_flops: float
    peak_flops: float              # the higher of the two
    variants: list                 # [options dict] per evejax run, the first the entry's options
    jax_step_s: list               # [median step seconds] per variant
    jax_samples: list              # [[seconds per step, one per repeat]] per variant
    torch_step_s: float
    torch_samples: list
    jax_faults: list               # median minor page faults per step, per variant
    torch_faults: float
    jax_first_loss: list           # loss of the first step per variant
    torch_first_loss: float
    jax_loss: list                 # last loss per variant
    torch_loss: float
    shape: str = ""                # the batch, as the headline gives it
    part_name: str = ""            # a piece of the step timed alone (Bench.part), "" for none
    jax_part_s: list = dataclasses.field(default_factory=list)  # its median seconds per step, per variant
    torch_part_s: float = 0.0
    work: str = "float32, forward + backward + AdamW"  # what a step does
    flops_note: str = ""
    # per variant: rows of the last step's outputs equal to PyTorch's, of `output_rows` (None: no outputs)
    same_rows: list = dataclasses.field(default_factory=list)
    output_rows: int = 0

    def per_second(self, seconds: float) -> float:
        """Units (tokens, samples) per second at `seconds` per step."""
        return self.units_per_step / seconds

    def fraction_of_peak(self, seconds: float) -> float:
        return self.flops_per_step / seconds / self.peak_flops


def _worker(conn, kind: str, name: str, size: str, overrides: dict, batch: int, seq_len: int, option_sets: list,
            threads: int, matmul_size: int, warmup: int, weights: Optional[str], reference_options: dict) -> None:
    """One framework in its own process: builds and warms up its runs (one per evejax option
    set), then answers ("step", run, n), ("part", run, n) (the entry's `part`, per step) and
    ("matmul", n) with (seconds per call, minor page faults per call) until ("stop",). Own processes keep the frameworks' heaps and thread pools
    apart; both set up host memory the same way, first. With shared weights the evejax worker
    writes the official state dict of its first run's initial weights to `weights` (.npz),
    which the PyTorch worker, started after it, loads."""
    from evejax import hostmem

    try:
        allocator = hostmem.keep_freed_memory()
        info = dict(allocator=allocator, setup_s=[])
        bench = BENCHES[name]
        if kind == "jax":
            make = lambda options: bench.jax_step(size, batch, seq_len, options, overrides)  # noqa: E731
        else:
            import torch

            torch.set_num_threads(threads)
            state = dict(np.load(weights)) if weights else None
            make = lambda options: bench.torch_step(size, batch, seq_len, state, overrides,  # noqa: E731
                                                    reference_options=reference_options)
        runs = []
        for options in option_sets:
            start = time.perf_counter()
            runs.append(make(options))
            if kind == "jax" and weights and len(runs) == 1:
                np.savez(weights, **bench.to_torch(runs[0].params(), runs[0].config))
            for _ in range(warmup):
                runs[-1].step()
            info["setup_s"].append(time.perf_counter() - start)
        part_options = reference_options if kind == "torch" else {}
        parts = [bench.part(kind, run.config, batch, seq_len, **part_options) for run in runs] if bench.part else []
        for fn, _ in parts:
            fn()  # compiles
        if kind == "jax":
            info.update(describe=bench.describe(runs[0].config), flops=runs[0].flops(batch, seq_len))
        else:
            info.update(label=runs[0].label)
        matmul = matmul_timer(kind, matmul_size)
        matmul()
        conn.send(info)
        while True:
            cmd, *arg = conn.recv()
            if cmd == "stop":
                conn.send([(run.first_loss, run.loss, run.outputs) for run in runs])
                return
            if cmd == "step":
                fn, n, k = runs[arg[0]].step, arg[1], 1
            elif cmd == "part":  # k calls make a step
                (fn, k), n = parts[arg[0]], arg[1]
            else:
                fn, n, k = matmul, arg[0], 1
            faults = hostmem.minor_page_faults()
            seconds = _seconds_per_call(fn, n) * k
            conn.send((seconds, (hostmem.minor_page_faults() - faults) / n))
    except BaseException:  # reported by the parent with the worker's traceback
        import traceback

        conn.send(("error", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx, name: str, *args):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.info = self.ask()  # waits for the build and warm-up

    def ask(self, *cmd):
        try:
            if cmd:
                self.conn.send(cmd)
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise RuntimeError(f"bench worker {self.name} died (exit code {self.process.exitcode}; "
                               "a negative code is the signal, -9 often the out-of-memory killer)")
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            raise RuntimeError(f"bench worker {self.name} failed:\n{reply[1]}")
        return reply


def run_bench(name: str, size: Optional[str] = None, batch: int = 4, seq_len: int = 512, steps: int = 2,
              repeats: int = 5, variants: Sequence[dict] = (), matmul_size: int = 2048,
              threads: Optional[int] = None, warmup: int = 3, overrides: Optional[dict] = None,
              reference_options: Optional[dict] = None, log: Callable[[str], None] = lambda s: None) -> BenchResult:
    """Measures evejax (the entry's options, then each variant's options on top) and PyTorch
    alternately for BENCHES[name]: all evejax runs in one worker process, PyTorch in another.
    Three warm-up steps: with kept host memory the heap settles within them (a 110M LM run
    grew once, at its third step, then ran 22 steps at a flat 5.66 GiB)."""
    import multiprocessing

    if name not in BENCHES:
        raise ValueError(f"evejax bench has no entry {name!r}; use one of {sorted(BENCHES)} or data")
    bench = BENCHES[name]
    size = size or bench.size
    overrides = dict(overrides or {})
    unknown = sorted(set(reference_options or {}) - set(bench.reference_options))
    if unknown:
        raise ValueError(f"evejax bench {name}: the reference has no option(s) {unknown}; "
                         f"it takes {sorted(bench.reference_options) or 'none'}")
    reference_options = {**bench.reference_options, **(reference_options or {})}
    ctx = multiprocessing.get_context("spawn")
    threads = threads or os.cpu_count() or 1
    option_sets = [dict(bench.options)] + [dict(bench.options, **v) for v in variants]
    names = [f"evejax {o}" for o in option_sets] + ["torch"]
    workers = []
    with tempfile.TemporaryDirectory(prefix="evejax_bench_") as tmp:
        weights = os.path.join(tmp, "reference_state.npz") if bench.to_torch else None
        try:
            # One after the other: a worker's set-up (compiles, warm-up) must not overlap another's,
            # and the PyTorch worker reads the weights the evejax worker wrote.
            for kind, sets in (("jax", option_sets), ("torch", [None])):
                workers.append(_Worker(ctx, kind, kind, name, size, overrides, batch, seq_len, sets, threads,
                                       matmul_size, warmup, weights, reference_options))
            jax_worker, torch_worker = workers
            for label, t in zip(names, jax_worker.info["setup_s"] + torch_worker.info["setup_s"]):
                log(f"{label}: build + {warmup} warm-up steps {t:.1f} s")
            runs = [(jax_worker, i) for i in range(len(option_sets))] + [(torch_worker, 0)]
            samples = [[] for _ in runs]
            part_samples = [[] for _ in runs] if bench.part else []
            faults = [[] for _ in runs]
            jax_mm_s, torch_mm_s = [], []
            for r in range(repeats):
                jax_mm_s.append(jax_worker.ask("matmul", 3)[0])
                torch_mm_s.append(torch_worker.ask("matmul", 3)[0])
                for i, (w, k) in enumerate(runs):
                    seconds, n = w.ask("step", k, steps)
                    samples[i].append(seconds)
                    faults[i].append(n)
                for i, (w, k) in enumerate(runs[:len(part_samples)]):
                    part_samples[i].append(w.ask("part", k, 2)[0])
                log(f"repeat {r + 1}/{repeats}: evejax " + " ".join(f"{s[-1]:.3f}" for s in samples[:-1])
                    + f" s/step, torch {samples[-1][-1]:.3f} s/step")
            losses = jax_worker.ask("stop") + torch_worker.ask("stop")
        finally:
            for w in workers:
                w.process.join(30)
                if w.process.is_alive():
                    w.process.kill()

    torch_outputs = losses[-1][2]
    same_rows = [None if torch_outputs is None else int(sum(np.array_equal(a, b) for a, b in zip(ours, torch_outputs)))
                 for _, _, ours in losses[:-1]]
    mm_flops = 2.0 * matmul_size ** 3
    jax_mm_flops = mm_flops / statistics.median(jax_mm_s)
    torch_mm_flops = mm_flops / statistics.median(torch_mm_s)
    return BenchResult(
        bench=name, size=size, describe=jax_worker.info["describe"], unit=bench.unit,
        units_per_step=bench.units(batch, seq_len), batch=batch, seq_len=seq_len, steps=steps, repeats=repeats,
        threads=threads, xla_flags=os.environ.get("XLA_FLAGS", ""), cpu=cpu_model(),
        torch_label=torch_worker.info["label"], same_weights=bench.to_torch is not None,
        allocator=torch_worker.info["allocator"], flops_per_step=jax_worker.info["flops"],
        matmul_size=matmul_size, jax_matmul_flops=jax_mm_flops, torch_matmul_flops=torch_mm_flops,
        peak_flops=max(jax_mm_flops, torch_mm_flops), variants=option_sets,
        jax_step_s=[statistics.median(s) for s in samples[:-1]], jax_samples=samples[:-1],
        torch_step_s=statistics.median(samples[-1]), torch_samples=samples[-1],
        jax_faults=[statistics.median(f) for f in faults[:-1]], torch_faults=statistics.median(faults[-1]),
        jax_first_loss=[first for first, _, _ in losses[:-1]], torch_first_loss=losses[-1][0],
        jax_loss=[last for _, last, _ in losses[:-1]], torch_loss=losses[-1][1], shape=bench.shape(batch, seq_len),
        work=bench.work, flops_note=bench.flops_note, same_rows=same_rows,
        output_rows=0 if torch_outputs is None else len(torch_outputs),
        part_name=bench.part_name if bench.part else "",
        jax_part_s=[statistics.median(s) for s in part_samples[:-1]],
        torch_part_s=statistics.median(part_samples[-1]) if part_samples else 0.0)


def run_lm(size: str = "llama_110m", batch: int = 4, seq_len: int = 512, **kw) -> BenchResult:
    return run_bench("lm", size, batch, seq_len, **kw)


def _rate(per_second: float) -> str:
    """3 significant digits below 100 (a Mamba-B step makes 0.08 images/s), else whole units."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def format_result(res: BenchResult) -> str:
    from importlib.metadata import version

    lines = [
        f"evejax bench {res.bench}: {res.size} ({res.describe}), batch {res.shape or f'{res.batch} x {res.seq_len}'}, "
        f"{res.work}",
        f"machine: {res.cpu}, {os.cpu_count()} CPU cores ({platform.machine()}); "
        f"torch {version('torch')} threads {res.threads}; jax {version('jax')}; "
        f"transformers {version('transformers')}",
        f"host memory: {res.allocator}, in each framework's worker process",
        f"XLA_FLAGS: {res.xla_flags or '(none)'}",
        f"torch: {res.torch_label}",
        f"{res.repeats} alternating repeats of {res.steps} steps each; medians",
        "",
    ]
    names = ["evejax" if i == 0 else f"variant {i}" for i in range(len(res.variants))]
    head = ["", *names, "torch"]
    rate = f"{res.unit}/s"
    rows = [
        ["s/step", *(f"{s:.3f}" for s in res.jax_step_s), f"{res.torch_step_s:.3f}"],
        [rate, *(_rate(res.per_second(s)) for s in res.jax_step_s), _rate(res.per_second(res.torch_step_s))],
        [f"x torch {rate}", *(f"{res.torch_step_s / s:.2f}" for s in res.jax_step_s), "1.00"],
        ["GFLOP/s (model)", *(f"{res.flops_per_step / s / 1e9:.1f}" for s in res.jax_step_s),
         f"{res.flops_per_step / res.torch_step_s / 1e9:.1f}"],
        ["fraction of peak", *(f"{res.fraction_of_peak(s):.1%}" for s in res.jax_step_s),
         f"{res.fraction_of_peak(res.torch_step_s):.1%}"],
        ["min..max s/step", *(f"{min(s):.3f}..{max(s):.3f}" for s in res.jax_samples),
         f"{min(res.torch_samples):.3f}..{max(res.torch_samples):.3f}"],
        ["page faults/step", *(f"{x:,.0f}" for x in res.jax_faults), f"{res.torch_faults:,.0f}"],
    ]
    if res.part_name:
        rows += [[f"{res.part_name} s/step", *(f"{p:.3f}" for p in res.jax_part_s), f"{res.torch_part_s:.3f}"],
                 [f"{res.part_name} share", *(f"{p / s:.1%}" for p, s in zip(res.jax_part_s, res.jax_step_s)),
                  f"{res.torch_part_s / res.torch_step_s:.1%}"]]
    if res.output_rows:  # the same weights and inputs: the same outputs when both compute the same thing
        per_row = res.units_per_step / res.batch  # new tokens per row; the latency includes the prompt
        rows.insert(2, ["latency ms/token", *(f"{1e3 * s / per_row:.1f}" for s in res.jax_step_s),
                        f"{1e3 * res.torch_step_s / per_row:.1f}"])
        rows.append(["rows = torch's", *(f"{n}/{res.output_rows}" for n in res.same_rows), "-"])
    if res.torch_loss is not None:
        if res.same_weights:  # the same weights and batch: the first losses agree when the steps do
            rows.append(["first loss", *(f"{x:.5f}" for x in res.jax_first_loss), f"{res.torch_first_loss:.5f}"])
        rows.append(["last loss", *(f"{x:.3f}" for x in res.jax_loss), f"{res.torch_loss:.3f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines += [
        "",
        f"model FLOPs per step: {res.flops_per_step:.4g} ({res.flops_note})",
        f"peak: {res.matmul_size}^3 float32 matmul, jax {res.jax_matmul_flops / 1e9:.1f} GFLOP/s, "
        f"torch {res.torch_matmul_flops / 1e9:.1f} GFLOP/s -> peak {res.peak_flops / 1e9:.1f} GFLOP/s",
    ]
    if res.part_name:
        lines.append(f"{res.part_name} s/step: timed alone in the same run, as many calls as a step makes "
                     "(forward + backward); share: of the step's median")
    for name, options in zip(names, res.variants):
        lines.append(f"{name} options: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "(none)"))
    return "\n".join(lines)


def _parser(name: str) -> argparse.ArgumentParser:
    bench = BENCHES[name]
    p = argparse.ArgumentParser(prog=f"evejax bench {name}",
                                description=f"evejax vs PyTorch eager, a {bench.model} model: {bench.work}")
    p.add_argument("--size", default=bench.size, help=f"a size of the registry's {bench.model!r} family")
    p.add_argument("--overrides", default="",
                   help="model config fields for both sides, e.g. max_tiles=2,num_layers=4")
    p.add_argument("--batch", type=int, default=bench.default_batch)
    p.add_argument("--seq-len", type=int, default=bench.default_seq_len,
                   help="tokens per row (generate: new tokens per row)")
    p.add_argument("--steps", type=int, default=bench.default_steps, help="steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements per framework")
    p.add_argument("--warmup", type=int, default=bench.default_warmup,
                   help="steps each run takes before it is measured")
    if bench.reference_options:
        p.add_argument("--reference", default="", help="options of the PyTorch reference, default "
                       + ",".join(f"{k}={v}" for k, v in bench.reference_options.items()))
    p.add_argument("--variant", action="append", default=[],
                   help="extra evejax run with these options on top of the entry's, e.g. remat=full")
    p.add_argument("--threads", type=int, help="torch threads (default: CPU cores)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--profile", action="store_true",
                   help="instead of the comparison: where one evejax step's time goes, by part and kind of op "
                        "(evejax/step_profile.py)")
    return p


def profile_family(name: str, size: str, batch: int, seq_len: int, options: dict, overrides: dict,
                   matmul_size: int = 2048, repeats: int = 3) -> str:
    """The evejax step's time by part of the model and kind of op (evejax.step_profile), in this
    process with evejax.hostmem as the bench's workers; the jax matmul peak timed alongside."""
    import jax

    from evejax import hostmem, step_profile

    allocator = hostmem.keep_freed_memory()
    bench = BENCHES[name]
    step = bench.jax_step(size, batch, seq_len, options, overrides)
    matmul = matmul_timer("jax", matmul_size)
    for _ in range(2):
        step.step()
        matmul()
    peak = 2.0 * matmul_size ** 3 / statistics.median(_seconds_per_call(matmul, 2) for _ in range(repeats))
    step_s = statistics.median(_seconds_per_call(step.step, 1) for _ in range(repeats))
    hlo = step.train_step.lower(step.state, step.batch).compile().as_text()
    rows = step_profile.profile(step.step, hlo)
    flops = step.spec.flops_per_step(batch, seq_len)
    return "\n".join([
        f"evejax bench {name} --profile: {size} ({bench.describe(step.config)}), batch {bench.shape(batch, seq_len)}",
        f"machine: {cpu_model()}, {os.cpu_count()} CPU cores; jax {jax.__version__}; host memory: {allocator}",
        "options: " + ", ".join(f"{k}={v}" for k, v in options.items()),
        step_profile.format_rows(rows, peak),
        f"step {step_s:.3f} s wall (median of {repeats}, untraced): model FLOPs {flops:.4g} -> "
        f"{flops / step_s / peak:.1%} of peak"])


def bench_family(name: str, argv: Sequence[str]) -> int:
    args = _parser(name).parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a TPU VM's chips are not what this measures
    if args.profile:
        options = {**BENCHES[name].options, **(parse_options(args.variant[-1]) if args.variant else {})}
        print(profile_family(name, args.size, args.batch, args.seq_len, options, parse_options(args.overrides),
                             args.matmul_size))
        return 0
    res = run_bench(name, args.size, args.batch, args.seq_len, args.steps, args.repeats,
                    [parse_options(v) for v in args.variant], args.matmul_size, args.threads, args.warmup,
                    overrides=parse_options(args.overrides),
                    reference_options=parse_options(getattr(args, "reference", "")),
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_result(res))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*BENCHES, "data"):
        print(f"usage: evejax bench {'|'.join([*BENCHES, 'data'])} [args]  (evejax bench lm --help)",
              file=sys.stderr)
        return 2
    if argv[0] == "data":
        from evejax.data.bench import bench_data

        return int(bench_data(argv[1:]) or 0)
    return bench_family(argv[0], argv[1:])
