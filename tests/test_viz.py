"""evejax viz: the over-focus statistic, the attention-map CLI, and that de-focus changes the maps."""
import json
import re

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from evejax import viz
from evejax.data import counting
from evejax.models import dan


def test_overfocus_hand_computed():
    causal = viz.causal_mask(3)
    # [heads 2, T 3, S 3]; the 9s sit on masked keys and must be ignored; query 0 (one key) is left out.
    weights = np.array([[[1, 9, 9], [0.3, 0.7, 9], [0.5, 0.2, 0.3]],
                        [[1, 9, 9], [0.9, 0.1, 9], [0.2, 0.2, 0.6]]])
    assert viz.overfocus(weights, causal) == pytest.approx((0.7 + 0.5 + 0.9 + 0.6) / 4, abs=1e-12)
    # 250 allowed keys: the top 1% is floor(2.5) = 2 keys.
    row = np.concatenate([[0.4, 0.1], np.full(248, 0.5 / 248)])[::-1]
    assert viz.overfocus(row[None, None], np.ones((1, 250), bool)) == pytest.approx(0.5, abs=1e-12)
    # 199 allowed keys: floor(1.99) = 1 key.
    assert viz.overfocus(row[None, None, -199:], np.ones((1, 199), bool)) == pytest.approx(0.4, abs=1e-12)


@pytest.fixture(scope="module")
def tiny():
    cfg = dan.get_config("vit_tiny")   # 32 px, patch 8: 16 patches + class token, 4 heads, 2 layers
    module = dan.DANClassifier(cfg)
    params = nn.meta.unbox(jax.jit(lambda r: module.init(r, *dan.init_inputs(cfg))["params"])(jax.random.PRNGKey(0)))
    pixels = counting.batch(range(2), "heldout", 0, 32)["pixels"]
    return cfg, params, pixels


def test_attention_weights_are_causal_softmax_rows(tiny):
    cfg, params, pixels = tiny
    w = viz.attention_weights(cfg, params, pixels)
    assert w.shape == (2, 2, 4, 17, 17)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(w[..., ~viz.causal_mask(17)] == 0)


def test_defocus_changes_the_maps(tiny):
    cfg, params, pixels = tiny
    # Sharp attention (at init the logits are near 0 and a multiplicative decay barely shows).
    attention = dict(params["blocks"]["layers"]["attention"])
    attention["query"] = dict(attention["query"], kernel=attention["query"]["kernel"] * 30)
    params = dict(params, blocks={"layers": dict(params["blocks"]["layers"], attention=attention)})
    plain_cfg = cfg.replace(defocus=None)
    plain = dict(params, blocks={"layers": dict(params["blocks"]["layers"], attention={
        k: v for k, v in attention.items() if not k.startswith("defocus")})})
    with_defocus, without = viz.attention_weights(cfg, params, pixels), viz.attention_weights(plain_cfg, plain, pixels)
    assert np.abs(with_defocus - without).max() > 1e-3


def test_viz_attention_cli_writes_grid_and_prints_overfocus(tmp_path, capsys):
    picture = tmp_path / "img.png"
    Image.fromarray(counting.image(0, "heldout", 0, 48)[0]).save(picture)
    out = tmp_path / "maps.png"
    target = "configs/dan_counting.py:defocus"   # vit_tiny at 48 px: 36 patches, 4 heads, 2 layers
    assert viz.main(["attention", target, "--image", str(picture), "--layers", "0,1", "--out", str(out)]) == 0
    # 2 rows (layers); 6 columns: the image, 4 heads, the head mean.
    assert Image.open(out).size == (6 * (96 + 4) + 4, 2 * (96 + 12 + 4) + 4)
    printed = float(re.search(r"over-focus .*?: ([0-9.]+)", capsys.readouterr().out).group(1))
    cfg, params = viz.load_target(target)
    weights = viz.attention_weights(cfg, params, counting.normalize(np.asarray(Image.open(picture)))[None])[:, 0]
    assert printed == pytest.approx(viz.overfocus(weights, viz.causal_mask(37)), abs=1e-4)
    assert viz.main(["attention", target, "--image", str(picture), "--layers", "2"]) == 2


def _filled_cells(picture, red_only=False):
    cells = picture.reshape(picture.shape[0] // 8, 8, picture.shape[1] // 8, 8, 3).swapaxes(1, 2)
    marked = np.all(cells == counting._COLOURS[0], -1) if red_only else np.any(cells != 255, -1)
    return int(marked.any((-1, -2)).sum())


def test_counting_with_distractors_counts_the_red_squares_only():
    extras = []
    for i in range(40):
        picture, label = counting.image(i, "train", 0, 64, distractors=10)
        assert _filled_cells(picture, red_only=True) == label + 1
        extras.append(_filled_cells(picture) - (label + 1))
        plain, plain_label = counting.image(i, "train", 0, 64)
        assert _filled_cells(plain) == plain_label + 1
    assert min(extras) >= 0 and max(extras) > 5 and max(extras) <= 10
    with pytest.raises(ValueError, match="distractors=60"):
        counting.image(0, "train", 0, 64, distractors=60)


def test_counting_majority_labels_the_colour_of_most_cells():
    labels = []
    for i in range(12):
        picture, label = counting.image(i, "heldout", 3, 32, task="majority")
        cells = picture.reshape(4, 8, 4, 8, 3).swapaxes(1, 2).reshape(16, 64, 3)
        # Each cell holds one square in one colour: its first non-white pixel names it.
        votes = np.zeros(4, int)
        for cell in cells:
            pixel = cell[np.any(cell != 255, -1)][0]
            votes[np.flatnonzero(np.all(counting._COLOURS == pixel, -1))[0]] += 1
        assert votes.sum() == 16 and np.sort(votes)[-1] > np.sort(votes)[-2] and label == votes.argmax()
        labels.append(label)
    assert len(set(labels)) > 1
    with pytest.raises(ValueError, match="distractors"):
        counting.image(0, "train", 0, 64, distractors=3, task="majority")


def test_counting_batches_carry_what_the_dan_trainer_feeds():
    from evejax import config as config_lib
    from evejax.models import registry

    config = config_lib.apply_overrides(config_lib.load("configs/dan_counting.py:defocus"),
                                        ["data.global_batch=8"])
    host = next(counting.make_data(config, 0, 1))
    specs = registry.build(config.model).batch_specs(8, 1)
    assert {k: (v.shape, v.dtype) for k, v in host.items()} == {k: (v.shape, v.dtype) for k, v in specs.items()}
    np.testing.assert_array_equal(host["label_probs"], np.eye(10, dtype=np.float32)[host["label"]])


def test_counting_train_images_cycles_a_fixed_set_in_new_orders():
    from evejax import config as config_lib

    config = config_lib.apply_overrides(config_lib.load("configs/dan_counting.py:plain"), [
        "data.global_batch=3", "data.train_images=3", "data.seed=5", "data.max_side=32",
        "data.counting_task=majority"])
    fixed = counting.batch(range(3), "train", 5, 32, task="majority")["pixels"]
    batches = counting.make_data(config, 0, 1)
    orders = []
    for _ in range(6):   # 6 epochs of the 3 images, one batch each
        pixels = next(batches)["pixels"]
        orders.append(tuple(int(np.flatnonzero((fixed == p).all((1, 2, 3)))[0]) for p in pixels))
    assert all(sorted(order) == [0, 1, 2] for order in orders) and len(set(orders)) > 1


def _shape_key(cells):
    """One key per free tetromino: the least of its 8 rotations / mirror images, moved to the origin."""
    cells, forms = np.array(cells), []
    for mirror in (1, -1):
        form = cells * [1, mirror]
        for _ in range(4):
            form = np.stack([form[:, 1], -form[:, 0]], 1)
            forms.append(tuple(sorted(map(tuple, (form - form.min(0)).tolist()))))
    return min(forms)


def test_counting_tetromino_labels_the_one_group_of_neighbouring_cells():
    kinds = [_shape_key(cells) for cells in counting.FIGURES["tetromino"][0].values()]
    assert len(set(kinds)) == 5
    labels, singles = [], []
    for i in range(40):
        picture, label = counting.image(i, "heldout", 1, 64, distractors=6, task="tetromino")
        filled = np.pad(np.any(picture.reshape(8, 8, 8, 8, 3) != 255, (1, 3, 4)), 1)
        neighbours = sum(np.roll(filled, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - filled
        alone = filled & (neighbours == 0)
        grouped = np.argwhere(filled & ~alone)
        assert len(grouped) == 4 and _shape_key(grouped) == kinds[label]
        labels.append(label)
        singles.append(int(alone.sum()))
    assert set(labels) == set(range(5)) and 0 <= min(singles) and 3 < max(singles) <= 6


def test_counting_arms_differ_only_where_the_config_says(tmp_path, capsys):
    from flax import traverse_util

    def flat(arm):
        return traverse_util.flatten_dict(viz.arm_config(arm, 3, 300, 64, task="majority").to_dict(), sep=".")

    plain = flat("plain")
    differ = {arm: {k for k in set(plain) | set(flat(arm)) if plain.get(k, "absent") != flat(arm).get(k, "absent")}
              for arm in ("defocus", "defocus_bias", "defocus_local", "defocus_paper", "plain_paper")}
    attention = {"model.overrides.defocus", "stage.name"}
    assert differ["defocus"] == differ["defocus_bias"] == attention
    assert differ["defocus_local"] == attention | {"model.overrides.defocus_decay_init"}
    schedule = {f"train.batch_schedules.drop_path_rate.{k}" for k in ("start", "end", "epochs", "steps_per_epoch")}
    assert differ["defocus_paper"] == attention | schedule | {"stage.losses.ce", "stage.losses.aux_ce"}
    assert differ["plain_paper"] == differ["defocus_paper"] - attention | {"stage.name"}
    paper = flat("defocus_paper")
    assert (paper["stage.losses.ce"], paper["stage.losses.aux_ce"]) == (0.5, 0.5)
    # 300 steps in 10 pieces: the rate climbs 0.1 -> 0.7 over the run whatever --steps is.
    assert [paper[k] for k in sorted(schedule)] == [0.7, 10, 0.1, 30]
    assert viz.main(["experiment", "--arms", "defocus,dense", "--out", str(tmp_path)]) == 2
    assert "'dense'" in capsys.readouterr().err and not any(tmp_path.iterdir())
    # --lr sets the peak learning rate of every arm; 0 keeps the config's.
    assert (viz.arm_config("plain", 3, 300, 64, lr=1e-3).optim.lr, viz.arm_config("plain", 3, 300, 64).optim.lr) == (
        1e-3, 3e-3)
    assert viz.main(["experiment", "--lr", "-1", "--out", str(tmp_path)]) == 2
    assert "--lr" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_experiment_results_keep_earlier_runs_and_refuse_a_foreign_file(tmp_path, capsys):
    run = ["experiment", "--out", str(tmp_path), "--steps", "2", "--heldout", "8", "--side", "32", "--arms", "plain"]
    assert viz.main(run + ["--seeds", "0,1"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert viz.main(run + ["--seeds", "1,2"]) == 0      # seed 1's workdir is reused, its row replaced
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [("plain", 0), ("plain", 1), ("plain", 2)]
    assert rows[:2] == first and rows[2]["steps"] == 2 and 0 <= rows[2]["heldout_accuracy"] <= 1
    (tmp_path / "results.json").write_text('{"not": "runs"}')
    assert viz.main(run + ["--seeds", "3"]) == 2
    assert "results.json" in capsys.readouterr().err and not (tmp_path / "plain_s3").exists()
    assert (tmp_path / "results.json").read_text() == '{"not": "runs"}'


def test_counting_bar_labels_the_direction_of_three_cells_in_a_line():
    steps = {(0, 1): 0, (1, 0): 1, (1, 1): 2, (1, -1): 3}   # across, down, diagonal, antidiagonal
    labels = []
    for i in range(30):
        picture, label = counting.image(i, "train", 2, 48, distractors=3, task="bar")
        filled = np.pad(np.any(picture.reshape(6, 8, 6, 8, 3) != 255, (1, 3, 4)), 1)
        neighbours = sum(np.roll(filled, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - filled
        bar = np.argwhere(filled & (neighbours > 0))
        assert len(bar) == 3 and steps[tuple(bar[1] - bar[0])] == label
        np.testing.assert_array_equal(bar[2] - bar[1], bar[1] - bar[0])
        labels.append(label)
    assert set(labels) == set(range(4))


def test_counting_stripes_label_the_direction_most_neighbouring_cells_run_in():
    hits, labels = 0, []
    for i in range(200):
        picture, label = counting.image(i, "train", 1, 64, task="stripes")
        f = np.any(picture.reshape(8, 8, 8, 8, 3) != 255, (1, 3, 4))
        pairs = [(f[:, 1:] & f[:, :-1]).sum(), (f[1:] & f[:-1]).sum(),      # across, down,
                 (f[1:, 1:] & f[:-1, :-1]).sum(), (f[1:, :-1] & f[:-1, 1:]).sum()]  # diagonal, antidiagonal
        hits += int(np.argmax(pairs) == label)
        labels.append(label)
    assert hits / 200 > 0.9 and set(labels) == set(range(4))   # local evidence, pooled, names the label
    with pytest.raises(ValueError, match="distractors=0"):
        counting.image(0, "train", 1, 64, distractors=2, task="stripes")


def test_position_arms_see_2d_position_and_differ_only_in_the_attention():
    from flax import traverse_util
    from evejax.nn.rope import inverse_frequencies

    def flat(arm):
        return traverse_util.flatten_dict(viz.arm_config(arm, 3, 300, 64, 4, "bar").to_dict(), sep=".")

    plain, defocus = flat("plain_pos"), flat("defocus_pos")
    assert {k for k in plain if plain[k] != defocus[k]} == {"model.overrides.defocus", "stage.name"}
    assert set(plain) == set(defocus)
    # The other position arms: the bias form, then the paper's loss alone or with its drop path, each
    # against the plain arm trained the same way.
    losses = {"stage.losses.ce", "stage.losses.aux_ce"}
    schedule = {f"train.batch_schedules.drop_path_rate.{k}" for k in ("start", "end", "epochs", "steps_per_epoch")}
    for arm, reference, differ in (("defocus_pos_bias", "plain_pos", {"model.overrides.defocus"}),
                                   ("plain_pos_aux", "plain_pos", losses),
                                   ("plain_pos_paper", "plain_pos", losses | schedule),
                                   ("defocus_pos_aux", "plain_pos_aux", {"model.overrides.defocus"}),
                                   ("defocus_pos_bias_aux", "plain_pos_aux", {"model.overrides.defocus"}),
                                   ("defocus_pos_paper", "plain_pos_paper", {"model.overrides.defocus"}),
                                   ("defocus_pos_bias_paper", "plain_pos_paper", {"model.overrides.defocus"})):
        a, b = flat(arm), flat(reference)
        assert {k for k in set(a) | set(b) if a.get(k, "absent") != b.get(k, "absent")} == differ | {"stage.name"}, arm
        assert a["model.overrides.defocus"] == ("bias" if "bias" in arm else None if "plain" in arm else "scale")
    shapes = {}
    for arm, config in (("plain_pos", plain), ("defocus_pos", defocus)):
        overrides = {k.split(".", 2)[2]: v for k, v in config.items() if k.startswith("model.overrides.")}
        cfg = dan.get_config(config["model.size"], **overrides)
        assert (cfg.grid, cfg.embed_dim, cfg.transformer.num_heads, cfg.depth) == ((8, 8), 64, 4, 2)
        shapes[arm] = {k: v.shape for k, v in traverse_util.flatten_dict(dan.abstract_params(cfg), sep="/").items()}
        if arm == "defocus_pos":
            params = dan.DANClassifier(cfg).init(jax.random.PRNGKey(0), *dan.init_inputs(cfg))["params"]
            attention = nn.meta.unbox(params)["blocks"]["layers"]["attention"]
            freq, decay = np.asarray(attention["defocus_freq"]), np.asarray(attention["defocus_decay"])
    # The learned rotation starts at plain's fixed RoPE frequencies, in every layer and head.
    base = np.asarray(inverse_frequencies(16, 100.0))
    np.testing.assert_allclose(freq, np.broadcast_to(base, freq.shape), rtol=1e-6)
    # Over the 64 patch tokens the slowest pair still turns about a radian (base 1e4: 0.06 rad).
    assert 0.5 < 64 * base.min() < 2
    # Decay spans 1/|lambda| rise from under a row (8 tokens) to about the whole image (64 tokens).
    spans = 1 / np.exp(decay[0])
    assert np.all(np.diff(spans) > 0) and spans[0] < 8 and 48 < spans[-1] < 80 and np.all(decay == decay[0])
    # Parameters: de-focus adds only its decay and rotation.
    assert {k: v for k, v in shapes["defocus_pos"].items() if "defocus" not in k} == shapes["plain_pos"]
    assert {k.rsplit("/", 1)[1] for k in set(shapes["defocus_pos"]) - set(shapes["plain_pos"])} == {
        "defocus_decay", "defocus_freq"}
