import numpy as np
import pytest

from evejax.data import text as tx

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

CONV = [
    {"from": "human", "value": "What shape is shown?\n<image>"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "Left of a blue circle, near the top."},
]


def _word_tokenizer():
    texts = [SYSTEM, "USER: ASSISTANT:"] + [t["value"] for t in CONV] + ["\n"]
    return tx.WordTokenizer.from_texts(texts)


def _runs(mask):
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def test_word_tokenizer_round_trip_and_specials():
    tok = _word_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    text = "What shape is shown?\nA red square. Left of a blue circle, near the top."
    ids = tok.encode(text)
    assert min(ids) > 3 and tok.decode(ids) == text
    assert tok.split("USER: hi?") == ["USER", ":", "hi", "?"]
    assert tok.encode("zebra") == [tok.unk_id]
    assert tok.decode([tok.bos_id] + tok.encode("A red square.") + [tok.eos_id, tok.pad_id]) == "A red square."
    # Deterministic: vocabulary does not depend on text order.
    assert tx.WordTokenizer.from_texts(["b a", "c"]).encode("a b c") == \
        tx.WordTokenizer.from_texts(["c", "a b"]).encode("a b c")
    with pytest.raises(ValueError, match="single piece"):
        tx.WordTokenizer(["two words"])


def test_vicuna_v1_prompt_string():
    expected = (SYSTEM + " USER: <image>\nWhat shape is shown? ASSISTANT: A red square.</s>"
                "USER: Where is it? ASSISTANT: Left of a blue circle, near the top.</s>")
    assert tx.render_conversation(CONV, "vicuna_v1") == expected
    assert tx.render_conversation(CONV[:2], "plain") == "<image>A red square.\n"


def test_vicuna_v1_ids_and_loss_mask():
    tok = _word_tokenizer()
    out = tx.encode_conversation(CONV, tok, "vicuna_v1")
    ids, mask = out.input_ids, out.loss_mask
    assert ids.dtype == np.int32 and ids.shape == mask.shape
    assert ids[0] == tok.bos_id and (ids == tok.bos_id).sum() == 1 and not mask[0]
    assert (ids == tx.IMAGE_TOKEN_INDEX).sum() == 1
    before_image = tok.encode(SYSTEM + " USER: ")
    assert ids[1 + len(before_image)] == tx.IMAGE_TOKEN_INDEX
    runs = _runs(mask)
    assert len(runs) == 2
    for (start, end), answer in zip(runs, [CONV[1]["value"], CONV[3]["value"]]):
        span = ids[start:end].tolist()
        assert span[-1] == tok.eos_id
        assert span[:-1] == tok.encode(answer) and tok.decode(span[:-1]) == answer
        # The token before each answer is the ":" of "ASSISTANT:".
        assert tok.decode(ids[start - 2:start]) == "ASSISTANT:"
    labels = out.labels
    assert (labels[~mask] == tx.IGNORE_INDEX).all() and (labels[mask] == ids[mask]).all()


def test_plain_template():
    tok = _word_tokenizer()
    out = tx.encode_conversation(CONV[:2], tok, "plain")
    caption = tok.encode("A red square.\n")
    assert out.input_ids.tolist() == [tok.bos_id, tx.IMAGE_TOKEN_INDEX] + caption
    assert out.loss_mask.tolist() == [False, False] + [True] * len(caption)
    with pytest.raises(ValueError, match="plain template"):
        tx.encode_conversation(CONV, tok, "plain")


def test_max_len_truncates_text_ids():
    tok = _word_tokenizer()
    full = tx.encode_conversation(CONV, tok)
    cut = tx.encode_conversation(CONV, tok, max_len=20)
    assert len(cut.input_ids) == 20
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:20])
    np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[:20])


def test_text_only_and_leading_gpt_turn():
    tok = _word_tokenizer()
    turns = [{"from": "gpt", "value": "ignored"},
             {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "A red square."}]
    out = tx.encode_conversation(turns, tok)
    assert tx.IMAGE_TOKEN_INDEX not in out.input_ids
    assert tok.decode(out.input_ids[out.loss_mask][:-1]) == "A red square."


def test_generation_prompt():
    tok = _word_tokenizer()
    ids = tx.encode_prompt("<image>\nWhere is it?", tok)
    assert ids[0] == tok.bos_id and tok.decode(ids[-2:]) == "ASSISTANT:"
    full = tx.encode_conversation([{"from": "human", "value": "<image>\nWhere is it?"},
                                   {"from": "gpt", "value": "A red square."}], tok)
    np.testing.assert_array_equal(ids, full.input_ids[:len(ids)])
    assert tx.encode_prompt("anything", tok, "plain").tolist() == [tok.bos_id, tx.IMAGE_TOKEN_INDEX]


@pytest.mark.parametrize("turns,message", [
    ([], "non-empty list"),
    ([{"from": "human", "value": "hi"}], "end with a gpt turn"),
    ([{"from": "human", "value": "hi"}, {"from": "human", "value": "hi"}], "expected 'gpt'"),
    ([{"from": "user", "value": "hi"}, {"from": "gpt", "value": "x"}], "turn 0 must be"),
    ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "x"},
      {"from": "human", "value": "<image>b"}, {"from": "gpt", "value": "y"}], "one image"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], "human turn"),
])
def test_user_errors(turns, message):
    with pytest.raises(ValueError, match=message):
        tx.encode_conversation(turns, _word_tokenizer())


def test_two_placeholders_in_one_turn_are_an_error_not_merged():
    # Official preprocess_multimodal merges them into one; one image cannot fill two places.
    with pytest.raises(tx.MultipleImagesError, match="2 <image>"):
        tx.encode_conversation([{"from": "human", "value": "Where <image> is <image> it?"},
                                {"from": "gpt", "value": "A red square."}], _word_tokenizer())
    assert tx.render_conversation([{"from": "human", "value": "Where <image> is it?"},
                                   {"from": "gpt", "value": "x"}]).endswith("USER: <image>\nWhere  is it? ASSISTANT: x</s>")


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown conversation template"):
        tx.encode_conversation(CONV, _word_tokenizer(), "llava_v9")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    corpus = [SYSTEM, "USER: ASSISTANT:"] + [t["value"] for t in CONV] * 20
    with open(path, "wb") as f:
        # LLaMA-like settings: BPE, byte fallback, dummy prefix, spaces kept, unk/bos/eos = 0/1/2.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=f, model_type="bpe", vocab_size=320,
            byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, minloglevel=2)
    return path


def test_sentencepiece_tokenizer_matches_official_mask_rule(sp_model):
    tok = tx.SentencePieceTokenizer(sp_model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.vocab_size >= 259
    assert tok.decode(tok.encode("A red square.")) == "A red square."
    out = tx.encode_conversation(CONV, tok)
    ids, mask = out.input_ids, out.loss_mask
    prompt = tx.render_conversation(CONV)
    # Official: rounds = prompt split at "</s>"; the instruction is everything up to
    # " ASSISTANT: " (space included); masked length = len(BOS + tokens) - 2.
    cur = 1
    for k, round_text in enumerate(prompt.split("</s>")[:-1]):
        instruction = round_text.split(" ASSISTANT: ")[0] + " ASSISTANT: "
        official_len = len(tx._encode_with_image(instruction, tok)) + 1 - 2
        round_len = len(tx._encode_with_image(round_text, tok)) + 1
        assert not mask[cur:cur + official_len].any()
        assert mask[cur + official_len:cur + round_len].all()
        span = ids[cur + official_len:cur + round_len]
        assert span[-1] == tok.eos_id and tok.decode(span[:-1]) == CONV[2 * k + 1]["value"]
        cur += round_len
    assert cur == len(ids)


def test_sentencepiece_missing_file(tmp_path):
    pytest.importorskip("sentencepiece")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        tx.SentencePieceTokenizer(tmp_path / "nope.model")
