"""ImageNet training augmentations of the DeiT / timm recipe (De-focus Attention Networks), in
NumPy and PIL, with explicit `np.random.Generator`s so that a resumed pipeline repeats them.

  rand_augment(image, rng, policy)   PIL RGB -> PIL RGB: timm's RandAugment ("rand-m9-mstd0.5-inc1":
                                     2 ops drawn with replacement from RAND_INCREASING_OPS, each
                                     applied with probability 0.5 at magnitude ~ N(9, 0.5) clipped to
                                     [0, 10]; affine ops bicubic, filled with the ImageNet mean)
  random_erasing(pixels, rng, prob)  float32 [H, W, 3] (normalised) -> same: timm's RandomErasing,
                                     mode "pixel", one box, area 2%..1/3, aspect 0.3..1/0.3, N(0, 1) fill
  smooth_labels(label, C, eps)       int [B] -> float32 [B, C]: 1 - eps + eps / C on the label, eps / C
                                     elsewhere; a padding row (label < 0) is all zero
  mix_batch(pixels, label, rng, ...) timm's Mixup in "batch" mode: one lambda for the whole batch,
                                     every row mixed with the row at the mirrored position (B-1-i);
                                     mixup with probability `prob`, switching to cutmix with
                                     probability `switch_prob`; cutmix's lambda is corrected to the
                                     pasted box's area. Returns pixels [B, H, W, 3] and label_probs
                                     lam * smooth(label) + (1 - lam) * smooth(mirrored label)
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
# timm fills exposed corners with round(255 * IMAGENET_DEFAULT_MEAN).
IMAGENET_FILL = (124, 116, 104)


def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.uniform() > 0.5 else value


def _affine(image, matrix, fill):
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BICUBIC,
                           fillcolor=fill)


def _solarize_add(image, add: int, threshold: int = 128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _enhance(kind):
    return lambda image, m, rng, fill: kind(image).enhance(max(0.1, 1.0 + _negate(m / MAX_LEVEL * 0.9, rng)))


# name -> (image, magnitude in [0, 10], rng, fill) -> image; the "increasing" variants, where a
# larger magnitude is always a stronger change (timm's _RAND_INCREASING_TRANSFORMS).
RAND_INCREASING_OPS = {
    "AutoContrast": lambda image, m, rng, fill: ImageOps.autocontrast(image),
    "Equalize": lambda image, m, rng, fill: ImageOps.equalize(image),
    "Invert": lambda image, m, rng, fill: ImageOps.invert(image),
    "Rotate": lambda image, m, rng, fill: image.rotate(_negate(m / MAX_LEVEL * 30.0, rng),
                                                       resample=Image.Resampling.BICUBIC, fillcolor=fill),
    "PosterizeIncreasing": lambda image, m, rng, fill: ImageOps.posterize(image, 4 - int(m / MAX_LEVEL * 4)),
    "SolarizeIncreasing": lambda image, m, rng, fill: ImageOps.solarize(image, 256 - int(m / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda image, m, rng, fill: _solarize_add(image, int(m / MAX_LEVEL * 110)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda image, m, rng, fill: _affine(image, (1, _negate(m / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0), fill),
    "ShearY": lambda image, m, rng, fill: _affine(image, (1, 0, 0, _negate(m / MAX_LEVEL * 0.3, rng), 1, 0), fill),
    "TranslateXRel": lambda image, m, rng, fill: _affine(
        image, (1, 0, _negate(m / MAX_LEVEL * 0.45, rng) * image.size[0], 0, 1, 0), fill),
    "TranslateYRel": lambda image, m, rng, fill: _affine(
        image, (1, 0, 0, 0, 1, _negate(m / MAX_LEVEL * 0.45, rng) * image.size[1]), fill),
}


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    prob: float = 0.5


def parse_rand_augment(spec: str) -> RandAugmentPolicy | None:
    """timm's policy string ("rand-m9-mstd0.5-inc1"; "" or "none": no RandAugment). Only the
    increasing op set is built here, so "inc1" is required."""
    if spec in ("", "none"):
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment policy {spec!r} must start with 'rand-' (timm's format)")
    fields: dict = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([\d.]+)", part)
        key, value = match.groups() if match else (part, "")
        if key == "m":
            fields["magnitude"] = float(value)
        elif key == "n":
            fields["num_ops"] = int(value)
        elif key == "mstd":
            fields["magnitude_std"] = float(value)
        elif key == "inc":
            if value != "1":
                raise ValueError(f"RandAugment policy {spec!r}: only the increasing ops (inc1) are implemented")
            fields["inc"] = True
        else:
            raise ValueError(f"RandAugment policy {spec!r}: unknown part {part!r} (known: m, n, mstd, inc)")
    if not fields.pop("inc", False):
        raise ValueError(f"RandAugment policy {spec!r}: add '-inc1' (only the increasing ops are implemented)")
    return RandAugmentPolicy(**fields)


def rand_augment(image: Image.Image, rng: np.random.Generator, policy: RandAugmentPolicy,
                 fill=IMAGENET_FILL) -> Image.Image:
    names = list(RAND_INCREASING_OPS)
    for k in rng.integers(0, len(names), policy.num_ops):
        if rng.uniform() > policy.prob:
            continue
        magnitude = policy.magnitude
        if policy.magnitude_std > 0:
            magnitude = rng.normal(magnitude, policy.magnitude_std)
        magnitude = min(max(magnitude, 0.0), MAX_LEVEL)
        image = RAND_INCREASING_OPS[names[k]](image, magnitude, rng, fill)
    return image


def random_erasing(pixels: np.ndarray, rng: np.random.Generator, prob: float, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3) -> np.ndarray:
    if prob <= 0 or rng.uniform() > prob:
        return pixels
    h, w, c = pixels.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target = rng.uniform(min_area, max_area) * h * w
        aspect = math.exp(rng.uniform(*log_aspect))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            pixels = pixels.copy()
            pixels[top:top + eh, left:left + ew] = rng.standard_normal((eh, ew, c)).astype(pixels.dtype)
            return pixels
    return pixels


def smooth_labels(label: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    label = np.asarray(label)
    off = smoothing / num_classes
    probs = np.full((len(label), num_classes), off, np.float32)
    real = label >= 0
    probs[np.flatnonzero(real), label[real]] = 1.0 - smoothing + off
    probs[~real] = 0.0
    return probs


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about (1 - lam) of the image, centred anywhere, clipped."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height)),
            int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width)))


def mix_batch(pixels: np.ndarray, label: np.ndarray, rng: np.random.Generator, num_classes: int,
              mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
              smoothing: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(pixels, label_probs, lam); see the module docstring."""
    lam = 1.0
    if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.uniform() < prob:
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.uniform() < switch_prob)
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
        mirrored = pixels[::-1]
        if use_cutmix:
            h, w = pixels.shape[1:3]
            top, bottom, left, right = cutmix_box(h, w, lam, rng)
            pixels = pixels.copy()
            pixels[:, top:bottom, left:right] = mirrored[:, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (h * w)
        else:
            pixels = (pixels * lam + mirrored * (1.0 - lam)).astype(pixels.dtype)
    probs = smooth_labels(label, num_classes, smoothing)
    return pixels, (lam * probs + (1.0 - lam) * probs[::-1]).astype(np.float32), lam
