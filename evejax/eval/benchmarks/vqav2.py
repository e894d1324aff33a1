"""VQAv2 (visualqa.org release): test-dev answers for the EvalAI server, val scored here.

  ROOT/vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json  {"questions": [{question_id, image_id, question}]}
  ROOT/vqav2/v2_OpenEnded_mscoco_test2015_questions.json      optional: the full test set the server wants
  ROOT/vqav2/test2015/COCO_test2015_{image_id:012d}.jpg
  ROOT/vqav2/v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json
                                                              {"annotations": [{question_id, answers: [10 x {answer}]}]}
  ROOT/vqav2/val2014/COCO_val2014_{image_id:012d}.jpg

Whichever split is present runs (both when both are). Prompt: the question, then "Answer the question
using a single word or phrase." after a newline (LLaVA-1.5 llava_vqav2_mscoco_test-dev2015.jsonl) or a
space (InternVL evaluate_vqa.py). An answer is sent through the EvalAI processor
(common.normalize_answer), as LLaVA's convert_vqav2_for_submission.py does; val is scored with the
official VQA accuracy (common.vqa_accuracy). Written: vqav2_test-dev2015_results.json
([{question_id, answer}], every test2015 question when that file is present, "" for the unasked, as
LLaVA fills them) and vqav2_val2014_results.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "vqav2", "VQAv2"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 10}
SEPARATOR = {"llava": "\n", "internvl": " "}
SPLITS = {"test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", "COCO_test2015"),
          "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                  "val2014", "COCO_val2014")}
FULL_TEST = "v2_OpenEnded_mscoco_test2015_questions.json"


def directory(root) -> Path:
    return Path(root) / NAME


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = directory(root)
    present = [s for s, (questions, *_) in SPLITS.items() if (base / questions).exists()]
    if not present:
        raise common.MissingFile(f"VQAv2 questions not found: expected {base / SPLITS['test-dev'][0]} "
                                 f"or {base / SPLITS['val'][0]}")
    items = []
    for split in present:
        questions, annotations, folder, prefix = SPLITS[split]
        answers = {}
        if annotations:
            for a in common.read_json(base / annotations, "VQAv2 val annotations")["annotations"]:
                answers[a["question_id"]] = [x["answer"] for x in a["answers"]]
        for q in common.read_json(base / questions, "VQAv2 questions")["questions"]:
            truth = {"split": split, "full_test": base / FULL_TEST}
            if annotations:
                truth["answers"] = answers[q["question_id"]]
            items.append(common.Item(q["question_id"], base / folder / f"{prefix}_{q['image_id']:012d}.jpg",
                                     q["question"] + SEPARATOR[protocol] + common.SHORT_ANSWER, truth,
                                     q["question"]))
    return items


score = common.vqa_val_score


def write(items, answers, out_dir) -> list[Path]:
    out = []
    for split, name in (("test-dev", "vqav2_test-dev2015_results.json"), ("val", "vqav2_val2014_results.json")):
        rows = {i.qid: common.normalize_answer(a) for i, a in zip(items, answers, strict=True)
                if i.truth["split"] == split}
        if not rows:
            continue
        if split == "test-dev":
            full = next(i.truth["full_test"] for i in items if i.truth["split"] == split)
            if full.exists():
                ids = [q["question_id"] for q in common.read_json(full, "VQAv2 test2015 questions")["questions"]]
                rows = {qid: rows.get(qid, "") for qid in ids}
        out.append(atomic.write_text(Path(out_dir) / name, json.dumps(
            [{"question_id": qid, "answer": a} for qid, a in rows.items()])))
    return out
