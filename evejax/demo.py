"""`evejax demo [--model eve|hovle] [--out DIR] [--quick]`: a tiny EVE or HoVLE trained end to
end on generated shapes.

From nothing but the installed package, on a CPU (one flow; what differs by family is a
`Family` entry of FAMILIES):
  1. trains a tiny CLIP teacher on the shapes class labels (configs/demo.py:teacher, both families);
  2. trains the model through its three stages with the generic trainer, a checkpoint per stage,
     stage 1 importing the teacher's CLIP: EVE configs/demo.py:stage1..3, into EVE's frozen `clip`
     slot; HoVLE configs/hovle.py:demo_stage1..3, into the frozen `teacher/clip` of its stage-1
     CLIP teacher, stage 1 distilling the embedding module on unpaired data (shapes images
     without text to that teacher's projected features, random text ids to the frozen LLM's input
     embeddings), stage 2 captions and stage 3 the questions with everything but the teacher
     trained (the demo's LLM is random: configs/hovle.py says why stage 2 trains it), the teacher
     kept in both for a distill_image term next to the CE, as EVE keeps its PAL;
  3. evaluates exact-match accuracy on held-out questions, and again with every
     image blanked (the text-only baseline; evejax/eval/evaluate.py says how,
     how each family is asked, and how chance is computed);
  4. exports the final model to the official PyTorch layout (EVE: the inference model, LLM +
     PEL, without the training-only PAL and teacher; HoVLE: InternVLChatModel) and answers
     three held-out questions with the PyTorch reference (EVE: transformers LLaMA + the official
     vision modules; HoVLE: evejax/port/torch_ref/hovle.py) on the exported weights, next to the
     JAX answers;
  5. plots the loss curves of every stage and a grid of held-out questions,
     and prints a summary with the figures, timings and paths.

Exit status 1 when a check fails: held-out accuracy >= 80%, blank-image
accuracy <= chance + 20 points, identical answers from the two frameworks.
`--quick` runs a few steps of everything (a smoke test); there only the
frameworks' agreement is checked.

Output (DIR, default runs/demo for EVE, runs/demo_hovle for HoVLE; must not exist or be empty):
  teacher/ stage1/ stage2/ stage3/   trainer workdirs (checkpoints, TensorBoard)
  teacher_clip/                      the teacher's ClipViT, evejax CLIP checkpoint (stage 1 imports it)
  eve_final/ | hovle_final/          final model, evejax checkpoint (EVE: with PAL and teacher)
  eve_official/ | hovle_official/    config.json + model.safetensors, official names
  loss_curves.png  heldout_grid.png  results.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

STAGES = ("stage1", "stage2", "stage3")
ACCURACY_TARGET = 0.80
BASELINE_MARGIN = 0.20
NUM_QUESTIONS = 500
TORCH_QUESTIONS = 3
GRID_QUESTIONS = 12
# --quick: every phase runs, at toy sizes.
QUICK_STEPS = 3
QUICK_QUESTIONS = 16
QUICK_BATCH = 8


class Clock:
    """Wall time per phase, in the order the phases ran."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.phases[name] = time.perf_counter() - t
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def stage_config(spec: str, quick: bool, extra=()):
    """The config `spec` ("file.py:arg") with the demo's overrides (`extra`, and --quick's)."""
    from evejax import config as config_lib

    overrides = list(extra)
    if quick:
        overrides += [f"--config.train.steps={QUICK_STEPS}", "--config.train.log_every=1",
                      f"--config.data.global_batch={QUICK_BATCH}", "--config.train.progress_bar=False"]
    return config_lib.apply_overrides(config_lib.load(spec), overrides)


# ---- the teacher ------------------------------------------------------------------------

def teacher_accuracy(workdir: Path, config, num_images: int) -> float:
    """Held-out accuracy of the teacher classifier on the first `num_images` held-out scenes."""
    import jax

    from evejax.data import image as image_lib
    from evejax.data import pipeline, shapes
    from evejax.models import registry
    from evejax.train import checkpoint as ckpt_lib

    spec = registry.build(config.model)
    _, params = ckpt_lib.load_params(str(workdir))
    anyres = pipeline.image_geometry(config)
    scenes = [shapes.scene(i, "heldout", config.data.seed, config.data.min_side, config.data.max_side)
              for i in range(num_images)]
    pixels = np.stack([image_lib.preprocess_anyres(shapes.render(s), anyres).teacher_pixels for s in scenes])
    logits = jax.jit(spec.module.apply)({"params": params}, pixels)
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.array([s.label for s in scenes])))


def save_teacher(directory: Path, teacher_dir: Path, config) -> None:
    """The teacher's ClipViT (`clip` subtree of the classifier) as an evejax CLIP checkpoint,
    the form `evejax import --family clip` gives a pre-trained CLIP for EVE's stage 1."""
    from evejax.models import registry
    from evejax.port import clip as clip_port
    from evejax.train import checkpoint as ckpt_lib

    _, params = ckpt_lib.load_params(str(teacher_dir))
    clip_port.save_checkpoint(directory, registry.build(config.model).config, params["clip"])


# ---- PyTorch ----------------------------------------------------------------------------

def reference_model(export_dir: Path):
    """The PyTorch reference (transformers LLaMA + official vision modules, official names) of an
    exported inference EVE, loaded strictly from its safetensors."""
    import torch
    import transformers

    from evejax.port import io
    from evejax.port.torch_ref import eve as ref

    config = io.load_config_json(export_dir)
    geometry = config["evejax"]
    llama_fields = set(transformers.LlamaConfig().to_dict()) - {"architectures", "model_type"}
    llama = transformers.LlamaConfig(**{k: v for k, v in config.items() if k in llama_fields},
                                     attn_implementation="eager")
    model = ref.EVEReference(llama, mm_hidden_size=config["mm_hidden_size"], patch_size=geometry["patch_size"],
                             pool=geometry["pool"], num_heads=geometry["vision_heads"], with_pal=False).eval()
    state = io.load_state_dict(export_dir)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model


def torch_answers(export_dir: Path, questions, answerer) -> list[str]:
    """Greedy answers of the PyTorch reference EVE loaded from `export_dir`, to the prompt ids and
    image view the JAX `answerer` (evaluate.Answerer) uses.

    Decoding recomputes the whole sequence for every new token (no cache), so
    it shares nothing with the JAX path but the weights and the prompt ids.
    """
    import torch

    from evejax.data import image as image_lib
    from evejax.eval.evaluate import decode_answer, prompt_ids

    model = reference_model(export_dir)
    tokenizer = answerer.tokenizer
    answers = []
    with torch.no_grad():
        for q in questions:
            ids = torch.from_numpy(prompt_ids(q.question, tokenizer)).long()[None]
            view = image_lib.preprocess_anyres(q.image, answerer.anyres, with_teacher=False)
            pixels = torch.from_numpy(view.chw4())[None]
            new = []
            for _ in range(answerer.max_new_tokens):
                token = int(model(ids, pixel_values=pixels).logits[0, -1].argmax())
                new.append(token)
                if token == tokenizer.eos_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            answers.append(decode_answer(new, tokenizer))
    return answers


def hovle_reference_model(export_dir: Path):
    """The PyTorch reference InternVLChatModel (evejax/port/torch_ref/hovle.py, official names) of
    an exported HoVLE, built from its config.json and loaded strictly from its safetensors."""
    import torch

    from evejax.port import io
    from evejax.port.torch_ref.hovle import HolisticEmbeddingConfig, InternVLChatModel
    from evejax.port.torch_ref.internlm2 import InternLM2Config

    config = io.load_config_json(export_dir)
    model = InternVLChatModel(HolisticEmbeddingConfig.from_hf_config_dict(config["embedding_config"]),
                              InternLM2Config.from_hf_config_dict(config["llm_config"]),
                              normalize_encoder_output=config["normalize_encoder_output"]).eval()
    state = io.load_state_dict(export_dir)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model


def hovle_torch_answers(export_dir: Path, questions, answerer) -> list[str]:
    """Greedy answers of the PyTorch reference HoVLE loaded from `export_dir`, to the prompt ids and
    tiles the JAX `answerer` (generate.HoVLEAnswerer) uses, one question at a time, recomputing the
    whole forward (images included) for every new token."""
    import torch

    from evejax.eval.evaluate import decode_answer
    from evejax.eval.generate import _until

    model = hovle_reference_model(export_dir)
    answers = []
    for q in questions:
        tiled = answerer.tiles(answerer.cfg, q.image)
        ids = torch.tensor([answerer.prompt_ids(q.question, tiled.num_tiles)])
        pixels = torch.from_numpy(tiled.pixels[:tiled.num_tiles].transpose(0, 3, 1, 2).copy())
        new = model.generate(pixels, ids, answerer.max_new_tokens, eos_token_id=answerer.stops[0],
                             use_cache=False)[0].tolist()
        answers.append(decode_answer(_until(new, answerer.stops), answerer.tokenizer))
    return answers


def export_eve(checkpoint: Path, out: Path) -> list[Path]:
    from evejax.port import eve as eve_port

    return eve_port.export_eve(checkpoint, out, inference=True)


def export_hovle(checkpoint: Path, out: Path) -> list[Path]:
    from evejax.port import hovle as hovle_port

    return hovle_port.export_hovle(checkpoint, out)


# ---- the families -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher trained first (its own config) and imported into stage 1's `subtree`."""
    spec: str                      # config "file.py:arg"
    accuracy: Callable             # (workdir, config, num_images) -> held-out class accuracy
    save: Callable                 # (directory, workdir, config): the checkpoint stage 1 imports
    subtree: str


@dataclasses.dataclass(frozen=True)
class Family:
    """What the demo flow (`run`) takes from one model family."""
    name: str                      # as printed
    stages: tuple[str, ...]        # config specs of stages 1..3 ("file.py:arg")
    port: str                      # module with save_checkpoint (the final evejax checkpoint)
    export: Callable               # (evejax checkpoint, out dir) -> files in the official layout
    torch_answers: Callable        # (export dir, questions, JAX answerer) -> the PyTorch answers
    default_out: str
    teacher: Teacher


FAMILIES = {
    "eve": Family("EVE", tuple(f"demo.py:{s}" for s in STAGES), "evejax.port.eve", export_eve, torch_answers,
                  "runs/demo", Teacher("demo.py:teacher", teacher_accuracy, save_teacher, "clip")),
    "hovle": Family("HoVLE", tuple(f"hovle.py:demo_{s}" for s in STAGES), "evejax.port.hovle", export_hovle,
                    hovle_torch_answers, "runs/demo_hovle",
                    Teacher("demo.py:teacher", teacher_accuracy, save_teacher, "teacher/clip")),
}


# ---- pictures ---------------------------------------------------------------------------

def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files the trainer wrote: {tag: [(step, value)]}."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        # TFRecord framing: length (u64), its CRC (u32), the record, the record's CRC (u32).
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_losses(path: Path, runs: dict[str, tuple[Path, object]], family: str) -> Path:
    """One panel per stage (runs: name -> (workdir, config)): the total loss and, when the stage
    weighs several, each term of config.stage.losses against the step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (name, (workdir, config)) in zip(axes[0], runs.items()):
        scalars = read_scalars(workdir / "tensorboard")
        weights = config.stage.losses.to_dict()
        terms = [("train/loss", "loss = " + " + ".join(f"{w:g} {k}" for k, w in weights.items()))]
        terms += [(f"train/{k}", k) for k in weights] if len(weights) > 1 else []
        for tag, label in terms:
            points = scalars.get(tag, [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=label, marker="." if len(points) < 20 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("training loss")
    fig.suptitle(f"evejax demo ({family}): training losses per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_items(questions, predictions, blank_predictions) -> list:
    """The first question of each of the first GRID_QUESTIONS scenes, with both predictions."""
    items, seen = [], set()
    for q, pred, blank in zip(questions, predictions, blank_predictions):
        if q.scene_index not in seen and len(items) < GRID_QUESTIONS:
            seen.add(q.scene_index)
            items.append((q, pred, blank))
    return items


def plot_grid(path: Path, items, family: str) -> Path:
    """Held-out images titled with question, answer, the model's prediction and the blank-image prediction.

    items: (Question, prediction, blank-image prediction) triples.
    """
    plt = _pyplot()
    cols = 4
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (q, pred, blank) in zip(axes.flat, items):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])   # the frame stays: it shows the image's extent and aspect ratio
        ax.imshow(np.asarray(q.image), interpolation="nearest")
        ax.set_title(f"{q.question}\nanswer: {q.answer}    {family}: {pred or '(empty)'}\n"
                     f"(blank image: {blank or '(empty)'})", fontsize=8,
                     color="darkgreen" if pred == q.answer else "red")
    fig.suptitle(f"evejax demo: held-out questions (green: {family} right, red: wrong)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the demo ---------------------------------------------------------------------------

def run(out: Path, quick: bool, model: str = "eve") -> int:
    import importlib

    import jax

    from evejax.eval import evaluate as ev
    from evejax.train import trainer

    family = FAMILIES[model]
    clock = Clock()
    print(f"evejax demo --model {model}{' --quick' if quick else ''}: output in {out}; {jax.device_count()} JAX "
          f"device(s) ({jax.devices()[0].platform}), {os.cpu_count()} CPU core(s)", flush=True)
    n_images = QUICK_QUESTIONS if quick else NUM_QUESTIONS

    # ---- training: the teacher, then the three stages, each from the one before ----
    runs: dict[str, tuple[Path, object]] = {}
    teacher = family.teacher
    config = stage_config(teacher.spec, quick)
    runs["teacher"] = (out / "teacher", config)
    clock.run("teacher", trainer.train, config, str(out / "teacher"))
    teacher_acc = clock.run("teacher eval", teacher.accuracy, out / "teacher", config, n_images)
    print(f"[teacher] held-out class accuracy {100 * teacher_acc:.1f}% on {n_images} images "
          f"(chance {100 / 12:.1f}%)", flush=True)
    saved = out / f"teacher_{teacher.subtree.rsplit('/', 1)[-1]}"
    clock.run("teacher export", teacher.save, saved, out / "teacher", config)
    start = [f"--config.stage.start.path={teacher.subtree}={saved}"]
    for stage, spec in zip(STAGES, family.stages):
        config = stage_config(spec, quick, start)
        runs[stage] = (out / stage, config)
        clock.run(stage, trainer.train, config, str(out / stage))
        start = [f"--config.stage.start.workdir={out / stage}"]

    # ---- evaluation ----
    name, cfg, params = ev.load_model(out / STAGES[-1])
    questions = ev.heldout_questions(n_images, runs[STAGES[-1]][1].data.seed)
    answerer = ev.FAMILIES[name].answerer(cfg, params, QUICK_BATCH if quick else 100)
    result = clock.run("eval", ev.evaluate, answerer, questions)
    blank = clock.run("eval, blank images", ev.evaluate, answerer, questions, blank=True)
    chance, majority = ev.chance_accuracy(questions)

    # ---- export, and the same questions in PyTorch ----
    final, official = out / f"{model}_final", out / f"{model}_official"

    def export():
        importlib.import_module(family.port).save_checkpoint(final, cfg, params)
        return family.export(final, official)

    files = clock.run("export", export)
    shown = questions[:TORCH_QUESTIONS]
    torch_said = clock.run("pytorch answers", family.torch_answers, official, shown, answerer)
    jax_said = result.predictions[:TORCH_QUESTIONS]

    # ---- pictures ----
    loss_png = clock.run("loss plot", plot_losses, out / "loss_curves.png", runs, family.name)
    grid_png = clock.run("grid plot", plot_grid, out / "heldout_grid.png",
                         grid_items(questions, result.predictions, blank.predictions), family.name)

    # ---- report ----
    print("\nheld-out questions answered by both frameworks from the exported weights:")
    print(f"  {'question':<46} {'answer':<8} {'JAX':<8} {'PyTorch':<8}")
    for q, a, b in zip(shown, jax_said, torch_said):
        print(f"  {q.question:<46} {q.answer:<8} {a!r:<8} {b!r:<8} {'same' if a == b else 'DIFFERENT'}")

    print(f"\n{len(questions)} held-out questions, exact match:")
    print(f"  {'type':<13} {'n':>4} {family.name:>7} {'blank':>7} {'chance':>7}  majority answer")
    for t in sorted(result.counts):
        print(f"  {t:<13} {result.counts[t]:>4} {100 * result.per_type[t]:>6.1f}% {100 * blank.per_type[t]:>6.1f}% "
              f"{100 * majority[t][1]:>6.1f}%  {majority[t][0]}")
    print(f"  {'all':<13} {len(questions):>4} {100 * result.accuracy:>6.1f}% {100 * blank.accuracy:>6.1f}% "
          f"{100 * chance:>6.1f}%")
    print(f"  blank: every image replaced by a white canvas of its size. chance: per question type the rate of\n"
          f"  its most frequent answer, weighted by the type's share = sum of those counts / {len(questions)}.")

    checks = {"PyTorch answers == JAX answers": torch_said == jax_said}
    if not quick:
        checks[f"held-out accuracy >= {100 * ACCURACY_TARGET:.0f}%"] = result.accuracy >= ACCURACY_TARGET
        checks[f"blank-image accuracy <= chance + {100 * BASELINE_MARGIN:.0f} points"] = (
            blank.accuracy <= chance + BASELINE_MARGIN)
    print("\nchecks:")
    for check, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {check}")

    print("\ntimings (wall clock):")
    for phase, seconds in clock.phases.items():
        print(f"  {phase:<20} {seconds:7.1f} s")
    print(f"  {'total':<20} {clock.total:7.1f} s")

    results_json = out / "results.json"
    results_json.write_text(json.dumps({
        "model": model, "quick": quick, "accuracy": result.accuracy, "blank_accuracy": blank.accuracy,
        "chance": chance, "per_type": result.per_type, "blank_per_type": blank.per_type, "counts": result.counts,
        "majority": majority, "teacher_accuracy": teacher_acc,
        "torch": [{"question": q.question, "answer": q.answer, "jax": a, "pytorch": b}
                  for q, a, b in zip(shown, jax_said, torch_said)],
        "checks": checks, "timings": dict(clock.phases, total=clock.total)}, indent=2) + "\n")

    print("\nwhere everything went:")
    for what, where in (
            ("stage checkpoints", "\n".join(f"{'':<26}{workdir / 'checkpoints'}" for workdir, _ in runs.values()).lstrip()),
            (f"final {family.name} (evejax)", final),
            ("official PyTorch layout", f"{official} (config.json, {', '.join(f.name for f in files)})"),
            ("loss curves", loss_png), ("held-out grid", grid_png), ("figures (JSON)", results_json)):
        print(f"  {what:<24}{where}")
    return 0 if all(checks.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evejax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(FAMILIES), default="eve", help="the model family (default: eve)")
    p.add_argument("--out", help="output directory (must not exist or be empty; default runs/demo for eve, "
                   "runs/demo_<model> otherwise)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything: a smoke test")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or FAMILIES[args.model].default_out).absolute()
    if out.exists() and any(out.iterdir()):
        print(f"evejax demo: error: {out} is not empty; choose another --out or delete it", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    from evejax.port.checkpoint import expected_orbax_warnings_silenced

    with expected_orbax_warnings_silenced():  # each stage reads the one before it read-only
        return run(out, args.quick, args.model)
