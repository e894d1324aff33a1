"""Exact-match VQA evaluation of an EVE or HoVLE checkpoint on held-out shapes questions.

  evejax eval CHECKPOINT [--num-questions 500] [--batch-size 100] [--seed 0] [--show 5]
              [--temperature T --top-p P --top-k K --sample-seed S]   (default greedy)
              [--mesh data=2,fsdp=2,tensor=2]                         (default: one device)
  evejax eval CHECKPOINT --bench vqav2,gqa,pope,... --data-root DIR   (the papers' benchmarks:
                                                                      evejax.eval.benchmarks.run)

CHECKPOINT is a trainer workdir (`evejax train --workdir`, newest checkpoint)
or an evejax checkpoint directory (`evejax import --family eve|hovle`); its
family (`FAMILIES`, by the workdir's model name or the checkpoint's format)
says how to ask it.

Questions: the QA rounds of held-out scenes 0, 1, 2, ... of
`evejax.data.shapes` (split "heldout": no scene geometry of it is ever
trained on), in order, each asked on its own as the first user turn
("<image>\\n" + question), until `num_questions` are collected, in the
prompt and image form the family trains on: EVE the any-res image in
vicuna_v1, HoVLE the InternVL tiles of its config in internlm2-chat with the
shapes tokenizer's chat and image ids (evejax.data.pipeline.special_ids).
A prediction is the greedy answer (KV cache, at most MAX_NEW_TOKENS tokens,
up to EOS; HoVLE also up to <|im_end|>), decoded and stripped; it is right
when it equals the reference answer exactly. An answer holding a token id the tokenizer does not know
(an under-trained model can emit any id of the LLM's larger vocabulary) is
wrong, and counted in `out_of_vocabulary`.

Text-only baseline ("blank"): the same prompts with each image replaced by a
canvas of the same size filled with the shapes' background colour (white),
so the prompt, the aspect ratio and the image-token layout are unchanged and
only the picture's content is gone (the image is not dropped: the model was
never trained on prompts without image tokens).

Chance (`chance_accuracy`): for each question type, the rate of its most
frequent reference answer among the evaluated questions of that type,
weighted by the type's share of the questions; i.e. the accuracy of a
guesser that knows each type's majority answer: sum over types of
(count of that type's majority answer) / number of questions.

--mesh (config.mesh's form, generate.add_mesh_arg) shards the generation as training shards: the
parameters by the model's logical axes, the rows over slice x data x fsdp; each batch is padded to a
multiple of those devices (the padding rows' answers dropped), so any number of questions works,
and greedy answers equal the unsharded run's. A mesh that does not fit the devices is an error
before anything loads or compiles. No mesh by default: JAX runs on one device, as before; a mesh is
a choice by model size (data=-1 copies the parameters to every device, fsdp=-1 splits them), as
each training config chooses its own.

Sizes: B batch of questions, N text length of the longest prompt, M image
slots of the model, T = N - 1 + M spliced length, V vocabulary.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from evejax import atomic, sharding
from evejax.data import image as image_lib
from evejax.data import shapes
from evejax.data import text as text_lib
from evejax.eval.generate import (HoVLEAnswerer, Sampling, add_mesh_arg, add_sampling_args, bucket_length,
                                  greedy_generate, mesh_from_arg, padded_batches, placed_params, row_multiple,
                                  sampling_from_args)
from evejax.models import eve as eve_lib
from evejax.models import hovle as hovle_lib
from evejax.models import llm as llm_lib

# Answers are one word, then EOS; two spare tokens show a model that rambles on.
MAX_NEW_TOKENS = 4
TEMPLATE = "vicuna_v1"

# Question type by the start and end of the question text (shapes._questions).
QUESTION_TYPES = (
    ("count_shapes", "how many shapes", ""),
    ("colour", "what colour is the", ""),
    ("shape", "what shape is the", ""),
    ("presence", "is there a", ""),
    ("left_right", "is the", "on the left or on the right?"),
    ("top_bottom", "is the", "at the top or at the bottom?"),
)


def question_type(question: str) -> str:
    for name, start, end in QUESTION_TYPES:
        if question.startswith(start) and question.endswith(end):
            return name
    raise ValueError(f"question {question!r} is not one of the shapes question types")


@dataclasses.dataclass(frozen=True)
class Question:
    scene_index: int
    image: Image.Image
    question: str
    answer: str

    @property
    def kind(self) -> str:
        return question_type(self.question)


def heldout_questions(num_questions: int, seed: int = 0, min_side: int = 16,
                      max_side: int = 64) -> list[Question]:
    """The first `num_questions` QA rounds of held-out scenes 0, 1, 2, ... (module docstring)."""
    if num_questions < 1:
        raise ValueError(f"num_questions must be positive, got {num_questions}")
    out: list[Question] = []
    index = 0
    while len(out) < num_questions:
        scene = shapes.scene(index, "heldout", seed, min_side, max_side)
        picture = shapes.render(scene)
        for question, answer in shapes.qa(scene, index, "heldout", seed):
            out.append(Question(index, picture, question, answer))
        index += 1
    return out[:num_questions]


def blank_like(picture: Image.Image) -> Image.Image:
    """A canvas of the picture's size in the shapes' background colour."""
    return Image.new("RGB", picture.size, shapes.BACKGROUND)


def chance_accuracy(questions: Sequence[Question]) -> tuple[float, dict[str, tuple[str, float]]]:
    """(weighted chance, {type: (majority answer, its rate)}); see the module docstring."""
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q in questions:
        by_type[q.kind][q.answer] += 1
    per_type = {t: (c.most_common(1)[0][0], c.most_common(1)[0][1] / sum(c.values()))
                for t, c in by_type.items()}
    return sum(c.most_common(1)[0][1] for c in by_type.values()) / len(questions), per_type


# ---- the model --------------------------------------------------------------------------

class Answerer:
    """Answers of an inference EVE (no PAL, no teacher) to (image, question) pairs, greedy unless
    `sampling` (generate.Sampling; batch k draws with fold_in(PRNGKey(seed), k)).

    Every batch is padded to [rows, N]: N the longest prompt rounded up to a multiple of
    PROMPT_BUCKET (generate.bucket_length), rows the batch size, or for fewer questions the next
    power of two (the last row repeated), so generation compiles once per bucket, not per call;
    on a `mesh` (greedy_generate's; the splice runs on it too) further to a multiple of its
    data-parallel devices.
    """

    def __init__(self, cfg: eve_lib.EVEConfig, params, batch_size: int = 100,
                 tokenizer: text_lib.Tokenizer | None = None, anyres: image_lib.AnyResConfig | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, sampling: Sampling | None = None, seed: int = 0,
                 mesh=None):
        anyres = anyres or cfg.anyres()
        if cfg.with_pal:
            params = {k: v for k, v in params.items() if k not in ("vision_compressor", "clip")}
            cfg = cfg.replace(with_pal=False)
        self.cfg, self.params, self.batch_size = cfg, params, batch_size
        self.tokenizer = tokenizer or shapes.tokenizer()
        self.anyres, self.max_new_tokens = anyres, max_new_tokens
        self.sampling, self.seed, self.mesh = sampling, seed, mesh
        self._placed = False

    def answer(self, pictures: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        prompts = [prompt_ids(q, self.tokenizer) for q in questions]
        width = bucket_length(max(len(p) for p in prompts))
        answers: list[str] = []
        for k, (rows, n_real) in enumerate(padded_batches(len(prompts), self.batch_size, row_multiple(self.mesh))):
            size = len(rows)
            tokens = np.full((size, width), self.tokenizer.pad_id, np.int32)
            segment_ids = np.zeros((size, width), np.int32)
            views = [image_lib.preprocess_anyres(pictures[r], self.anyres, with_teacher=False) for r in rows]
            for i, r in enumerate(rows):
                tokens[i, :len(prompts[r])] = prompts[r]
                segment_ids[i, :len(prompts[r])] = 1
            batch = (tokens, segment_ids, np.stack([v.pixels for v in views]), np.stack([v.mask for v in views]))
            if self.mesh is not None:
                if not self._placed:
                    self.params, self._placed = placed_params(self.mesh, eve_lib.EVE(self.cfg), self.params,
                                                              batch), True
                batch = [jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim)) for a in batch]
            with sharding.rules_context(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                embeds, mask = _left_padded_prompt(self.params, *batch, cfg=self.cfg)
            new = np.asarray(greedy_generate(llm_lib.CausalLM(self.cfg.llm), self.params["llm"], None, mask,
                                             self.max_new_tokens, self.tokenizer.eos_id, inputs_embeds=embeds,
                                             sampling=self.sampling,
                                             rng=jax.random.fold_in(jax.random.PRNGKey(self.seed), k),
                                             mesh=self.mesh))
            answers += [decode_answer(new[i], self.tokenizer) for i in range(n_real)]
        return answers


def prompt_ids(question: str, tokenizer: text_lib.Tokenizer) -> np.ndarray:
    """int32 [N]: BOS, system prompt, "USER: <image>\\n{question} ASSISTANT:" (vicuna_v1)."""
    return text_lib.encode_prompt(text_lib.IMAGE_PLACEHOLDER + "\n" + question, tokenizer, TEMPLATE)


def decode_answer(ids: Sequence[int], tokenizer: text_lib.Tokenizer) -> str:
    """The answer text of generated ids, up to EOS. The LLM's vocabulary can be larger than
    the tokenizer's (the demo: 256 ids, 67 words); an answer holding an id the tokenizer
    does not know is `out_of_vocabulary_answer(id)`, which equals no reference answer."""
    ids = list(int(i) for i in ids)
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    unknown = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if unknown:
        return out_of_vocabulary_answer(unknown[0])
    return tokenizer.decode(ids).strip()


_OUT_OF_VOCABULARY = re.compile(r"<id -?\d+ outside the vocabulary>")


def out_of_vocabulary_answer(token_id: int) -> str:
    return f"<id {token_id} outside the vocabulary>"


def is_out_of_vocabulary(prediction: str) -> bool:
    return _OUT_OF_VOCABULARY.fullmatch(prediction) is not None


@functools.partial(jax.jit, static_argnames=("cfg",))
def _left_padded_prompt(params, tokens, segment_ids, pixels, pixel_mask, *, cfg):
    """Spliced prompt embeddings moved to the right end of each row, as greedy_generate wants.

    EVE splices right-padded rows (text, image tokens, text, padding); rolling
    each row by its padding keeps the order of its real positions.
    """
    spliced = eve_lib.EVE(cfg).apply({"params": params}, tokens, segment_ids, pixels, pixel_mask,
                                     method=eve_lib.EVE.embed_inputs)
    real = spliced.segment_ids > 0
    length = real.shape[1]
    shift = length - jnp.sum(real, axis=1)
    index = (jnp.arange(length)[None, :] - shift[:, None]) % length
    embeds = jnp.take_along_axis(spliced.embeds, index[..., None], axis=1)
    mask = (jnp.arange(length)[None, :] >= shift[:, None]).astype(jnp.int32)
    return embeds, mask


# ---- evaluation -------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    accuracy: float
    per_type: dict[str, float]          # type -> accuracy
    counts: dict[str, int]              # type -> number of questions
    predictions: list[str]
    out_of_vocabulary: int              # answers holding an id the tokenizer does not know (all wrong)


def score(questions: Sequence[Question], predictions: Sequence[str]) -> Result:
    right: dict[str, int] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for q, p in zip(questions, predictions, strict=True):
        counts[q.kind] += 1
        right[q.kind] += int(p == q.answer.strip())
    return Result(accuracy=sum(right.values()) / len(questions),
                  per_type={t: right[t] / counts[t] for t in counts}, counts=dict(counts),
                  predictions=list(predictions), out_of_vocabulary=sum(map(is_out_of_vocabulary, predictions)))


def evaluate(answerer: Answerer, questions: Sequence[Question], blank: bool = False) -> Result:
    """Exact-match accuracy of `answerer` on `questions` (images blanked when `blank`)."""
    pictures = [blank_like(q.image) if blank else q.image for q in questions]
    return score(questions, answerer.answer(pictures, [q.question for q in questions]))


# ---- checkpoints ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """How `evejax eval` reads and asks one model family."""
    name: str                                    # as printed
    port: str                                    # module with FORMAT and load_checkpoint
    config_type: type                            # the config of a model that answers
    answerer: Callable                           # (cfg, params, batch_size, mesh=) -> .answer(pictures, questions)


def _hovle_answerer(cfg, params, batch_size: int, **kw) -> HoVLEAnswerer:
    from evejax.data import pipeline

    tokenizer = shapes.tokenizer()
    return HoVLEAnswerer(cfg, params, tokenizer, pipeline.special_ids("shapes", tokenizer), MAX_NEW_TOKENS,
                         batch_size, **kw)


# registry model name -> family
FAMILIES = {"eve": Family("EVE", "evejax.port.eve", eve_lib.EVEConfig, Answerer),
            "hovle": Family("HoVLE", "evejax.port.hovle", hovle_lib.HoVLEConfig, _hovle_answerer)}


def load_model(path: str | Path) -> tuple[str, object, dict]:
    """(family name, config, params) of a trainer workdir or an evejax checkpoint of a FAMILIES model."""
    from evejax.port import checkpoint
    from evejax.port.io import CheckpointError

    names = " or ".join(f.name for f in FAMILIES.values())
    if checkpoint.is_workdir(path):
        name, cfg, params, _ = checkpoint.load_workdir(path)
        if name not in FAMILIES:
            raise ValueError(f"{path} trained a {name!r} model, not {names}")
        if not isinstance(cfg, FAMILIES[name].config_type):
            raise ValueError(f"{path} trained a {type(cfg).__name__}, which answers no questions; evaluate "
                             f"a workdir of a later stage")
        return name, cfg, params
    for name, family in FAMILIES.items():
        port = importlib.import_module(family.port)
        if checkpoint.has_format(path, port.FORMAT):
            return (name, *port.load_checkpoint(path))
    raise CheckpointError(f"{path} is no {names} checkpoint or training workdir (no checkpoints/, and no "
                          f"{checkpoint.MODEL_JSON} of an evejax {names} checkpoint)")


def load_shapes_answerer(path: str | Path, batch_size: int = 100, **kw):
    """The shapes-question answerer of a checkpoint (`load_model`): the shapes tokenizer, at most
    MAX_NEW_TOKENS, `batch_size` questions a call (generate.load_answerer answers any prompt, with
    the checkpoint's or a given tokenizer); `kw`: the answerers' `sampling`, `seed` and `mesh`."""
    name, cfg, params = load_model(path)
    return FAMILIES[name].answerer(cfg, params, batch_size, **kw)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--bench" or a.startswith("--bench=") for a in argv):
        from evejax.eval.benchmarks import run

        return run.main(argv)
    p = argparse.ArgumentParser(prog="evejax eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="trainer workdir or evejax EVE or HoVLE checkpoint directory")
    p.add_argument("--num-questions", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the shapes set the model was trained on")
    p.add_argument("--show", type=int, default=5, help="print this many predictions")
    p.add_argument("--json", help="also write the figures to this file (replaced only once complete)")
    add_sampling_args(p, seed_flag="--sample-seed")
    add_mesh_arg(p)
    args = p.parse_args(argv)
    sampling = sampling_from_args(p, args)
    try:
        mesh = mesh_from_arg(args.mesh)
    except ValueError as e:
        print(f"evejax eval: error: --mesh: {e}", file=sys.stderr)
        return 1
    try:
        answerer = load_shapes_answerer(args.checkpoint, args.batch_size, mesh=mesh, sampling=sampling,
                                 seed=args.sample_seed)
        questions = heldout_questions(args.num_questions, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"evejax eval: error: {e}", file=sys.stderr)
        return 1
    result, blank = evaluate(answerer, questions), evaluate(answerer, questions, blank=True)
    chance, majority = chance_accuracy(questions)
    print(f"{len(questions)} held-out questions: accuracy {100 * result.accuracy:.1f}%, blank image "
          f"{100 * blank.accuracy:.1f}%, chance {100 * chance:.1f}%")
    if result.out_of_vocabulary or blank.out_of_vocabulary:
        print(f"  {result.out_of_vocabulary} answers ({blank.out_of_vocabulary} with blank images) hold token ids "
              f"outside the tokenizer's vocabulary; they count as wrong")
    for t in sorted(result.counts):
        print(f"  {t:<13} n={result.counts[t]:<4} accuracy {100 * result.per_type[t]:5.1f}%  blank "
              f"{100 * blank.per_type[t]:5.1f}%  chance {100 * majority[t][1]:5.1f}% ({majority[t][0]!r})")
    for q, pred in list(zip(questions, result.predictions))[:args.show]:
        print(f"  scene {q.scene_index}: {q.question} -> {pred!r} (answer {q.answer!r})")
    if args.json:
        atomic.write_text(args.json, json.dumps(
            {"accuracy": result.accuracy, "blank_accuracy": blank.accuracy, "chance": chance,
             "per_type": result.per_type, "blank_per_type": blank.per_type, "counts": result.counts,
             "majority": majority, "out_of_vocabulary": result.out_of_vocabulary,
             "predictions": result.predictions, "blank_predictions": blank.predictions,
             "blank_out_of_vocabulary": blank.out_of_vocabulary}, indent=2) + "\n")
    return 0
