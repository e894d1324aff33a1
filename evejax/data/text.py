"""Tokenizers and EVE's chat templates.

`encode_conversation(turns, tokenizer, template, max_len)` turns a LLaVA-style
record ([{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt",
"value": "..."}, ...]) into

  input_ids  int32 [T]  BOS once, text ids, IMAGE_TOKEN_INDEX (-200) where
                        `<image>` stands (one id; the model later splices the
                        1 + h * (w + 1) image tokens in its place)
  loss_mask  bool  [T]  True on supervised tokens, aligned with input_ids (the
                        token at t is predicted from t - 1), as official targets:
                        vicuna_v1: each answer + its "</s>" (EOS);
                        plain: the caption + its "\\n" separator (no EOS, as official)

`max_len` truncates these text ids, i.e. before image expansion, as the
official collator does.

HoVLE / InternVL (`encode_internlm2_chat`): the `internlm2-chat` template, with
the k-th `<image>` expanded in the text to <img> + <IMG_CONTEXT> x (tokens per
tile * tiles of image k) + </img> before tokenizing; input_ids int32 [T] (BOS,
then the ids, special tokens by INTERNLM2_SPECIAL_IDS) and loss_mask bool [T]
(each answer + its "<|im_end|>"), aligned the same way.

Tokenizers: `SentencePieceTokenizer` (LLaMA/Vicuna tokenizer.model; needs the
`sentencepiece` package) and `WordTokenizer` (word-level, for generated data).
Both follow the `Tokenizer` protocol: `encode` returns ids without BOS.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Protocol, Sequence

import numpy as np

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS or EOS."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS, EOS and padding are dropped."""


class SentencePieceTokenizer:
    """A LLaMA/Vicuna `tokenizer.model`.

    `encode` is `SentencePieceProcessor.encode` of the whole string, which is
    what the official slow (legacy) LlamaTokenizer does to each text segment.
    LLaMA's model has no pad piece; official training pads with UNK (id 0),
    so `pad_id` falls back to the UNK id.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("SentencePieceTokenizer needs the `sentencepiece` package: "
                              "pip install sentencepiece") from e
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path} does not exist; pass the "
                                    "tokenizer.model file shipped with the checkpoint")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i != self.pad_id])


class WordTokenizer:
    """Deterministic word-level tokenizer for generated data.

    Ids: pad 0, bos 1, eos 2, unk 3, then the distinct `words` in the order
    given. Text splits on spaces; each newline and each of `PUNCTUATION` is a
    token of its own. `decode` joins words with single spaces and attaches
    punctuation to the word before it, so text written that way round-trips.
    """

    PUNCTUATION = "?.,:;!"
    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
    _PIECE = re.compile(r"\n|[" + re.escape(PUNCTUATION) + r"]|[^\s" + re.escape(PUNCTUATION) + r"]+")

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Iterable[str]):
        self._pieces = list(self.SPECIALS)
        for word in words:
            if not isinstance(word, str) or self.split(word) != [word]:
                raise ValueError(f"WordTokenizer vocabulary entry {word!r} is not a single "
                                 "piece; build the vocabulary with WordTokenizer.from_texts")
            if word not in self._pieces:
                self._pieces.append(word)
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        self.vocab_size = len(self._pieces)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """Vocabulary = sorted distinct pieces of `texts` (independent of text order)."""
        return cls(sorted({piece for text in texts for piece in cls.split(text)}))

    @classmethod
    def split(cls, text: str) -> list[str]:
        return cls._PIECE.findall(text)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(piece, self.unk_id) for piece in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        out = ""
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary (size {self.vocab_size})")
            piece = self._pieces[i]
            glue = not out or out.endswith("\n") or piece == "\n" or piece in self.PUNCTUATION
            out += piece if glue else " " + piece
        return out


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """The official `Conversation` fields EVE uses. style "two": system + sep, then
    "ROLE: message" + (sep after a user turn, sep2 after an assistant turn);
    style "plain": "<image>" + caption + sep, with the question dropped."""

    name: str
    system: str
    roles: tuple
    sep: str
    sep2: str | None
    style: str


TEMPLATES = {
    "plain": ConversationTemplate(name="plain", system="", roles=("", ""), sep="\n", sep2=None,
                                  style="plain"),
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>", style="two"),
}


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
    input_ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """Official-style targets: input_ids where supervised, IGNORE_INDEX (-100) elsewhere."""
        return np.where(self.loss_mask, self.input_ids, IGNORE_INDEX).astype(np.int32)


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; "
                         f"choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


class MultipleImagesError(ValueError):
    """A conversation with more than one `<image>`."""


def _checked_pairs(turns) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA record, with `<image>` moved to the
    front of its turn as official `preprocess_multimodal` does.

    More than one `<image>` raises MultipleImagesError, also within one turn,
    where official `preprocess_multimodal` removes them all and puts one in
    front (two images' placeholders become one, for one image)."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError(f"a conversation must be a non-empty list of turns, got {turns!r:.200}")
    for k, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("from") in ("human", "gpt")
                and isinstance(turn.get("value"), str)):
            raise ValueError(f"turn {k} must be {{'from': 'human' | 'gpt', 'value': str}}, "
                             f"got {turn!r:.200}")
    if turns[0]["from"] != "human":
        # Official training drops a leading assistant turn.
        turns = turns[1:]
    n_images = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n_images > 1:
        raise MultipleImagesError(f"EVE takes at most one image per sample; this conversation has "
                                  f"{n_images} {IMAGE_PLACEHOLDER} placeholders")
    if len(turns) % 2 or not turns:
        raise ValueError("a conversation must alternate human/gpt turns and end with a gpt turn; "
                         f"got roles {[t['from'] for t in turns]}")
    values = []
    for k, turn in enumerate(turns):
        expected = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(f"turn {k} is from {turn['from']!r}, expected {expected!r}: turns "
                             "must alternate human/gpt")
        value = turn["value"]
        if IMAGE_PLACEHOLDER in value:
            value = (IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        values.append(value)
    if any(IMAGE_PLACEHOLDER in v for v in values[1::2]):
        raise ValueError(f"{IMAGE_PLACEHOLDER} may only appear in a human turn")
    return list(zip(values[0::2], values[1::2]))


def _encode_with_image(text: str, tokenizer: Tokenizer) -> list[int]:
    """Encodes the text on each side of `<image>` separately, as official
    `tokenizer_image_token` does, with IMAGE_TOKEN_INDEX in between."""
    ids = []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk))
    return ids


def render_conversation(turns, template: str | ConversationTemplate = "vicuna_v1") -> str:
    """The prompt string the official `Conversation.get_prompt` builds for training."""
    tpl = get_template(template)
    pairs = _checked_pairs(turns)
    if tpl.style == "plain":
        return IMAGE_PLACEHOLDER + pairs[0][1] + tpl.sep
    text = tpl.system + tpl.sep
    for question, answer in pairs:
        text += f"{tpl.roles[0]}: {question}{tpl.sep}{tpl.roles[1]}: {answer}{tpl.sep2}"
    return text


def encode_conversation(turns, tokenizer: Tokenizer,
                        template: str | ConversationTemplate = "vicuna_v1",
                        max_len: int | None = None) -> TokenizedConversation:
    """Token ids and loss mask of a training conversation; see the module docstring.

    vicuna_v1: the text is cut at each "</s>" into rounds, each round is encoded
    on its own and followed by the EOS id (the official slow tokenizer splits on
    "</s>" the same way); everything up to and including "ASSISTANT:" is masked.
    Official masks len(tokens of "... ASSISTANT: ") - 1 tokens, relying on the
    trailing space becoming one lone "▁" piece; the instruction here is encoded
    without that space, which gives the same count for SentencePiece and the
    right count for tokenizers that drop spaces.
    plain: needs exactly one human/gpt pair with `<image>` in the human turn.
    """
    tpl = get_template(template)
    pairs = _checked_pairs(turns)
    ids, mask = [tokenizer.bos_id], [False]
    if tpl.style == "plain":
        if len(pairs) != 1 or IMAGE_PLACEHOLDER not in pairs[0][0]:
            raise ValueError("the plain template takes one human turn containing "
                             f"{IMAGE_PLACEHOLDER} and one gpt turn (a caption)")
        caption = tokenizer.encode(pairs[0][1] + tpl.sep)
        ids += [IMAGE_TOKEN_INDEX] + caption
        mask += [False] + [True] * len(caption)
    else:
        for k, (question, answer) in enumerate(pairs):
            prefix = tpl.system + tpl.sep if k == 0 else ""
            instruction = f"{prefix}{tpl.roles[0]}: {question}{tpl.sep}{tpl.roles[1]}:"
            round_ids = _encode_with_image(f"{instruction} {answer}", tokenizer)
            instruction_ids = _encode_with_image(instruction, tokenizer)
            if round_ids[:len(instruction_ids)] != instruction_ids:
                raise ValueError(f"tokenizing round {k} splits differently with and without the "
                                 f"answer {answer[:80]!r}; the loss mask boundary is undefined")
            ids += round_ids + [tokenizer.eos_id]
            mask += [False] * len(instruction_ids) + [True] * (len(round_ids) - len(instruction_ids) + 1)
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        ids, mask = ids[:max_len], mask[:max_len]
    return TokenizedConversation(input_ids=np.asarray(ids, np.int32),
                                 loss_mask=np.asarray(mask, bool))


def encode_prompt(question: str, tokenizer: Tokenizer,
                  template: str | ConversationTemplate = "vicuna_v1") -> np.ndarray:
    """Generation prompt int32 [T]: BOS + one user turn + "ASSISTANT:" (plain: BOS + image).

    A question without `<image>` gets none; official evaluation puts
    "<image>\\n" in front of the question itself.
    """
    tpl = get_template(template)
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    if tpl.style == "plain":
        return np.asarray([tokenizer.bos_id, IMAGE_TOKEN_INDEX], np.int32)
    text = f"{tpl.system}{tpl.sep}{tpl.roles[0]}: {question}{tpl.sep}{tpl.roles[1]}:"
    return np.asarray([tokenizer.bos_id] + _encode_with_image(text, tokenizer), np.int32)


# ---- internlm2-chat (HoVLE, InternVL) ---------------------------------------------------------

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# InternLM2-chat's chat tokens and InternVL's added image tokens (added_tokens.json).
INTERNLM2_SPECIAL_IDS = {IM_END: 92542, IM_START: 92543, IMG_START: 92544, IMG_END: 92545,
                         IMG_CONTEXT: 92546}
INTERNVL_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                   "是一个有用无害的人工智能助手。")
INTERNLM2_CHAT = ConversationTemplate(
    name="internlm2-chat", system=INTERNVL_SYSTEM,
    roles=(IM_START + "user\n", IM_START + "assistant\n"), sep=IM_END, sep2=None, style="mpt")


class ImageCountError(ValueError):
    """The `<image>` placeholders of a conversation do not match its images."""


def _chat_pairs(turns, n_images: int) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA-style record for internlm2-chat.

    As official InternVL training: one image and no `<image>` puts "<image>\\n"
    in front of the first question; placeholders stay where they are. Every other
    count mismatch raises ImageCountError. Text holding a chat or image token
    (e.g. "<|im_end|>") would be read as that token, so it raises ValueError.
    """
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError(f"a conversation must be a non-empty list of turns, got {turns!r:.200}")
    roles = [t.get("from") if isinstance(t, dict) else None for t in turns]
    if (len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2)
            or not all(isinstance(t.get("value"), str) for t in turns)):
        raise ValueError("an internlm2-chat conversation must alternate {'from': 'human' | 'gpt', "
                         "'value': str} turns, starting with human and ending with gpt; "
                         f"got roles {roles}")
    values = [t["value"] for t in turns]
    for k, value in enumerate(values):
        found = [s for s in INTERNLM2_SPECIAL_IDS if s in value]
        if found:
            raise ValueError(f"turn {k} contains {found}, which would be read as special tokens")
    placeholders = sum(v.count(IMAGE_PLACEHOLDER) for v in values)
    if placeholders == 0 and n_images == 1:
        values[0] = IMAGE_PLACEHOLDER + "\n" + values[0]
    elif placeholders != n_images:
        raise ImageCountError(f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders "
                              f"for {n_images} images; give one {IMAGE_PLACEHOLDER} per image")
    return list(zip(values[0::2], values[1::2]))


def _expand_images(text: str, image_tokens: list[int]) -> str:
    """Replaces successive `<image>` with <img> + <IMG_CONTEXT> x n + </img>; pops the counts used."""
    chunks = text.split(IMAGE_PLACEHOLDER)
    out = chunks[0]
    for chunk in chunks[1:]:
        out += IMG_START + IMG_CONTEXT * image_tokens.pop(0) + IMG_END + chunk
    return out


def _internlm2_segments(turns, tiles_per_image: Sequence[int], tokens_per_tile: int,
                        system: str) -> list[tuple[str, bool]]:
    """The prompt as (text, supervised) pieces, cut where official preprocess_internlm cuts."""
    if tokens_per_tile <= 0 or any(n <= 0 for n in tiles_per_image):
        raise ValueError(f"tokens_per_tile ({tokens_per_tile}) and every image's tile count "
                         f"({list(tiles_per_image)}) must be positive")
    if any(s in system for s in (*INTERNLM2_SPECIAL_IDS, IMAGE_PLACEHOLDER)):
        raise ValueError("the system message must not contain special tokens or <image>")
    tpl = INTERNLM2_CHAT
    image_tokens = [tokens_per_tile * n for n in tiles_per_image]
    head = IM_START + "system\n" + system + tpl.sep
    segments = []
    for question, answer in _chat_pairs(turns, len(tiles_per_image)):
        segments.append((head + tpl.roles[0] + _expand_images(question, image_tokens) + tpl.sep
                         + tpl.roles[1], False))
        segments.append((_expand_images(answer, image_tokens) + tpl.sep, True))
        head = ""
    return segments


def render_internlm2_chat(turns, tiles_per_image: Sequence[int] = (), tokens_per_tile: int = 256,
                          system: str = INTERNVL_SYSTEM) -> str:
    """The official training string: the MPT-style `internlm2-chat` prompt
    "<|im_start|>system\\n{system}<|im_end|>" + per round "<|im_start|>user\\n{q}<|im_end|>
    <|im_start|>assistant\\n{a}<|im_end|>" (no newlines between), with the k-th `<image>`
    replaced by <img> + <IMG_CONTEXT> x (tokens_per_tile * tiles_per_image[k]) + </img>."""
    return "".join(text for text, _ in _internlm2_segments(turns, tiles_per_image, tokens_per_tile, system))


def encode_with_specials(text: str, tokenizer: Tokenizer,
                         special_ids: dict[str, int] = INTERNLM2_SPECIAL_IDS) -> list[int]:
    """Ids of `text` without BOS: special-token strings map to their ids, the text between
    them is encoded piece by piece, as the official slow tokenizer splits at added tokens."""
    pattern = "(" + "|".join(re.escape(s) for s in sorted(special_ids, key=len, reverse=True)) + ")"
    ids = []
    for k, piece in enumerate(re.split(pattern, text)):
        ids.extend([special_ids[piece]] if k % 2 else tokenizer.encode(piece))
    return ids


def encode_internlm2_chat(turns, tokenizer: Tokenizer, tiles_per_image: Sequence[int] = (),
                          tokens_per_tile: int = 256,
                          special_ids: dict[str, int] = INTERNLM2_SPECIAL_IDS,
                          system: str = INTERNVL_SYSTEM,
                          max_len: int | None = None) -> TokenizedConversation:
    """Ids and loss mask of an internlm2-chat training conversation (HoVLE, InternVL).

    input_ids int32 [T]: BOS + the tokens of `render_internlm2_chat`, IMG_CONTEXT's id
    tokens_per_tile * tiles_per_image[k] times for image k (256 per 448 px tile to the
    LLM; the "post" (HD) embedding stream takes 1024, the same text ids otherwise).
    loss_mask bool [T], as official preprocess_internlm: True on each answer and its
    "<|im_end|>"; BOS, system, questions, image tokens and the "<|im_start|>user\\n" /
    "<|im_start|>assistant\\n" headers are masked. Official computes the mask from the
    lengths of the pieces tokenized on their own and masks the whole sample when they
    do not add up to the tokenized prompt; that raises ValueError here. `max_len` cuts
    the ids after expansion, as the official tokenizer's truncation does.
    """
    segments = _internlm2_segments(turns, tiles_per_image, tokens_per_tile, system)
    ids = [tokenizer.bos_id] + encode_with_specials("".join(t for t, _ in segments), tokenizer, special_ids)
    mask = [False]
    for text, supervised in segments:
        mask += [supervised] * len(encode_with_specials(text, tokenizer, special_ids))
    if len(mask) != len(ids):
        raise ValueError(f"tokenization mismatch: the prompt has {len(ids)} ids, its pieces {len(mask)}; "
                         "the loss mask boundary is undefined (official training drops this sample's loss)")
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        ids, mask = ids[:max_len], mask[:max_len]
    return TokenizedConversation(input_ids=np.asarray(ids, np.int32), loss_mask=np.asarray(mask, bool))
