"""TextVQA 0.5.1 val (textvqa.org release), scored here.

  ROOT/textvqa/TextVQA_0.5.1_val.json   {"data": [{question_id, question, image_id, answers: [10]}]}
  ROOT/textvqa/train_images/{image_id}.jpg   (val images live in the train_val image folder)

Prompt: the question, then "Answer the question using a single word or phrase." after a newline
(LLaVA-1.5) or a space (InternVL evaluate_vqa.py, textvqa_val). LLaVA-1.5's released question file
also puts the Rosetta OCR tokens ("Reference OCR token: ...") between the two; this module does not
(the OCR file and its exact line are not read here), so EVE's paper number is with OCR tokens and this
one without. Scored with the m4c accuracy (common.textvqa_accuracy), as LLaVA's eval_textvqa.py and
InternVL do. Written: textvqa_val_results.json [{question_id, answer}].
"""
from __future__ import annotations

import json
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "textvqa", "TextVQA"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 10}
SEPARATOR = {"llava": "\n", "internvl": " "}
QUESTIONS = "TextVQA_0.5.1_val.json"


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / NAME
    return [common.Item(q["question_id"], base / "train_images" / f"{q['image_id']}.jpg",
                        q["question"] + SEPARATOR[protocol] + common.SHORT_ANSWER, {"answers": q["answers"]},
                        q["question"])
            for q in common.read_json(base / QUESTIONS, "TextVQA val questions")["data"]]


def score(items, answers) -> dict[str, float]:
    total = sum(common.textvqa_accuracy(a, i.truth["answers"]) for i, a in zip(items, answers, strict=True))
    return {"accuracy": common.percent(total, len(items))}


def write(items, answers, out_dir) -> list[Path]:
    return [atomic.write_text(Path(out_dir) / "textvqa_val_results.json", json.dumps(
        [{"question_id": i.qid, "answer": a} for i, a in zip(items, answers, strict=True)]))]
