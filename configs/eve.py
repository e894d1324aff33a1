"""EVE (arXiv 2406.11832): the three training stages of EVE-7B and EVE-7B (HD).

Weights come in once, with `evejax import` (Vicuna-7B v1.5 into checkpoints/vicuna_7b,
with its tokenizer.model; CLIP-ViT-L/14-336 into checkpoints/clip_vit_l14_336);
then each stage starts from the previous stage's final params, found by workdir name:

  evejax train --config configs/eve.py:7b_stage1      # runs/eve_7b_stage1
  evejax train --config configs/eve.py:7b_stage2      # reads runs/eve_7b_stage1
  evejax train --config configs/eve.py:7b_stage3      # reads runs/eve_7b_stage2 -> EVE-7B
  evejax train --config configs/eve.py:7b_hd_stage3   # reads runs/eve_7b_stage2 -> EVE-7B (HD)

With `--workdir gs://BUCKET/eve/eve_7b_stage1` etc. the stages find each
other in gs://BUCKET/eve/ (a relative `stage.start.workdir` is resolved next to
the run's own workdir). Re-running a command resumes it. Data paths are
placeholders: point `--config.data.path` / `--config.data.image_root` at the
LLaVA-style JSON of each stage (reference/eve.md §2.3, §3). Every config here
(and in demo.py) has the same data keys, so the tiny stages take LLaVA data too
(`--config.data.name=llava --config.data.path=x.jsonl --config.data.image_root=DIR`,
tokenizer "shapes" or a tokenizer.model of the model's vocabulary); the image
preprocessing always follows config.model.

Paper targets (Table 3): EVE-7B VQAv2 75.4, GQA 60.8, VizWiz 41.8, SQA-I 63.0,
TextVQA 51.9, POPE 83.6, MME 1217.3, MMB 49.5, SEED 54.3, MM-Vet 25.6;
EVE-7B (HD) 78.6 / 62.6 / 51.1 / 64.9 / 56.8 / 85.0 / 1305.7 / 52.3 / 56.8 / 25.7.

Hyperparameters are reference/eve.md §3 (paper §3.2, §4.1, Table 8 and the
official scripts): AdamW (0.9, 0.999, 1e-8), no weight decay, cosine decay
after linear warmup, 1 epoch (steps = examples / global batch), text cut to
2048 ids (4096 for HD) before the image is spliced in, images at 672 px long
edge (1344 for HD), bf16 compute with fp32 master weights. Unverified
(defaults a config may change): gradient clipping at 1.0 (HF's max_grad_norm;
the DeepSpeed ZeRO-3 json has no clipping key) and the PAL loss weight 1.0.

Stage 1 trains the PEL (`vision_tokenizer` + `mm_projector`) and the PAL
(`vision_compressor`) with the LLM frozen; stages 2 and 3 train everything but
the frozen CLIP teacher (`clip`). Gradients of stage 1 still flow through the
frozen LLM into the PEL.

Args: 7b_stage1 | 7b_stage2 | 7b_stage3 | 7b_hd_stage3 | tiny_stage1 | tiny_stage2 | tiny_stage3.
The tiny stages run the same chain on CPU on generated shapes (evejax/data/shapes.py).
"""
import math

import ml_collections

from evejax import config as config_lib

PEL_PAL = (r"vision_tokenizer/.*", r"mm_projector/.*", r"vision_compressor/.*")
ALL_BUT_CLIP = PEL_PAL + (r"llm/.*",)
IMPORTED = "llm=checkpoints/vicuna_7b,clip=checkpoints/clip_vit_l14_336"

STAGES = {
    # EVE-cap16M: the 16M subset of EVE-cap33M.
    "stage1": dict(trainable=PEL_PAL, lr=4e-4, warmup_frac=0.03, global_batch=512, accum_steps=2,
                   num_examples=16_000_000, template="plain", json="eve_cap16m.json", previous=None),
    # EVE-cap33M.
    "stage2": dict(trainable=ALL_BUT_CLIP, lr=4e-5, warmup_frac=0.01, global_batch=512, accum_steps=1,
                   num_examples=33_000_000, template="plain", json="eve_cap33m.json", previous="stage1"),
    # LLaVA-mix-665K.
    "stage3": dict(trainable=ALL_BUT_CLIP, lr=2e-5, warmup_frac=0.01, global_batch=128,
                   num_examples=665_298, template="vicuna_v1", json="llava_v1_5_mix665k.json",
                   previous="stage2"),
    # eve_instruct_mix1.8m: LLaVA-mix-665K + 1.2M OCR and multi-task records.
    "hd_stage3": dict(trainable=ALL_BUT_CLIP, lr=2e-5, warmup_frac=0.01, global_batch=128,
                      num_examples=1_800_000, template="vicuna_v1", json="eve_instruct_mix1.8m.json",
                      previous="stage2"),
}

# arg -> (model size, stage)
ARGS = {"7b_stage1": ("7b", "stage1"), "7b_stage2": ("7b", "stage2"), "7b_stage3": ("7b", "stage3"),
        "7b_hd_stage3": ("7b_hd", "hd_stage3"), "tiny_stage1": ("tiny", "stage1"),
        "tiny_stage2": ("tiny", "stage2"), "tiny_stage3": ("tiny", "stage3")}


def data_config(size: str, stage: str) -> dict:
    """config.data: the keys of every pipeline config (evejax.config.data_config); the image
    geometry comes from config.model, so `--config.model.size=tiny` takes the tiny model's."""
    s = STAGES[stage]
    if size == "tiny":
        return config_lib.data_config(name="shapes_qa" if s["template"] == "vicuna_v1" else "shapes_caption",
                                      tokenizer="shapes", template=s["template"], seq_len=64, global_batch=8,
                                      seed=0)
    return config_lib.data_config(name="llava", path=f"data/eve/{s['json']}", image_root="data/eve/images",
                                  tokenizer="checkpoints/vicuna_7b/tokenizer.model", template=s["template"],
                                  seq_len=4096 if size == "7b_hd" else 2048, overlong="truncate",
                                  global_batch=s["global_batch"], seed=0)


def get_config(arg: str = "tiny_stage1"):
    if arg not in ARGS:
        raise ValueError(f"configs/eve.py takes one of {sorted(ARGS)}, got {arg!r}")
    size, stage = ARGS[arg]
    s = STAGES[stage]
    tiny = size == "tiny"
    prefix = "eve_tiny" if tiny else "eve_7b"
    if s["previous"]:
        start = dict(kind="stage", workdir=f"{prefix}_{s['previous']}", path="")
    elif tiny:
        start = dict(kind="fresh", workdir="", path="")
    else:
        start = dict(kind="import", workdir="", path=IMPORTED)

    c = ml_collections.ConfigDict()
    # TPU stages run the splash kernel (no [B, heads, T, T] scores in HBM); the CPU stays on "xla".
    c.model = dict(name="eve", size=size,
                   overrides=dict(dtype="float32" if tiny else "bfloat16", remat="full",
                                  attention_impl="xla" if tiny else "splash"))
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1) if tiny else dict(slice=1, data=1, fsdp=-1, tensor=1)
    c.data = data_config(size, stage)
    steps = 30 if tiny else math.ceil(s["num_examples"] / s["global_batch"])
    # The tiny model learns in 30 steps only with a larger learning rate.
    c.optim = dict(lr=s["lr"] if not tiny else 10 * s["lr"], warmup_frac=s["warmup_frac"], schedule="cosine",
                   min_lr_frac=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                   no_decay=(r".*norm.*", r".*bias", r".*embed.*"))
    c.stage = dict(name=f"eve_{arg}", trainable=s["trainable"], losses=dict(ce=1.0, pal=1.0), start=start)
    # Stage 2 on v5p-64 (`evejax plan`): batch 512 in one step needs 131.95 GiB/chip with the
    # einsum attention, 94.32 GiB (99 %, fast effort) with splash, so it runs in one step.
    c.train = dict(steps=steps, accum_steps=1 if tiny else s.get("accum_steps", 1), seed=0, log_every=10 if tiny else 50, ema_decay=0.0,
                   peak_flops_per_device=0.0, progress_bar=True)
    c.checkpoint = dict(every=10 if tiny else (1000 if stage in ("stage1", "stage2") else 500),
                        keep=3, async_save=True)
    return c
