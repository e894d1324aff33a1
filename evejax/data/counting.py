"""A generated counting set: the label is how many cells are filled, so it needs the whole image.

Image `index` of a split is drawn from a generator seeded by (seed, split, index), so any
example can be produced on its own (random access for grain):

  image  S x S RGB, S = config.data.max_side (a multiple of CELL), white, on a grid of
         (S / CELL)^2 cells of CELL = 8 px; n = label + 1 of them (label uniform in
         [0, NUM_CLASSES)) hold one square each, 4-6 px, at a random offset inside its cell,
         in one of the shapes colours (evejax/data/shapes.py COLOURS). With patch 8 every image
         token sees one cell, so no token alone knows the label: a classifier must aggregate
         all of them, which is where a causal model's over-focus on a few keys hurts.
  label  int32 in [0, NUM_CLASSES): the number of filled cells minus one (task "count").

With `distractors` = D > 0 (config.data.distractors) the task is to count the red squares:
n = label + 1 squares are red, and 0 to D more squares (uniform) in the other colours sit in
other cells, so a token must also tell a target from a distractor.

With `task="majority"` (config.data.counting_task) every cell holds a square, its colour drawn
uniformly from the 4 colours; the label (in [0, 4)) is the colour with the most squares, ties
rejected. The margin is usually a few cells out of (S / CELL)^2 and the squares' areas vary,
so the class token has to weigh every cell alike: attention on a few cells is a small sample
of the vote and often names the wrong colour.

With `task="tetromino"` one tetromino of 4 edge-adjacent cells (FIGURES: I, O, T, S, L; any
rotation or mirror image, so S/Z and L/J are one class each) sits at a random place; the label
(in [0, 5)) is its kind. `task="bar"`: a bar of 3 cells instead, across, down or along either
diagonal, the label (in [0, 4)) its direction (no turns: the direction is the label). `distractors` = D adds 0 to D (uniform) single squares, each in a cell
with no filled cell among its 8 neighbours, and every square takes a random colour: only the
arrangement of neighbouring cells (1 token apart across, `S / CELL` tokens down, in raster
order) names the label, the local structure a learned locality prior is meant to find.

With `task="stripes"` the cells lie on stripes of one direction across the whole grid (across,
down, diagonal, antidiagonal: the label, in [0, 4)), one line in every 3 or 4 (random period and
phase); a cell on a stripe is filled with probability STRIPE_ON, any other cell with STRIPE_OFF,
each square in a random colour. The evidence is local (a filled cell's neighbour 1, S / CELL - 1,
S / CELL or S / CELL + 1 tokens back is filled more often along the stripes) and spread over the
whole image, so a model does best by checking neighbours everywhere and pooling all of it.

Splits: an image belongs to "heldout" when a hash of its exact layout (cells, offsets,
sizes, colours) falls in HELDOUT_BUCKETS of NUM_BUCKETS buckets, else to "train"; each
split rejects candidates of the other, so no held-out image is ever trained on.

Host batch (`make_data`, config.data.name = "evejax.data.counting:make_data"): pixels float32
[b, S, S, 3] (ImageNet-normalised, as the DAN classifiers expect), label int32 [b] and its
one-hot label_probs float32 [b, NUM_CLASSES] (the dan trainer's batch carries both),
b = global_batch / process_count; endless. With config.data.train_images = N > 0 the batches
draw only the first N images of the split (a fixed training set for a low-data regime),
reshuffled every epoch (grain shuffle seeded by config.data.seed).
"""
from __future__ import annotations

import hashlib

import grain
import numpy as np

from evejax.data import shapes
from evejax.data.image import IMAGENET_MEAN, IMAGENET_STD

CELL = 8
NUM_CLASSES = 10
NUM_BUCKETS, HELDOUT_BUCKETS = 10, 1
SPLITS = ("train", "heldout")
TASKS = ("count", "majority", "tetromino", "bar", "stripes")
# stripes, one per label: cell (row, col) -> which line of that direction it lies on; p(filled) on / off a stripe
STRIPES = ((lambda r, c: r), (lambda r, c: c), (lambda r, c: r - c), (lambda r, c: r + c))
STRIPE_ON, STRIPE_OFF = 0.7, 0.1
# task -> (the figures, their (row, col) cells, one per label; whether a figure appears turned / mirrored)
FIGURES = {"tetromino": ({"I": ((0, 0), (0, 1), (0, 2), (0, 3)), "O": ((0, 0), (0, 1), (1, 0), (1, 1)),
                          "T": ((0, 0), (0, 1), (0, 2), (1, 1)), "S": ((0, 1), (0, 2), (1, 0), (1, 1)),
                          "L": ((0, 0), (1, 0), (2, 0), (2, 1))}, True),
           "bar": ({"across": ((0, 0), (0, 1), (0, 2)), "down": ((0, 0), (1, 0), (2, 0)),
                    "diagonal": ((0, 0), (1, 1), (2, 2)), "antidiagonal": ((0, 2), (1, 1), (2, 0))}, False)}
NUM_EXAMPLES = 2 ** 40  # endless in practice; random access needs a length
_COLOURS = np.array(list(shapes.COLOURS.values()), np.uint8)


def image(index: int, split: str = "train", seed: int = 0, side: int = 64,
          distractors: int = 0, task: str = "count") -> tuple[np.ndarray, int]:
    """(uint8 [side, side, 3], label) of image `index` of `split`."""
    if split not in SPLITS:
        raise ValueError(f"counting split {split!r} is not known; use one of {SPLITS}")
    if task not in TASKS:
        raise ValueError(f"counting task {task!r} (config.data.counting_task) is not known; use one of {TASKS}")
    if task in ("majority", "stripes") and distractors:
        raise ValueError(f"counting task {task!r} draws every cell itself, so it takes no distractors; "
                         "set config.data.distractors=0")
    if side % CELL or side < 4 * CELL:
        raise ValueError(f"counting images need a side that is a multiple of {CELL} and at least {4 * CELL} "
                         f"(config.data.max_side), got {side}")
    grid = side // CELL
    if distractors < 0 or NUM_CLASSES + distractors > grid * grid:
        raise ValueError(f"counting distractors={distractors} must be >= 0 and leave room for {NUM_CLASSES} "
                         f"targets among the {grid * grid} cells of a {side} px image")
    rng = np.random.default_rng((seed, SPLITS.index(split), int(index)))
    while True:
        if task == "majority":
            filled = grid * grid
            cells = np.arange(filled)
            colours = rng.integers(len(_COLOURS), size=filled)
            votes = np.bincount(colours, minlength=len(_COLOURS))
            if (votes == votes.max()).sum() > 1:
                continue
            label = int(votes.argmax())
            sizes, offsets = _squares(rng, filled)
        elif task == "stripes":
            label, cells, sizes, offsets, colours = _stripes_layout(rng, grid)
        elif task in FIGURES:
            label, cells, sizes, offsets, colours = _figure_layout(rng, grid, distractors, *FIGURES[task])
        else:
            label, cells, sizes, offsets, colours = _count_layout(rng, grid, distractors)
        layout = np.concatenate([np.sort(cells), sizes, offsets.ravel(), colours]).astype(np.int32)
        bucket = int.from_bytes(hashlib.blake2b(layout.tobytes(), digest_size=8).digest(), "little") % NUM_BUCKETS
        if (bucket < HELDOUT_BUCKETS) == (split == "heldout"):
            break
    canvas = np.full((side, side, 3), 255, np.uint8)
    for cell, size, (dy, dx), colour in zip(cells, sizes, offsets, colours):
        y, x = (cell // grid) * CELL + dy, (cell % grid) * CELL + dx
        canvas[y:y + size, x:x + size] = _COLOURS[colour]
    return canvas, label


def _squares(rng, n: int):
    """(sizes [n], offsets [n, 2]) of n squares, 4-6 px, each at a random place inside its cell."""
    sizes = rng.integers(4, 7, size=n)
    return sizes, rng.integers(1, CELL - sizes[:, None], size=(n, 2))


def _count_layout(rng, grid: int, distractors: int):
    label = int(rng.integers(NUM_CLASSES))
    extra = int(rng.integers(distractors + 1)) if distractors else 0
    filled = label + 1 + extra
    cells = rng.choice(grid * grid, size=filled, replace=False)
    sizes, offsets = _squares(rng, filled)
    if distractors:  # the targets red (colour 0), the distractors any other colour
        colours = np.concatenate([np.zeros(label + 1, np.int64), rng.integers(1, len(_COLOURS), size=extra)])
    else:
        colours = rng.integers(len(_COLOURS), size=filled)
    return label, cells, sizes, offsets, colours


def _figure_layout(rng, grid: int, distractors: int, figures: dict, turned: bool):
    label = int(rng.integers(len(figures)))
    shape = np.array(list(figures.values())[label])
    if turned:
        for _ in range(int(rng.integers(4))):  # a quarter turn: (row, col) -> (col, -row)
            shape = np.stack([shape[:, 1], -shape[:, 0]], 1)
        if rng.integers(2):
            shape[:, 1] *= -1
    shape -= shape.min(0)
    top, left = (int(rng.integers(grid - extent)) for extent in shape.max(0))
    filled = np.zeros((grid + 2, grid + 2), bool)  # a 1-cell border so the 3 x 3 look-around needs no clipping
    filled[shape[:, 0] + top + 1, shape[:, 1] + left + 1] = True
    for _ in range(int(rng.integers(distractors + 1)) if distractors else 0):
        crowded = np.lib.stride_tricks.sliding_window_view(filled, (3, 3)).any((-2, -1))
        free = np.flatnonzero(~crowded)
        if not free.size:
            break
        cell = int(rng.choice(free))
        filled[cell // grid + 1, cell % grid + 1] = True
    rows, cols = np.nonzero(filled[1:-1, 1:-1])
    cells = rows * grid + cols
    sizes, offsets = _squares(rng, cells.size)
    return label, cells, sizes, offsets, rng.integers(len(_COLOURS), size=cells.size)


def _stripes_layout(rng, grid: int):
    label = int(rng.integers(len(STRIPES)))
    period = int(rng.integers(3, 5))
    r, c = np.divmod(np.arange(grid * grid), grid)
    on = STRIPES[label](r, c) % period == rng.integers(period)
    cells = np.flatnonzero(rng.random(grid * grid) < np.where(on, STRIPE_ON, STRIPE_OFF))
    sizes, offsets = _squares(rng, cells.size)
    return label, cells, sizes, offsets, rng.integers(len(_COLOURS), size=cells.size)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 ImageNet-normalised."""
    return ((pixels.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD))


def batch(indices, split: str = "heldout", seed: int = 0, side: int = 64,
          distractors: int = 0, task: str = "count") -> dict[str, np.ndarray]:
    """{"pixels" [n, side, side, 3] float32, "label" [n] int32} of the given images."""
    images, labels = zip(*(image(i, split, seed, side, distractors, task) for i in indices))
    return {"pixels": normalize(np.stack(images)), "label": np.array(labels, np.int32)}


class CountingSource:
    """A random-access source: `source[i]` -> one example (unbatched arrays)."""

    def __init__(self, split: str, seed: int, side: int, distractors: int = 0, task: str = "count"):
        image(0, split, seed, side, distractors, task)  # checks the arguments now, not in a worker
        self.split, self.seed, self.side, self.distractors, self.task = split, seed, side, distractors, task

    def __len__(self) -> int:
        return NUM_EXAMPLES

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        pixels, label = image(index, self.split, self.seed, self.side, self.distractors, self.task)
        return {"pixels": normalize(pixels), "label": np.int32(label),
                "label_probs": np.eye(NUM_CLASSES, dtype=np.float32)[label]}


def make_data(config, process_index: int, process_count: int):
    """This process's endless iterator of host batches, with get_state / set_state."""
    d = config.data
    if d.global_batch % process_count:
        raise ValueError(f"config.data.global_batch={d.global_batch} does not split over {process_count} processes")
    if d.train_images < 0:
        raise ValueError(f"config.data.train_images must be >= 0 (0: a new image every draw), got {d.train_images}")
    dataset = grain.MapDataset.source(CountingSource(d.split, d.seed, d.max_side, d.distractors, d.counting_task))
    if d.train_images:  # a small fixed set: its epochs one after the other, each in a new order
        dataset = dataset[:d.train_images].shuffle(seed=d.seed).repeat()
    dataset = dataset[process_index::process_count]
    dataset = dataset.batch(d.global_batch // process_count, drop_remainder=True)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=4)))
