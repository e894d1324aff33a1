"""HoVLE (arXiv 2412.16158): training stages of HoVLE (2.6B). Stage 1 is built here.

Stage 1 distils the holistic embedding module on unpaired data (reference/hovle.md §2):
a stream of images (no text) whose image tokens are pulled towards a frozen vision
teacher's features, and a stream of random text ids whose outputs are pulled towards the
frozen LLM's own input embeddings; loss = negative cosine similarity per token, image
term + text term (weights 1 and 1, the paper's sum); only `embedding_model` trains. The
teacher runs inside the step (evejax/models/hovle.py `HoVLEDistill`).

  evejax import --family internvit InternVL2-2B-dir checkpoints/internvl2_2b_teacher
  evejax import --family internlm2 LLM-dir checkpoints/internlm2_chat_1_8b --vocab-size 92553
  evejax train --config configs/hovle.py:stage1        # runs/hovle_stage1
  evejax train --config configs/hovle.py:tiny_stage1   # CPU, generated shapes, fresh weights

Point the images at any source with `--config.data.name=unpaired_llava --config.data.path=x.jsonl
--config.data.image_root=DIR` (or unpaired_arrayrecord, unpaired_tfds; evejax/data/unpaired.py);
the text stream needs no data.

Teacher (a config choice: config.model.teacher, teacher_overrides). Its features must be
where the LLM reads its inputs: 2048-d, 256 tokens per 448 px tile. The default is
InternVL2-2B's vision side, InternViT-300M-448px + pixel shuffle 0.5 + `mlp1`: its output
is, by construction, the input space of InternVL2-2B's LLM (InternLM2-chat-1.8B, the LLM
HoVLE is built on), one token per 2 x 2 patch block of a 448 px tile, the same geometry as
HoVLE's image tokens, so student token (y, x) is compared with teacher token (y, x) with no
learned part in between. The alternative, CLIP with a learned projection into that space,
would put a trainable map on the target side of a cosine loss (which can collapse) or
first need its own training against the LLM; it is not built.
What is distilled: the LLM's inputs at the image positions. For "pre" (HoVLE) these are the
embedding module's outputs; for "post" (HoVLE-HD) the outputs of the 1024 patch tokens per
tile, pixel-shuffled and projected to 256 (the projection trains after the layers).

The paper's hyperparameters are not public (hovle.md §2, "Not found"); every value below is
a default chosen here, a field a command line can change:
  lr 2e-4, global batch 512, weight decay 0.01 (not on norms and biases), cosine decay:
      InternVL 2.5's stage 1, "MLP warmup" (OpenGVLab/InternVL
      internvl_chat/shell/internvl2.5/stage1/*.sh: freeze_llm, freeze_backbone, lr 2e-4,
      weight decay 0.01, packed batch 512), the public recipe that trains new layers in front
      of a frozen LLM; AdamW (0.9, 0.999, 1e-8), 3% linear warmup, clipping at 1.0. A row is
      one image + one text stream.
  max_tiles 6 (the official max_dynamic_patch), so the module sees the tiles and thumbnails
      of the later stages; 7 tile slots x 256 = 1792 image tokens per row.
  text rows of 2048 random ids (config.data.seq_len): about the image row's 1792 tokens, so
      both streams cost about the same per step; ids uniform over the 92553-id vocabulary
      without <IMG_CONTEXT>.
  550M rows (num_examples): the "pre-training" data scale NEO (arXiv 2510.14979) reports for
      HoVLE, presumably stage 1; its unit (images or tokens) is not stated.
  bf16 compute, fp32 master weights, full rematerialisation, FSDP over all chips, 4 micro-batches.
The embedding module starts from a random init: whether the official one is initialised from
LLM layers is unknown (hovle.md §5 item 3).

Weights: the teacher from InternVL2-2B (`evejax import --family internvit`). The LLM slot holds
92553 token rows (HoVLE's vocabulary: InternLM2's 92544 + InternVL's 9 added tokens, hovle.md
§1.3), so the InternLM2-chat-1.8B import grows its 92544 rows to 92553 with `--vocab-size`
(new rows: the mean of the others, the rule LLaVA-style fine-tuning code uses for added tokens); a checkpoint
of another size is refused by the trainer naming `language_model/embed_tokens/embedding`.

Args: stage1 | tiny_stage1. The tiny stage trains tiny HoVLE (56 px tiles, 4 tokens per tile,
width 64) against a tiny InternVL teacher sized to match, from fresh weights, on shapes.
"""
import math

import ml_collections

from evejax import config as config_lib

EMBEDDING = (r"embedding_model/.*",)
STAGE1_IMPORT = "language_model=checkpoints/internlm2_chat_1_8b,teacher=checkpoints/internvl2_2b_teacher"

# One row per stage (module docstring for the sources of the numbers).
STAGES = {
    # Distillation on unpaired data; accum_steps 4: micro-batches of 8 rows per chip fit a v5e-16
    # (11.4 GiB of 16, `evejax plan`), the whole 32 need ~30 GiB. The tiny run halves both
    # losses in 60 steps at lr 3e-3.
    "stage1": dict(trainable=EMBEDDING, lr=2e-4, global_batch=512, accum_steps=4, num_examples=550_000_000,
                   drop_path=0.0, start=("import", STAGE1_IMPORT), checkpoint_every=1000,
                   teacher="internvl2_2b", losses=dict(distill_image=1.0, distill_text=1.0), text_len=2048,
                   tiny_lr=3e-3, tiny_steps=60),
}

# arg -> (model size, stage)
ARGS = {"stage1": ("2.6b", "stage1"), "tiny_stage1": ("tiny", "stage1")}
WARMUP_FRAC = 0.03
# Grid tiles per image (max_dynamic_patch): the official 6; the tiny model's 3 (4 slots of 56 px).
MAX_TILES = {"2.6b": 6, "2.6b_hd": 6, "tiny": 3}
# The tiny teacher reshaped to tiny HoVLE's tiles: 56 px, patch 14 -> 4 x 4 grid -> 4 tokens of 64.
TINY_TEACHER = dict(image_size=56, patch_size=14, llm_dim=64)


def data_config(size: str, stage: str) -> dict:
    """config.data; the tiling comes from config.model."""
    s = STAGES[stage]
    if size == "tiny":
        return config_lib.data_config(name="unpaired_shapes", seq_len=16, global_batch=8, seed=0)
    return config_lib.data_config(name="unpaired_shapes", seq_len=s["text_len"], global_batch=s["global_batch"],
                                  seed=0)


def get_config(arg: str = "tiny_stage1"):
    if arg not in ARGS:
        raise ValueError(f"configs/hovle.py takes one of {sorted(ARGS)}, got {arg!r}")
    size, stage = ARGS[arg]
    s = STAGES[stage]
    tiny = size == "tiny"
    prefix = "hovle_tiny" if tiny else "hovle_2_6b"
    kind, where = s["start"]
    if kind == "stage":
        start = dict(kind="stage", workdir=f"{prefix}_{where}", path="")
    elif tiny:
        start = dict(kind="fresh", workdir="", path="")
    else:
        start = dict(kind="import", workdir="", path=where)

    c = ml_collections.ConfigDict()
    c.data = data_config(size, stage)
    c.model = dict(name="hovle", size=size, overrides=dict(
        dtype="float32" if tiny else "bfloat16", remat="none" if tiny else "full",
        embedding_drop_path=s["drop_path"], max_tiles=MAX_TILES[size]),
        teacher="tiny" if tiny else s["teacher"], teacher_overrides=TINY_TEACHER if tiny else {})
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1) if tiny else dict(slice=1, data=1, fsdp=-1, tensor=1)
    steps = s["tiny_steps"] if tiny else math.ceil(s["num_examples"] / s["global_batch"])
    c.optim = dict(lr=s["tiny_lr"] if tiny else s["lr"], warmup_frac=WARMUP_FRAC, schedule="cosine",
                   min_lr_frac=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
                   no_decay=(r".*norm.*", r".*bias"))
    c.stage = dict(name=f"hovle_{arg}", trainable=s["trainable"], losses=s["losses"], start=start)
    c.train = dict(steps=steps, accum_steps=1 if tiny else s["accum_steps"], seed=0, log_every=10 if tiny else 50,
                   ema_decay=0.0, peak_flops_per_device=0.0, progress_bar=True)
    c.checkpoint = dict(every=10 if tiny else s["checkpoint_every"], keep=3, async_save=True)
    return c
