"""Unpaired batches for HoVLE's stage 1 (distillation): images with no text, text with no images.

Each row holds one image of an image source, tiled as HoVLE tiles (image.tile_image), and,
independently of it, T random token ids of the LLM vocabulary:

  pixels            float32 [b, P, t, t, 3]  P = max_tiles + 1 slots (1 at max_tiles 1), real tiles first
  tile_mask         bool    [b, P]
  text_tokens       int32   [b, T]           T = config.data.seq_len, uniform over the model's
                                             text ids (the image placeholder id excluded)
  text_segment_ids  int32   [b, T]           1; 0 on the padding rows of a last, short batch

The tile side, max_tiles and the text ids come from config.model (the stage-1 model's
`unpaired_data()`), so data and model cannot disagree; config.data must not set tile_size,
max_tiles or tokens_per_tile. The ids are drawn per record from grain's per-record random
generator (seed config.data.seed), so a resumed run sees the same ids.

Data names (config.data.name) and their images:
  unpaired_shapes       generated shapes (split, num_examples, min_side, max_side)
  unpaired_llava        the images of a LLaVA JSON / JSONL file (path, image_root); the text
                        is ignored, a record without an image is a counted skip (missing_image)
  unpaired_arrayrecord  the images of `evejax data convert` shards (path, image_root)
  unpaired_tfds         the images of a TFDS set prepared as ArrayRecord (tfds_name, tfds_dir,
                        split, image_key); labels are ignored
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from evejax.data import image as image_lib
from evejax.data import packing, pipeline, sources
from evejax.data.sources import BadRecord

def text_ids(vocab_size: int, exclude, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` ids uniform over [0, vocab_size) without the ids in `exclude`: int32 [count]."""
    exclude = np.unique(np.asarray(exclude, np.int64))
    exclude = exclude[(exclude >= 0) & (exclude < vocab_size)]
    ids = rng.integers(0, vocab_size - len(exclude), count)
    # The k-th allowed id: shift past every excluded id at or below it, smallest first.
    for e in exclude:
        ids = ids + (ids >= e)
    return ids.astype(np.int32)


class UnpairedMap:
    """((index, raw record), rng) -> unpaired example (module docstring) or {"bad": kind}.

    `decode(raw)` -> the image: a PIL image, encoded bytes, or a path under `image_root`.
    """

    def __init__(self, decode: Callable, tiling: image_lib.TilingConfig, seq_len: int, vocab_size: int,
                 exclude_ids, image_root: str | None = None):
        self.decode, self.tiling, self.seq_len = decode, tiling, seq_len
        self.vocab_size, self.exclude_ids, self.image_root = vocab_size, tuple(exclude_ids), image_root

    def __call__(self, item, rng: np.random.Generator) -> dict:
        index, raw = item
        try:
            image = self.decode(raw)
            if image is None:
                raise BadRecord("missing_image", "the record has no image")
            tiled = image_lib.tile_image(pipeline._load_image(image, self.image_root), self.tiling)
        except BadRecord as e:
            return {"bad": e.kind}
        return {"index": np.int64(index), "pixels": tiled.pixels, "tile_mask": tiled.tile_mask,
                "text_tokens": text_ids(self.vocab_size, self.exclude_ids, self.seq_len, rng),
                "text_segment_ids": np.ones(self.seq_len, np.int32)}


def _shapes_image(record: dict):
    return record["image"]


def _decode_record_image(raw: bytes):
    return sources.parse_record(raw).get("image")


def _decode_arrayrecord_image(raw: bytes):
    return pipeline.decode_arrayrecord(raw)[1]


class _TFDSImage:
    def __init__(self, key: str):
        self.key = key

    def __call__(self, features):
        if self.key not in features:
            raise BadRecord("malformed", f"features {sorted(features)} lack {self.key!r}")
        return bytes(features[self.key])


def model_facts(config) -> dict:
    """The stage-1 model's tiling (image.TilingConfig), text vocab_size and exclude_ids."""
    from evejax.models import registry

    model = getattr(config, "model", None)
    cfg = None if model is None else registry.build(model).config
    if not hasattr(cfg, "unpaired_data"):
        raise ValueError(f"config.data.name={config.data['name']!r} makes the stage-1 distillation batch; "
                         "config.model must be a HoVLE stage-1 model (name 'hovle' with a teacher)")
    return cfg.unpaired_data()


def make_data(config, process_index: int, process_count: int) -> packing.BatchIterator:
    """This host's iterator of unpaired host batches (module docstring)."""
    given = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
    from_model = sorted(k for k in pipeline.HOVLE_FIELDS if given.get(k, pipeline.HOVLE_FIELDS[k])
                        != pipeline.HOVLE_FIELDS[k])
    if from_model:
        raise ValueError(f"config.data sets {from_model}, but the stage-1 tiling comes from config.model; "
                         "remove them from config.data")
    opts = pipeline.config_options(config)
    facts = model_facts(config)
    name, b = opts["name"], opts["global_batch"] // max(process_count, 1)
    tiling = facts["tiling"]
    what = opts["path"] or name
    if name == "unpaired_shapes":
        source, decode = pipeline._shapes_source("class", opts), _shapes_image
    elif name in ("unpaired_llava", "unpaired_arrayrecord"):
        kind = name.removeprefix("unpaired_")
        source = pipeline.record_source(kind, opts)
        decode = _decode_record_image if kind == "llava" else _decode_arrayrecord_image
    else:
        source = sources.tfds_source(opts["tfds_name"], opts["split"], opts["tfds_dir"] or None,
                                     opts["image_key"])
        decode, what = _TFDSImage(opts["image_key"]), f"TFDS {opts['tfds_name']} {opts['split']}"
    if opts["image_root"]:
        what += f" (images under {opts['image_root']})"
    slots, t, n = tiling.max_slots, tiling.tile_size, opts["seq_len"]
    pad = {"pixels": np.zeros((slots, t, t, 3), np.float32), "tile_mask": np.zeros(slots, bool),
           "text_tokens": np.zeros(n, np.int32), "text_segment_ids": np.zeros(n, np.int32)}
    transform = UnpairedMap(decode, tiling, n, facts["vocab_size"], facts["exclude_ids"],
                            opts["image_root"] or None)
    return pipeline.build(source, transform, lambda: packing.Stacker(b, pad), opts, process_index,
                          process_count, random=True, what=what)
