"""ImageNet top-1 / top-5 of an image classifier on a TFDS split (`evejax eval` of a classifier).

  evejax eval runs/dan_mamba_b --tfds-dir DIR [--split validation] [--weights ema] [--json out.json]
  evejax eval checkpoints/dan_mamba_l --config configs/dan.py:mamba_l --tfds-dir DIR
  evejax eval runs/dan_mamba_l_in21k --tfds-dir DIR --class-map map22kto1k.txt   # 22k model on 1k

CHECKPOINT is a trainer workdir (its newest checkpoint; the model comes from the checkpoint's
own config) or an `evejax import` directory (the model comes from `--config`). `--weights ema`
reads a workdir's exponential moving average (config.train.ema_decay > 0) instead of its params.

The view is the official evaluation transform (`tfds_imagenet` with augment off): short side to
floor(size / crop_pct) bicubic, centre crop to the model's input size, ImageNet mean / std;
size is the model's image_size, crop_pct 0.875 (224 / 256) unless `--crop-pct`. Every record of
the split is read once (padding rows of the last batch do not count; unreadable records are
skipped and counted). A prediction is the arg-max (top-5: the 5 largest) of the model's class
logits, `logits` of its output (DAN: the class-token head) or the output itself; float32.
`--class-map FILE` (one model class index a line; the official classification/data/map22kto1k.txt)
scores a model over more classes on the set's: class j's logit is the model's logit of line j,
as the official `validate` scores the 21,841-class pre-train on ImageNet-1k.

Shapes: pixels [B, S, S, 3] float32, label [B] int32 (-1 padding), logits [B, C].
Any command line that is not a classifier's (no --tfds-dir, a workdir of another model) goes to
evejax/eval/evaluate.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from evejax import atomic


def load_classifier(checkpoint: str, config_spec: str | None, weights: str):
    """(config.model, params as numpy, step or None) of a workdir or an import directory."""
    import ml_collections

    from evejax import config as config_lib
    from evejax.port import checkpoint as port_ckpt
    from evejax.train import checkpoint as ckpt_lib

    if port_ckpt.is_workdir(checkpoint):
        with port_ckpt.expected_orbax_warnings_silenced():
            step, params = ckpt_lib.load_params(checkpoint, weights="ema_params" if weights == "ema" else "params")
            store = ckpt_lib.Checkpoints(checkpoint, read_only=True)
            try:
                model = ml_collections.ConfigDict(store.config(step)["model"])
            finally:
                store.close()
        return model, params, step
    if config_spec is None:
        raise ValueError(f"{checkpoint} is not a trainer workdir; an `evejax import` directory needs "
                         "--config FILE.py:ARG for its model")
    if weights == "ema":
        raise ValueError("--weights ema reads a trainer workdir's EMA; an import directory holds one set of weights")
    from evejax.train import trainer

    model = config_lib.load(config_spec).model
    _, params = trainer.load_imported(checkpoint, None)
    return model, jax.tree.map(np.asarray, params), None


def class_logits(module, params, pixels):
    out = module.apply({"params": params}, pixels, deterministic=True)
    return getattr(out, "logits", out).astype(jnp.float32)


def evaluate(model, params, tfds_name: str, tfds_dir: str, split: str, batch_size: int = 256,
             crop_pct: float = 0.875, progress: bool = True, classes=None) -> dict:
    """{"top1", "top5", "examples", "skipped"} of `model` (config.model) with `params` on the split;
    `classes` [C'] int: score the model's logits[:, classes] (the --class-map)."""
    from tqdm import tqdm

    from evejax import config as config_lib
    from evejax import sharding
    from evejax.data import pipeline
    from evejax.models import registry

    spec = registry.build(model)
    mesh = sharding.make_mesh(dict(data=-1))
    devices = sharding.data_parallel_size(mesh)
    batch_size = math.ceil(batch_size / devices) * devices
    data = config_lib.data_config(name="tfds_imagenet", tfds_name=tfds_name, tfds_dir=tfds_dir, split=split,
                                  augment=False, shuffle=False, num_epochs=1, global_batch=batch_size,
                                  crop_pct=crop_pct)
    batches = pipeline.make_data(SimpleNamespace(data=data, model=model), jax.process_index(), jax.process_count())
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    rows = sharding.batch_sharding(mesh, 4)

    @jax.jit
    def counts(params, pixels, label):
        logits = class_logits(spec.module, params, pixels)
        if classes is not None:
            logits = logits[:, classes]
        k = min(5, logits.shape[-1])
        top = jax.lax.top_k(logits, k)[1]
        real = label >= 0
        hit1 = (top[:, 0] == label) & real
        hitk = jnp.any(top == label[:, None], axis=-1) & real
        return jnp.stack([jnp.sum(real), jnp.sum(hit1), jnp.sum(hitk)]).astype(jnp.int32)

    total = np.zeros(3, np.int64)
    bar = tqdm(desc=f"eval {tfds_name} {split}", unit="img", disable=not progress or jax.process_index() != 0)
    for batch in batches:
        pixels = jax.make_array_from_process_local_data(rows, batch["pixels"])
        label = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, 1), batch["label"])
        got = np.asarray(jax.device_get(counts(params, pixels, label)))
        total += got
        bar.update(int(got[0]))
    bar.close()
    skipped = int(batches.stats().get("skipped", 0))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        total = np.asarray(multihost_utils.process_allgather(total)).reshape(-1, 3).sum(0)
    n = int(total[0])
    if n == 0:
        raise ValueError(f"TFDS {tfds_name} {split} in {tfds_dir!r} gave no readable example")
    return {"top1": float(total[1]) / n, "top5": float(total[2]) / n, "examples": n, "skipped": skipped}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evejax eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="trainer workdir or `evejax import` directory")
    p.add_argument("--config", help="FILE.py:ARG whose config.model the import directory holds")
    p.add_argument("--tfds-dir", required=True, help="TFDS data_dir holding the set in ArrayRecord format")
    p.add_argument("--tfds-name", default="imagenet2012")
    p.add_argument("--split", default="validation")
    p.add_argument("--weights", default="params", choices=("params", "ema"),
                   help="a workdir's trained params or their EMA")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--crop-pct", type=float, default=0.875, help="centre crop / resized short side (224 / 256)")
    p.add_argument("--class-map", help="one model class index a line: score those logits as the set's classes "
                   "(official map22kto1k.txt for a 22k model on ImageNet-1k)")
    p.add_argument("--json", help="also write the figures to this file (replaced only once complete)")
    p.add_argument("--no-progress", action="store_true")
    return p


def is_classifier_command(argv) -> bool:
    """Whether `evejax eval argv` is this module's: it names a TFDS directory."""
    return any(a == "--tfds-dir" or a.startswith("--tfds-dir=") for a in argv)


def eval_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not is_classifier_command(argv):
        from evejax.eval import evaluate as vqa

        return vqa.main(argv)
    args = _parser().parse_args(argv)
    try:
        from evejax.port import dan as dan_port

        classes = None if args.class_map is None else jnp.asarray(dan_port.read_class_map(args.class_map))
        model, params, step = load_classifier(args.checkpoint, args.config, args.weights)
        result = evaluate(model, params, args.tfds_name, args.tfds_dir, args.split, args.batch_size,
                          args.crop_pct, progress=not args.no_progress, classes=classes)
    except (FileNotFoundError, ValueError, KeyError) as e:  # CheckpointError is a ValueError
        print(f"evejax eval: error: {e}", file=sys.stderr)
        return 1
    result.update(checkpoint=args.checkpoint, step=step, weights=args.weights, tfds_name=args.tfds_name,
                  split=args.split, crop_pct=args.crop_pct, class_map=args.class_map)
    print(f"{args.checkpoint} ({args.weights}{'' if step is None else f', step {step}'}) on {args.tfds_name} "
          f"{args.split}: top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}% "
          f"({result['examples']} images, {result['skipped']} skipped)")
    if args.json:
        atomic.write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


main = eval_main
