"""`evejax demo [--out DIR] [--quick]`: a tiny EVE trained end to end on generated shapes.

From nothing but the installed package, on a CPU:
  1. trains a tiny CLIP teacher on the shapes class labels (configs/demo.py:teacher);
  2. trains a tiny EVE through its three stages with the generic trainer
     (configs/demo.py:stage1..3), stage 1 importing the teacher just trained
     into EVE's frozen `clip` slot; a checkpoint per stage;
  3. evaluates exact-match accuracy on held-out questions, and again with every
     image blanked (the text-only baseline; evejax/eval/evaluate.py says how,
     and how chance is computed);
  4. exports the final model to the official EVE PyTorch layout (inference
     model: LLM + PEL, without the training-only PAL and teacher) and answers
     three held-out questions with the PyTorch reference (transformers LLaMA +
     the official vision modules) on the exported weights, next to the JAX answers;
  5. plots the loss curves of every stage and a grid of held-out questions,
     and prints a summary with the figures, timings and paths.

Exit status 1 when a check fails: held-out accuracy >= 80%, blank-image
accuracy <= chance + 20 points, identical answers from the two frameworks.
`--quick` runs a few steps of everything (a smoke test); there only the
frameworks' agreement is checked.

Output (DIR, default runs/demo, must not exist or be empty):
  teacher/ stage1/ stage2/ stage3/   trainer workdirs (checkpoints, TensorBoard)
  teacher_clip/                      the teacher's ClipViT, evejax CLIP checkpoint (stage 1 imports it)
  eve_final/                         final EVE, evejax checkpoint (with PAL and teacher)
  eve_official/                      config.json + model.safetensors, official names
  loss_curves.png  heldout_grid.png  results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CONFIG_FILE = "demo.py"
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


def stage_config(arg: str, quick: bool, extra=()):
    from evejax import config as config_lib

    overrides = list(extra)
    if quick:
        overrides += [f"--config.train.steps={QUICK_STEPS}", "--config.train.log_every=1",
                      f"--config.data.global_batch={QUICK_BATCH}", "--config.train.progress_bar=False"]
    return config_lib.apply_overrides(config_lib.load(f"{CONFIG_FILE}:{arg}"), overrides)


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


def torch_answers(export_dir: Path, questions, anyres, max_new_tokens: int) -> list[str]:
    """Greedy answers of the PyTorch reference loaded from `export_dir`.

    Decoding recomputes the whole sequence for every new token (no cache), so
    it shares nothing with the JAX path but the weights and the prompt ids.
    """
    import torch

    from evejax.data import image as image_lib
    from evejax.data import shapes
    from evejax.eval.evaluate import decode_answer, prompt_ids

    model = reference_model(export_dir)
    tokenizer = shapes.tokenizer()
    answers = []
    with torch.no_grad():
        for q in questions:
            ids = torch.from_numpy(prompt_ids(q.question, tokenizer)).long()[None]
            pixels = torch.from_numpy(image_lib.preprocess_anyres(q.image, anyres, with_teacher=False).chw4())[None]
            new = []
            for _ in range(max_new_tokens):
                token = int(model(ids, pixel_values=pixels).logits[0, -1].argmax())
                new.append(token)
                if token == tokenizer.eos_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            answers.append(decode_answer(new, tokenizer))
    return answers


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


def plot_losses(path: Path, workdirs: dict[str, Path]) -> Path:
    """One panel per stage: total loss and its terms against the step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(workdirs), figsize=(4.2 * len(workdirs), 3.4), squeeze=False)
    for ax, (name, workdir) in zip(axes[0], workdirs.items()):
        scalars = read_scalars(workdir / "tensorboard")
        terms = (("train/loss", "loss (CE)"),) if name == "teacher" else (
            ("train/loss", "loss = CE + PAL"), ("train/ce", "CE"), ("train/pal", "PAL (1 - cos)"))
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
    fig.suptitle("evejax demo: training losses per stage")
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


def plot_grid(path: Path, items) -> Path:
    """Held-out images titled with question, answer, EVE's prediction and the blank-image prediction.

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
        ax.set_title(f"{q.question}\nanswer: {q.answer}    EVE: {pred or '(empty)'}\n"
                     f"(blank image: {blank or '(empty)'})", fontsize=8,
                     color="darkgreen" if pred == q.answer else "red")
    fig.suptitle("evejax demo: held-out questions (green: EVE right, red: wrong)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the demo ---------------------------------------------------------------------------

def run(out: Path, quick: bool) -> int:
    import jax

    from evejax.eval import evaluate as ev
    from evejax.models import registry
    from evejax.port import eve as eve_port
    from evejax.train import checkpoint as ckpt_lib
    from evejax.train import trainer

    clock = Clock()
    workdirs = {"teacher": out / "teacher", **{s: out / s for s in STAGES}}
    print(f"evejax demo{' --quick' if quick else ''}: output in {out}; {jax.device_count()} JAX device(s) "
          f"({jax.devices()[0].platform}), {os.cpu_count()} CPU core(s)", flush=True)

    # ---- training: the teacher, then the three EVE stages ----
    teacher_config = stage_config("teacher", quick)
    clock.run("teacher", trainer.train, teacher_config, str(workdirs["teacher"]))
    n_images = QUICK_QUESTIONS if quick else NUM_QUESTIONS
    teacher_acc = clock.run("teacher eval", teacher_accuracy, workdirs["teacher"], teacher_config, n_images)
    print(f"[teacher] held-out class accuracy {100 * teacher_acc:.1f}% on {n_images} images "
          f"(chance {100 / 12:.1f}%)", flush=True)
    clock.run("teacher export", save_teacher, out / "teacher_clip", workdirs["teacher"], teacher_config)
    configs = {s: stage_config(s, quick, [f"--config.stage.start.path=clip={out / 'teacher_clip'}"]
                               if s == "stage1" else []) for s in STAGES}
    for stage in STAGES:
        clock.run(stage, trainer.train, configs[stage], str(workdirs[stage]))

    # ---- evaluation ----
    cfg = registry.build(configs["stage3"].model).config
    _, params = ckpt_lib.load_params(str(workdirs["stage3"]))
    questions = ev.heldout_questions(n_images, configs["stage3"].data.seed)
    answerer = ev.Answerer(cfg, params, batch_size=QUICK_BATCH if quick else 100)
    result = clock.run("eval", ev.evaluate, answerer, questions)
    blank = clock.run("eval, blank images", ev.evaluate, answerer, questions, blank=True)
    chance, majority = ev.chance_accuracy(questions)

    # ---- export, and the same questions in PyTorch ----
    def export():
        eve_port.save_checkpoint(out / "eve_final", cfg, params)
        return eve_port.export_eve(out / "eve_final", out / "eve_official", inference=True)

    files = clock.run("export", export)
    shown = questions[:TORCH_QUESTIONS]
    torch_said = clock.run("pytorch answers", torch_answers, out / "eve_official", shown, answerer.anyres,
                           ev.MAX_NEW_TOKENS)
    jax_said = result.predictions[:TORCH_QUESTIONS]

    # ---- pictures ----
    loss_png = clock.run("loss plot", plot_losses, out / "loss_curves.png", workdirs)
    grid_png = clock.run("grid plot", plot_grid, out / "heldout_grid.png",
                         grid_items(questions, result.predictions, blank.predictions))

    # ---- report ----
    print("\nheld-out questions answered by both frameworks from the exported weights:")
    print(f"  {'question':<46} {'answer':<8} {'JAX':<8} {'PyTorch':<8}")
    for q, a, b in zip(shown, jax_said, torch_said):
        print(f"  {q.question:<46} {q.answer:<8} {a!r:<8} {b!r:<8} {'same' if a == b else 'DIFFERENT'}")

    print(f"\n{len(questions)} held-out questions, exact match:")
    print(f"  {'type':<13} {'n':>4} {'EVE':>7} {'blank':>7} {'chance':>7}  majority answer")
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
    for name, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")

    print("\ntimings (wall clock):")
    for name, seconds in clock.phases.items():
        print(f"  {name:<20} {seconds:7.1f} s")
    print(f"  {'total':<20} {clock.total:7.1f} s")

    results_json = out / "results.json"
    results_json.write_text(json.dumps({
        "quick": quick, "accuracy": result.accuracy, "blank_accuracy": blank.accuracy, "chance": chance,
        "per_type": result.per_type, "blank_per_type": blank.per_type, "counts": result.counts,
        "majority": majority, "teacher_accuracy": teacher_acc,
        "torch": [{"question": q.question, "answer": q.answer, "jax": a, "pytorch": b}
                  for q, a, b in zip(shown, jax_said, torch_said)],
        "checks": checks, "timings": dict(clock.phases, total=clock.total)}, indent=2) + "\n")

    print("\nwhere everything went:")
    for name, where in (
            ("stage checkpoints", "\n".join(f"{'':<26}{workdirs[s] / 'checkpoints'}" for s in workdirs).lstrip()),
            ("final EVE (evejax)", out / "eve_final"),
            ("official PyTorch layout", f"{out / 'eve_official'} (config.json, {', '.join(f.name for f in files)})"),
            ("loss curves", loss_png), ("held-out grid", grid_png), ("figures (JSON)", results_json)):
        print(f"  {name:<24}{where}")
    return 0 if all(checks.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evejax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (must not exist or be empty)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything: a smoke test")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).absolute()
    if out.exists() and any(out.iterdir()):
        print(f"evejax demo: error: {out} is not empty; choose another --out or delete it", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    from evejax.port.checkpoint import expected_orbax_warnings_silenced

    with expected_orbax_warnings_silenced():  # each stage reads the one before it read-only
        return run(out, args.quick)
