"""Attention maps and the over-focus statistic of causal ViTs (De-focus Attention Networks).

  evejax viz attention TARGET --image IMG [--layers 0,1] [--out maps.png]
  evejax viz experiment [--out runs/counting] [--seeds 0,1,2] [--steps 600] [--side 48]
                        [--heldout 1000] [--distractors 0] [--task count] [--train-images 0]
                        [--lr 0] [--arms defocus,plain]

TARGET is a trainer workdir of a DAN ViT (`evejax train`, newest checkpoint) or a config
FILE.py[:ARG] of one (random initial weights, seed --seed).

The map (`attention_grid`): one row per chosen layer; columns: the input image, then for
each head and for the mean over heads the class-token query's attention weights over the
gh x gw patch grid (the class token is last, so under the causal mask it is the one query
that sees every patch). Each panel is scaled to its own maximum (bright = most attended);
its label gives the weight the class token keeps on itself ("self").

Over-focus (`overfocus`): attention weights w [..., T, S] of queries t over keys s, and the
causal mask allowed [T, S]. For a query with n_t >= 2 allowed keys, its share is the sum of
its k_t = max(1, floor(n_t / 100)) largest weights over allowed keys (the mass on its top 1%
of keys, at least one key); queries with one allowed key (share 1 whatever the model) are
left out. The statistic is the mean of the shares over those queries and every leading axis
(layers, images, heads). 1 means every query puts all its mass on one key; uniform causal
attention over T tokens gives the mean of 1/(t+1) over t = 1..T-1: 0.089 at T = 37.

`experiment` trains the --arms of configs/dan_counting.py (default :defocus and :plain; images
--side px, task --task) for each seed (workdirs OUT/{arm}_s{seed}; a finished workdir is reused),
then reports per run the held-out accuracy on the first --heldout held-out counting images and
the over-focus statistic on the first 64 of them (all layers), writes OUT/{arm}_s{seed}.png (the
maps of held-out image 0, OUT/heldout0.png) and OUT/results.json (every run reported in OUT so far:
a row of this call replaces an earlier row of the same arm and seed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from PIL import Image, ImageDraw

from evejax import config as config_lib

PANEL, LABEL, GAP = 96, 12, 4   # pixels of one map, its label strip, the space between panels
TOP_FRACTION = 0.01
COUNTING_CONFIG = f"{config_lib.REPO_CONFIGS}/dan_counting.py"


def overfocus_shares(weights: np.ndarray, allowed: np.ndarray, fraction: float = TOP_FRACTION):
    """(shares [..., T], counted [T]): each query's mass on its top max(1, floor(fraction n_t))
    allowed keys, and which queries count (n_t >= 2). weights [..., T, S], allowed bool [T, S]."""
    weights, allowed = np.asarray(weights, np.float64), np.asarray(allowed, bool)
    n = allowed.sum(-1)
    k = np.maximum(1, np.floor(fraction * n).astype(np.int64))
    ranked = -np.sort(-np.where(allowed, weights, -np.inf), axis=-1)
    cumulative = np.cumsum(np.where(np.isfinite(ranked), ranked, 0.0), axis=-1)
    index = np.broadcast_to((k - 1)[:, None], cumulative.shape[:-1] + (1,))
    return np.take_along_axis(cumulative, index, axis=-1)[..., 0], n >= 2


def overfocus(weights: np.ndarray, allowed: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """The over-focus statistic (module docstring) of weights [..., T, S] under allowed [T, S]."""
    shares, counted = overfocus_shares(weights, allowed, fraction)
    return float(shares[..., counted].mean())


def causal_mask(length: int) -> np.ndarray:
    return np.tril(np.ones((length, length), bool))


def load_target(target: str, seed: int = 0):
    """(DANConfig, params) of a DAN ViT workdir or config FILE.py[:ARG] (random init)."""
    from evejax.models import registry
    from evejax.port import checkpoint

    if checkpoint.is_workdir(target):
        name, cfg, params, _ = checkpoint.load_workdir(target)
    elif target.partition(":")[0].endswith(".py"):
        model_cfg = config_lib.load(target).model
        name, spec = model_cfg.name, registry.build(model_cfg)
        cfg = spec.config
        params = jax.jit(lambda r: spec.module.init(r, *spec.init_args)["params"])(jax.random.PRNGKey(seed))
        params = jax.tree.map(np.asarray, nn.meta.unbox(params))
    else:
        raise FileNotFoundError(f"{target} is neither a trainer workdir (no checkpoints/) nor a config FILE.py[:ARG]")
    if name != "dan" or getattr(cfg, "backbone", None) != "vit":
        raise ValueError(f"{target} holds a {name!r} model; attention maps need a DAN ViT (model.name 'dan', "
                         "size vit_*)")
    return cfg, params


def attention_weights(cfg, params, pixels) -> np.ndarray:
    """Attention weights [L, B, N, T, T] (T = patches + class token) of pixels [B, H, W, 3]."""
    from evejax.models import dan

    module = dan.DANClassifier(cfg)
    _, state = jax.jit(lambda p, x: module.apply({"params": p}, x, mutable=["intermediates"]))(params, pixels)
    sown = traverse_util.flatten_dict(state.get("intermediates", {}))
    found = [v for k, v in sown.items() if k[-1] == "attention_weights"]
    if len(found) != 1:
        raise RuntimeError("the model sowed no attention weights (nn/attention.py sows 'attention_weights' "
                           "when the 'intermediates' collection is mutable)")
    length = cfg.num_patches + 1
    return np.asarray(found[0][0], np.float32)[..., :length, :length]


def read_image(path: str, size) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, resized (bilinear) to size (H, W) when it differs."""
    try:
        picture = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"--image {path}: cannot read it as an image ({e})") from None
    if picture.size != (size[1], size[0]):
        picture = picture.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(picture)


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of an attention grid."""
    return cols * (PANEL + GAP) + GAP, rows * (PANEL + LABEL + GAP) + GAP


def attention_grid(picture: np.ndarray, weights: np.ndarray, layers, grid) -> Image.Image:
    """The map (module docstring) of one image: picture uint8 [H, W, 3], weights [L, N, T, T]."""
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    heads = weights.shape[1]
    out = Image.new("RGB", grid_size(len(layers), heads + 2), "white")
    draw = ImageDraw.Draw(out)

    def panel(row, col, pixels, label):
        x, y = GAP + col * (PANEL + GAP), GAP + row * (PANEL + LABEL + GAP)
        draw.text((x, y), label, fill="black")
        out.paste(Image.fromarray(pixels).resize((PANEL, PANEL), Image.NEAREST), (x, y + LABEL))

    for row, layer in enumerate(layers):
        panel(row, 0, picture, f"layer {layer}")
        cls = weights[layer, :, -1]                                        # [N, T]
        for col, (name, w) in enumerate([(f"h{h}", cls[h]) for h in range(heads)] + [("mean", cls.mean(0))]):
            patches = w[:-1].reshape(grid)
            colours = viridis(patches / max(float(patches.max()), 1e-12))[..., :3]
            panel(row, col + 1, (colours * 255).astype(np.uint8), f"{name} self {w[-1]:.2f}")
    return out


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Written beside its place and swapped in whole (as evejax.atomic.write_text)."""
    import os
    import uuid

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def parse_layers(text: str | None, depth: int) -> list[int]:
    if not text:
        return list(range(depth))
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give layer numbers separated by commas, e.g. 0,1") from None
    bad = [x for x in layers if not 0 <= x < depth]
    if bad:
        raise ValueError(f"--layers {bad} are not layers of this model (0..{depth - 1})")
    return layers


def attention_main(args) -> int:
    from evejax.data.counting import normalize

    cfg, params = load_target(args.target, args.seed)
    layers = parse_layers(args.layers, cfg.depth)
    picture = read_image(args.image, cfg.image_size)
    weights = attention_weights(cfg, params, normalize(picture)[None])[:, 0]    # [L, N, T, T]
    mask = causal_mask(weights.shape[-1])
    path = save_png(attention_grid(picture, weights, layers, cfg.grid), args.out)
    per_layer = "  ".join(f"layer {i}: {overfocus(weights[i], mask):.4f}" for i in layers)
    print(f"over-focus (mass on the top 1% of allowed keys, mean over queries and heads): "
          f"{overfocus(weights[layers], mask):.4f}  ({per_layer})")
    print(f"wrote {path}")
    return 0


def evaluate_run(cfg, params, heldout: int, focus_images: int = 64, batch: int = 250, distractors: int = 0,
                 task: str = "count") -> dict:
    """Held-out accuracy and over-focus of a trained counting model (trained with `distractors`, `task`)."""
    from evejax.data import counting
    from evejax.models import dan

    side = cfg.image_size[0]
    module = dan.DANClassifier(cfg)
    logits = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
    right = 0
    for start in range(0, heldout, batch):
        b = counting.batch(range(start, min(start + batch, heldout)), "heldout", 0, side, distractors, task)
        right += int(np.sum(np.argmax(np.asarray(logits(params, b["pixels"])), -1) == b["label"]))
    focus = counting.batch(range(focus_images), "heldout", 0, side, distractors, task)
    weights = attention_weights(cfg, params, focus["pixels"])
    mask = causal_mask(weights.shape[-1])
    return {"heldout_accuracy": right / heldout, "overfocus": overfocus(weights, mask),
            "overfocus_per_layer": [overfocus(w, mask) for w in weights],
            "class_token_overfocus": overfocus(weights[..., -1:, :], mask[-1:])}


def arm_config(arm: str, seed: int, steps: int, side: int, distractors: int = 0, task: str = "count",
               train_images: int = 0, lr: float = 0.0):
    """configs/dan_counting.py:ARM for one run of `experiment` (peak lr `lr`, 0: the config's); a
    scheduled scalar (the drop path of defocus_paper) keeps its number of pieces, so its pieces
    follow `steps`."""
    if lr < 0:
        raise ValueError(f"--lr must be > 0, or 0 for the config's, got {lr}")
    config = config_lib.load(f"{COUNTING_CONFIG}:{arm}")
    overrides = [f"train.seed={seed}", f"data.seed={seed}", f"train.steps={steps}", f"data.max_side={side}",
                 f"model.overrides.image_size={side}", f"data.distractors={distractors}",
                 f"data.counting_task={task}", f"data.train_images={train_images}"] + [f"optim.lr={lr}"] * (lr > 0)
    overrides += [f"train.batch_schedules.{key}.steps_per_epoch={max(steps // spec.epochs, 1)}"
                  for key, spec in config.train.get("batch_schedules", {}).items()]
    return config_lib.apply_overrides(config, overrides)


def earlier_results(path: Path) -> list:
    """The rows of an earlier results.json (none if absent); one that is not a list of runs is an
    error before any run, so that nothing the user has is overwritten."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except ValueError:
        rows = None
    if not (isinstance(rows, list) and all(isinstance(r, dict) and {"variant", "seed"} <= r.keys() for r in rows)):
        raise ValueError(f"{path} is not the runs list `evejax viz experiment` writes; move it away or choose "
                         f"another --out")
    return rows


def experiment_main(args) -> int:
    from evejax import atomic
    from evejax.data import counting
    from evejax.train import trainer

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    side = args.side or config_lib.load(COUNTING_CONFIG).data.max_side
    for arm in arms:  # an unknown arm or a bad --lr fails now, not after the first runs
        arm_config(arm, seeds[0], args.steps, side, args.distractors, args.task, args.train_images, args.lr)
    earlier = earlier_results(out / "results.json")
    first, _ = counting.image(0, "heldout", 0, side, args.distractors, args.task)
    save_png(Image.fromarray(first), out / "heldout0.png")
    results = []
    for variant in arms:
        for seed in seeds:
            config = arm_config(variant, seed, args.steps, side, args.distractors, args.task, args.train_images,
                                args.lr)
            workdir = out / f"{variant}_s{seed}"
            trainer.train(config, str(workdir))
            cfg, params = load_target(str(workdir))
            row = dict(variant=variant, seed=seed, steps=args.steps, side=side, distractors=args.distractors,
                       task=args.task, train_images=args.train_images, lr=config.optim.lr,
                       **evaluate_run(cfg, params, args.heldout, distractors=args.distractors, task=args.task))
            weights = attention_weights(cfg, params, counting.normalize(first)[None])[:, 0]
            row["png"] = str(save_png(attention_grid(first, weights, range(cfg.depth), cfg.grid),
                                      out / f"{variant}_s{seed}.png"))
            results.append(row)
            print(json.dumps(row), flush=True)
    done = {(r["variant"], r["seed"]) for r in results}
    atomic.write_text(out / "results.json", json.dumps(
        [r for r in earlier if (r["variant"], r["seed"]) not in done] + results, indent=1))
    print(f"{'arm':<13} {'seed':>4} {'held-out acc':>12} {'over-focus':>10} {'cls over-focus':>14}")
    for r in results:
        print(f"{r['variant']:<13} {r['seed']:>4} {r['heldout_accuracy']:>12.4f} {r['overfocus']:>10.4f} "
              f"{r['class_token_overfocus']:>14.4f}")
    return 0


def main(argv=None) -> int:
    from evejax.data.counting import TASKS

    parser = argparse.ArgumentParser(prog="evejax viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    att = sub.add_parser("attention", help="attention maps of a DAN ViT over an image, and its over-focus")
    att.add_argument("target", help="trainer workdir, or config FILE.py[:ARG] (random weights)")
    att.add_argument("--image", required=True, help="image file (resized to the model's input size)")
    att.add_argument("--layers", default=None, help="comma-separated layer numbers (default: all)")
    att.add_argument("--out", default="attention.png", help="PNG to write")
    att.add_argument("--seed", type=int, default=0, help="initialisation seed for a config target")
    exp = sub.add_parser("experiment", help="tiny causal ViTs with and without de-focus on the counting set")
    exp.add_argument("--out", default="runs/counting")
    exp.add_argument("--seeds", default="0,1,2")
    exp.add_argument("--steps", type=int, default=600)
    exp.add_argument("--side", type=int, default=0, help="image side in pixels (default: the config's, 48)")
    exp.add_argument("--heldout", type=int, default=1000, help="held-out images for the accuracy")
    exp.add_argument("--distractors", type=int, default=0,
                     help="count the red squares among up to N squares of other colours (default 0: count all)")
    exp.add_argument("--task", default="count", choices=TASKS,
                     help="count: how many cells are filled (or red, with --distractors); majority: which of "
                          "the 4 colours fills the most cells, every cell filled; tetromino / bar: which of 5 "
                          "shapes of 4 neighbouring cells / which direction a bar of 3 runs, among up to "
                          "--distractors single squares; stripes: which way stripes of cells run across the "
                          "whole image (evejax/data/counting.py)")
    exp.add_argument("--train-images", type=int, default=0,
                     help="train on the first N training images only, for many epochs (default 0: a new image "
                          "every draw)")
    exp.add_argument("--lr", type=float, default=0.0, help="peak learning rate (default: the config's, 3e-3)")
    exp.add_argument("--arms", default="defocus,plain",
                     help="comma-separated arms of configs/dan_counting.py (plain, defocus, defocus_bias, "
                          "defocus_local, defocus_paper, plain_paper, plain_pos, defocus_pos, defocus_pos_bias, "
                          "and those three position arms with _aux or _paper; the file's docstring says what "
                          "each is)")
    args = parser.parse_args(argv)
    try:
        return attention_main(args) if args.command == "attention" else experiment_main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"evejax viz: {e}", file=sys.stderr)
        return 2
