"""The demo (`evejax demo`): a tiny CLIP teacher, then a tiny EVE through its three stages,
on generated shapes (evejax/data/shapes.py), on a CPU in minutes.

`evejax demo --out DIR` runs the chain below and evaluates it; by hand it is

  evejax train --config configs/demo.py:teacher --workdir DIR/teacher
  (DIR/teacher_clip: the teacher's ClipViT as an evejax CLIP checkpoint, written
   by `evejax demo`, as `evejax import --family clip` writes a pre-trained CLIP)
  evejax train --config configs/demo.py:stage1 --workdir DIR/stage1 \
      --config.stage.start.path=clip=DIR/teacher_clip    # fresh EVE, teacher imported
  evejax train --config configs/demo.py:stage2 --workdir DIR/stage2   # reads DIR/stage1
  evejax train --config configs/demo.py:stage3 --workdir DIR/stage3   # reads DIR/stage2

teacher  ClipClassifier (the `clip` geometry of EVE "demo": 32 px, patch 8,
         width 32, 2 layers) + linear head on the 12 shapes classes
         (kind and colour of the largest shape), all parameters trained.
stage1   EVE PEL (vision_tokenizer + mm_projector) and PAL (vision_compressor)
         train on captions (plain template), the LLM frozen; the PAL pulls the
         LLM's image states toward the frozen teacher's layer -2 patch features.
stage2   everything but the teacher trains on captions.
stage3   everything but the teacher trains on the question rounds (vicuna_v1),
         8 of the questions an image answers per conversation (qa_rounds="all").
CE + 1.0 x PAL in every EVE stage, as official.

The tiny EVE (size "demo" of evejax/models/eve.py + the overrides below): LLaMA
decoder width 128, 4 layers, 4 heads, MLP 256; PEL width 64 (8 heads), canvas
64 px, patch 8, CA1 pool 2 -> at most 4 x 4 image patches of 16 x 16 pixels
(21 image tokens with CLS and SPL); teacher view 32 px, patch 8 (grid 4).
Args: teacher | stage1 | stage2 | stage3.
"""
import ml_collections

from evejax import config as config_lib

# The LLM on top of EVE "demo". No rematerialisation: the model is small, and
# recomputation only costs CPU time; 2-D matmuls are faster on CPU (evejax/bench.py).
EVE_OVERRIDES = dict(dtype="float32", remat="none", embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4,
                     head_dim=32, mlp_dim=256, matmul_2d=True)
# The teacher is CLIP "demo" (models/vit.py), the CLIP that EVE "demo" and HoVLE's "clip_demo" hold.
TEACHER_OVERRIDES = dict(remat="none")

# config.data common to all stages: shapes on a grid of 16 px cells, 1 to 4 cells by 4
# (aspect 1:4 to 4:1). The image geometry is the models': the EVE view at 64 px and the
# teacher view at 32 px, both with patch 8, so every image token sees one cell.
SHAPES = dict(tokenizer="shapes", min_side=16, max_side=64, num_examples=1_000_000, seed=0,
              read_threads=2, overlong="truncate")

PEL_PAL = (r"vision_tokenizer/.*", r"mm_projector/.*", r"vision_compressor/.*")
ALL_BUT_CLIP = PEL_PAL + (r"llm/.*",)

# arg -> data name, template, text positions per row, batch, steps, peak lr, trainable.
# Rows hold the image tokens (at most 21) and the text: a caption fits in 56 positions,
# the system prompt with MAX_ROUNDS (8) questions of an image in 176.
STAGES = {
    "stage1": dict(data="shapes_caption", template="plain", seq_len=56, batch=32, steps=100, lr=2e-3,
                   trainable=PEL_PAL),
    "stage2": dict(data="shapes_caption", template="plain", seq_len=56, batch=32, steps=500, lr=2e-3,
                   trainable=ALL_BUT_CLIP),
    "stage3": dict(data="shapes_qa", template="vicuna_v1", seq_len=176, batch=32, steps=500, lr=1e-3,
                   trainable=ALL_BUT_CLIP, qa_rounds="all"),
}
PREVIOUS = {"stage2": "stage1", "stage3": "stage2"}
ARGS = ("teacher",) + tuple(STAGES)


def _common(steps: int, lr: float) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
    c.optim = dict(lr=lr, warmup_frac=0.05, schedule="cosine", min_lr_frac=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=0.0, clip_norm=1.0, no_decay=(r".*norm.*", r".*bias", r".*embed.*"))
    c.train = dict(steps=steps, accum_steps=1, seed=0, log_every=25, ema_decay=0.0, peak_flops_per_device=0.0,
                   progress_bar=True)
    # Only the final checkpoint: the next stage starts from it, and saving costs demo time.
    c.checkpoint = dict(every=0, keep=1, async_save=False)
    return c


def get_config(arg: str = "teacher"):
    if arg not in ARGS:
        raise ValueError(f"configs/demo.py takes one of {ARGS}, got {arg!r}")
    if arg == "teacher":
        c = _common(steps=400, lr=3e-3)
        c.model = dict(name="clip_classifier", size="demo", num_classes=12, overrides=TEACHER_OVERRIDES)
        # seq_len is unused by image batches; the trainer reads it for throughput figures.
        c.data = config_lib.data_config(**SHAPES, name="shapes_class", global_batch=64, seq_len=1)
        c.stage = dict(name="demo_teacher", trainable=(".*",), losses=dict(ce=1.0),
                       start=dict(kind="fresh", workdir="", path=""))
        return c
    s = STAGES[arg]
    c = _common(steps=s["steps"], lr=s["lr"])
    c.model = dict(name="eve", size="demo", overrides=EVE_OVERRIDES, pal_weight=1.0)
    c.data = config_lib.data_config(**SHAPES, name=s["data"], template=s["template"], seq_len=s["seq_len"],
                                    global_batch=s["batch"])
    if "qa_rounds" in s:
        c.data.qa_rounds = s["qa_rounds"]
    if arg in PREVIOUS:
        start = dict(kind="stage", workdir=PREVIOUS[arg], path="")
    else:
        start = dict(kind="import", workdir="", path="clip=runs/demo/teacher_clip")
    c.stage = dict(name=f"demo_{arg}", trainable=s["trainable"], losses=dict(ce=1.0, pal=1.0), start=start)
    return c
