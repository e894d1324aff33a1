"""MMBench dev (opencompass release mmbench_dev_20230712.tsv), scored here with circular evaluation.

  ROOT/mmbench/mmbench_dev_20230712.tsv   tab-separated, a header row; columns index, question, hint,
                                          A, B, C, D, answer, category, image (base64), source, ...

The release holds each question once per rotation of its options, at index i, i + 1e6, i + 2e6, ...
(circular evaluation); a question (index mod 1e6) counts as right only when every one of its rows is.
A question with a single row is asked in every rotation here, the options moved up by one each time
and the letters kept (LLaVA's model_vqa_mmbench --all-rounds). Prompt (both protocols): hint line,
question, "A. option" lines, "Answer with the option's letter from the given choices directly."
The letter of an answer: InternVL's post_process (common.option_letter); MMBench's server matches
LLaVA's raw answers itself, by rules plus a GPT judge, so for EVE this is its exact-match stage only.
Written: mmbench_dev_20230712_predictions.xlsx, the sheet the server takes, as LLaVA's
convert_mmbench_for_submission.py makes it (openpyxl): the release's columns without image, hint,
category, source, l2-category and comment, i.e. index, question, A-D, and prediction inserted before
answer; one row per release row.
"""
from __future__ import annotations

import base64
import collections
import csv
import io
import sys
from pathlib import Path

from PIL import Image

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "mmbench", "MMB"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 100}
TSV = "mmbench_dev_20230712.tsv"
SUBMISSION = "mmbench_dev_20230712_predictions.xlsx"
LETTERS = "ABCD"
ROTATION = 1_000_000


def _blank(value) -> bool:
    return value is None or value.strip().lower() in ("", "nan", "none")


def _image(encoded: str):
    return lambda: Image.open(io.BytesIO(base64.b64decode(encoded)))


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    path = common.require(Path(root) / NAME / TSV, "MMBench dev questions")
    csv.field_size_limit(sys.maxsize)  # the images are base64 cells
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    groups = collections.Counter(int(r["index"]) % ROTATION for r in rows)
    items = []
    for r in rows:
        options = [r[x] for x in LETTERS if not _blank(r.get(x))]
        hint = None if _blank(r.get("hint")) else r["hint"]
        answer = LETTERS.index(r["answer"])
        rounds = len(options) if groups[int(r["index"]) % ROTATION] == 1 else 1
        for k in range(rounds):
            shown = options[k:] + options[:k]
            items.append(common.Item(int(r["index"]), _image(r["image"]),
                                     common.option_prompt(r["question"], shown, hint),
                                     {"group": int(r["index"]) % ROTATION, "round": k, "options": shown,
                                      "answer": LETTERS[(answer - k) % len(options)], "question": r["question"]}))
    return items


def score(items, answers) -> dict[str, float]:
    groups = collections.defaultdict(list)
    for i, a in zip(items, answers, strict=True):
        groups[i.truth["group"]].append(common.option_letter(a, i.truth["options"]) == i.truth["answer"])
    return {"circular_accuracy": common.percent(sum(map(all, groups.values())), len(groups)),
            "row_accuracy": common.percent(sum(sum(g) for g in groups.values()), len(items))}


def write(items, answers, out_dir) -> list[Path]:
    """The server's sheet: one row per release row (its round 0; rotations made here are scored
    locally only, the server rotates by index itself)."""
    from openpyxl import Workbook

    sheet = Workbook()
    table = sheet.active
    table.append(["index", "question", *LETTERS, "prediction", "answer"])
    for i, a in zip(items, answers, strict=True):
        if i.truth["round"] == 0:
            options = i.truth["options"] + [None] * (len(LETTERS) - len(i.truth["options"]))
            table.append([i.qid, i.truth["question"], *options, a, i.truth["answer"]])
    return [atomic.write_file(Path(out_dir) / SUBMISSION, sheet.save)]
