"""SEED-Bench image questions (AILab-CVC release), scored here.

  ROOT/seed_bench/SEED-Bench.json   {"questions": [{question_id, question, choice_a..choice_d, answer,
                                     data_id, data_type, question_type_id}], "question_type": {name: id}}
  ROOT/seed_bench/SEED-Bench-image/{data_id}

Only data_type "image" (the paper's SEED column). Prompt (both protocols; InternVL reads LLaVA's
llava-seed-bench.jsonl): question, "A. choice" lines, "Answer with the option's letter from the given
choices directly." Right: LLaVA's convert_seed_for_submission.py compares the raw answer with the
letter; InternVL reads the letter with its post_process (common.option_letter) first. Reported: the
accuracy over all image questions and per question type. Written: seed_image_predictions.jsonl
({question_id, prediction} lines, the upload format).
"""
from __future__ import annotations

import json
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "seed", "SEED"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 100}
CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / "seed_bench"
    data = common.read_json(base / "SEED-Bench.json", "SEED-Bench questions")
    type_names = {v: k for k, v in data.get("question_type", {}).items()}
    return [common.Item(q["question_id"], base / "SEED-Bench-image" / q["data_id"],
                        common.option_prompt(q["question"], [q[c] for c in CHOICES]),
                        {"answer": q["answer"], "options": [q[c] for c in CHOICES], "protocol": protocol,
                         "type": type_names.get(q["question_type_id"], str(q["question_type_id"]))})
            for q in data["questions"] if q.get("data_type", "image") == "image"]


def prediction(item, answer: str) -> str:
    return answer if item.truth["protocol"] == "llava" else common.option_letter(answer, item.truth["options"])


def score(items, answers) -> dict[str, float]:
    right = [prediction(i, a) == i.truth["answer"] for i, a in zip(items, answers, strict=True)]
    out = {"accuracy": common.percent(sum(right), len(items))}
    for kind in sorted({i.truth["type"] for i in items}):
        picked = [r for i, r in zip(items, right) if i.truth["type"] == kind]
        out[f"type_{kind}"] = common.percent(sum(picked), len(picked))
    return out


def write(items, answers, out_dir) -> list[Path]:
    return [atomic.write_text(Path(out_dir) / "seed_image_predictions.jsonl", "".join(
        json.dumps({"question_id": i.qid, "prediction": prediction(i, a)}) + "\n"
        for i, a in zip(items, answers, strict=True)))]
