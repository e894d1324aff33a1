"""ScienceQA-IMG (scienceqa.github.io release): the test problems that have an image, scored here.

  ROOT/scienceqa/problems.json     {pid: {question, choices: [..], answer: int, hint, image, ...}}
  ROOT/scienceqa/pid_splits.json   {"test": [pid, ...], ...}
  ROOT/scienceqa/images/test/{pid}/{image}

Prompt (LLaVA-1.5, llava_test_CQM-A.json with --single-pred-prompt): "Context: {hint}\\n" when there is a
hint, the question, "A. choice" lines, "Answer with the option's letter from the given choices
directly." (the released file's exact text is unverified); InternVL (evaluate_scienceqa.py): the hint
line without "Context: ", otherwise the same. The chosen letter: LLaVA's eval_science_qa.py (the whole
answer a letter, or "X. " at its start, or one "The answer is X." in it; else failed); InternVL's
post_process (common.option_letter). Written: scienceqa_test_answers.jsonl ({question_id, prompt, text}
lines, the result file eval_science_qa.py reads).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "scienceqa", "SQA-I"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 100}
LETTERS = "ABCDE"
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / NAME
    problems = common.read_json(base / "problems.json", "ScienceQA problems")
    items = []
    for pid in common.read_json(base / "pid_splits.json", "ScienceQA splits")["test"]:
        p = problems[pid]
        if not p.get("image"):
            continue
        hint = p.get("hint") or None
        if hint and protocol == "llava":
            hint = "Context: " + hint
        items.append(common.Item(pid, base / "images" / "test" / pid / p["image"],
                                 common.option_prompt(p["question"], p["choices"], hint),
                                 {"answer": LETTERS[p["answer"]], "choices": p["choices"], "protocol": protocol}))
    return items


def llava_letter(text: str) -> str:
    if text in LETTERS:
        return text
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def letter(item, answer: str) -> str:
    if item.truth["protocol"] == "llava":
        picked = llava_letter(answer)
        return picked if picked in LETTERS[:len(item.truth["choices"])] else "FAILED"
    return common.option_letter(answer, item.truth["choices"])


def score(items, answers) -> dict[str, float]:
    right = sum(letter(i, a) == i.truth["answer"] for i, a in zip(items, answers, strict=True))
    return {"img_accuracy": common.percent(right, len(items))}


def write(items, answers, out_dir) -> list[Path]:
    return [atomic.write_text(Path(out_dir) / "scienceqa_test_answers.jsonl", "".join(
        json.dumps({"question_id": i.qid, "prompt": "<image>\n" + i.prompt, "text": a}) + "\n"
        for i, a in zip(items, answers, strict=True)))]
