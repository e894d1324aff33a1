"""The benchmarks' official scoring on hand-made cases, and `evejax eval --bench` end to end."""
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evejax import cli
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
    # the server's .xlsx: one row per release row (round 0), written through a temporary file
    import openpyxl

    path, = mmbench.write(items, answers, tmp_path / "out")
    assert path.name == "mmbench_dev_20230712_predictions.xlsx" and list(path.parent.iterdir()) == [path]
    assert list(openpyxl.load_workbook(path).active.iter_rows(values_only=True)) == [
        ("index", "question", "A", "B", "C", "D", "prediction", "answer"),
        (0, "which colour?", "red", "green", "blue", "yellow", "A", "A"),
        (1, "which shape?", "circle", "square", None, None, "B", "B")]
    assert run.run_one(mmbench, None, tmp_path, tmp_path / "out", "llava", progress=False,
                       prompt_style="question") == {"error": "mmbench prompts list options; it has no "
                                                             "--prompt-style question"}


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


def test_question_style_gives_the_demo_exact_match_figures(tmp_path):
    """`eval --bench vqav2,pope --prompt-style question` asks as the demo's evaluation does (the
    question alone in vicuna_v1), so on a shapes benchmark in the VQAv2 and POPE layouts its figures
    are evaluate's exact-match ones. The tiny EVE's lm_head keeps two columns, "yes" and its negation
    "no", and one new token is asked: every answer is yes or no, where POPE's reading of an answer
    (no unless it says no) and exact match agree; VQAv2 with 10 equal references is exact match."""
    from test_checkpoint_io import EVE_MODEL, _init, _workdir

    from evejax.data import shapes

    cfg, params = _init(EVE_MODEL, 0)
    tokenizer = shapes.tokenizer()
    (yes,), (no,) = tokenizer.encode("yes"), tokenizer.encode("no")
    head = params["llm"]["lm_head"]["kernel"]
    cut = np.zeros_like(head)
    cut[:, yes], cut[:, no] = head[:, yes], -head[:, yes]
    params["llm"]["lm_head"]["kernel"] = cut
    _workdir(tmp_path / "run", {"model": EVE_MODEL}, params, 2)
    questions, presence = _write_vqav2_and_pope(tmp_path / "data", 16)
    argv = ["eval", str(tmp_path / "run"), "--bench", "vqav2,pope", "--data-root", str(tmp_path / "data"),
            "--tokenizer", "shapes", "--out", str(tmp_path / "out"), "--max-new", "1", "--prompt-style", "question",
            "--temperature", "0", "--top-k", "5"]  # the sampled decode path at temperature 0: greedy
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["prompt_style"] == "question"
    scores = {name: r["scores"] for name, r in results["results"].items()}

    demo = ev.evaluate(ev.Answerer(cfg, params, 100, tokenizer, max_new_tokens=1), questions)
    assert set(demo.predictions) == {"yes", "no"} and 0 < demo.accuracy < 1, demo.predictions
    written = json.loads((tmp_path / "out" / "vqav2_val2014_results.json").read_text())
    assert [w["answer"] for w in written] == demo.predictions
    assert scores["vqav2"]["val_accuracy"] == 100 * demo.accuracy
    assert len(presence) == demo.counts["presence"] > 1
    for split in pope.SPLITS:  # each split holds the presence questions once
        assert scores["pope"][f"{split}_accuracy"] == 100 * demo.per_type["presence"]


def test_submission_files_for_the_servers(tmp_path):
    from evejax.eval.benchmarks import mmvet, vizwiz

    (tmp_path / "vqav2").mkdir()
    (tmp_path / "vqav2" / vqav2.SPLITS["test-dev"][0]).write_text(json.dumps(
        {"questions": [{"question_id": 5, "image_id": 1, "question": "How many?"}]}))
    (tmp_path / "vqav2" / vqav2.FULL_TEST).write_text(json.dumps(
        {"questions": [{"question_id": q, "image_id": 1, "question": "x"} for q in (4, 5, 6)]}))
    items = vqav2.load(tmp_path, "internvl")
    assert items[0].prompt == "How many? Answer the question using a single word or phrase."
    assert str(items[0].image).endswith("test2015/COCO_test2015_000000000001.jpg")
    assert vqav2.score(items, ["Two."]) == {}
    path, = vqav2.write(items, ["Two."], tmp_path / "out")
    assert json.loads(path.read_text()) == [{"question_id": 4, "answer": ""}, {"question_id": 5, "answer": "2"},
                                            {"question_id": 6, "answer": ""}]

    (tmp_path / "vizwiz" / "Annotations").mkdir(parents=True)
    (tmp_path / "vizwiz" / "Annotations" / "test.json").write_text(json.dumps([{"image": "VizWiz_test_1.jpg",
                                                                              "question": "What is it?"}]))
    (tmp_path / "vizwiz" / "Annotations" / "val.json").write_text(json.dumps([{
        "image": "VizWiz_val_1.jpg", "question": "What?", "answers": [{"answer": "unanswerable"}] * 10}]))
    items = vizwiz.load(tmp_path, "llava")
    assert items[0].prompt == ("What is it?\nWhen the provided information is insufficient, respond with "
                               "'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert vizwiz.score(items, ["A cup.", "Unanswerable"]) == {"val_accuracy": 100.0}
    test_file, _ = vizwiz.write(items, ["A cup.", "Unanswerable"], tmp_path / "out")
    assert json.loads(test_file.read_text()) == [{"image": "VizWiz_test_1.jpg", "answer": "cup"}]

    (tmp_path / "mm-vet").mkdir()
    (tmp_path / "mm-vet" / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "v1_0.png", "question": "Q?"}}))
    items = mmvet.load(tmp_path, "llava")
    assert mmvet.score(items, ["An answer."]) == {}
    assert json.loads(mmvet.write(items, ["An answer."], tmp_path / "out")[0].read_text()) == {"v1_0": "An answer."}


def test_mme_and_scienceqa_release_layouts(tmp_path):
    release = tmp_path / mme.RELEASE
    for k, task in enumerate(mme.PERCEPTION + mme.COGNITION):
        images = qa = release / task
        if k % 2:  # the tasks that keep images and answers in subfolders
            images, qa = release / task / "images", release / task / "questions_answers_YN"
        images.mkdir(parents=True, exist_ok=True)
        qa.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(images / "1.png")
        (qa / "1.txt").write_text("Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n")
    items = mme.load(tmp_path, "llava")
    assert len(items) == 28 and items[0].prompt == ("Is it red? Please answer yes or no.\n"
                                                    "Answer the question using a single word or phrase.")
    scores = mme.score(items, ["yes", "No"] * 14)
    assert scores["perception"] == 2000.0 and scores["cognition"] == 800.0
    mme.write(items, ["yes", "No"] * 14, tmp_path / "out")
    assert (tmp_path / "out" / "mme_results" / "count.txt").read_text().splitlines()[0] == \
        "1.png\tIs it red? Please answer yes or no.\tYes\tYes"
    (release / "existence" / "1.png").unlink()
    with pytest.raises(common.MissingFile, match="existence/1"):
        mme.load(tmp_path, "llava")

    base = tmp_path / "scienceqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps({
        "1": {"question": "Which is a fish?", "choices": ["cat", "trout"], "answer": 1, "hint": "Look.",
              "image": "image.png"},
        "2": {"question": "No picture?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None}}))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    llava, = scienceqa.load(tmp_path, "llava")
    internvl, = scienceqa.load(tmp_path, "internvl")
    assert llava.prompt == "Context: Look.\nWhich is a fish?\nA. cat\nB. trout\n" + common.OPTION_LETTER
    assert internvl.prompt == "Look.\nWhich is a fish?\nA. cat\nB. trout\n" + common.OPTION_LETTER
    assert str(llava.image).endswith("images/test/1/image.png")
    assert scienceqa.score([llava, internvl], ["B", "trout"]) == {"img_accuracy": 100.0}
