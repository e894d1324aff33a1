"""What every benchmark module shares: the question record, file checks, the two protocols' prompts,
and the VQA answer normalisation and accuracy.

A benchmark module reads its files into `Item`s (one question each), the runner asks the model
`answer([(PIL image, prompt), ...]) -> [text, ...]`, and the module's `score(items, answers)` returns
{metric: value} (percent) for what has ground truth locally, and `write(items, answers, out_dir)`
writes the files the official server or script takes.

VQA normalisation (`normalize_answer`): the EvalAI answer processor that LLaVA's
convert_{vqav2,vizwiz}_for_submission.py applies to every answer before upload, and that LLaVA's
and InternVL's TextVQA evaluators apply to prediction and references alike: lower case; drop "," and
"?" and split "'s"; punctuation removed where it touches a space (or when the text holds a
digit-comma-digit), else turned into a space; a period dropped unless a digit follows (at most 32
periods: the official code passes re.UNICODE, 32, as the count); number words zero..ten and "none" to
digits; the articles a, an, the dropped; missing apostrophes restored ("dont" -> "don't").

VQA accuracy of one prediction against the 10 human answers: for each of the 10 leave-one-out sets of
9, min(#answers equal to the prediction / 3, 1); the mean of the 10. `vqa_accuracy` is the official
VQA evaluation (GT-Vision-Lab/VQA vqaEval.py, also the server's): prediction and references are
normalised (punctuation, number words, articles, contractions) only when the 10 references are not
all the same. `textvqa_accuracy` (m4c TextVQAAccuracyEvaluator) always normalises both sides with the
full processor.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

# The two protocols: EVE is evaluated as LLaVA-1.5 (vicuna_v1, greedy), HoVLE as InternVL (chat()).
PROTOCOLS = ("llava", "internvl")
# How a question is put to the model: "protocol", the protocol's prompt (its instruction appended,
# as the papers ask); "question", the question text alone, as `evejax eval` asks the shapes questions
# and `evejax demo` scores them (open and yes/no benchmarks only: a prompt with options keeps them).
PROMPT_STYLES = ("protocol", "question")
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass
class Item:
    """One question: `image` is a file path or a callable returning the PIL image (MMBench keeps its
    images inside the question file); `truth` holds what scoring and writing need; `question` the
    question text alone (PROMPT_STYLES "question"), None where the prompt must list options."""
    qid: Any
    image: Any
    prompt: str
    truth: dict = dataclasses.field(default_factory=dict)
    question: str | None = None

    def picture(self) -> Image.Image:
        picture = self.image() if callable(self.image) else Image.open(self.image)
        return picture.convert("RGB")


class MissingFile(FileNotFoundError):
    """A benchmark file is not where the official release puts it."""


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingFile(f"{what} not found: expected at {path}")
    return path


def read_json(path: Path, what: str):
    with open(require(path, what)) as f:
        return json.load(f)


def read_jsonl(path: Path, what: str) -> list[dict]:
    with open(require(path, what)) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")


def percent(right: float, total: int) -> float:
    return 100.0 * right / total if total else 0.0


# ---- VQA answer normalisation --------------------------------------------------------------------

_CONTRACTION_PAIRS = (
    "aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|"
    "couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|"
    "hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|"
    "howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|"
    "itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|"
    "mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|"
    "neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|"
    "'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|"
    "shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|"
    "somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|"
    "someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|"
    "someones someone's|somethingd something'd|somethingd've something'd've|"
    "something'dve something'd've|somethingll something'll|thats that's|thered there'd|"
    "thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|"
    "theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|"
    "wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|"
    "whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's|"
    "whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|"
    "whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|"
    "wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|"
    "yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|"
    "you'dve you'd've|youll you'll|youre you're|youve you've")
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_PAIRS.split("|"))
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# The official "(?!<=\d)" is a lookahead (a typo for a lookbehind), so a period goes unless a digit follows.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_OFFICIAL_PERIOD_COUNT = 32  # re.UNICODE passed as sub()'s count in the official code


def strip_punctuation(text: str) -> str:
    out = text
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        touches_space = p + " " in text or " " + p in text
        out = out.replace(p, "" if touches_space or remove_all else " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The EvalAI answer processor (module docstring)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return digits_articles_contractions(strip_punctuation(_whitespace(text)))


def _leave_one_out(prediction: str, references: Sequence[str]) -> float:
    scores = [min(1.0, sum(r == prediction for j, r in enumerate(references) if j != i) / 3)
              for i in range(len(references))]
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Official VQA accuracy in [0, 1] of a submitted answer (module docstring)."""
    prediction, references = _whitespace(prediction), [_whitespace(r) for r in references]
    if len(set(references)) > 1:
        prediction = digits_articles_contractions(strip_punctuation(prediction))
        references = [digits_articles_contractions(strip_punctuation(r)) for r in references]
    return _leave_one_out(prediction, references)


def vqa_val_score(items, answers) -> dict[str, float]:
    """{"val_accuracy"} over the items with local answers (VQAv2 and VizWiz val), {} when none has."""
    scored = [(normalize_answer(a), i.truth["answers"]) for i, a in zip(items, answers, strict=True)
              if "answers" in i.truth]
    if not scored:
        return {}
    return {"val_accuracy": percent(sum(vqa_accuracy(p, r) for p, r in scored), len(scored))}


def textvqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """m4c (TextVQA) accuracy in [0, 1]: both sides through `normalize_answer`."""
    return _leave_one_out(normalize_answer(prediction), [normalize_answer(r) for r in references])


def option_prompt(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """hint, question and "A. option" lines, then the option-letter instruction (LLaVA's
    model_vqa_mmbench and InternVL's evaluate_mmbench build it alike)."""
    text = (hint + "\n" if hint else "") + question
    for letter, option in zip("ABCDEFGH", options):
        text += f"\n{letter}. {option}"
    return text + "\n" + OPTION_LETTER


def option_letter(prediction: str, options: Sequence[str]) -> str:
    """The option a free-text answer picks, as InternVL's post_process reads it: a one-character
    answer as it is; else its first character when that is an option letter; else the first option
    whose text it contains; else the stripped answer (which then matches no letter)."""
    text = prediction.strip()
    letters = "ABCDEFGH"[:len(options)]
    if len(text) == 1:
        return text
    if text and text[0] in letters:
        return text[0]
    return next((letter for letter, option in zip(letters, options) if option in text), text)


Answer = Callable[[Sequence[tuple[Image.Image, str]]], list[str]]
