"""MM-Vet (yuweihao/MM-Vet release): answers for its GPT-4 grader (no local score).

  ROOT/mm-vet/mm-vet.json   {"v1_0": {imagename, question, answer, capability}, ...}
  ROOT/mm-vet/images/{imagename}

Prompt: the question as it is (LLaVA-1.5 asks MM-Vet free-form; InternVL's evaluate_mmvet.py adds an
empty instruction). Written: mmvet_results.json {"v1_0": answer, ...}, the grader's input (LLaVA's
convert_mmvet_for_eval.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from evejax import atomic
from evejax.eval.benchmarks import common

NAME, COLUMN = "mmvet", "MM-Vet"
MAX_NEW_TOKENS = {"llava": 128, "internvl": 1000}


def load(root, protocol: str) -> list[common.Item]:
    common.check_protocol(protocol)
    base = Path(root) / "mm-vet"
    return [common.Item(qid, base / "images" / q["imagename"], q["question"], question=q["question"])
            for qid, q in common.read_json(base / "mm-vet.json", "MM-Vet questions").items()]


def score(items, answers) -> dict[str, float]:
    return {}


def write(items, answers, out_dir) -> list[Path]:
    return [atomic.write_text(Path(out_dir) / "mmvet_results.json", json.dumps(
        {i.qid: a for i, a in zip(items, answers, strict=True)}, indent=2))]
