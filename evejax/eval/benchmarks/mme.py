"""MME (BradyFU release, MME_Benchmark_release_version), scored here as its eval_tool's calculation.py.

  ROOT/MME_Benchmark_release_version/{task}/images/*.jpg|png + {task}/questions_answers_YN/{stem}.txt
  or  ROOT/MME_Benchmark_release_version/{task}/{stem}.jpg|png + {stem}.txt   (the other tasks)
  each .txt: two lines "question<TAB>Yes|No" about its image

Prompt: the question (it ends "Please answer yes or no."), then "Answer the question using a single
word or phrase." after a newline (LLaVA-1.5 llava_mme.jsonl) or a space (InternVL eval/mme/eval.py).
An answer becomes "Yes"/"No" when it starts with yes/no (LLaVA's convert_answer_to_mme.py) or is
cleaned as InternVL's post_processing does (newlines dropped, lower case, true/false to yes/no);
calculation.py then reads it lower-cased as yes or no, or by "yes"/"no" in its first 4 characters,
else "other" (wrong). Task score = 100 (accuracy over questions + acc+), acc+ = the share of images
whose two questions are both right; perception = the sum over its 10 tasks, cognition over its 4.
Written: mme_results/{task}.txt ("image<TAB>question<TAB>truth<TAB>answer" lines), the directory
calculation.py --results_dir reads.
"""
from __future__ import annotations

import collections
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "mme", "MME"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 20}
RELEASE = "MME_Benchmark_release_version"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SEPARATOR = {"llava": "\n", "internvl": " "}
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / RELEASE
    items = []
    for task in PERCEPTION + COGNITION:
        folder = common.require(base / task, f"MME task {task}")
        images, answers = ((folder / "images", folder / "questions_answers_YN") if (folder / "images").is_dir()
                           else (folder, folder))
        for qa in sorted(answers.glob("*.txt")):
            image = next((images / (qa.stem + s) for s in IMAGE_SUFFIXES if (images / (qa.stem + s)).exists()), None)
            if image is None:
                raise common.MissingFile(f"MME image of {qa} not found: expected {images / qa.stem}.jpg or .png")
            for line in qa.read_text().splitlines():
                if line.strip():
                    question, truth = line.rstrip("\n").split("\t")
                    items.append(common.Item(f"{task}/{image.name}", image, question + SEPARATOR[protocol]
                                             + common.SHORT_ANSWER, {"task": task, "question": question,
                                                                      "truth": truth.strip(), "protocol": protocol},
                                             question))
    return items


def converted(item, answer: str) -> str:
    """The answer as the protocol's converter writes it into the results file."""
    if item.truth["protocol"] == "llava":
        text = answer.strip().lower()
        return "Yes" if text.startswith("yes") else "No" if text.startswith("no") else text
    return answer.replace("\n", "").lower().replace("true", "yes").replace("false", "no")


def label(answer: str) -> str:
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score(items, answers) -> dict[str, float]:
    right_by_image = collections.defaultdict(list)
    for i, a in zip(items, answers, strict=True):
        right_by_image[i.truth["task"], i.qid].append(label(converted(i, a)) == i.truth["truth"].lower())
    out = {}
    for task in [t for t in PERCEPTION + COGNITION if any(k[0] == t for k in right_by_image)]:
        images = [r for (t, _), r in right_by_image.items() if t == task]
        questions = [x for r in images for x in r]
        # calculation.py's float order: accuracy * 100 + acc+ * 100
        out[task] = sum(questions) / len(questions) * 100 + sum(map(all, images)) / len(images) * 100
    out["perception"] = sum(out.get(t, 0) for t in PERCEPTION)  # a task not asked (--limit) adds nothing
    out["cognition"] = sum(out.get(t, 0) for t in COGNITION)
    return out


def write(items, answers, out_dir) -> list[Path]:
    lines = collections.defaultdict(list)
    for i, a in zip(items, answers, strict=True):
        lines[i.truth["task"]].append("\t".join((i.qid.split("/", 1)[1], i.truth["question"], i.truth["truth"],
                                                 converted(i, a))) + "\n")
    with atomic.replaced_dir(Path(out_dir) / "mme_results", owned=("*.txt",)) as tmp:
        for task, rows in lines.items():
            (tmp / f"{task}.txt").write_text("".join(rows))
    return [Path(out_dir) / "mme_results" / f"{t}.txt" for t in lines]
