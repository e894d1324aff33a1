"""grain input pipelines: `make_data(config, process_index, process_count)`.

Every pipeline has the same shape:

  MapDataset.source(records)      random access; element = (global index, raw record)
  [process_index::process_count]  this host's shard (disjoint; together one epoch)
  .shuffle(seed)                  a new permutation each epoch (config.data.shuffle)
  .repeat(num_epochs)             endless for training (num_epochs = 0)
  .map / .random_map              decode, preprocess, tokenize; a bad record becomes
                                  a marker {"bad": kind} (sources.BadRecord.KINDS)
  .to_iter_dataset(read_threads)  [.mp_prefetch(num_workers) worker processes]
  BatchIterDataset                drops and counts markers, packs / stacks into host
                                  batches (packing.py); get_state / set_state / stats;
                                  stops with sources.NoGoodRecordsError after a run of
                                  min(max_bad_run, this host's records) markers

Bad records are dropped after the workers, in this process, so the counters
(`iterator.stats()`: examples, batches, skipped, skipped_<kind>, fill) live in
one place and in the checkpointed state, and the batches do not depend on
num_workers. Host batch size b = global_batch / process_count;
`sharding.global_batch(batch, mesh)` assembles the hosts' batches.

Data names (config.data.name) and their host batches:
  llava           LLaVA JSON list / JSONL + image directory  -> conversation batch
  arrayrecord     shards from `evejax data convert`            -> conversation batch
  shapes_caption  generated shapes, captions (plain template)  -> conversation batch
  shapes_qa       generated shapes, QA rounds (vicuna_v1)      -> conversation batch
  shapes_class    generated shapes: pixels [b, Tt, Tt, 3] (the CLIP-teacher view,
                  teacher_image_size), pixel_mask [b, Tt, Tt], label int32 [b]
                  (shapes.CLASS_NAMES; -1 on padding rows)
  unpaired_shapes, unpaired_llava, unpaired_arrayrecord, unpaired_tfds
                  HoVLE stage 1's unpaired batch (images without text + random text
                  ids): evejax/data/unpaired.py
  tfds_imagenet   any TFDS image-classification set prepared as ArrayRecord:
                  pixels float32 [b, image_size, image_size, 3] (ImageNet-normalised;
                  when augment: random-resized crop (bicubic) + flip, RandAugment, random
                  erasing, then mixup / cutmix over the host batch (data/augment.py); else
                  short side to image_size / crop_pct (bicubic) + centre crop),
                  label int32 [b] (-1 on padding rows), index int64 [b] (the record's, -1 on
                  padding rows), label_probs float32 [b, C] (C = the TFDS label feature's
                  num_classes; with augment mixed and smoothed, else one-hot; zero rows on
                  padding)
Conversation batch (packing.SequencePacker; T = seq_len, S = image_size,
Tt = teacher_image_size): tokens, targets, loss_mask, segment_ids, positions
[b, T]; has_image [b]; pixels [b, S, S, 3], pixel_mask [b, S, S] and, with
with_teacher, teacher_pixels [b, Tt, Tt, 3], teacher_mask [b, Tt, Tt]
(evejax.data.image.preprocess_anyres); example_id [b, T] with with_ids.
tokens holds IMAGE_TOKEN_INDEX (-200) where the model splices the image;
positions count text positions (the placeholder is one), so a model that
splices must recompute positions per segment after splicing.
HoVLE conversation batch (template "internlm2-chat", `HoVLEConversationMap`; same
sources; N = max_tiles + 1 tile slots, t = tile_size): tokens, targets,
loss_mask, segment_ids, positions [b, T] and has_image [b] as above, but tokens
hold the expanded image (<img>, tokens_per_tile x <IMG_CONTEXT> per real tile,
</img>), so positions already count every image token; pixels float32
[b, N, t, t, 3] (image.tile_image) and tile_mask bool [b, N] (False on padding
slots and on text-only rows); example_id [b, T] with with_ids.

config.data fields (FIELDS; a key not listed there is an error):
  name               one of DATA_NAMES
  global_batch       rows per step over all hosts (divisible by process_count)
  seed               shuffle / augmentation seed (0)
  shuffle            reshuffle every epoch (True)
  num_epochs         0 = endless (training); n: stop after n epochs, the last batch
                     padded (empty rows: segment_ids 0, label -1) (0)
  num_workers        grain worker processes; 0 = in this process (0)
  read_threads       threads per process running the map step (2)
  max_bad_run        stop with an error (the file and the skips by kind) when this
                     many records in a row, or a whole pass over this host's
                     records, are bad (10000)
  -- conversation data: llava, arrayrecord, shapes_caption, shapes_qa --
  seq_len            T, text positions per row; a sample of L ids takes L - 1 (2048)
  template           "plain" | "vicuna_v1" (vicuna_v1; shapes_caption: plain)
  tokenizer          SentencePiece tokenizer.model path, or "shapes" (the fixed
                     shapes word vocabulary; the default for shapes_*)
  pack               first-fit several samples per row, at most one image per row (False)
  overlong           "skip": a sample longer than a row is dropped and counted
                     (too_long); "truncate": its ids are cut to seq_len + 1 as
                     official EVE does, dropped only if no answer token is left ("skip")
  image_size, patch_size, pool, teacher_image_size, teacher_patch_size
                     AnyResConfig. With config.model (the trainer) they come from the
                     model (`model_geometry`: EVE's canvas, patch, pool and teacher;
                     a CLIP classifier's input) and config.data must not set them;
                     only the pipeline used on its own reads them here (672, 14, 2,
                     336, 14; shapes_*: 64, 8, 2, 32, 8; tfds_imagenet: image_size
                     224 is the crop). Config files build config.data with
                     evejax.config.data_config: every other key, in every config.
  with_teacher       add the CLIP teacher view (True; not used by internlm2-chat)
  -- internlm2-chat (HoVLE) only --
  tile_size          t, the InternVL tile side (448)
  max_tiles          the official max_dynamic_patch, grid tiles per image (6); the
                     batch has max_tiles + 1 slots (the thumbnail; 1 slot at max_tiles 1)
  tokens_per_tile    <IMG_CONTEXT> per tile in the text (256 = (448 / 14)^2 / 4)
  tile_pad_unit      0: stretch each image to its tiles (official); > 0 letterbox it
                     (image.TilingConfig.pad_unit)
                     With a HoVLE config.model these four come from it (`model_geometry`:
                     its image_size, max_tiles, image_tokens_per_tile, tiling()) and config.data must
                     not set them; the tokenizer's <IMG_CONTEXT> id must be the model's
                     img_context_token_id (`config_options`).
  The tokenizer's special tokens: INTERNLM2_SPECIAL_IDS for a tokenizer.model
  (InternLM2's); with "shapes" they take the ids after its vocabulary,
  (<|im_end|>, <|im_start|>, <img>, </img>, <IMG_CONTEXT>) = V, ..., V + 4,
  V = the shapes vocabulary size (`special_ids`).
  with_ids           add example_id, for inspection and tests (False)
  -- llava, arrayrecord --
  path               llava: the JSON / JSONL file; arrayrecord: the --out directory
                     of `evejax data convert`, a glob or a comma list of shards
  image_root         directory (or gs:// prefix) of the records' relative image
                     paths; arrayrecord records stored by path default to the
                     image root recorded at conversion
  -- shapes_* --
  split              "train" | "heldout" ("train")
  num_examples       size of the generated split (100000)
  min_side, max_side image side range in pixels (16, 64; see evejax/data/shapes.py)
  qa_rounds          shapes_qa: "sample" (1 to 3 questions per image, as held out)
                     or "all" (every question the image answers)
  -- tfds_imagenet --
  tfds_name          ("imagenet2012")
  tfds_dir           TFDS data_dir, local or gs:// ("": TFDS's default)
  split              TFDS split ("train")
  image_key, label_key  feature names ("image", "label")
  augment            training augmentation (True); the fields below apply only with it
  crop_pct           eval view: the centre crop's share of the resized short side (0.875 = 224/256)
  rand_augment       timm RandAugment policy, e.g. "rand-m9-mstd0.5-inc1" ("": none)
  random_erase       probability of one random-erasing box per image (0.0)
  mixup, cutmix      Beta alphas of mixup and cutmix (0.0: off)
  mix_prob           probability that a batch is mixed at all (1.0)
  mix_switch_prob    probability of cutmix instead of mixup when both are on (0.5)
  label_smoothing    label_probs smoothing (0.0)
  repeated_aug       R > 1: each epoch reads 1/R of this host's records, each R times in a row
                     (so in one batch), with independent augmentations (DeiT's RASampler) (1)
"""
from __future__ import annotations

import os
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image

from evejax import config as config_lib
from evejax.data import augment as augment_lib
from evejax.data import image as image_lib
from evejax.data import packing, shapes, sources
from evejax.data import text as text_lib
from evejax.data.sources import BadRecord

UNPAIRED_NAMES = ("unpaired_shapes", "unpaired_llava", "unpaired_arrayrecord", "unpaired_tfds")
DATA_NAMES = ("llava", "arrayrecord", "shapes_caption", "shapes_qa", "shapes_class", "tfds_imagenet") + UNPAIRED_NAMES
CONVERSATION_NAMES = ("llava", "arrayrecord", "shapes_caption", "shapes_qa")

GEOMETRY = ("image_size", "patch_size", "pool", "teacher_image_size", "teacher_patch_size")
HOVLE_TEMPLATE = "internlm2-chat"
HOVLE_FIELDS = dict(tile_size=448, max_tiles=6, tokens_per_tile=256, tile_pad_unit=0)
FIELDS: dict[str, Any] = dict(config_lib.DATA_KEYS, image_size=672, patch_size=14, pool=2,
                              teacher_image_size=336, teacher_patch_size=14, **HOVLE_FIELDS)
_SHAPES_DEFAULTS = dict(image_size=64, patch_size=8, pool=2, teacher_image_size=32, teacher_patch_size=8,
                        tokenizer="shapes", seq_len=128)
NAME_DEFAULTS: dict[str, dict[str, Any]] = {
    "shapes_caption": dict(_SHAPES_DEFAULTS, template="plain"),
    "shapes_qa": dict(_SHAPES_DEFAULTS),
    "shapes_class": dict(_SHAPES_DEFAULTS),
    "tfds_imagenet": dict(image_size=224),
}


def options(data, geometry: dict | image_lib.AnyResConfig | None = None) -> dict[str, Any]:
    """config.data (ConfigDict or dict) with defaults filled in, checked; the image fields of
    `geometry` (the model's, `model_geometry`; an AnyResConfig stands for its GEOMETRY fields)
    when given, which config.data must then leave out."""
    given = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise KeyError(f"config.data has unknown field(s) {unknown}; the data pipeline knows "
                       f"{sorted(FIELDS)} (see evejax/data/pipeline.py)")
    name = given.get("name")
    if name not in DATA_NAMES:
        raise ValueError(f"config.data.name={name!r} is not a pipeline here; use one of {DATA_NAMES}")
    opts = dict(FIELDS, **NAME_DEFAULTS.get(name, {}))
    opts.update(given)
    if isinstance(geometry, image_lib.AnyResConfig):
        geometry = {k: getattr(geometry, k) for k in GEOMETRY}
    if geometry is not None:
        doubled = sorted(set(given) & set(geometry))
        if doubled:
            raise ValueError(f"config.data sets {doubled}, but the image geometry comes from config.model "
                             "(its size and overrides); remove them from config.data")
        opts.update(geometry)

    def need(ok, what):
        if not ok:
            raise ValueError(f"config.data: {what}")

    need(int(opts["global_batch"]) > 0, f"global_batch must be positive, got {opts['global_batch']}")
    need(opts["num_epochs"] >= 0 and opts["num_workers"] >= 0 and opts["read_threads"] >= 1,
         "num_epochs and num_workers must be >= 0 and read_threads >= 1")
    need(opts["max_bad_run"] >= 1, f"max_bad_run must be >= 1, got {opts['max_bad_run']}")
    if name in CONVERSATION_NAMES:
        need(opts["seq_len"] >= 2, f"seq_len must be >= 2, got {opts['seq_len']}")
        need(opts["overlong"] in ("skip", "truncate"), f"overlong={opts['overlong']!r}: use 'skip' or 'truncate'")
        need(bool(opts["tokenizer"]), "tokenizer is required: a SentencePiece tokenizer.model path "
             "(the checkpoint's) or 'shapes'")
        if opts["template"] == HOVLE_TEMPLATE:
            tiling_config(opts)
            need(opts["tokens_per_tile"] > 0, f"tokens_per_tile must be positive, got {opts['tokens_per_tile']}")
        else:
            text_lib.get_template(opts["template"])
    changed = sorted(k for k in HOVLE_FIELDS if k in given and given[k] != HOVLE_FIELDS[k])
    need(not changed or opts["template"] == HOVLE_TEMPLATE,
         f"{changed} apply only to template={HOVLE_TEMPLATE!r}, not {opts['template']!r}")
    if name in ("llava", "arrayrecord", "unpaired_llava", "unpaired_arrayrecord"):
        need(bool(opts["path"]), f"path is required for {name}")
    if name == "tfds_imagenet":
        need(0 < opts["crop_pct"] <= 1, f"crop_pct must be in (0, 1], got {opts['crop_pct']}")
        need(int(opts["repeated_aug"]) >= 1, f"repeated_aug must be >= 1, got {opts['repeated_aug']}")
        need(0 <= opts["label_smoothing"] < 1 and 0 <= opts["random_erase"] <= 1
             and 0 <= opts["mix_prob"] <= 1 and 0 <= opts["mix_switch_prob"] <= 1
             and opts["mixup"] >= 0 and opts["cutmix"] >= 0,
             "label_smoothing must be in [0, 1), random_erase, mix_prob and mix_switch_prob in [0, 1], "
             "mixup and cutmix >= 0")
        augment_lib.parse_rand_augment(opts["rand_augment"])
    if name in UNPAIRED_NAMES:
        need(opts["seq_len"] >= 1, f"seq_len (the text stream's length) must be >= 1, got {opts['seq_len']}")
    return opts


def model_geometry(model) -> dict[str, int]:
    """The config.data image fields config.model fixes: EVE's canvas, patch, pool and its
    teacher's view, or a CLIP classifier's input size and patch (its view is the teacher
    view), as GEOMETRY; HoVLE's tile side, max_tiles and LLM tokens per tile, as HOVLE_FIELDS."""
    return _geometry(model, _model_config(model))


def _model_config(model):
    from evejax.models import registry

    return registry.build(model).config


def _geometry(model, cfg) -> dict[str, int]:
    if hasattr(cfg, "anyres"):
        anyres = cfg.anyres()
        return {k: getattr(anyres, k) for k in GEOMETRY}
    if hasattr(cfg, "image_tokens_per_tile"):
        tiling = cfg.tiling()
        return dict(tile_size=tiling.tile_size, max_tiles=tiling.max_tiles, tokens_per_tile=cfg.image_tokens_per_tile,
                    tile_pad_unit=tiling.pad_unit)
    if hasattr(cfg, "patch_size"):
        size = cfg.image_size
        if isinstance(size, (tuple, list)):   # (H, W): the square views here need H == W
            if size[0] != size[1]:
                raise ValueError(f"config.model.name={model.name!r} reads {size[0]} x {size[1]} images; the "
                                 "classification pipelines make square views: set a square image_size")
            size = size[0]
        return dict(image_size=size, patch_size=cfg.patch_size, pool=1,
                    teacher_image_size=size, teacher_patch_size=cfg.patch_size)
    raise ValueError(f"config.model.name={model.name!r} takes no images; its data cannot be {DATA_NAMES}")


def config_options(config) -> dict[str, Any]:
    """options() of config.data, with the image geometry of config.model when the config has
    a model, else of config.data's fields (the pipeline used on its own). A model that reads
    tiles (HoVLE) needs conversations in the internlm2-chat template whose <IMG_CONTEXT> id is
    its img_context_token_id; any other image model, another template."""
    model = getattr(config, "model", None)
    if model is None:
        return options(config.data)
    cfg = _model_config(model)
    geometry = _geometry(model, cfg)
    opts = options(config.data, geometry)
    if opts["name"] in CONVERSATION_NAMES:
        tiled = "tokens_per_tile" in geometry
        if tiled != (opts["template"] == HOVLE_TEMPLATE):
            raise ValueError(f"config.data.template={opts['template']!r} does not fit config.model.name="
                             f"{model.name!r}: " + (f"it reads {HOVLE_TEMPLATE!r} conversations" if tiled else
                                                    f"{HOVLE_TEMPLATE!r} is HoVLE's template"))
        if tiled:
            data_id = image_context_id(opts["tokenizer"])
            if data_id != cfg.img_context_token_id:
                raise ValueError(f"config.data.tokenizer={opts['tokenizer']!r} gives <IMG_CONTEXT> id {data_id}, "
                                 f"but the model splices the image at img_context_token_id="
                                 f"{cfg.img_context_token_id}; set --config.model.overrides.img_context_token_id="
                                 f"{data_id} or use the model's tokenizer")
    return opts


def image_geometry(config) -> image_lib.AnyResConfig:
    """The image preprocessing of the pipeline that `config` builds."""
    return anyres_config(config_options(config))


def anyres_config(opts: dict) -> image_lib.AnyResConfig:
    return image_lib.AnyResConfig(image_size=opts["image_size"], patch_size=opts["patch_size"],
                                  pool=opts["pool"], teacher_image_size=opts["teacher_image_size"],
                                  teacher_patch_size=opts["teacher_patch_size"])


def tiling_config(opts: dict) -> image_lib.TilingConfig:
    return image_lib.TilingConfig(tile_size=opts["tile_size"], max_tiles=opts["max_tiles"],
                                  pad_unit=opts["tile_pad_unit"])


def make_tokenizer(spec: str) -> text_lib.Tokenizer:
    if spec == "shapes":
        return shapes.tokenizer()
    return text_lib.SentencePieceTokenizer(spec)


# ---- map steps ------------------------------------------------------------------------------

def _load_image(image, image_root: str | None = None) -> Image.Image:
    """PIL image from a PIL image, encoded bytes, or a path under image_root."""
    if isinstance(image, str):
        image = sources.read_image_bytes(image, image_root)
    if isinstance(image, bytes):
        try:
            return image_lib.load_image(image)
        except image_lib.BadImageError as e:
            raise BadRecord("corrupt_image", str(e)) from e
    if not isinstance(image, Image.Image):
        raise BadRecord("malformed", f"record 'image' must be one path, got {type(image).__name__}")
    return image


class ConversationMap:
    """(index, raw record) -> conversation example (packing.SequencePacker) or {"bad": kind}.

    `decode(raw)` -> (record dict, image) with image None, a PIL image,
    encoded bytes, or a path string resolved against `image_root`. Text is
    checked before the image is read, so a too-long sample costs no decoding.
    Picklable for grain's worker processes: the tokenizer is built on first use.

    Records official EVE trains differently are counted skips here, never
    silently changed: an image without `<image>` in the text
    ("image_without_placeholder"; official training keeps the text and drops
    the image, `cur_image_features[0:0]`, and its plain template asserts), more
    than one `<image>` ("multiple_images"; official `preprocess_multimodal`
    merges those of one turn into one), and, with overlong="truncate", an
    `<image>` that the cut to seq_len + 1 ids removed ("too_long").
    """

    def __init__(self, decode: Callable, opts: dict):
        self.decode = decode
        self.tokenizer_spec, self.template = opts["tokenizer"], opts["template"]
        self.seq_len, self.truncate = opts["seq_len"], opts["overlong"] == "truncate"
        self.anyres, self.with_teacher = anyres_config(opts), opts["with_teacher"]
        self.image_root = opts["image_root"] or None
        self._tokenizer = None

    def __getstate__(self):
        return dict(self.__dict__, _tokenizer=None)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    def __call__(self, item) -> dict:
        index, raw = item
        try:
            return self._example(index, raw)
        except BadRecord as e:
            return {"bad": e.kind}

    def _decoded(self, raw) -> tuple[dict, Any, list]:
        """(record, image reference or None, its turns); an empty conversation is a bad record."""
        record, image = self.decode(raw)
        turns = record.get("conversations")
        if not turns or (isinstance(turns, list) and all(
                isinstance(t, dict) and not str(t.get("value", "")).strip() for t in turns)):
            raise BadRecord("empty_conversation", f"record {record.get('id')!r} has no conversation")
        return record, image, turns

    def _example(self, index: int, raw) -> dict:
        record, image, turns = self._decoded(raw)
        mentions_image = any(isinstance(t, dict) and text_lib.IMAGE_PLACEHOLDER in str(t.get("value"))
                             for t in turns)
        if image is not None and not mentions_image:
            raise BadRecord("image_without_placeholder", "the record has an image but no <image> in its text")
        try:
            encoded = text_lib.encode_conversation(turns, self.tokenizer, self.template,
                                                   self.seq_len + 1 if self.truncate else None)
        except text_lib.MultipleImagesError as e:
            raise BadRecord("multiple_images", str(e)) from e
        except ValueError as e:
            raise BadRecord("malformed", str(e)) from e
        ids, mask = encoded.input_ids, encoded.loss_mask
        placeholder = bool((ids == text_lib.IMAGE_TOKEN_INDEX).any())
        if placeholder and image is None:
            raise BadRecord("malformed", "<image> in the text but the record has no image")
        cut_image = image is not None and not placeholder
        if len(ids) - 1 > self.seq_len or not mask[1:].any() or cut_image:
            raise BadRecord("too_long", f"{len(ids)} ids for rows of {self.seq_len} positions"
                            + ("; the cut removed <image>" if cut_image else ""))
        example = {"index": np.int64(index), "ids": ids, "loss_mask": mask}
        if placeholder:
            view = image_lib.preprocess_anyres(_load_image(image, self.image_root), self.anyres,
                                               self.with_teacher)
            example.update(pixels=view.pixels, pixel_mask=view.mask)
            if self.with_teacher:
                example.update(teacher_pixels=view.teacher_pixels, teacher_mask=view.teacher_mask)
        return example


def special_ids(tokenizer_spec: str, tokenizer: text_lib.Tokenizer) -> dict[str, int]:
    """The internlm2-chat special-token ids for this tokenizer (module docstring)."""
    if tokenizer_spec != "shapes":
        return dict(text_lib.INTERNLM2_SPECIAL_IDS)
    ordered = sorted(text_lib.INTERNLM2_SPECIAL_IDS, key=text_lib.INTERNLM2_SPECIAL_IDS.get)
    return {s: tokenizer.vocab_size + k for k, s in enumerate(ordered)}


def image_context_id(tokenizer_spec: str) -> int:
    """The id of <IMG_CONTEXT> in internlm2-chat data tokenized by `tokenizer_spec` (no file read)."""
    shapes_tokenizer = make_tokenizer(tokenizer_spec) if tokenizer_spec == "shapes" else None
    return special_ids(tokenizer_spec, shapes_tokenizer)[text_lib.IMG_CONTEXT]


class HoVLEConversationMap(ConversationMap):
    """(index, raw record) -> HoVLE conversation example or {"bad": kind}.

    Example: index int64; ids int32 [L] and loss_mask bool [L]
    (text.encode_internlm2_chat, tokens_per_tile x the image's tiles <IMG_CONTEXT>);
    with an image also pixels float32 [N, t, t, 3] and tile_mask bool [N]
    (image.tile_image, N = max_tiles + 1). As official InternVL training, an image
    without `<image>` in the text gets "<image>\n" before the first question.
    Counted skips: `<image>` count not one per image ("multiple_images" when there
    are more, else "malformed"), and, with overlong="truncate", a cut that removes
    any image token ("too_long"; official asserts the one </img> survives).
    """

    def __init__(self, decode: Callable, opts: dict):
        super().__init__(decode, opts)
        self.tiling = tiling_config(opts)
        self.tokens_per_tile = opts["tokens_per_tile"]
        self._special_ids = None

    def __getstate__(self):
        return dict(super().__getstate__(), _special_ids=None)

    def _example(self, index: int, raw) -> dict:
        record, image, turns = self._decoded(raw)
        tiled = None if image is None else image_lib.tile_image(_load_image(image, self.image_root), self.tiling)
        if self._special_ids is None:
            self._special_ids = special_ids(self.tokenizer_spec, self.tokenizer)
        tiles = [] if tiled is None else [tiled.num_tiles]
        try:
            encoded = text_lib.encode_internlm2_chat(turns, self.tokenizer, tiles, self.tokens_per_tile,
                                                     self._special_ids,
                                                     max_len=self.seq_len + 1 if self.truncate else None)
        except text_lib.ImageCountError as e:
            raise BadRecord("multiple_images" if _placeholders(turns) > 1 else "malformed", str(e)) from e
        except ValueError as e:
            raise BadRecord("malformed", str(e)) from e
        ids, mask = encoded.input_ids, encoded.loss_mask
        image_ids = sum(tiles) * self.tokens_per_tile + 2 * len(tiles)
        special = set(self._special_ids[s] for s in (text_lib.IMG_START, text_lib.IMG_END, text_lib.IMG_CONTEXT))
        cut_image = int(np.isin(ids, list(special)).sum()) != image_ids
        if len(ids) - 1 > self.seq_len or not mask[1:].any() or cut_image:
            raise BadRecord("too_long", f"{len(ids)} ids for rows of {self.seq_len} positions"
                            + ("; the cut removed image tokens" if cut_image else ""))
        example = {"index": np.int64(index), "ids": ids, "loss_mask": mask}
        if tiled is not None:
            example.update(pixels=tiled.pixels, tile_mask=tiled.tile_mask)
        return example


def _placeholders(turns) -> int:
    return sum(str(t.get("value", "")).count(text_lib.IMAGE_PLACEHOLDER) for t in turns if isinstance(t, dict))


def record_source(kind: str, opts: dict):
    """The conversation records at opts["path"]: "llava" JSON/JSONL or "arrayrecord" shards (whose
    info.json supplies opts["image_root"] when none is set)."""
    if kind == "llava":
        return sources.JsonConversations(opts["path"])
    if not opts["image_root"] and os.path.isdir(opts["path"]):
        opts["image_root"] = sources.read_info(opts["path"]).get("image_root") or ""
    return sources.arrayrecord_source(opts["path"])


def decode_json(raw: bytes):
    record = sources.parse_record(raw)
    return record, record.get("image")


def decode_arrayrecord(raw: bytes):
    record, image = sources.decode_record(raw)
    return record, image if image is not None else record.get("image")


def decode_shapes(record: dict):
    return record, record["image"]


class ShapesClassMap:
    """(index, shapes record) -> {"index", "pixels" [Tt, Tt, 3], "pixel_mask", "label"}."""

    def __init__(self, opts: dict):
        self.anyres = anyres_config(opts)

    def __call__(self, item) -> dict:
        index, record = item
        view = image_lib.preprocess_anyres(record["image"], self.anyres, with_teacher=True)
        return {"index": np.int64(index), "pixels": view.teacher_pixels, "pixel_mask": view.teacher_mask,
                "label": np.int32(record["label"])}


class ImageClassMap:
    """((index, TFDS features), rng) -> {"index", "pixels" [s, s, 3], "label", "mix_seed"} or
    {"bad": kind}; mix_seed (uint32, from the element's own rng) seeds the batch's mixing."""

    def __init__(self, opts: dict):
        self.size, self.augment, self.crop_pct = opts["image_size"], opts["augment"], opts["crop_pct"]
        self.image_key, self.label_key = opts["image_key"], opts["label_key"]
        self.policy = augment_lib.parse_rand_augment(opts["rand_augment"])
        self.random_erase = opts["random_erase"]

    def __call__(self, item, rng: np.random.Generator) -> dict:
        index, features = item
        try:
            if self.image_key not in features or self.label_key not in features:
                raise BadRecord("malformed", f"features {sorted(features)} lack {self.image_key!r} "
                                f"or {self.label_key!r}")
            image = _load_image(bytes(features[self.image_key]))
        except BadRecord as e:
            return {"bad": e.kind}
        if self.augment:
            pixels = image_lib.imagenet_train_transform(
                image, rng, self.size,
                augment=None if self.policy is None else lambda im: augment_lib.rand_augment(im, rng, self.policy))
            pixels = augment_lib.random_erasing(pixels, rng, self.random_erase)
        else:
            pixels = image_lib.imagenet_eval_transform(image, self.size, self.crop_pct)
        return {"index": np.int64(index), "pixels": pixels, "label": np.int32(features[self.label_key]),
                "mix_seed": np.uint32(rng.integers(0, 2 ** 32))}


class MixingStacker(packing.Stacker):
    """packing.Stacker whose batch gets label_probs [b, C] and, with opts["augment"] and when
    full, mixup / cutmix (augment.mix_batch) seeded by its first row's mix_seed, so a resumed
    run mixes alike. A batch with padding rows (the end of a finite pass) is only smoothed;
    without augment label_probs is the one-hot label."""

    def __init__(self, batch_size: int, pad: dict, num_classes: int, opts: dict):
        super().__init__(batch_size, dict(pad, mix_seed=np.uint32(0)))
        self.num_classes, self.opts = num_classes, opts

    def emit(self) -> dict[str, np.ndarray]:
        out = super().emit()
        o, seed = self.opts, out.pop("mix_seed")[0]
        mix = o["augment"] and bool((out["label"] >= 0).all())
        out["pixels"], out["label_probs"], _ = augment_lib.mix_batch(
            out["pixels"], out["label"], np.random.default_rng(seed), self.num_classes,
            o["mixup"] if mix else 0.0, o["cutmix"] if mix else 0.0, o["mix_prob"], o["mix_switch_prob"],
            o["label_smoothing"] if o["augment"] else 0.0)
        return out


# ---- assembly -------------------------------------------------------------------------------

class _RepeatedAugmentation(grain.MapDataset):
    """Position g of epoch e = g // n reads parent[e * n + (g % n) // repeats]: each epoch (n
    elements) takes the first ceil(n / repeats) records of the parent's epoch-e order, each
    `repeats` times in a row."""

    def __init__(self, parent: grain.MapDataset, repeats: int):
        super().__init__(parent)
        self._repeats = repeats

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        return self._parent[index // n * n + index % n // self._repeats]


class _WithIndex:
    """(index, record) -> (record's index in the source, record); grain hands later
    epochs indices past the end (it reads source[index % len])."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, index: int, record):
        return index % self.size, record


def build(source, transform: Callable, make_batcher: Callable[[], packing.Batcher], opts: dict,
          process_index: int, process_count: int, random: bool = False,
          what: str = "the data") -> packing.BatchIterator:
    """The pipeline of the module docstring over any random-access `source`, named `what`
    in errors."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if opts["global_batch"] % process_count:
        raise ValueError(f"config.data.global_batch={opts['global_batch']} does not split over "
                         f"{process_count} processes")
    if len(source) < process_count:
        raise ValueError(f"the data has {len(source)} records, fewer than the {process_count} processes")
    ds = grain.MapDataset.source(source).map_with_index(_WithIndex(len(source)))
    ds = ds[process_index::process_count]
    per_pass = len(ds)
    if opts["shuffle"]:
        ds = ds.shuffle(seed=opts["seed"])
    if opts["repeated_aug"] > 1:
        ds = _RepeatedAugmentation(ds, opts["repeated_aug"])
    ds = ds.repeat(opts["num_epochs"] or None)
    ds = ds.random_map(transform, seed=opts["seed"]) if random else ds.map(transform)
    # Small buffers: an element is ~9 MB at 672 px, and every worker process holds
    # its own read buffer plus its output buffer.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=opts["read_threads"],
                                              prefetch_buffer_size=2 * opts["read_threads"]))
    if opts["num_workers"]:
        from absl import flags

        # grain's worker processes read absl flags; outside an absl app nobody
        # parsed them, so take the defaults rather than fail.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=opts["num_workers"],
                                                         per_worker_buffer_size=4))
    limit = min(per_pass, opts["max_bad_run"])

    def describe(n: int, kinds: str) -> str:
        why = (f"a whole pass over this host's {per_pass} records" if n >= per_pass else
               f"config.data.max_bad_run={opts['max_bad_run']}; raise it if such runs are expected")
        return (f"{n} records in a row of {what} were bad, none good ({why}); skipped by kind: {kinds}. "
                "Fix the data or config.data (path, image_root, tokenizer, template, seq_len, overlong)")

    return iter(packing.BatchIterDataset(it, make_batcher, limit, describe))


def make_data(config, process_index: int, process_count: int) -> packing.BatchIterator:
    """This host's iterator of host batches for config.data (module docstring)."""
    if config.data["name"] in UNPAIRED_NAMES:
        from evejax.data import unpaired

        return unpaired.make_data(config, process_index, process_count)
    opts = config_options(config)
    name, b = opts["name"], opts["global_batch"] // max(process_count, 1)
    if name in CONVERSATION_NAMES:
        if name in ("llava", "arrayrecord"):
            source = record_source(name, opts)
            decode = decode_json if name == "llava" else decode_arrayrecord
        else:
            task = "caption" if name == "shapes_caption" else "qa"
            source, decode = _shapes_source(task, opts), decode_shapes
        pad_id = make_tokenizer(opts["tokenizer"]).pad_id
        if opts["template"] == HOVLE_TEMPLATE:
            slots, t = tiling_config(opts).max_slots, opts["tile_size"]
            fields = {"pixels": np.zeros((slots, t, t, 3), np.float32), "tile_mask": np.zeros(slots, bool)}
            transform = HoVLEConversationMap(decode, opts)
        else:
            blank = image_lib.blank_anyres(anyres_config(opts))
            fields = {"pixels": blank.pixels, "pixel_mask": blank.mask}
            if opts["with_teacher"]:
                fields.update(teacher_pixels=blank.teacher_pixels, teacher_mask=blank.teacher_mask)
            transform = ConversationMap(decode, opts)
        what = opts["path"] or name
        if opts["image_root"]:
            what += f" (images under {opts['image_root']})"
        return build(source, transform,
                     lambda: packing.SequencePacker(b, opts["seq_len"], opts["pack"], pad_id, fields,
                                                    opts["with_ids"]),
                     opts, process_index, process_count, what=what)
    if name == "shapes_class":
        t = opts["teacher_image_size"]
        pad = {"pixels": np.zeros((t, t, 3), np.float32), "pixel_mask": np.zeros((t, t), np.float32),
               "label": np.int32(-1)}
        return build(_shapes_source("class", opts), ShapesClassMap(opts), lambda: packing.Stacker(b, pad),
                     opts, process_index, process_count)
    s = opts["image_size"]
    pad = {"pixels": np.zeros((s, s, 3), np.float32), "label": np.int32(-1), "index": np.int64(-1)}
    source = sources.tfds_source(opts["tfds_name"], opts["split"], opts["tfds_dir"] or None, opts["image_key"])
    num_classes = sources.tfds_num_classes(source, opts["label_key"])
    return build(source, ImageClassMap(opts), lambda: MixingStacker(b, pad, num_classes, opts), opts,
                 process_index, process_count, random=True, what=f"TFDS {opts['tfds_name']} {opts['split']}")


def _shapes_source(task: str, opts: dict) -> shapes.ShapesSource:
    return shapes.ShapesSource(task, opts["split"], opts["num_examples"], opts["seed"],
                               opts["min_side"], opts["max_side"], opts["qa_rounds"])
