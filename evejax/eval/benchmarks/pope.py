"""POPE (github.com/AoiDragon/POPE release, COCO val2014), scored here per split.

  ROOT/pope/coco/coco_pope_{adversarial,popular,random}.json   lines {question_id, image, text, label}
  ROOT/pope/val2014/{image}

Prompt (both protocols: InternVL reads LLaVA's llava_pope_test.jsonl and keeps its instruction):
the question, newline, "Answer the question using a single word or phrase." An answer is "no" when
its first sentence (up to the first ".") holds the word "no", "No" or "not" once commas are dropped,
else "yes" (LLaVA's eval_pope.py, also used by InternVL). Per split: accuracy, precision, recall and
F1 of "yes", and the share of "yes" answers; a precision or recall over nothing is 0 (the official
script divides by zero). Headline: F1 averaged over the three splits (LLaVA's convention; unverified
which one EVE reports). Written: pope_answers.jsonl ({question_id, category, prompt, text} lines).
"""
from __future__ import annotations

import json
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "pope", "POPE"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 100}
SPLITS = ("adversarial", "popular", "random")


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / NAME
    items = []
    for split in SPLITS:
        for q in common.read_jsonl(base / "coco" / f"coco_pope_{split}.json", f"POPE {split} questions"):
            items.append(common.Item(q["question_id"], base / "val2014" / q["image"],
                                     q["text"] + "\n" + common.SHORT_ANSWER, {"label": q["label"], "split": split},
                                     q["text"]))
    return items


def says_yes(answer: str) -> bool:
    words = answer.split(".")[0].replace(",", "").split(" ")
    return not ({"no", "No", "not"} & set(words))


def split_scores(labels, yes) -> dict[str, float]:
    tp = sum(l != "no" and y for l, y in zip(labels, yes))  # the official script: any label but "no" is yes
    fp = sum(l == "no" and y for l, y in zip(labels, yes))
    tn = sum(l == "no" and not y for l, y in zip(labels, yes))
    fn = len(labels) - tp - fp - tn
    precision, recall = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # eval_pope.py's fractions, times 100
    return {"accuracy": (tp + tn) / len(labels) * 100, "precision": precision * 100, "recall": recall * 100,
            "f1": f1 * 100, "yes_ratio": sum(yes) / len(labels) * 100}


def score(items, answers) -> dict[str, float]:
    out = {}
    for split in SPLITS:
        rows = [(i.truth["label"], says_yes(a)) for i, a in zip(items, answers, strict=True) if i.truth["split"] == split]
        out.update({f"{split}_{k}": v for k, v in split_scores(*zip(*rows)).items()})
    out["f1"] = sum(out[f"{s}_f1"] for s in SPLITS) / len(SPLITS)
    return out


def write(items, answers, out_dir) -> list[Path]:
    return [atomic.write_text(Path(out_dir) / "pope_answers.jsonl", "".join(
        json.dumps({"question_id": i.qid, "category": i.truth["split"], "prompt": i.prompt, "text": a}) + "\n"
        for i, a in zip(items, answers, strict=True)))]
