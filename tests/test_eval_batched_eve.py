"""Batched EVE answers: left-padded rows of different prompt lengths and image sizes decode the same
tokens as one question at a time, and prompt widths compile once per bucket."""
from evejax.data import shapes
from evejax.data.text import WordTokenizer
from evejax.eval import evaluate as ev
from evejax.eval import generate

from test_checkpoint_io import EVE_MODEL, _init



def test_batched_answers_equal_one_at_a_time_and_compile_once_per_bucket():
    cfg, params = _init(EVE_MODEL, 0)
    # the shapes words, then one word per remaining LLM id: every id the model can emit decodes to a
    # word of its own, so equal answers mean equal token ids
    extra = cfg.llm.vocab_size - shapes.tokenizer().vocab_size
    tokenizer = WordTokenizer(shapes.VOCABULARY + tuple(f"w{i}" for i in range(extra)))
    assert tokenizer.vocab_size == cfg.llm.vocab_size
    questions = ev.heldout_questions(8)
    assert len({q.image.size for q in questions}) > 1
    by_length = sorted(questions, key=lambda q: len(ev.prompt_ids(q.question, tokenizer)))
    lengths = [len(ev.prompt_ids(q.question, tokenizer)) for q in by_length]
    assert lengths[3] != lengths[-1] and generate.bucket_length(lengths[3]) == generate.bucket_length(lengths[-1])

    def answer(batch_size, picked):
        answerer = ev.Answerer(cfg, params, batch_size, tokenizer, max_new_tokens=6)
        return answerer.answer([q.image for q in picked], [q.question for q in picked])

    one_by_one = answer(1, by_length)
    assert answer(4, by_length) == one_by_one                       # two batches of 4
    compiled = (ev._left_padded_prompt._cache_size(), generate._greedy_cached._cache_size())
    assert answer(4, by_length[:4]) == one_by_one[:4]               # a shorter longest prompt, same bucket
    assert (ev._left_padded_prompt._cache_size(), generate._greedy_cached._cache_size()) == compiled
