"""De-focus Attention Networks (arXiv 2406.04342): the ImageNet recipes of the official
`classification/` code (OpenGVLab/De-focus-Attention-Networks at 9406511; reference/dan.md §5, §11, §12).

  evejax train --config configs/dan.py:mamba_b        # runs/dan_mamba_b; IN-1k top-1 82.0 (paper Table 1)
  evejax train --config configs/dan.py:mamba_s        # 80.3
  evejax train --config configs/dan.py:vit_s          # De-focus ViT-S 79.6 (paper only; no official code)
  evejax train --config configs/dan.py:vit_b          # De-focus ViT-B 81.5
  evejax train --config configs/dan.py:mamba_l_in21k  # IN-21k pre-train at 192 px (no IN-1k number of its own)
  evejax train --config configs/dan.py:mamba_l        # the 384 px IN-1k fine-tune of L: 85.4 (paper), 85.9 (README)
  evejax eval  runs/dan_mamba_b --tfds-dir DIR [--weights ema]   # top-1 / top-5 on imagenet2012 validation

Data: TFDS `imagenet2012` (and, for the pre-train, an `imagenet21k` the user prepared; its
labels must be the 21,841 classes of ImageNet-22k fall 2011 in the official order) in ArrayRecord
format under `--config.data.tfds_dir` (`tfds build imagenet2012 --file_format=array_record`);
no TensorFlow runs. Everything below is a field: `--config.optim.lr=...`, `--config.data.mixup=0`.

Sources of the values ("yaml": the size's configs/*.yaml; "default": utils/config.py; "main":
main.py; "build": data/build.py):
  lr            BASE_LR x global batch / 512 (main: linear_scaled_lr); the warmup starts at
                WARMUP_LR (5e-7) and the cosine ends at MIN_LR (5e-6), scaled the same way
                (default), i.e. warmup_init_frac = 5e-7 / BASE_LR, min_lr_frac = 5e-6 / BASE_LR.
                A different --config.data.global_batch does not rescale lr: set it too.
  schedule      per step, linear warmup then cosine (timm CosineLRScheduler, warmup_prefix)
  AdamW         betas (0.9, 0.999), eps 1e-8, weight decay 0.05 (default); no decay on 1-D
                params, cls_token, A_log, D, freq (utils/optimizer.py; dan.md §12); ViT: nor
                on its de-focus decay and rotation (a choice: no code)
  clipping      10.0 (every yaml; the default is 5.0)
  augmentation  timm create_transform (build): RandomResizedCrop bicubic + flip,
                rand-m9-mstd0.5-inc1, random erasing 0.25 "pixel"; colour jitter 0.4 is
                skipped by timm when RandAugment is on; Large: AUTO_AUGMENT None, REPROB 0
  mixup/cutmix  alpha 0.8 / 1.0, prob 1.0, switch 0.5, label smoothing 0.1 (default); Large:
                MIXUP_PROB 0.5, MIXUP_SWITCH_PROB 0 (so never cutmix)
  repeated aug  RASampler, 3 repeats (base yaml use_repeated_aug; samplers.py); Large: off
  EMA           timm ModelEma 0.9999 every step (main --model_ema_decay); both evaluated
  bf16          autocast compute, float32 weights (yaml bfloat16: True)
  drop path     the maximum rate per epoch e: min + e / (epochs - 1) x (max - min) (main
                train_one_epoch), spread linearly over depth by the model
  eval view     short side int(256 / 224 x size) bicubic, centre crop (build), crop_pct 0.875

Fields with no official value (each a choice, overridable):
  Small (mamba_s): no yaml; the base yaml's recipe with the model's drop path 0.1 -> 0.75.
  ViT-S/B: no code; the paper's IN-1k setting (§5.1: the DeiT recipe, drop path linear(0.1, 0.7)).
  train_examples: IN-1k train 1,281,167 (TFDS imagenet2012); IN-21k 14,197,122 (ImageNet-22k
  fall 2011). Steps per epoch = floor(train_examples / global batch) (the official loader drops
  the last partial batch); for another count set --config.train.steps and
  --config.train.batch_schedules.drop_path_rate.steps_per_epoch.

The fine-tune (mamba_l) starts from IN-21k weights with IN-1k heads at `checkpoints/dan_mamba_l_21k`
(`evejax import` of the released defocus_mamba_large_cls_21k.pth; dan.md §8). Going from a
`mamba_l_in21k` run of this repository needs the 22k -> 1k head rows (tools/convert_22k_to_1k.py,
data/map22kto1k.txt), which is not built here. The pre-train's own evaluation (21k logits mapped
to the 1k classes) is not built either.

Args: mamba_s | mamba_b | mamba_l | mamba_l_in21k | vit_s | vit_b | tiny (a De-focus Mamba on a
tiny TFDS set: --config.data.tfds_name / tfds_dir point at it; tests/test_dan_train.py).
"""
import ml_collections

from evejax import config as config_lib

IN1K_TRAIN, IN21K_TRAIN = 1_281_167, 14_197_122
BASE_WARMUP_LR, BASE_MIN_LR = 5e-7, 5e-6   # per 512 images (default WARMUP_LR, MIN_LR)
# The De-focus ViT's learned decay and rotation (no official code) are left out like their Mamba
# counterparts A_log and freq.
NO_DECAY = (r".*bias", r".*/scale", r"cls_token", r".*/A_log", r".*/D", r".*/freq", r".*/defocus_.*")

IN1K_SCRATCH = dict(
    image_size=224, epochs=300, warmup_epochs=20, global_batch=1024, base_lr=5e-4,
    rand_augment="rand-m9-mstd0.5-inc1", random_erase=0.25, mixup=0.8, cutmix=1.0, mix_prob=1.0,
    mix_switch_prob=0.5, repeated_aug=3, tfds_name="imagenet2012", train_examples=IN1K_TRAIN,
    num_classes=1000, drop_path=(0.1, 0.75))
RECIPES = {
    # defocus_mamba_base.yaml: 32 per GPU x 32 GPUs; drop path 0.1 -> 0.75 scheduled.
    "mamba_b": dict(IN1K_SCRATCH, size="mamba_b"),
    "mamba_s": dict(IN1K_SCRATCH, size="mamba_s"),
    "vit_s": dict(IN1K_SCRATCH, size="vit_s", drop_path=(0.1, 0.7)),
    "vit_b": dict(IN1K_SCRATCH, size="vit_b", drop_path=(0.1, 0.7)),
    # defocus_mamba_large_22k.yaml: 192 px, 90 / 5 epochs, 64 per GPU x 64 GPUs (dan.md §5: 4096),
    # BASE_LR 1.25e-4, constant drop path 0.4 (use_scheduled_drop_path False), MLP heads,
    # 21,841 classes, gradient checkpointing, no RandAugment / erasing / repeats, mixup only.
    "mamba_l_in21k": dict(size="mamba_l", image_size=192, epochs=90, warmup_epochs=5, global_batch=4096,
                          base_lr=1.25e-4, rand_augment="", random_erase=0.0, mixup=0.8, cutmix=1.0,
                          mix_prob=0.5, mix_switch_prob=0.0, repeated_aug=1, tfds_name="imagenet21k",
                          train_examples=IN21K_TRAIN, num_classes=21841, drop_path=(0.4, 0.4),
                          overrides=dict(rope_scale_factor=1.0, delta_scale_factor=1.0), fsdp=True,
                          # `evejax plan ... --topology v4-32`: one micro-batch of 256 per chip needs
                          # ~38 GiB (119% of HBM); two micro-batches with FSDP 22.6 GiB (70%).
                          accum_steps=2),
    # defocus_mamba_large.yaml: 384 px, 20 / 2 epochs, 32 per GPU x 32 GPUs, BASE_LR 2e-5, drop path
    # 0.1 -> 0.7 scheduled, rope_scale 4 / delta_scale 2 (the model size's), from the 21k weights.
    "mamba_l": dict(size="mamba_l", image_size=384, epochs=20, warmup_epochs=2, global_batch=1024,
                    base_lr=2e-5, rand_augment="", random_erase=0.0, mixup=0.8, cutmix=1.0, mix_prob=0.5,
                    mix_switch_prob=0.0, repeated_aug=1, tfds_name="imagenet2012", train_examples=IN1K_TRAIN,
                    num_classes=1000, drop_path=(0.1, 0.7), start="checkpoints/dan_mamba_l_21k", fsdp=True),
    # The whole chain on CPU: 2 epochs of 24 images in batches of 8 (3 steps each).
    # lr 5e-4 (the paper's figure) at batch 8, so 6 steps move the weights visibly.
    "tiny": dict(IN1K_SCRATCH, size="mamba_tiny", image_size=32, epochs=2, warmup_epochs=1, global_batch=8,
                 base_lr=5e-4 * 512 / 8, tfds_name="tiny_dan_imagenet", train_examples=24, num_classes=5, drop_path=(0.1, 0.5)),
}


def get_config(arg: str = "tiny"):
    if arg not in RECIPES:
        raise ValueError(f"configs/dan.py takes one of {sorted(RECIPES)}, got {arg!r}")
    r = RECIPES[arg]
    tiny = arg == "tiny"
    batch = r["global_batch"]
    steps_per_epoch = max(r["train_examples"] // batch, 1)
    tokens = (r["image_size"] // (8 if tiny else 16)) ** 2 + 1
    lr_scale = batch / 512

    c = ml_collections.ConfigDict()
    c.model = dict(name="dan", size=r["size"], overrides=dict(
        r.get("overrides", {}), image_size=r["image_size"], num_classes=r["num_classes"],
        drop_path=r["drop_path"][1], dtype="float32" if tiny else "bfloat16", remat="none" if tiny else "full"))
    # Large shards its state (params, Adam moments, EMA: 7.3 GB for the 21k heads) over the chips.
    c.mesh = dict(slice=1, data=1, fsdp=-1, tensor=1) if r.get("fsdp") else dict(slice=1, data=-1, fsdp=1, tensor=1)
    c.data = config_lib.data_config(
        name="tfds_imagenet", tfds_name=r["tfds_name"], split="train", global_batch=batch, seq_len=tokens,
        seed=0, rand_augment=r["rand_augment"], random_erase=r["random_erase"], mixup=r["mixup"],
        cutmix=r["cutmix"], mix_prob=r["mix_prob"], mix_switch_prob=r["mix_switch_prob"], label_smoothing=0.1,
        repeated_aug=r["repeated_aug"], crop_pct=224 / 256, num_workers=0 if tiny else 16,
        read_threads=2 if tiny else 8)
    c.optim = dict(lr=r["base_lr"] * lr_scale, warmup_frac=r["warmup_epochs"] / r["epochs"],
                   warmup_init_frac=BASE_WARMUP_LR / r["base_lr"], schedule="cosine",
                   min_lr_frac=BASE_MIN_LR / r["base_lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                   clip_norm=10.0, no_decay=NO_DECAY)
    start = (dict(kind="import", workdir="", path=r["start"]) if "start" in r
             else dict(kind="fresh", workdir="", path=""))
    c.stage = dict(name=f"dan_{arg}", trainable=(".*",), losses=dict(ce=0.5, aux_ce=0.5), start=start)
    c.train = dict(steps=r["epochs"] * steps_per_epoch, accum_steps=r.get("accum_steps", 1), seed=0, log_every=1 if tiny else 100,
                   ema_decay=0.9999, peak_flops_per_device=0.0, progress_bar=not tiny,
                   batch_schedules=dict(drop_path_rate=dict(start=r["drop_path"][0], end=r["drop_path"][1],
                                                            epochs=r["epochs"], steps_per_epoch=steps_per_epoch)))
    c.checkpoint = dict(every=4 if tiny else steps_per_epoch, keep=3, async_save=not tiny)
    return c
