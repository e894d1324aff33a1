"""VizWiz-VQA (vizwiz.org release): test answers for the EvalAI server, val scored here.

  ROOT/vizwiz/Annotations/test.json   [{image, question}]
  ROOT/vizwiz/Annotations/val.json    [{image, question, answers: [10 x {answer}]}]
  ROOT/vizwiz/test/VizWiz_test_*.jpg, ROOT/vizwiz/val/VizWiz_val_*.jpg

Prompt: the question, "When the provided information is insufficient, respond with 'Unanswerable'."
and "Answer the question using a single word or phrase.", joined by newlines (LLaVA-1.5's
llava_test.jsonl; its exact line breaks are unverified) or by spaces (InternVL evaluate_vqa.py).
Answers go through the EvalAI processor (LLaVA convert_vizwiz_for_submission.py); val is scored with
the VQA accuracy (common.vqa_accuracy). Written: vizwiz_{split}_results.json [{image, answer}].
"""
from __future__ import annotations

import json
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "vizwiz", "VizWiz"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 10}
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
SEPARATOR = {"llava": "\n", "internvl": " "}


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / NAME
    present = [s for s in ("test", "val") if (base / "Annotations" / f"{s}.json").exists()]
    if not present:
        raise common.MissingFile(f"VizWiz annotations not found: expected {base / 'Annotations' / 'test.json'} "
                                 f"or {base / 'Annotations' / 'val.json'}")
    sep = SEPARATOR[protocol]
    items = []
    for split in present:
        for q in common.read_json(base / "Annotations" / f"{split}.json", "VizWiz annotations"):
            truth = {"split": split}
            if "answers" in q:
                truth["answers"] = [a["answer"] for a in q["answers"]]
            items.append(common.Item(q["image"], base / split / q["image"],
                                     sep.join((q["question"], UNANSWERABLE, common.SHORT_ANSWER)), truth,
                                     q["question"]))
    return items


score = common.vqa_val_score


def write(items, answers, out_dir) -> list[Path]:
    out = []
    for split in ("test", "val"):
        rows = [{"image": i.qid, "answer": common.normalize_answer(a)}
                for i, a in zip(items, answers, strict=True) if i.truth["split"] == split]
        if rows:
            out.append(atomic.write_text(Path(out_dir) / f"vizwiz_{split}_results.json", json.dumps(rows)))
    return out
