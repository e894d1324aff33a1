"""A generated vision-language set of coloured shapes (no download).

Scene `index` of a split is drawn from a generator seeded by (seed, split,
index), so any example can be produced on its own (random access for grain):

  image    RGB PIL image, width and height each in [min_side, max_side]
           (any aspect ratio), white background, 1 to 4 non-overlapping
           shapes (circle, square, triangle) in 4 colours, drawn without
           anti-aliasing so every shape pixel has exactly its colour
  caption  "a red circle at the top left and a blue square on the right."
           (shapes from left to right), for the pre-training stages
  qa       1 to 3 (question, one-word answer) rounds: colour of a named
           shape, count of shapes or of one kind, presence yes/no, left/right
           and top/bottom of a named shape, kind of a coloured shape
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


def _overlaps(a: tuple, b: tuple) -> bool:
    """Boxes (x0, y0, size) closer than one pixel; the gap keeps shapes separate components."""
    ax, ay, asz = a
    bx, by, bsz = b
    return ax <= bx + bsz and bx <= ax + asz and ay <= by + bsz and by <= ay + asz


def _candidate(rng: np.random.Generator, min_side: int, max_side: int) -> Scene | None:
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    short = min(width, height)
    lo, hi = max(5, short // 6), max(5, short * 2 // 5)
    boxes: list[tuple] = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        size = int(rng.integers(lo, hi + 1))
        for _ in range(20):
            box = (int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1)), size)
            if not any(_overlaps(box, other) for other in boxes):
                boxes.append(box)
                break
    shapes = tuple(Shape(KINDS[rng.integers(len(KINDS))], list(COLOURS)[rng.integers(len(COLOURS))], *box)
                   for box in boxes)
    areas = sorted((s.area for s in shapes), reverse=True)
    if len(areas) > 1 and areas[0] < LARGEST_MARGIN * areas[1]:
        return None
    return Scene(width, height, shapes)


def scene(index: int, split: str = "train", seed: int = 0, min_side: int = 32,
          max_side: int = 64) -> Scene:
    """Scene `index` of `split`: the first candidate of its generator that belongs to the split."""
    if split not in SPLITS:
        raise ValueError(f"shapes split {split!r} is not known; use one of {SPLITS}")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"shapes sides need 16 <= min_side <= max_side, got {min_side}, {max_side}")
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
             for shape in sorted(s.shapes, key=lambda t: (t.x0 + t.size / 2, t.y0))]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _questions(s: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every question this scene answers unambiguously, one per type where possible."""
    kinds = [t.kind for t in s.shapes]
    colours = [t.colour for t in s.shapes]
    names = [t.name for t in s.shapes]
    out = [("how many shapes are there?", NUMBERS[len(s.shapes)])]
    kind = KINDS[rng.integers(len(KINDS))]
    out.append((f"how many {kind}s are there?", NUMBERS[kinds.count(kind)]))
    unique_kind = [t for t in s.shapes if kinds.count(t.kind) == 1]
    if unique_kind:
        t = unique_kind[rng.integers(len(unique_kind))]
        out.append((f"what colour is the {t.kind}?", t.colour))
    unique_colour = [t for t in s.shapes if colours.count(t.colour) == 1]
    if unique_colour:
        t = unique_colour[rng.integers(len(unique_colour))]
        out.append((f"what shape is the {t.colour} one?", t.kind))
    if rng.integers(2):
        out.append((f"is there a {names[rng.integers(len(names))]}?", "yes"))
    else:
        absent = [c for c in CLASS_NAMES if c not in names]
        out.append((f"is there a {absent[rng.integers(len(absent))]}?", "no"))
    unique = [t for t in s.shapes if names.count(t.name) == 1]
    sided = [t for t in unique if s.horizontal(t)]
    if sided:
        t = sided[rng.integers(len(sided))]
        out.append((f"is the {t.name} on the left or on the right?", s.horizontal(t)))
    stacked = [t for t in unique if s.vertical(t)]
    if stacked:
        t = stacked[rng.integers(len(stacked))]
        out.append((f"is the {t.name} at the top or at the bottom?", s.vertical(t)))
    return out


def qa(s: Scene, index: int, split: str = "train", seed: int = 0) -> list[tuple[str, str]]:
    """1 to 3 distinct-type (question, answer) rounds for scene `index` of `split`."""
    rng = np.random.default_rng([seed, len(SPLITS) + SPLITS.index(split), index])
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
               "what shape is the one?", "is there a?", "is the on the left or on the right?",
               "is the at the top or at the bottom?"]
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
                 min_side: int = 32, max_side: int = 64):
        if task not in self.TASKS:
            raise ValueError(f"shapes task {task!r} is not known; use one of {self.TASKS}")
        if num_examples < 1:
            raise ValueError(f"config.data.num_examples must be positive, got {num_examples}")
        scene(0, split, seed, min_side, max_side)  # checks split and sides now, not in a worker
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
            record["conversations"] = qa_conversation(qa(s, index, self.split, self.seed))
        return record
