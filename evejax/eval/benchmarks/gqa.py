"""GQA testdev-balanced (cs.stanford.edu/people/dorarad/gqa release), scored here.

  ROOT/gqa/testdev_balanced_questions.json   {question_id: {imageId, question, answer, ...}}
  ROOT/gqa/images/{imageId}.jpg

Prompt: the question, then "Answer the question using a single word or phrase." after a newline
(LLaVA-1.5 llava_gqa_testdev_balanced.jsonl) or a space (InternVL). Prediction: the answer without
trailing periods, lower-cased (LLaVA's and InternVL's convert_gqa_for_eval.py); accuracy: the share of
predictions equal to the answer (the official eval.py --tier testdev_balanced). Written:
testdev_balanced_predictions.json [{questionId, prediction}], the file eval.py reads.
"""
from __future__ import annotations

import json
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "gqa", "GQA"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 10}
SEPARATOR = {"llava": "\n", "internvl": " "}
QUESTIONS = "testdev_balanced_questions.json"


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / NAME
    return [common.Item(qid, base / "images" / f"{q['imageId']}.jpg",
                        q["question"] + SEPARATOR[protocol] + common.SHORT_ANSWER, {"answer": q["answer"]},
                        q["question"])
            for qid, q in common.read_json(base / QUESTIONS, "GQA testdev-balanced questions").items()]


def prediction(answer: str) -> str:
    return answer.rstrip(".").lower()


def score(items, answers) -> dict[str, float]:
    right = sum(prediction(a) == i.truth["answer"] for i, a in zip(items, answers, strict=True))
    return {"accuracy": common.percent(right, len(items))}


def write(items, answers, out_dir) -> list[Path]:
    return [atomic.write_text(Path(out_dir) / "testdev_balanced_predictions.json", json.dumps(
        [{"questionId": i.qid, "prediction": prediction(a)} for i, a in zip(items, answers, strict=True)]))]
