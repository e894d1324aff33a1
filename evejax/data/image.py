"""Image decoding and preprocessing in numpy/PIL (no JAX).

EVE any-resolution view (`preprocess_anyres`), following the official
`process_images` / `LazySupervisedDataset.__getitem__` of EVEv1:

  input   a decoded RGB `PIL.Image` of any size (width W, height H)
  output  `AnyResImage` with
            pixels          float32 [S, S, 3]   CLIP-normalised, S = image_size (672; 1344 for HD)
            mask            float32 [S, S]      1 = real image, 0 = padding
            grid            (h, w)              pooled patch grid of the valid region
            teacher_pixels  float32 [T, T, 3]   T = teacher_image_size (336), the CLIP view
            teacher_mask    float32 [T, T]
          `AnyResImage.chw4()` / `teacher_chw4()` give the official 4-channel
          [4, S, S] layout (RGB + mask) that the PyTorch VisionTokenizer reads.

The layout is decided at the teacher scale and multiplied up: the long edge
becomes exactly T, the short edge is rounded up to whole teacher patches, the
padding before the valid band is floor(free patches / 2) patches (so the band
is centred, with the odd patch after it), and the EVE view is the same layout
times ratio = S / T. Hence the short edge of the EVE view is a multiple of
teacher_patch_size * ratio (28 for 672, 56 for 1344) and the token count is
1 + h * (w + 1) (`num_image_tokens`).

InternVL dynamic tiling for HoVLE (`tile_image`), following the official
`dynamic_preprocess` / `find_closest_aspect_ratio` and the per-tile transform:

  input   a decoded RGB `PIL.Image` (width W, height H), `TilingConfig`
  output  `TiledImage` with
            pixels     float32 [N, t, t, 3]  ImageNet-normalised tiles, t = tile_size
                                             (448), N = cfg.max_slots (static)
            tile_mask  bool    [N]           True on the num_tiles real tiles
            grid       (i, j)                i tiles across, j down
            num_tiles  int                   i * j, + 1 thumbnail when i * j > 1
          Tiles are row-major over the (448 i) x (448 j) bicubic resize; the
          thumbnail (whole image bicubic to t x t, aspect not kept) comes last.
          HWC like EVE's views; padding slots are zeros.
          `pad_unit` > 0 (not official, which always stretches): letterbox
          instead, as EVE's any-res view does: the image keeps its aspect, its
          long side fills the canvas (grid or thumbnail), its short side is
          rounded up to whole units of pad_unit px and centred in whole units
          (pad_unit = the pixels of one LLM token, so a token never straddles
          the image's edge), on the ImageNet mean colour (0 once normalised).

ImageNet views for the DAN backbones (`imagenet_train_transform`,
`imagenet_eval_transform`): PIL image in, float32 [size, size, 3] out.

Undecodable input raises `BadImageError`, so pipelines can count and skip it.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = Union[str, os.PathLike, bytes]


class BadImageError(ValueError):
    """A record's image cannot be decoded (corrupt, truncated, empty, not an image)."""


def load_image(source: ImageSource) -> Image.Image:
    """Decodes a file path or encoded bytes into an RGB image, fully loaded.

    PIL decodes lazily, so `load()` is forced here: a truncated file must fail
    now, inside the pipeline's skip logic, not later inside a transform.
    """
    name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with stream, Image.open(stream) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError as e:
        raise BadImageError(f"image {name} does not exist: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode image {name}: {e}") from e
    if rgb.width == 0 or rgb.height == 0:
        raise BadImageError(f"image {name} is empty ({rgb.width}x{rgb.height})")
    return rgb


def normalize(pixels: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 [..., 3] -> float32 [..., 3]: x / 255, then per-channel (x - mean) / std."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclasses.dataclass(frozen=True)
class AnyResConfig:
    """Sizes of the EVE view and of the CLIP teacher view.

    Official: image_size 672 (HD 1344), patch_size 14, pool 2 (the CA1 window),
    teacher 336 with patch 14. A tiny config: image_size 32, patch_size 4,
    pool 2, teacher_image_size 16, teacher_patch_size 4.
    """

    image_size: int = 672
    patch_size: int = 14
    pool: int = 2
    teacher_image_size: int = 336
    teacher_patch_size: int = 14
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(f"AnyResConfig {self}: {what}")

        need(min(self.image_size, self.patch_size, self.pool,
                 self.teacher_image_size, self.teacher_patch_size) > 0, "all sizes must be positive")
        need(self.image_size % self.teacher_image_size == 0,
             "image_size must be a multiple of teacher_image_size")
        need(self.teacher_image_size % self.teacher_patch_size == 0,
             "teacher_image_size must be a multiple of teacher_patch_size")
        need(self.band_unit % (self.patch_size * self.pool) == 0,
             "teacher_patch_size * image_size / teacher_image_size must be a multiple of "
             "patch_size * pool, so the valid band covers whole pooled patches")

    @property
    def ratio(self) -> int:
        return self.image_size // self.teacher_image_size

    @property
    def band_unit(self) -> int:
        """Pixel granularity of the valid band and of the padding in the EVE view."""
        return self.teacher_patch_size * self.ratio

    @property
    def background(self) -> tuple:
        """Padding colour, as official: int(255 * mean) per channel ((122, 116, 104) for CLIP)."""
        return tuple(int(m * 255) for m in self.mean)


@dataclasses.dataclass(frozen=True)
class AnyResLayout:
    """Where the resized image sits in the square canvas of side `size`.

    The image is resized to (width, height); along the short axis it starts at
    `offset` and spans `valid` pixels; `landscape` says the short axis is the
    height (width > height), otherwise the width (this includes squares).
    """

    size: int
    width: int
    height: int
    offset: int
    valid: int
    landscape: bool


def anyres_layout(width: int, height: int, cfg: AnyResConfig = AnyResConfig(),
                  teacher: bool = False) -> AnyResLayout:
    """Layout of a width x height image in the EVE view (or the teacher view)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    long_edge, patch = cfg.teacher_image_size, cfg.teacher_patch_size
    landscape = width > height
    short, longer = (height, width) if landscape else (width, height)
    # Same float expression as official, so the ceil rounds identically.
    valid_patches = int(math.ceil(long_edge * short / longer / patch))
    pad_before = (long_edge // patch - valid_patches) // 2 * patch
    scale = 1 if teacher else cfg.ratio
    size, valid, offset = long_edge * scale, valid_patches * patch * scale, pad_before * scale
    resized = (size, valid) if landscape else (valid, size)
    return AnyResLayout(size=size, width=resized[0], height=resized[1], offset=offset,
                        valid=valid, landscape=landscape)


def grid_hw(height: int, width: int, cfg: AnyResConfig = AnyResConfig()) -> tuple[int, int]:
    """Pooled patch grid (rows, cols) EVE sees for a height x width image."""
    layout = anyres_layout(width, height, cfg)
    cell = cfg.patch_size * cfg.pool
    return layout.height // cell, layout.width // cell


def num_image_tokens(height: int, width: int, cfg: AnyResConfig = AnyResConfig()) -> int:
    """Length of the image span in the LLM sequence: CLS + h rows of (w patches + SPL)."""
    h, w = grid_hw(height, width, cfg)
    return 1 + h * (w + 1)


def _place(image: Image.Image, layout: AnyResLayout, cfg: AnyResConfig):
    """Resizes and pads one view; returns (uint8 [size, size, 3], float32 mask [size, size])."""
    resized = image.resize((layout.width, layout.height), Image.Resampling.BICUBIC)
    canvas = np.empty((layout.size, layout.size, 3), np.uint8)
    canvas[...] = np.asarray(cfg.background, np.uint8)
    mask = np.zeros((layout.size, layout.size), np.float32)
    band = slice(layout.offset, layout.offset + layout.valid)
    if layout.landscape:
        canvas[band, :] = np.asarray(resized)
        mask[band, :] = 1.0
    else:
        canvas[:, band] = np.asarray(resized)
        mask[:, band] = 1.0
    return canvas, mask


@dataclasses.dataclass(frozen=True)
class AnyResImage:
    pixels: np.ndarray
    mask: np.ndarray
    grid: tuple
    teacher_pixels: np.ndarray | None
    teacher_mask: np.ndarray | None

    @property
    def num_tokens(self) -> int:
        """Image-span length; 0 for `blank_anyres`, whose features are spliced in empty."""
        h, w = self.grid
        return 1 + h * (w + 1) if h and w else 0

    def chw4(self) -> np.ndarray:
        """Official layout of the EVE view: float32 [4, S, S], channels RGB + mask."""
        return np.concatenate([self.pixels.transpose(2, 0, 1), self.mask[None]], 0)

    def teacher_chw4(self) -> np.ndarray:
        """Official layout of the teacher view: float32 [4, T, T]."""
        return np.concatenate([self.teacher_pixels.transpose(2, 0, 1), self.teacher_mask[None]], 0)


def preprocess_anyres(image: Image.Image, cfg: AnyResConfig = AnyResConfig(),
                      with_teacher: bool = True) -> AnyResImage:
    """EVE view (and the CLIP teacher view) of one RGB image; see the module docstring."""
    image = image.convert("RGB")
    layout = anyres_layout(image.width, image.height, cfg)
    pixels, mask = _place(image, layout, cfg)
    cell = cfg.patch_size * cfg.pool
    grid = (layout.height // cell, layout.width // cell)
    teacher_pixels = teacher_mask = None
    if with_teacher:
        # Resized from the raw image, not from the EVE view, as official.
        teacher_layout = anyres_layout(image.width, image.height, cfg, teacher=True)
        teacher_uint8, teacher_mask = _place(image, teacher_layout, cfg)
        teacher_pixels = normalize(teacher_uint8, cfg.mean, cfg.std)
    return AnyResImage(pixels=normalize(pixels, cfg.mean, cfg.std), mask=mask, grid=grid,
                       teacher_pixels=teacher_pixels, teacher_mask=teacher_mask)


def blank_anyres(cfg: AnyResConfig = AnyResConfig()) -> AnyResImage:
    """Stand-in for a text-only sample: background colour everywhere, all-zero masks."""
    def view(size):
        canvas = np.empty((size, size, 3), np.uint8)
        canvas[...] = np.asarray(cfg.background, np.uint8)
        return normalize(canvas, cfg.mean, cfg.std), np.zeros((size, size), np.float32)

    pixels, mask = view(cfg.image_size)
    teacher_pixels, teacher_mask = view(cfg.teacher_image_size)
    return AnyResImage(pixels=pixels, mask=mask, grid=(0, 0),
                       teacher_pixels=teacher_pixels, teacher_mask=teacher_mask)


class TooManyTilesError(ValueError):
    """More tiles than the static tile slots of the config."""


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """InternVL dynamic tiling. `max_tiles` is the official max_dynamic_patch (the
    grid's i * j limit; official class default 6); `max_slots`,
    the static tile dimension of a batch, adds the thumbnail's slot. `pad_unit`:
    0 stretches the image to the canvas (official), > 0 letterboxes it (module docstring)."""

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    pad_unit: int = 0

    def __post_init__(self):
        if self.tile_size <= 0 or not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"TilingConfig {self}: need tile_size > 0 and 1 <= min_tiles <= max_tiles")
        if self.pad_unit < 0 or (self.pad_unit and self.tile_size % self.pad_unit):
            raise ValueError(f"TilingConfig {self}: pad_unit must be 0 (stretch) or divide tile_size")

    @property
    def max_slots(self) -> int:
        return self.max_tiles + (self.use_thumbnail and self.max_tiles > 1)


def closest_grid(width: int, height: int, cfg: TilingConfig = TilingConfig()) -> tuple[int, int]:
    """The official tile grid (i across, j down) of a width x height image.

    Among grids with min_tiles <= i * j <= max_tiles, those whose i / j is
    nearest W / H (the same float |W / H - i / j| as official); of these the
    largest with W * H > t^2 * i * j / 2, else the smallest. This is what the
    official area-ordered scan with its equal-distance tie-break ends on.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    grids = [(i, j) for i in range(1, cfg.max_tiles + 1) for j in range(1, cfg.max_tiles // i + 1)
             if i * j >= cfg.min_tiles]
    nearest = min(abs(aspect - i / j) for i, j in grids)
    tied = sorted((g for g in grids if abs(aspect - g[0] / g[1]) == nearest), key=lambda g: g[0] * g[1])
    large_enough = [g for g in tied if width * height > 0.5 * cfg.tile_size ** 2 * g[0] * g[1]]
    return large_enough[-1] if large_enough else tied[0]


def num_tiles(width: int, height: int, cfg: TilingConfig = TilingConfig()) -> int:
    """Tiles of a width x height image, the thumbnail included."""
    i, j = closest_grid(width, height, cfg)
    return i * j + (cfg.use_thumbnail and i * j > 1)


@dataclasses.dataclass(frozen=True)
class TiledImage:
    pixels: np.ndarray
    tile_mask: np.ndarray
    grid: tuple
    num_tiles: int


def check_tile_count(n: int, max_slots: int) -> None:
    if n > max_slots:
        raise TooManyTilesError(f"{n} tiles exceed the {max_slots} tile slots of the config; raise the "
                                "config's max_tiles (slots = max_tiles + 1 thumbnail) or tile with a "
                                "smaller max_tiles")


def pad_tiles(tiles: np.ndarray, max_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, t, t, 3] -> ([max_slots, t, t, 3] zero-padded, bool tile_mask [max_slots])."""
    n = len(tiles)
    check_tile_count(n, max_slots)
    pixels = np.zeros((max_slots,) + tiles.shape[1:], np.float32)
    pixels[:n] = tiles
    return pixels, np.arange(max_slots) < n


def _fit(image: Image.Image, width: int, height: int, cfg: TilingConfig) -> np.ndarray:
    """uint8 [height, width, 3]: the image stretched to the canvas, or letterboxed (cfg.pad_unit)."""
    if not cfg.pad_unit:
        return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    unit = cfg.pad_unit
    if image.width * height >= image.height * width:   # wider than the canvas: the width fills it
        w, h = width, min(height, unit * -(-image.height * width // (image.width * unit)))
    else:
        w, h = min(width, unit * -(-image.width * height // (image.height * unit))), height
    x, y = (width - w) // unit // 2 * unit, (height - h) // unit // 2 * unit
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[...] = np.asarray([int(m * 255) for m in cfg.mean], np.uint8)
    canvas[y:y + h, x:x + w] = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
    return canvas


def tile_image(image: Image.Image, cfg: TilingConfig = TilingConfig(),
               max_slots: int | None = None) -> TiledImage:
    """Tiles of one image (module docstring), in `max_slots` slots (cfg.max_slots by default)."""
    image = image.convert("RGB")
    i, j = closest_grid(image.width, image.height, cfg)
    max_slots = cfg.max_slots if max_slots is None else max_slots
    check_tile_count(num_tiles(image.width, image.height, cfg), max_slots)
    t = cfg.tile_size
    resized = _fit(image, t * i, t * j, cfg)
    tiles = resized.reshape(j, t, i, t, 3).transpose(0, 2, 1, 3, 4).reshape(i * j, t, t, 3)
    if cfg.use_thumbnail and i * j > 1:
        # Official resizes each tile to t x t once more; at t x t that is PIL's copy, so skipped.
        thumbnail = _fit(image, t, t, cfg)
        tiles = np.concatenate([tiles, thumbnail[None]])
    pixels, tile_mask = pad_tiles(normalize(tiles, cfg.mean, cfg.std), max_slots)
    return TiledImage(pixels=pixels, tile_mask=tile_mask, grid=(i, j), num_tiles=len(tiles))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height), torchvision's RandomResizedCrop sampling:
    10 tries of area-fraction x log-uniform aspect ratio, else a centre crop with
    the aspect ratio clamped into `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def imagenet_train_transform(image: Image.Image, rng: np.random.Generator, size: int = 224,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip_prob: float = 0.5,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=None) -> np.ndarray:
    """Random resized crop (bicubic) + horizontal flip [+ `augment`, PIL -> PIL, e.g. RandAugment,
    as timm orders them] -> float32 [size, size, 3]."""
    image = image.convert("RGB")
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng, scale, ratio)
    crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    if rng.uniform() < hflip_prob:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if augment is not None:
        crop = augment(crop)
    return normalize(np.asarray(crop), mean, std)


def imagenet_eval_transform(image: Image.Image, size: int = 224, crop_pct: float = 0.875,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Short side to floor(size / crop_pct) (bicubic), centre crop -> float32 [size, size, 3]."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    image = image.convert("RGB")
    short = math.floor(size / crop_pct)
    if image.width <= image.height:
        new_w, new_h = short, max(1, int(short * image.height / image.width))
    else:
        new_w, new_h = max(1, int(short * image.width / image.height)), short
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)))
    return normalize(pixels, mean, std)
