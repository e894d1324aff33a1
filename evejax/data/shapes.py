"""A generated vision-language set of coloured shapes (no download).

Scene `index` of a split is drawn from a generator seeded by (seed, split,
index), so any example can be produced on its own (random access for grain):

  image    RGB PIL image on a grid of CELL x CELL pixel cells: width and
           height are multiples of CELL in [min_side, max_side], the longer
           side (either one) equal to max_side, so aspect ratios 1:4 to 4:1;
           white background, 1 to 4 shapes (circle, square, triangle) in 4
           colours, at most one per cell, each 10-14 px and placed at random
           inside its cell with a margin; drawn without anti-aliasing, so
           every shape pixel has exactly its colour. With max_side equal to
           the EVE canvas (configs/demo.py: 64 px, patch 8, pool 2) the
           any-res view keeps the pixels as they are and every image token
           sees one cell.
  caption  "a red circle at the top left and a blue square on the right."
           (shapes in reading order of their cells, the order of the image
           tokens), for the pre-training stages
  qa       (question, one-word answer) rounds, 1 to 3 of distinct types (or,
           for training, up to MAX_ROUNDS of all the scene answers): count of
           shapes, colour of a named shape, shape of a named one, presence
           of a kind or a colour (yes/no), left/right and top/bottom of a
           named shape. A shape is named by the one attribute that singles
           it out in its scene ("the circle", "the red one").
  label    int in [0, NUM_CLASSES): kind and colour of the largest shape
           (CLASS_NAMES), e.g. to train a tiny vision teacher

Position words are used only where they are unambiguous: "left" means the
shape's bounding box lies entirely in the left half (likewise right, top,
bottom); otherwise the caption says "in the middle" for that axis and no
question asks about it. The largest shape is larger than the next by at least
LARGEST_MARGIN in area, so the label is well defined.

Splits: a candidate scene belongs to "heldout" when a hash of its exact
geometry falls in one of HELDOUT_BUCKETS of NUM_BUCKETS buckets, else to
"train"; each split rejects candidates of the other, so no held-out scene
can appear in train. `VOCABULARY` holds every word the captions, questions,
answers and the vicuna_v1 / plain templates use; `tokenizer()` is the fixed
`WordTokenizer` over it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw

from evejax.data.text import IMAGE_PLACEHOLDER, TEMPLATES, WordTokenizer

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (235, 200, 40)}
BACKGROUND = (255, 255, 255)
NUMBERS = ("zero", "one", "two", "three", "four")
MAX_SHAPES = 4
CLASS_NAMES = tuple(f"{colour} {kind}" for kind in KINDS for colour in COLOURS)
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "heldout")
NUM_BUCKETS, HELDOUT_BUCKETS = 10, 1
CELL = 16
MIN_SIZE, MAX_SIZE = 10, 14  # shape side in pixels; at least 1 px from its cell's edges
LARGEST_MARGIN = 1.15
# Fraction of its bounding box a shape covers, for the area comparison.
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x0: int      # bounding box: columns [x0, x0 + size), rows [y0, y0 + size)
    y0: int
    size: int

    @property
    def area(self) -> float:
        return _FILL[self.kind] * self.size ** 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: tuple[Shape, ...]

    def horizontal(self, s: Shape) -> str | None:
        if 2 * (s.x0 + s.size) <= self.width:
            return "left"
        if 2 * s.x0 >= self.width:
            return "right"
        return None

    def vertical(self, s: Shape) -> str | None:
        if 2 * (s.y0 + s.size) <= self.height:
            return "top"
        if 2 * s.y0 >= self.height:
            return "bottom"
        return None

    @property
    def largest(self) -> Shape:
        return max(self.shapes, key=lambda s: s.area)

    @property
    def label(self) -> int:
        s = self.largest
        return KINDS.index(s.kind) * len(COLOURS) + list(COLOURS).index(s.colour)

    def key(self) -> bytes:
        """Canonical bytes of the geometry: equal scenes have equal keys."""
        shapes = sorted((s.kind, s.colour, s.x0, s.y0, s.size) for s in self.shapes)
        return repr((self.width, self.height, shapes)).encode()

    def split(self) -> str:
        bucket = int.from_bytes(hashlib.blake2b(self.key(), digest_size=8).digest(), "little") % NUM_BUCKETS
        return "heldout" if bucket < HELDOUT_BUCKETS else "train"


def _candidate(rng: np.random.Generator, min_side: int, max_side: int) -> Scene | None:
    sides = (int(rng.integers(min_side // CELL, max_side // CELL + 1)) * CELL, max_side)
    width, height = sides if rng.integers(2) else sides[::-1]
    cols, rows = width // CELL, height // CELL
    n = int(rng.integers(1, min(MAX_SHAPES, rows * cols) + 1))
    boxes = []
    for cell in rng.permutation(rows * cols)[:n]:
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        dx, dy = (int(v) for v in rng.integers(1, CELL - size, size=2))
        boxes.append(((int(cell) % cols) * CELL + dx, (int(cell) // cols) * CELL + dy, size))
    shapes = tuple(Shape(KINDS[rng.integers(len(KINDS))], list(COLOURS)[rng.integers(len(COLOURS))], *box)
                   for box in boxes)
    areas = sorted((s.area for s in shapes), reverse=True)
    if len(areas) > 1 and areas[0] < LARGEST_MARGIN * areas[1]:
        return None
    return Scene(width, height, shapes)


def scene(index: int, split: str = "train", seed: int = 0, min_side: int = 16,
          max_side: int = 64) -> Scene:
    """Scene `index` of `split`: the first candidate of its generator that belongs to the split."""
    if split not in SPLITS:
        raise ValueError(f"shapes split {split!r} is not known; use one of {SPLITS}")
    if not CELL <= min_side <= max_side or max_side % CELL:
        raise ValueError(f"shapes sides need {CELL} <= min_side <= max_side with max_side a multiple of "
                         f"{CELL}, got {min_side}, {max_side}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    while True:
        s = _candidate(rng, min_side, max_side)
        if s is not None and s.split() == split:
            return s


def render(s: Scene) -> Image.Image:
    image = Image.new("RGB", (s.width, s.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in s.shapes:
        x1, y1 = shape.x0 + shape.size - 1, shape.y0 + shape.size - 1
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((shape.x0, shape.y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((shape.x0, shape.y0, x1, y1), fill=fill)
        else:
            draw.polygon([(shape.x0, y1), (x1, y1), ((shape.x0 + x1) / 2, shape.y0)], fill=fill)
    return image


def _place(s: Scene, shape: Shape) -> str:
    h, v = s.horizontal(shape), s.vertical(shape)
    if h and v:
        return f"at the {v} {h}"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle"


def caption(s: Scene) -> str:
    parts = [f"a {shape.name} {_place(s, shape)}"
             for shape in sorted(s.shapes, key=lambda t: (t.y0 // CELL, t.x0 // CELL))]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _questions(s: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every question type this scene answers unambiguously, one question per type.

    A shape is named by one attribute that singles it out ("the circle", "the
    red one"), and presence asks for one attribute ("a circle", "a red
    shape"), yes or no with equal odds unless the scene has every kind (or
    every colour), when the answer is yes."""
    kinds = [t.kind for t in s.shapes]
    colours = [t.colour for t in s.shapes]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    out = [("how many shapes are there?", NUMBERS[len(s.shapes)])]
    unique_kind = [t for t in s.shapes if kinds.count(t.kind) == 1]
    unique_colour = [t for t in s.shapes if colours.count(t.colour) == 1]
    if unique_kind:
        t = pick(unique_kind)
        out.append((f"what colour is the {t.kind}?", t.colour))
    if unique_colour:
        t = pick(unique_colour)
        out.append((f"what shape is the {t.colour} one?", t.kind))
    present = bool(rng.integers(2))
    if rng.integers(2):
        kind = pick([k for k in KINDS if (k in kinds) == present] or KINDS)
        out.append((f"is there a {kind}?", "yes" if kind in kinds else "no"))
    else:
        colour = pick([c for c in COLOURS if (c in colours) == present] or list(COLOURS))
        out.append((f"is there a {colour} shape?", "yes" if colour in colours else "no"))
    named = [(f"the {t.kind}", t) for t in unique_kind] + [(f"the {t.colour} one", t) for t in unique_colour]
    sided = [(n, t) for n, t in named if s.horizontal(t)]
    if sided:
        n, t = pick(sided)
        out.append((f"is {n} on the left or on the right?", s.horizontal(t)))
    stacked = [(n, t) for n, t in named if s.vertical(t)]
    if stacked:
        n, t = pick(stacked)
        out.append((f"is {n} at the top or at the bottom?", s.vertical(t)))
    return out


def _every_question(s: Scene) -> list[tuple[str, str]]:
    """Every question of the types above this scene answers: presence for every kind and colour,
    colour / shape / position for every shape that one attribute names."""
    kinds = [t.kind for t in s.shapes]
    colours = [t.colour for t in s.shapes]
    named = ([(f"the {t.kind}", t) for t in s.shapes if kinds.count(t.kind) == 1]
             + [(f"the {t.colour} one", t) for t in s.shapes if colours.count(t.colour) == 1])
    out = [("how many shapes are there?", NUMBERS[len(s.shapes)])]
    out += [(f"what colour is {n}?", t.colour) for n, t in named if not n.endswith(" one")]
    out += [(f"what shape is {n}?", t.kind) for n, t in named if n.endswith(" one")]
    out += [(f"is there a {k}?", "yes" if k in kinds else "no") for k in KINDS]
    out += [(f"is there a {c} shape?", "yes" if c in colours else "no") for c in COLOURS]
    out += [(f"is {n} on the left or on the right?", s.horizontal(t)) for n, t in named if s.horizontal(t)]
    out += [(f"is {n} at the top or at the bottom?", s.vertical(t)) for n, t in named if s.vertical(t)]
    return out


QA_ROUNDS = ("sample", "all")
MAX_ROUNDS = 8  # qa_rounds="all": at most this many of a scene's questions per conversation


def qa(s: Scene, index: int, split: str = "train", seed: int = 0, rounds: str = "sample") -> list[tuple[str, str]]:
    """(question, answer) rounds for scene `index` of `split`. "sample": 1 to 3 questions of
    distinct types (the held-out questions are these). "all", for training: MAX_ROUNDS of every
    question the scene answers (`_every_question`), in random order, so that every type also
    comes first, right after the image, and presence is asked both ways in most conversations."""
    if rounds not in QA_ROUNDS:
        raise ValueError(f"shapes qa_rounds {rounds!r} is not known; use one of {QA_ROUNDS}")
    rng = np.random.default_rng([seed, len(SPLITS) + SPLITS.index(split), index])
    if rounds == "all":
        every = _every_question(s)
        return [every[k] for k in rng.permutation(len(every))[:MAX_ROUNDS]]
    candidates = _questions(s, rng)
    n = int(rng.integers(1, 4))
    picks = rng.permutation(len(candidates))[:n]
    return [candidates[k] for k in sorted(picks)]


def caption_conversation(s: Scene) -> list[dict]:
    return [{"from": "human", "value": IMAGE_PLACEHOLDER},
            {"from": "gpt", "value": caption(s)}]


def qa_conversation(rounds: list[tuple[str, str]]) -> list[dict]:
    turns = []
    for k, (question, answer) in enumerate(rounds):
        turns.append({"from": "human", "value": (IMAGE_PLACEHOLDER + "\n" if k == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _vocabulary() -> tuple[str, ...]:
    """Sorted pieces of every template the generator uses (and the chat templates)."""
    words = set(KINDS) | {k + "s" for k in KINDS} | set(COLOURS) | set(NUMBERS)
    words |= {"left", "right", "top", "bottom", "middle", "yes", "no", "\n"}
    phrases = ["a at the on in and , .", "how many shapes are there?", "what colour is the",
               "what shape is the one?", "is there a shape?", "is the one on the left or on the right?",
               "is the one at the top or at the bottom?"]
    phrases += [t.system for t in TEMPLATES.values()] + [f"{r}:" for t in TEMPLATES.values() for r in t.roles if r]
    for phrase in phrases:
        words.update(WordTokenizer.split(phrase))
    return tuple(sorted(words))


VOCABULARY = _vocabulary()


def tokenizer() -> WordTokenizer:
    """The fixed word tokenizer of this set: ids depend only on VOCABULARY."""
    return WordTokenizer(VOCABULARY)


class ShapesSource:
    """Random-access source for grain: `source[i]` -> a LLaVA-style record dict

      {"id": "shapes-<split>-<i>", "image": PIL image, "label": int,
       "conversations": caption (task "caption") or QA rounds (task "qa"); none for "class"}
    """

    TASKS = ("caption", "qa", "class")

    def __init__(self, task: str, split: str = "train", num_examples: int = 100_000, seed: int = 0,
                 min_side: int = 16, max_side: int = 64, qa_rounds: str = "sample"):
        if task not in self.TASKS:
            raise ValueError(f"shapes task {task!r} is not known; use one of {self.TASKS}")
        if num_examples < 1:
            raise ValueError(f"config.data.num_examples must be positive, got {num_examples}")
        scene(0, split, seed, min_side, max_side)  # checks split and sides now, not in a worker
        if qa_rounds not in QA_ROUNDS:
            raise ValueError(f"config.data.qa_rounds must be one of {QA_ROUNDS}, got {qa_rounds!r}")
        self.qa_rounds = qa_rounds
        self.task, self.split, self.num_examples, self.seed = task, split, num_examples, seed
        self.min_side, self.max_side = min_side, max_side

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        s = scene(index, self.split, self.seed, self.min_side, self.max_side)
        record = {"id": f"shapes-{self.split}-{index}", "image": render(s), "label": s.label}
        if self.task == "caption":
            record["conversations"] = caption_conversation(s)
        elif self.task == "qa":
            record["conversations"] = qa_conversation(qa(s, index, self.split, self.seed, self.qa_rounds))
        return record
