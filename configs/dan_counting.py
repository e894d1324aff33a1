"""A tiny causal ViT with and without de-focus attention on the generated counting set.

  evejax train --config configs/dan_counting.py:defocus --workdir runs/counting/defocus_s0
  evejax train --config configs/dan_counting.py:plain --workdir runs/counting/plain_s0
  (seeds: --config.train.seed=N --config.data.seed=N)
  evejax viz experiment --out runs/counting     # both, 3 seeds, held-out accuracy, over-focus, maps

Data (evejax/data/counting.py): 48 x 48 images, 6 x 6 cells of 8 px, 1 to 10 of them filled;
the label is the count, so the class token (last, causal) must aggregate all 36 patch tokens
(other tasks: config.data.counting_task majority | tetromino | bar, see that file).
Model: DAN "vit_tiny" (width 32, 4 heads, 2 layers, patch 8 -> 36 patches + class token) at
48 px with 10 classes. The arms (ARMS):
  plain          the causal ViT with `defocus=None`, i.e. fixed RoPE; class-token CE only, no drop path.
  defocus        the same with de-focus attention (learned per-head decay and rotation, DAN Eq. 8,
                 form "scale"): the attention is the one difference from `plain`.
  defocus_bias   as defocus with the decay as a logit bias (form "bias": a locality prior).
  defocus_local  as defocus_bias with the decays started at (1, 1): lambda_h = ln(1 - 2^-(1+h)) =
                 -0.69, -0.29, -0.13, -0.06 per token, spans 1/|lambda| of 1.4 to 15 tokens (a fifth of
                 a row to 2 rows of an 8 x 8 grid): RetNet's (5, 1), spans 32 to 256 tokens of 2048,
                 scaled to a 64-token image; (5, 1) gives e^{lambda 8} >= 0.78 across a whole row.
  defocus_paper  the De-focus ViT as the paper trains it (reference/dan.md): defocus's attention plus
                 the auxiliary loss on every image token, (ce + aux_ce) / 2, and drop path scheduled
                 linearly 0.1 -> 0.7 over DROP_PATH_PIECES equal pieces of the run (the paper's ViT-S/B
                 range per epoch; on 2 layers only the last block's branch drops, at the full rate).
  plain_paper    plain's attention with defocus_paper's training (aux loss, drop path): the ablation that
                 tells the attention's share of defocus_paper's result from the training strategy's.
  plain_pos      the test bed that can see 2-D position (POS_VIT): width 64, 4 heads of 16 (as many as the
                 directions a neighbour lies in: across 1 token, down 8, diagonals 7 and 9), 2 layers,
                 RoPE base 100, so on 64 tokens (8 x 8 patches) the slowest of the 8 rotation pairs still
                 turns 1.1 rad over the sequence (vit_tiny's base 1e4 with head_dim 8 turns 3 of its 4
                 pairs by < 0.1 rad a token); fixed RoPE, as plain. With 2 heads of 32 it stayed at chance
                 on the bar task (README, `evejax viz`).
  defocus_pos    the same with de-focus attention (form "scale"), its learned rotation starting at
                 plain_pos's frequencies and its decays at (2, 4/3): lambda_h = ln(1 - 2^-(2 + 4h/3)),
                 spans 1/|lambda| of 3.5, 9.6, 25 and 63 tokens (half a row to the whole image).
  defocus_pos_bias  defocus_pos with the decay as a logit bias (form "bias").
  plain_pos_aux, defocus_pos_aux, defocus_pos_bias_aux
                 the three position arms with the paper's loss, (ce + aux_ce) / 2, and no drop path (on 2
                 layers the paper's schedule puts its whole maximum on the last block).
  plain_pos_paper, defocus_pos_paper, defocus_pos_bias_paper
                 the same with the loss and defocus_paper's drop path.
Args: one of ARMS.
"""
import ml_collections

from evejax import config as config_lib

AUX = dict(losses=dict(ce=0.5, aux_ce=0.5))
PAPER_TRAINING = dict(AUX, drop_path=(0.1, 0.7))
ARMS = {"plain": dict(model=dict(defocus=None)), "defocus": dict(model=dict(defocus="scale")),
        "defocus_bias": dict(model=dict(defocus="bias")),
        "defocus_local": dict(model=dict(defocus="bias", defocus_decay_init=(1.0, 1.0))),
        "defocus_paper": dict(PAPER_TRAINING, model=dict(defocus="scale")),
        "plain_paper": dict(PAPER_TRAINING, model=dict(defocus=None))}
# vit_tiny resized; plain_pos ignores the decay init (no de-focus) but carries it, so the arms differ in `defocus` only.
POS_VIT = dict(embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=256, rope_base=100.0,
               defocus_decay_init=(2.0, 4 / 3))
for name, form in (("plain_pos", None), ("defocus_pos", "scale"), ("defocus_pos_bias", "bias")):
    for suffix, training in (("", {}), ("_aux", AUX), ("_paper", PAPER_TRAINING)):
        ARMS[name + suffix] = dict(training, model=dict(POS_VIT, defocus=form))
DROP_PATH_PIECES = 10
OVERRIDES = dict(image_size=48, num_classes=10, remat="none")


def get_config(arg: str = "defocus"):
    if arg not in ARMS:
        raise ValueError(f"configs/dan_counting.py takes one of {tuple(ARMS)}, got {arg!r}")
    arm = ARMS[arg]
    c = ml_collections.ConfigDict()
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
    c.optim = dict(lr=3e-3, warmup_frac=0.05, schedule="cosine", min_lr_frac=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=0.05, clip_norm=1.0, no_decay=(r".*norm.*", r".*bias", r".*defocus.*"))
    steps = 600
    c.train = dict(steps=steps, accum_steps=1, seed=0, log_every=100, ema_decay=0.0, peak_flops_per_device=0.0,
                   progress_bar=False)
    if "drop_path" in arm:  # a run of other --config.train.steps sets steps_per_epoch = steps / DROP_PATH_PIECES too
        start, end = arm["drop_path"]
        c.train.batch_schedules = dict(drop_path_rate=dict(start=start, end=end, epochs=DROP_PATH_PIECES,
                                                           steps_per_epoch=steps // DROP_PATH_PIECES))
    c.checkpoint = dict(every=0, keep=1, async_save=False)
    c.model = dict(name="dan", size="vit_tiny", overrides=dict(OVERRIDES, **arm["model"]))
    # max_side is the image side; seq_len is unused by image batches (the trainer's throughput figures).
    c.data = config_lib.data_config(name="evejax.data.counting:make_data", global_batch=64, seed=0, max_side=48,
                                    seq_len=1)
    c.stage = dict(name=f"dan_counting_{arg}", trainable=(".*",), losses=arm.get("losses", dict(ce=1.0)),
                   start=dict(kind="fresh", workdir="", path=""))
    return c
