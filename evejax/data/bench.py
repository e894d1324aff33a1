"""`evejax bench data`: host input-pipeline throughput against what a TPU slice consumes.

    evejax bench data [--examples 96] [--batch 8] [--workers 0,1,2] [--source-size 1024x768]
                      [--image-size 672] [--teacher-size 336] [--seq-len 2048] [--pack]
                      [--tokenizer tokenizer.model] [--threads 2]

Writes a temporary LLaVA set (JPEG photos-like images of --source-size, in
both orientations, with ~100-token vicuna_v1 conversations), converts it to
ArrayRecord with embedded images, and times the `llava` (JSONL + image files)
and `arrayrecord` pipelines: real JPEG decoding, EVE any-res preprocessing
(long edge --image-size, with the --teacher-size CLIP view) and tokenization,
for each worker-process count. Without --tokenizer a SentencePiece model is
trained on the generated text (use the checkpoint's tokenizer.model for the
real cost). One warm-up batch (worker start-up) is excluded.

Then prints the examples/s each host must deliver (`required_rate`) for EVE-7B
stage 2 on a v5p-64 (32 chips, 8 hosts, 459e12 bf16 FLOP/s per chip, 50% MFU,
global batch 512, per example 6 * 7.0e9 * 700 tokens + CLIP forward
2 * 0.3e9 * 577).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

# EVE-7B stage 2 on a v5p-64: the default plan the measured rate is compared with.
V5P64 = dict(chips=32, hosts=8, peak_flops=459e12, mfu=0.5, global_batch=512)
EVE7B_FLOPS_PER_EXAMPLE = 6 * 7.0e9 * 700 + 2 * 0.3e9 * 577


def required_rate(step_flops: float, chips: int, peak_flops: float, mfu: float, global_batch: int,
                  hosts: int) -> dict[str, float]:
    """What the input pipeline must sustain for the step to run at `mfu`.

    step_time = step_flops / (chips * peak_flops * mfu); the slice consumes
    global_batch examples per step_time, each host global_batch / hosts of them.
    """
    step_time = step_flops / (chips * peak_flops * mfu)
    examples = global_batch / step_time
    return {"step_time_s": step_time, "examples_per_s": examples, "examples_per_s_per_host": examples / hosts}


_WORDS = ("the a of image shows large small red green blue people street building car dog cat tree sky "
          "water sign table room window person standing sitting near next left right top bottom front "
          "behind two three several white black colour light dark wooden metal old new open view").split()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(_WORDS[i] for i in rng.integers(len(_WORDS), size=n)).capitalize() + "."


def _photo(rng: np.random.Generator, width: int, height: int):
    """A smooth random image plus grain, so JPEG size and decode cost resemble a photo's."""
    from PIL import Image

    small = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    image = image + rng.integers(-12, 13, image.shape, dtype=np.int16)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_bench_set(root: str, n: int, width: int, height: int, seed: int = 0) -> str:
    """n JPEGs under root/images and root/data.jsonl (half portrait); returns the JSONL path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    path = os.path.join(root, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            w, h = (width, height) if i % 2 == 0 else (height, width)
            name = f"images/{i:06d}.jpg"
            _photo(rng, w, h).save(os.path.join(root, name), quality=90)
            turns = [{"from": "human", "value": "<image>\n" + _sentence(rng, 12)},
                     {"from": "gpt", "value": " ".join(_sentence(rng, 12) for _ in range(5))}]
            f.write(json.dumps({"id": str(i), "image": name, "conversations": turns}) + "\n")
    return path


def _train_tokenizer(jsonl: str, out: str) -> str:
    import sentencepiece

    with open(jsonl, encoding="utf-8") as f:
        texts = [t["value"] for line in f for t in json.loads(line)["conversations"]]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(out, "bench"), vocab_size=200,
        model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return os.path.join(out, "bench.model")


def measure(data: dict, warmup: int = 1, batches: int = 4) -> tuple[float, dict]:
    """(examples/s over `batches` after `warmup`, iterator stats) for one config.data."""
    from types import SimpleNamespace

    from evejax.data import pipeline

    it = pipeline.make_data(SimpleNamespace(data=data), 0, 1)
    try:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        examples = it.stats()["examples"]
        for _ in range(batches):
            next(it)
        rate = (it.stats()["examples"] - examples) / (time.perf_counter() - start)
        return rate, it.stats()
    finally:
        it.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evejax bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=96, help="images in the generated set")
    p.add_argument("--batch", type=int, default=8, help="host batch")
    p.add_argument("--batches", type=int, default=4, help="timed batches per config")
    p.add_argument("--workers", default="0,1,2", help="comma list of worker-process counts")
    p.add_argument("--threads", type=int, default=2, help="read threads per process")
    p.add_argument("--source-size", default="1024x768", help="WxH of the generated JPEGs")
    p.add_argument("--image-size", type=int, default=672)
    p.add_argument("--teacher-size", type=int, default=336)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--pack", action="store_true")
    p.add_argument("--tokenizer", default=None, help="SentencePiece tokenizer.model (default: train one)")
    p.add_argument("--keep", default=None, help="write the generated set here and keep it")
    return p


def bench_data(argv=None) -> int:
    args = _parser().parse_args(argv)
    from evejax.data import sources

    width, height = (int(v) for v in args.source_size.lower().split("x"))
    workers = [int(w) for w in args.workers.split(",")]
    root = args.keep or tempfile.mkdtemp(prefix="evejax_bench_data_")
    try:
        t0 = time.perf_counter()
        jsonl = write_bench_set(root, args.examples, width, height)
        sources.convert_conversations(jsonl, os.path.join(root, "arrayrecord"), root, embed_images=True,
                                      shards=4, log=lambda _: None)
        tokenizer = args.tokenizer or _train_tokenizer(jsonl, root)
        print(f"generated {args.examples} JPEGs of {width}x{height} (both orientations) and the "
              f"ArrayRecord copy in {time.perf_counter() - t0:.1f}s; tokenizer {tokenizer}")
        common = dict(global_batch=args.batch, tokenizer=tokenizer, template="vicuna_v1", seq_len=args.seq_len,
                      pack=args.pack, image_size=args.image_size, teacher_image_size=args.teacher_size,
                      patch_size=args.patch_size, teacher_patch_size=args.patch_size,
                      read_threads=args.threads, with_teacher=True)
        pipelines = {"llava": dict(common, name="llava", path=jsonl, image_root=root),
                     "arrayrecord": dict(common, name="arrayrecord", path=os.path.join(root, "arrayrecord"))}
        print(f"\n{'pipeline':<12} {'workers':>7} {'examples/s':>11} {'skipped':>8}")
        for name, data in pipelines.items():
            for w in workers:
                rate, stats = measure(dict(data, num_workers=w), batches=args.batches)
                print(f"{name:<12} {w:>7} {rate:>11.1f} {int(stats['skipped']):>8}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    need = required_rate(EVE7B_FLOPS_PER_EXAMPLE * V5P64["global_batch"], V5P64["chips"], V5P64["peak_flops"],
                         V5P64["mfu"], V5P64["global_batch"], V5P64["hosts"])
    print(f"\nEVE-7B stage 2 on v5p-64 ({V5P64['chips']} chips, {V5P64['hosts']} hosts, "
          f"{V5P64['peak_flops']:.3g} FLOP/s/chip, MFU {V5P64['mfu']:.0%}, global batch {V5P64['global_batch']}):")
    print(f"  FLOPs/example = 6 * 7.0e9 * 700 + 2 * 0.3e9 * 577 = {EVE7B_FLOPS_PER_EXAMPLE:.4g}")
    print(f"  step time {need['step_time_s']:.2f} s -> {need['examples_per_s']:.1f} examples/s for the slice, "
          f"{need['examples_per_s_per_host']:.1f} examples/s per host")
    print("  (required_rate(step_flops, chips, peak_flops, mfu, global_batch, hosts) gives other plans)")
    return 0
