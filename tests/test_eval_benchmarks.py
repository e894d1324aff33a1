"""The benchmarks' official scoring on hand-made cases, and `evejax eval --bench` end to end."""
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evejax import cli
from evejax.data import shapes
from evejax.eval import evaluate as ev
from evejax.eval.benchmarks import common, gqa, mmbench, mme, pope, run, scienceqa, seed, textvqa, vqav2


def _vqav2(prediction, references):
    item = common.Item(1, None, "", {"split": "val", "answers": references})
    return vqav2.score([item], [prediction])["val_accuracy"]


# ---- VQA normalisation and accuracy --------------------------------------------------------------

@pytest.mark.parametrize("prediction, references, expected", [
    ("two", ["2"] * 10, 100.0),                       # number words become digits before upload
    ("a dog", ["dog"] * 10, 100.0),                   # articles dropped
    ("Dog.", ["dog"] * 10, 100.0),                    # capitals and a trailing period
    ("yes!", ["yes"] * 10, 100.0),                    # punctuation not touching a space: a space
    ("No", ["yes"] * 10, 0.0),
    ("dont", ["don't"] * 10, 100.0),                  # the contraction map restores the apostrophe
    ("don't", ["dont"] * 10, 0.0),                    # identical references are compared as they are
    ("don't", ["dont"] * 9 + ["no"], 100.0),          # ... and normalised when they differ
    ("red", ["red"] * 3 + ["blue"] * 7, 90.0),        # 3 of 10: (3 x 2/3 + 7 x 1) / 10
    ("red", ["red"] + ["blue"] * 9, 30.0),            # 1 of 10: 9 x 1/3 / 10
    ("red", ["red"] * 2 + ["blue"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10 * 100),
])
def test_vqa_accuracy_of_submitted_answers(prediction, references, expected):
    assert _vqav2(prediction, references) == expected


def test_normalisation_and_textvqa_accuracy():
    assert common.normalize_answer("Two dogs, three cats?") == "2 dogs 3 cats"
    assert common.normalize_answer("1,000") == "1000"
    assert common.normalize_answer("3.5 m.") == "3.5 m"
    assert common.normalize_answer("the man's hat") == "man 's hat"
    assert common.normalize_answer("t-shirt") == "t shirt" and common.normalize_answer("t - shirt") == "t shirt"
    assert textvqa.score([common.Item(1, None, "", {"answers": ["dont"] * 10})], ["don't"]) == {"accuracy": 100.0}
    assert common.textvqa_accuracy("Two", ["2"] * 3 + ["x"] * 7) == 0.9


def test_gqa_exact_match_after_stripping_periods_and_capitals(tmp_path):
    items = [common.Item(q, None, "", {"answer": a}) for q, a in (("1", "yes"), ("2", "dog"), ("3", "dog"))]
    assert gqa.score(items, ["Yes.", "Dog", "a dog"]) == {"accuracy": 200 / 3}
    written = json.loads(gqa.write(items, ["Yes.", "Dog", "a dog"], tmp_path)[0].read_text())
    assert written[0] == {"questionId": "1", "prediction": "yes"}


# ---- yes/no and multiple choice ----------------------------------------------------------------

POPE_ANSWERS = ["Yes", "No, there is not.", "Yes.", "There is no dog.", "yes", "Not at all"]
POPE_LABELS = ["yes", "no", "no", "yes", "yes", "no"]


def test_pope_metrics_and_yes_ratio():
    # "Not at all" is a yes: the official check looks for "no", "No" and "not", not "Not".
    # yes answers 0, 2, 4, 5: TP 0, 4; FP 2, 5; TN 1; FN 3
    got = pope.split_scores(POPE_LABELS, [pope.says_yes(a) for a in POPE_ANSWERS])
    assert got == {"accuracy": 50.0, "precision": 50.0, "recall": 2 / 3 * 100,
                   "f1": 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3) * 100, "yes_ratio": 4 / 6 * 100}


def test_mme_acc_plus_counts_an_image_only_when_both_answers_are_right():
    def items(task, rows):
        return [common.Item(f"{task}/{img}", None, "", {"task": task, "question": q, "truth": t, "protocol": "llava"})
                for img, q, t in rows]
    count = items("count", [("a.jpg", "q1", "Yes"), ("a.jpg", "q2", "No"), ("b.jpg", "q1", "Yes"),
                            ("b.jpg", "q2", "No")])
    code = items("code_reasoning", [("c.png", "q", "Yes"), ("c.png", "q2", "No")])
    scores = mme.score(count + code, ["Yes, two.", "no", "yes", "Yes", "maybe", "No."])
    assert scores["count"] == 75.0 + 50.0            # 3 of 4 right; image a both right, image b not
    assert scores["code_reasoning"] == 50.0 + 0.0    # "maybe" is "other": wrong
    assert scores["perception"] == 125.0 and scores["cognition"] == 50.0


def _mmbench_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
    lines = ["\t".join(header)] + ["\t".join([str(i), q, "nan", *opts, ans, "cat", image, "src"])
                                   for i, q, opts, ans in rows]
    path.write_text("\n".join(lines) + "\n")


def test_mmbench_circular_question_right_in_three_of_four_rotations_counts_zero(tmp_path):
    _mmbench_tsv(tmp_path / "mmbench" / mmbench.TSV, [
        (0, "which colour?", ["red", "green", "blue", "yellow"], "A"),
        (1, "which shape?", ["circle", "square", "nan", "nan"], "B")])
    items = mmbench.load(tmp_path, "llava")
    assert [(i.qid, i.truth["round"], i.truth["answer"]) for i in items] == [
        (0, 0, "A"), (0, 1, "D"), (0, 2, "C"), (0, 3, "B"), (1, 0, "B"), (1, 1, "A")]
    assert items[1].prompt == ("which colour?\nA. green\nB. blue\nC. yellow\nD. red\n" + common.OPTION_LETTER)
    assert items[0].picture().size == (8, 8)
    answers = ["A", "D. red", "B", "B", "B", "square"]         # question 0: rotation 2 wrong
    assert mmbench.score(items, answers) == {"circular_accuracy": 50.0, "row_accuracy": 100 * 5 / 6}


def test_mmbench_released_rotations_are_grouped_by_index(tmp_path):
    _mmbench_tsv(tmp_path / "mmbench" / mmbench.TSV, [
        (7, "q", ["x", "y", "nan", "nan"], "A"), (1_000_007, "q", ["y", "x", "nan", "nan"], "B")])
    items = mmbench.load(tmp_path, "internvl")
    assert len(items) == 2 and {i.truth["group"] for i in items} == {7}
    assert mmbench.score(items, ["A", "B"])["circular_accuracy"] == 100.0
    assert mmbench.score(items, ["A", "A"])["circular_accuracy"] == 0.0


def test_scienceqa_and_seed_option_letters():
    choices = ["cat", "dog", "fish"]
    item = common.Item("1", None, "", {"answer": "B", "choices": choices, "protocol": "llava"})
    assert [scienceqa.letter(item, a) for a in ("B", "B. dog", "The answer is B.", "dog", "D", "(B)")] == \
        ["B", "B", "B", "FAILED", "FAILED", "FAILED"]
    item.truth["protocol"] = "internvl"
    assert [scienceqa.letter(item, a) for a in ("B", "B) dog", "it is a dog", "(B)")] == ["B", "B", "B", "(B)"]
    llava = common.Item(1, None, "", {"answer": "C", "options": list("wxyz"), "protocol": "llava", "type": "t"})
    internvl = common.Item(2, None, "", {"answer": "C", "options": list("wxyz"), "protocol": "internvl", "type": "t"})
    assert seed.score([llava, internvl], ["C.", "C."]) == {"accuracy": 50.0, "type_t": 50.0}


# ---- end to end: files in the release layouts -------------------------------------------------------

def _write_vqav2_and_pope(root: Path, num_questions: int):
    """Held-out shapes questions as VQAv2 val (10 identical references, written as VQA annotators
    write numbers: digits) and their presence questions as POPE's three splits."""
    questions = ev.heldout_questions(num_questions)
    (root / "vqav2" / "val2014").mkdir(parents=True)
    (root / "pope" / "coco").mkdir(parents=True)
    (root / "pope" / "val2014").mkdir(parents=True)
    vqa_q, vqa_a, presence = [], [], []
    for k, q in enumerate(questions):
        q.image.save(root / "vqav2" / "val2014" / f"COCO_val2014_{q.scene_index:012d}.jpg", quality=95)
        vqa_q.append({"question_id": k, "image_id": q.scene_index, "question": q.question})
        vqa_a.append({"question_id": k, "answers": [{"answer": common.normalize_answer(q.answer), "answer_id": j}
                                                    for j in range(1, 11)]})
        if q.kind == "presence":
            name = f"COCO_val2014_{q.scene_index:012d}.jpg"
            q.image.save(root / "pope" / "val2014" / name)
            presence.append({"image": name, "text": q.question, "label": q.answer})
    (root / "vqav2" / vqav2.SPLITS["val"][0]).write_text(json.dumps({"questions": vqa_q}))
    (root / "vqav2" / vqav2.SPLITS["val"][1]).write_text(json.dumps({"annotations": vqa_a}))
    for split in pope.SPLITS:
        (root / "pope" / "coco" / f"coco_pope_{split}.json").write_text(
            "".join(json.dumps({"question_id": k + 1, **p}) + "\n" for k, p in enumerate(presence)))
    return questions, presence


def test_run_scores_the_vqav2_and_pope_layouts_and_names_a_missing_file(tmp_path):
    questions, presence = _write_vqav2_and_pope(tmp_path / "data", 24)
    truths = [q.answer for q in questions] + [p["label"] for p in presence] * 3  # the order of asking
    asked = []

    def answer(pairs):  # right, with the capital and period a model adds, except every third question
        out = []
        for pair in pairs:
            asked.append(pair)
            out.append("wrong" if len(asked) % 3 == 0 else truths[len(asked) - 1].capitalize() + ".")
        return out

    results = run.run(["vqav2", "gqa", "pope"], answer, tmp_path / "data", tmp_path / "out", "llava", progress=False)
    assert results["gqa"] == {"missing": "GQA testdev-balanced questions not found: expected at "
                                         f"{tmp_path / 'data' / 'gqa' / gqa.QUESTIONS}"}
    assert results["vqav2"]["scores"] == {"val_accuracy": 100 * (24 - 8) / 24}
    assert asked[0][1] == questions[0].question + "\nAnswer the question using a single word or phrase."
    assert asked[0][0].size == questions[0].image.size
    n = len(presence)
    right = [(24 + k + 1) % 3 != 0 for k in range(3 * n)]  # POPE's answers, split by split
    labels = [p["label"] for p in presence]
    said_yes = [label == "yes" if r else True for label, r in zip(labels * 3, right)]  # "wrong" has no "no"
    for s, split in enumerate(pope.SPLITS):
        want = pope.split_scores(labels, said_yes[s * n:(s + 1) * n])
        assert {k: results["pope"]["scores"][f"{split}_{k}"] for k in want} == want
    written = json.loads((tmp_path / "out" / "vqav2_val2014_results.json").read_text())
    assert written[0] == {"question_id": 0, "answer": common.normalize_answer(questions[0].answer)}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"]["gqa"] == results["gqa"]
    table = run.table(results, "llava")
    assert table.splitlines()[0].split() == ["VQAv2", "GQA", "POPE"]
    assert table.splitlines()[1].split() == ["measured", "66.7", "missing", f"{results['pope']['scores']['f1']:.1f}"]
    assert table.splitlines()[2].split() == ["EVE-7B", "75.4", "60.8", "83.6"]


def test_cli_runs_a_tiny_eve_on_the_vqav2_and_pope_layouts(tmp_path, capsys):
    from test_checkpoint_io import EVE_MODEL, _init, _workdir

    cfg, params = _init(EVE_MODEL, 0)
    _workdir(tmp_path / "run", {"model": EVE_MODEL}, params, 2)
    questions, presence = _write_vqav2_and_pope(tmp_path / "data", 4)
    argv = ["eval", str(tmp_path / "run"), "--bench", "vqav2,pope,mme", "--data-root", str(tmp_path / "data"),
            "--tokenizer", "shapes", "--out", str(tmp_path / "out"), "--max-new", "3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "MME_Benchmark_release_version" in printed.err and "EVE-7B (HD)" in printed.out
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert results["vqav2"]["questions"] == 4 and results["pope"]["questions"] == 3 * len(presence)
    assert "missing" in results["mme"]
    # with 10 identical references the VQA accuracy is the exact match of the submitted answer
    written = json.loads((tmp_path / "out" / "vqav2_val2014_results.json").read_text())
    exact = np.mean([w["answer"] == common.normalize_answer(q.answer) for w, q in zip(written, questions)])
    assert results["vqav2"]["scores"]["val_accuracy"] == 100 * exact
    lines = (tmp_path / "out" / "pope_answers.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(presence) and json.loads(lines[0])["category"] == "adversarial"
