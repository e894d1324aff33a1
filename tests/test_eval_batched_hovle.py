"""Batched HoVLE answers: rows of different prompt lengths and tile counts decode the same answers as
one question at a time, a call in shape buckets already seen (rows, prompt width, tile slots)
compiles nothing, and sampling runs through the same loop (temperature 0 greedy, a seed reproduces)."""
from test_checkpoint_io import _init
from test_hovle_eval import MODEL, SPECIAL, TOKENIZER

from evejax.eval import evaluate as ev
from evejax.eval import generate as gen


def test_batched_answers_equal_one_at_a_time_and_compile_once_per_bucket():
    cfg, params = _init(MODEL, 3)
    questions = ev.heldout_questions(8)

    def answerer(batch_size, sampling=None, seed=0):
        return gen.HoVLEAnswerer(cfg, params, TOKENIZER, SPECIAL, 6, batch_size, sampling, seed)

    def ask(batch_size, picked, **kw):
        return answerer(batch_size, **kw).answer([q.image for q in picked], [q.question for q in picked])

    def buckets(picked):
        tiles = [gen.HoVLEAnswerer.tiles(cfg, q.image).num_tiles for q in picked]
        widths = [len(answerer(1).prompt_ids(q.question, t)) for q, t in zip(picked, tiles)]
        return gen.bucket_length(max(widths)), gen.tile_bucket(max(tiles), cfg.tile_slots), max(widths)

    assert len({gen.HoVLEAnswerer.tiles(cfg, q.image).num_tiles for q in questions}) > 1
    one_by_one = [ask(1, [q])[0] for q in questions]
    assert len(set(one_by_one)) > 1 and not all(map(ev.is_out_of_vocabulary, one_by_one)), one_by_one
    assert ask(4, questions) == one_by_one                          # two batches of 4
    compiled = gen._hovle_greedy_cached._cache_size()
    # three of the first four: padded to 4 rows, same width and tile buckets, a shorter longest prompt
    again = questions[1:4]
    width, slots, longest = buckets(questions[:4])
    assert buckets(again)[:2] == (width, slots) and buckets(again)[2] < longest
    assert ask(4, again) == one_by_one[1:4]
    assert gen._hovle_greedy_cached._cache_size() == compiled

    # sampling: the cuts on at temperature 0 give the greedy answers; a seed gives the same draws
    assert ask(4, questions[:4], sampling=gen.Sampling(0.0, top_p=0.5, top_k=3)) == one_by_one[:4]
    hot = gen.Sampling(temperature=2.0)
    drawn = ask(4, questions[:4], sampling=hot, seed=3)
    assert ask(4, questions[:4], sampling=hot, seed=3) == drawn != one_by_one[:4]
