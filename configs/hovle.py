"""HoVLE (arXiv 2412.16158): the three training stages of HoVLE (2.6B) and the HD stage 3 of HoVLE-HD.

Stage 1 distils the holistic embedding module on unpaired data (reference/hovle.md §2):
a stream of images (no text) whose image tokens are pulled towards a frozen vision
teacher's features, and a stream of random text ids whose outputs are pulled towards the
frozen LLM's own input embeddings; loss = negative cosine similarity per token, image
term + text term (weights 1 and 1, the paper's sum); only `embedding_model` trains. The
teacher runs inside the step (evejax/models/hovle.py `HoVLEDistill`).

  evejax import --family internvit InternVL2-2B-dir checkpoints/internvl2_2b_teacher
  evejax import --family internlm2 LLM-dir checkpoints/internlm2_chat_1_8b --vocab-size 92553
  evejax train --config configs/hovle.py:stage1        # runs/hovle_stage1

Its images come from `--config.data.path=x.jsonl --config.data.image_root=DIR` (LLaVA-style
records, their text ignored; or `--config.data.name=unpaired_arrayrecord|unpaired_tfds`,
evejax/data/unpaired.py); the text stream needs no data.

Teacher (a config choice: config.model.teacher, teacher_overrides; the arg picks its kind,
`stage1` InternVL, `stage1_clip` CLIP). Its features must be where the LLM reads its
inputs: 2048-d, 256 tokens per 448 px tile. The default is InternVL2-2B's vision side,
InternViT-300M-448px + pixel shuffle 0.5 + `mlp1`: its output is, by construction, the input
space of InternVL2-2B's LLM (InternLM2-chat-1.8B, the LLM HoVLE is built on), one token per
2 x 2 patch block of a 448 px tile, the same geometry as HoVLE's image tokens, so student
token (y, x) is compared with teacher token (y, x) with no learned part in between: the
target is fixed and already in the LLM's input space.
The alternative, `stage1_clip` (teacher "clip_l14_336", models/vit.py ClipTeacher): CLIP-ViT-L/14-336
(`evejax import --family clip`, frozen) on the same 448 px tiles, its 24 x 24 position grid
resized bicubically to 32 x 32 (HF's interpolate_pos_encoding; the 336 px model needs the
smallest resize of the CLIP-L/14 pair), layer -2 without CLS, the same 2 x 2 pixel shuffle
(256 tokens of 4096), then a learned projection (LayerNorm-Linear-GELU-Linear) to 2048. Why it
is not the default: a projection trained with the student by the distillation loss can
shrink that loss without teaching anything (map every tile to one vector, which the student
copies); and nothing in stage 1's unpaired data ties its output to the LLM's input space.
The guard: the target is the projection's output under stop_gradient, so the distillation
loss never reaches the projection; the projection trains by its own objective only,
`teacher_projection` = 1 - cos between the shuffled CLIP features and their reconstruction
(one Linear, `teacher/reconstruction`) from its output, which a collapsed projection cannot
satisfy. Its output is an information-preserving code of CLIP's features, not the LLM's input
space: stage 2 (next-token prediction through the frozen LLM) does that alignment.
`stage1_clip` trains embedding_model and teacher/{projection,reconstruction} (CLIP and LLM
frozen) with losses distill_image + distill_text + teacher_projection; start:
  evejax import --family clip clip-vit-large-patch14-336-dir checkpoints/clip_vit_l14_336
  evejax train --config configs/hovle.py:stage1_clip   # runs/hovle_stage1_clip
  evejax train --config configs/hovle.py:stage2 --config.stage.start.workdir=hovle_stage1_clip
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

Stages II and III (reference/hovle.md §2): II alignment (next-token prediction on image-text data, the LLM frozen, only
`embedding_model` trains), III instruction tuning (everything trains). Launch:

  evejax train --config configs/hovle.py:stage2      # reads runs/hovle_stage1
  evejax train --config configs/hovle.py:stage3      # reads runs/hovle_stage2 -> HoVLE
  evejax train --config configs/hovle.py:hd_stage3   # reads runs/hovle_stage2 -> HoVLE-HD

Stage 2 starts from stage 1's embedding module and LLM (the teacher stays behind);
`--config.stage.start.kind=import --config.stage.start.path=checkpoints/hovle` starts it
from the released HoVLE instead (`evejax import --family hovle`). hd_stage3 runs the HoVLE-HD model ("post" pixel shuffle:
the embedding layers see 1024 tokens per tile) on stage 2's parameters, which have
the same shapes (how HoVLE-HD's earlier stages ran is not public; `--config.model.size=2.6b_hd`
on stage2 aligns with the HD placement too). With `--workdir gs://BUCKET/hovle/hovle_stage2` etc. the stages
find each other in gs://BUCKET/hovle/. Data paths are placeholders (the tokenizer is
InternLM2-chat's tokenizer.model: copy it next to the import or set
`--config.data.tokenizer`): point
`--config.data.path` / `--config.data.image_root` at LLaVA-style JSON (or `evejax data
convert` shards with `--config.data.name=arrayrecord`) of each stage; the text is
rendered in InternVL's internlm2-chat template, and the tile geometry (tile side,
max_tiles, tokens per tile) always follows config.model (`pipeline.model_geometry`),
so `--config.model.overrides.max_tiles=12` changes data and model together.

What each should reach: stage 2 leaves the LLM bit-identical and brings the
caption CE down (no paper figure is public); stage 3 gives HoVLE, paper targets as
third parties quote them (hovle.md §3): MME-P 1433.5, MMB 71.9, POPE 87.6, SEED 70.7,
MMMU 33.7, MM-Vet 44.3, TextVQA 66.0, SQA-I 94.8, GQA 60.9; hd_stage3 gives HoVLE-HD
(NEO's row, likely HD): MMB 73.3, MM-Vet 43.8, MMMU 32.2, POPE 87.4, TextVQA 70.9,
DocVQA 86.1, ChartQA 78.6, InfoVQA 55.7, OCRBench 740.

Hyperparameters: the paper's are not public (hovle.md §2, "Not found"). The data scale
is NEO's quote, 550M / 50M / 7M examples for stages I / II / III, and each stage runs
one epoch of it. Every other number below is a default taken from InternVL's public
training scripts, the closest public recipe (same InternLM2-1.8B LLM, the same tiling,
template and 256 tokens per tile): AdamW through HF Trainer (0.9, 0.999, 1e-8),
weight decay 0.01 on all but norms and biases, cosine decay after a 3 % linear warmup,
gradient clipping at 1.0 (HF max_grad_norm), bf16 compute with fp32 master weights,
text + image tokens cut to max_seq_length 4096. Each is a config field; change it on the
command line (`--config.optim.lr=1e-4`).

Args: stage1 | stage1_clip | stage2 | stage3 | hd_stage3 | tiny_stage1 | tiny_stage1_clip | tiny_stage2 |
tiny_stage3 | demo_stage1 | demo_stage2 | demo_stage3. The tiny stages run the same chain on CPU on generated
shapes (evejax/data/shapes.py) from fresh weights: tiny HoVLE (56 px tiles, 4 tokens per tile,
width 64) against a tiny InternVL teacher sized to match, then internlm2-chat conversations.

The demo stages (`evejax demo --model hovle`, evejax/demo.py) are the shapes demo of EVE's
configs/demo.py through HoVLE's stages, HoVLE size "demo" at EVE demo's LLM width (128; 3 LLM
layers + 2 embedding layers, one 64 px tile of 8 px patches -> 16 image tokens, one per 16 px
shapes cell), no drop path (EVE's demo has none either). A demo data choice, not official:
tile_fit "pad" letterboxes the scenes (aspect 1:4 to 4:1) onto the square tile, centred in whole
16 px tokens on the ImageNet mean, as EVE's any-res view pads them, so every token still sees
one cell and the teacher sees the views it was trained on; InternVL's tiling (tile_fit
"stretch", every other config here) would stretch them to the tile at max_tiles 1. Measured at
100 / 500 / 500 steps (README "The demo", loaded machine): stretched 61.2% held-out, padded 68.4%.
  (teacher)    `evejax demo` first trains EVE demo's teacher, configs/demo.py:teacher (a tiny CLIP
               classifying the largest shape's kind and colour), and writes its CLIP to
               DIR/teacher_clip
  demo_stage1  unpaired, 300 steps: shapes images without text distilled to the CLIP teacher
               (`clip_demo`, models/vit.py: that CLIP, frozen, imported into teacher/clip, reading
               the tile pooled to its 32 px so each patch is one cell, as in its training; its
               16 layer -2 tokens go through the learned projection to 128, trained by its own
               reconstruction loss, as stage1_clip), random text ids distilled to the frozen LLM's
               input embeddings; embedding_model and the projection train. 300 steps, not
               100: distill_image ends at 0.12 (0.25 after 100), stage 2's caption CE at 0.05
               (0.18), held-out shape questions at 76.7% (58.9%; all 69.8% against 68.4%, within
               a run's spread), for no measurable CPU time (881 s user for the demo against 886 s)
  demo_stage2  captions (internlm2-chat), 500 steps, everything trains. A stated deviation from
               the paper's stage 2 (LLM frozen, which stage2 and tiny_stage2 keep): the demo's LLM
               is random, not pre-trained; frozen, it left the caption CE where it started (3.74 ->
               3.73 in 50 steps) and stage 3 learnt the answer prior only (held-out 36.2% = blank).
               EVE's demo trains its LLM on captions too.
  demo_stage3  the question rounds (qa_rounds "all"), 500 steps at lr 2e-3, everything trains
               (EVE demo's stage-3 budget; twice its lr 1e-3, with which the CE sat at 0.33-0.40 from
               step 75 to 300: held-out 74.2% against 69.8%, the same CPU time; 800 steps at 2e-3
               gave 76.6% for +367 s user CPU, within a run's spread, so not taken; README)
By hand: `evejax train --config configs/demo.py:teacher --workdir DIR/teacher`, its CLIP saved as
`evejax demo` does (demo.save_teacher) to DIR/teacher_clip, then `evejax train --config
configs/hovle.py:demo_stage1 --workdir DIR/stage1 --config.stage.start.path=teacher/clip=DIR/teacher_clip`,
then demo_stage2 and demo_stage3 with `--config.stage.start.workdir=DIR/stage1` (DIR/stage2).
Why a trained teacher (measured, README "The demo"): the frozen random tiny InternVL teacher used
before gave near-constant targets (mean pairwise cosine of the LLM's image tokens 0.98 after stage
1) and, with 30 / 200 / 300 steps, held-out 41.6% (blank 35.2%); with this teacher the caption CE
of stage 2 depends on the image (0.44 with the right images, 0.92 with another row's, against 0.53
and 0.62 before) and held-out rose to 47.8% at the same budget, 61.2% at 100 / 500 / 500 steps
(blank 38.2%), 68.4% letterboxed, 69.8% (blank 36.8%) with stage 1 at 300 steps and 74.2%
(blank 37.6%) with stage 3 at lr 2e-3: still short of the demo's 80% target (presence at
chance; README says where).
"""
import math

import ml_collections

from evejax import config as config_lib
from evejax.data import pipeline

EMBEDDING = (r"embedding_model/.*",)
EVERYTHING = (r".*",)
STAGE1_IMPORT = "language_model=checkpoints/internlm2_chat_1_8b,teacher=checkpoints/internvl2_2b_teacher"
# The tiny teacher reshaped to tiny HoVLE's tiles: 56 px, patch 14 -> 4 x 4 grid -> 4 tokens of 64.
TINY_TEACHER = dict(image_size=56, patch_size=14, llm_dim=64)
# Stage-1 teacher kinds (the args without / with "_clip"): teacher sizes (full, tiny), the tiny
# overrides, the import of the start, what trains besides the embedding module, extra loss terms.
TEACHER_KINDS = {
    "internvl": dict(teacher="internvl2_2b", tiny="tiny", tiny_overrides=TINY_TEACHER, start=STAGE1_IMPORT,
                     trainable=(), losses={}),
    "clip": dict(teacher="clip_l14_336", tiny="clip_tiny", tiny_overrides={},
                 start="language_model=checkpoints/internlm2_chat_1_8b,teacher/clip=checkpoints/clip_vit_l14_336",
                 trainable=(r"teacher/(projection|reconstruction)/.*",), losses=dict(teacher_projection=1.0)),
}

# One row per stage. Sources of the numbers:
STAGES = {
    # Distillation on unpaired data; accum_steps 4: micro-batches of 8 rows per chip fit a v5e-16
    # (11.4 GiB of 16, `evejax plan`), the whole 32 need ~30 GiB. The tiny run halves both
    # losses in 60 steps at lr 3e-3.
    "stage1": dict(trainable=EMBEDDING, lr=2e-4, global_batch=512, accum_steps=4, num_examples=550_000_000,
                   drop_path=0.0, start=("import", STAGE1_IMPORT), checkpoint_every=1000,
                   teacher="internvl2_2b", losses=dict(distill_image=1.0, distill_text=1.0), text_len=2048,
                   tiny_lr=3e-3, tiny_steps=60),
    # Alignment, LLM frozen. 50M examples: NEO's HoVLE "mid-training" scale. lr 2e-4, batch 512,
    # weight decay 0.01 and drop path 0 are InternVL 2.5's stage 1 (MLP warmup:
    # internvl_chat/shell/internvl2.5/stage1/*.sh), the public stage with this freezing
    # pattern (the LLM frozen, only what feeds it trains); its warmup is 100 steps, here the
    # 3 % of stage 3. 16 micro-batches of 32: the rows per
    # micro-batch of stage 3, which fit a v5e-16 that way (`evejax plan`, README).
    "stage2": dict(trainable=EMBEDDING, lr=2e-4, global_batch=512, accum_steps=16, num_examples=50_000_000,
                   drop_path=0.0, json="hovle_stage2.json", start=("stage", "stage1"), checkpoint_every=1000),
    # Instruction tuning, all trainable. 7M examples: NEO's HoVLE SFT scale. lr 4e-5, batch 128,
    # drop path 0.1 (InternVL's is on its vision encoder; here the embedding module plays that
    # part) are InternVL 2.0's full fine-tuning of InternVL2-2B
    # (internvl_chat/shell/internvl2.0/2nd_finetune/internvl2_2b_*_finetune_full.sh). Four
    # micro-batches of 32: on a v5e-16 one step of 128 needs ~26 GiB/chip, two of 64 16.2 GiB,
    # four of 32 10.2 GiB of the 16 (`evejax plan` with einsum attention, README). Splash does
    # not buy fewer: two of 64 still need 16.9 GiB/chip (the scores of one layer's recompute
    # were not what filled HBM).
    "stage3": dict(trainable=EVERYTHING, lr=4e-5, global_batch=128, accum_steps=4, num_examples=7_000_000,
                   drop_path=0.1, json="hovle_stage3.json", start=("stage", "stage2"), checkpoint_every=500),
}
# HoVLE-HD: its embedding layers run on 4x the image tokens (9472 for 4096 LLM tokens at 7 tile
# slots); on a v5e-16 one step of 128 needs ~79 GiB/chip, eight micro-batches of 16 14.3 GiB.
STAGES["hd_stage3"] = dict(STAGES["stage3"], json="hovle_hd_stage3.json", accum_steps=8)

# The demo (module docstring): arg -> data name, text positions per row (stage 1: the random
# text row), steps, peak lr. Rows hold a caption in 70 positions, the system prompt with
# shapes.MAX_ROUNDS (8) questions of an image in 184, the 16 image tokens and <img>, </img>
# included. Batch 32, EVE demo's.
DEMO_STAGES = {
    # Without stage 1 (lr 0) the image tokens collapse by stage 3 and held-out = blank (36.2%, README).
    # The CLIP teacher's kind (tiny_stage1_clip's chain): the projection trains with the student.
    "stage1": dict(data="unpaired_shapes", seq_len=16, steps=300, lr=3e-3, base="tiny_stage1_clip",
                   trainable=EMBEDDING + TEACHER_KINDS["clip"]["trainable"]),
    # The LLM trains too: a deviation from the paper (module docstring), the demo's LLM is random.
    "stage2": dict(data="shapes_caption", seq_len=70, steps=500, lr=2e-3, trainable=EVERYTHING),
    "stage3": dict(data="shapes_qa", seq_len=184, steps=500, lr=2e-3, trainable=EVERYTHING),
}
# HoVLE "demo" widened to EVE demo's LLM width, both stacks, 3 LLM layers (+ 2 embedding layers:
# about EVE demo's 4-layer cost: a stage-3 step takes the CPU time of EVE demo's, README); float32,
# no remat, 2-D matmuls: faster on CPU; causal scores in 4 query blocks (stage 3's 184 = 4 x 46; stage 2's
# 70 falls back to 1) and the layers unrolled (no scan slicing): stage-3 step -23% CPU time, stage 2 -17%
# (README); one tile per image (its max_tiles), every image letterboxed onto it (tile_fit "pad", module docstring).
DEMO_WIDTH = dict(embed_dim=128, head_dim=32, mlp_dim=256)
DEMO_OVERRIDES = dict(dtype="float32", remat="none", matmul_2d=True, xla_causal_blocks=4, scan_unroll=3,
                      max_tiles=1, tile_fit="pad", num_layers=3, embedding_drop_path=0.0, **DEMO_WIDTH,
                      **{f"embedding_{k}": v for k, v in DEMO_WIDTH.items()})
DEMO_TEACHER = dict(llm_dim=DEMO_WIDTH["embed_dim"], remat="none")
# Where `evejax demo --model hovle` writes EVE demo's teacher CLIP (its default --out, runs/demo_hovle).
DEMO_TEACHER_IMPORT = "teacher/clip=runs/demo_hovle/teacher_clip"

# arg -> (model size, stage)
ARGS = {"stage1": ("2.6b", "stage1"), "tiny_stage1": ("tiny", "stage1"), "stage1_clip": ("2.6b", "stage1"),
        "tiny_stage1_clip": ("tiny", "stage1"), "stage2": ("2.6b", "stage2"), "stage3": ("2.6b", "stage3"), "hd_stage3": ("2.6b_hd", "hd_stage3"),
        "tiny_stage2": ("tiny", "stage2"), "tiny_stage3": ("tiny", "stage3")}
WARMUP_FRAC = 0.03
SEQ_LEN = 4096
# Grid tiles per image (max_dynamic_patch): 6, the official InternVLChatConfig default and the
# usual evaluation limit (hovle.md §1.4). InternVL2-2B's fine-tuning script uses 12: with
# `--config.model.overrides.max_tiles=12` (13 slots) re-run `evejax plan`. The tiny model: 3.
MAX_TILES = {"2.6b": 6, "2.6b_hd": 6, "tiny": 3}


def data_config(size: str, stage: str) -> dict:
    """config.data: the keys of every pipeline config (evejax.config.data_config); the tile
    geometry comes from config.model, so `--config.model.size=tiny` takes the tiny model's."""
    s = STAGES[stage]
    if "teacher" in s:   # unpaired images (their text ignored) + random text ids
        if size == "tiny":
            return config_lib.data_config(name="unpaired_shapes", seq_len=16, global_batch=8, seed=0)
        return config_lib.data_config(name="unpaired_llava", path="data/hovle/hovle_stage1.json",
                                      image_root="data/hovle/images", seq_len=s["text_len"],
                                      global_batch=s["global_batch"], seed=0)
    if size == "tiny":
        # Rows hold the system prompt, a question or caption and up to 4 tiles x 4 tokens.
        return config_lib.data_config(name="shapes_caption" if stage == "stage2" else "shapes_qa",
                                      tokenizer="shapes", template=pipeline.HOVLE_TEMPLATE, seq_len=96,
                                      global_batch=8, overlong="truncate", seed=0)
    return config_lib.data_config(name="llava", path=f"data/hovle/{s['json']}", image_root="data/hovle/images",
                                  tokenizer="checkpoints/internlm2_chat_1_8b/tokenizer.model",
                                  template=pipeline.HOVLE_TEMPLATE, seq_len=SEQ_LEN, overlong="truncate",
                                  global_batch=s["global_batch"], seed=0)


def demo_config(stage: str) -> ml_collections.ConfigDict:
    """The demo stage (module docstring): the tiny stage's chain at demo size and schedule."""
    d = DEMO_STAGES[stage]
    c = get_config(d.get("base", f"tiny_{stage}"))
    c.model.size = "demo"
    c.model.overrides.update(DEMO_OVERRIDES)
    if "teacher" in c.model:
        c.model.update(teacher="clip_demo", teacher_overrides=DEMO_TEACHER)
        c.stage.start = dict(kind="import", workdir="", path=DEMO_TEACHER_IMPORT)
    c.data.update(name=d["data"], seq_len=d["seq_len"], global_batch=32, read_threads=2, num_examples=1_000_000)
    if d["data"] == "shapes_qa":
        c.data.qa_rounds = "all"
    c.optim.update(lr=d["lr"], warmup_frac=0.05, weight_decay=0.0)
    c.train.update(steps=d["steps"], log_every=25)
    c.checkpoint.update(every=0, keep=1, async_save=False)  # only the final one: the next stage reads it
    c.stage.name = f"hovle_demo_{stage}"
    c.stage.trainable = d["trainable"]
    if c.stage.start.kind == "stage":
        c.stage.start.workdir = f"hovle_demo_{c.stage.start.workdir.rsplit('_', 1)[-1]}"
    return c


def get_config(arg: str = "tiny_stage1"):
    if arg.startswith("demo_") and arg[len("demo_"):] in DEMO_STAGES:
        return demo_config(arg[len("demo_"):])
    if arg not in ARGS:
        raise ValueError(f"configs/hovle.py takes one of {sorted(ARGS) + [f'demo_{s}' for s in DEMO_STAGES]}, "
                         f"got {arg!r}")
    size, stage = ARGS[arg]
    s = STAGES[stage]
    if "teacher" in s:
        teacher = TEACHER_KINDS["clip" if arg.endswith("_clip") else "internvl"]
        s = dict(s, teacher=teacher["teacher"], start=("import", teacher["start"]),
                 trainable=s["trainable"] + teacher["trainable"], losses={**s["losses"], **teacher["losses"]})
    tiny = size == "tiny"
    prefix = "hovle_tiny" if tiny else "hovle"
    kind, where = s["start"]
    if kind == "stage":
        start = dict(kind="stage", workdir=f"{prefix}_{where}", path="")
    elif tiny:
        start = dict(kind="fresh", workdir="", path="")
    else:
        start = dict(kind="import", workdir="", path=where)

    c = ml_collections.ConfigDict()
    c.data = data_config(size, stage)
    overrides = dict(dtype="float32" if tiny else "bfloat16", remat="none" if tiny else "full",
                     attention_impl="xla" if tiny else "splash",
                     embedding_drop_path=s["drop_path"], max_tiles=MAX_TILES[size])
    if "teacher" in s:
        c.model = dict(name="hovle", size=size, overrides=overrides, teacher=teacher["tiny"] if tiny else s["teacher"],
                       teacher_overrides=teacher["tiny_overrides"] if tiny else {})
    else:
        # The model splices the image where the data's tokenizer puts <IMG_CONTEXT> (92546 for
        # InternLM2's tokenizer; after the vocabulary for "shapes"); the pipeline checks they agree.
        c.model = dict(name="hovle", size=size, overrides=dict(
            overrides, img_context_token_id=pipeline.image_context_id(c.data.tokenizer)))
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1) if tiny else dict(slice=1, data=1, fsdp=-1, tensor=1)
    steps = s.get("tiny_steps", 30) if tiny else math.ceil(s["num_examples"] / s["global_batch"])
    # The tiny model learns in 30 steps only with a larger learning rate.
    c.optim = dict(lr=s.get("tiny_lr", 10 * s["lr"]) if tiny else s["lr"], warmup_frac=WARMUP_FRAC, schedule="cosine",
                   min_lr_frac=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
                   no_decay=(r".*norm.*", r".*bias"))
    c.stage = dict(name=f"hovle_{arg}", trainable=s["trainable"], losses=s.get("losses", dict(ce=1.0)), start=start)
    c.train = dict(steps=steps, accum_steps=1 if tiny else s["accum_steps"], seed=0, log_every=10 if tiny else 50,
                   ema_decay=0.0, peak_flops_per_device=0.0, progress_bar=True)
    c.checkpoint = dict(every=10 if tiny else s["checkpoint_every"], keep=3, async_save=True)
    return c
