"""A tiny causal ViT with and without de-focus attention on the generated counting set.

  evejax train --config configs/dan_counting.py:defocus --workdir runs/counting/defocus_s0
  evejax train --config configs/dan_counting.py:plain --workdir runs/counting/plain_s0
  (seeds: --config.train.seed=N --config.data.seed=N)
  evejax viz experiment --out runs/counting     # both, 3 seeds, held-out accuracy, over-focus, maps

Data (evejax/data/counting.py): 48 x 48 images, 6 x 6 cells of 8 px, 1 to 10 of them filled;
the label is the count, so the class token (last, causal) must aggregate all 36 patch tokens.
Model: DAN "vit_tiny" (width 32, 4 heads, 2 layers, patch 8 -> 36 patches + class token) at
48 px with 10 classes. `defocus`: its de-focus attention (learned per-head decay and rotation,
DAN Eq. 8); `plain`: the same ViT with `defocus=None`, i.e. fixed RoPE. Both train on the
class-token CE only (no aux head loss, no drop path), so the attention is the one difference.
Args: defocus | plain.
"""
import ml_collections

from evejax import config as config_lib

VARIANTS = {"defocus": {}, "plain": {"defocus": None}}
OVERRIDES = dict(image_size=48, num_classes=10, remat="none")


def get_config(arg: str = "defocus"):
    if arg not in VARIANTS:
        raise ValueError(f"configs/dan_counting.py takes one of {tuple(VARIANTS)}, got {arg!r}")
    c = ml_collections.ConfigDict()
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
    c.optim = dict(lr=3e-3, warmup_frac=0.05, schedule="cosine", min_lr_frac=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=0.05, clip_norm=1.0, no_decay=(r".*norm.*", r".*bias", r".*defocus.*"))
    c.train = dict(steps=600, accum_steps=1, seed=0, log_every=100, ema_decay=0.0, peak_flops_per_device=0.0,
                   progress_bar=False)
    c.checkpoint = dict(every=0, keep=1, async_save=False)
    c.model = dict(name="dan", size="vit_tiny", overrides=dict(OVERRIDES, **VARIANTS[arg]))
    # max_side is the image side; seq_len is unused by image batches (the trainer's throughput figures).
    c.data = config_lib.data_config(name="evejax.data.counting:make_data", global_batch=64, seed=0, max_side=48,
                                    seq_len=1)
    c.stage = dict(name=f"dan_counting_{arg}", trainable=(".*",), losses=dict(ce=1.0),
                   start=dict(kind="fresh", workdir="", path=""))
    return c
