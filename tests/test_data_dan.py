"""The De-focus Attention Networks data: a tiny TFDS set written to disk in ArrayRecord format,
read through tfds.data_source into the grain pipeline with the whole training chain."""
import functools
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from evejax import config as config_lib
from evejax.data import augment, pipeline

NUM_CLASSES = 5


@functools.cache
def _builder_class():
    """TFDS registers a builder class by name once per process, so it is defined once."""
    import tensorflow_datasets as tfds

    class TinyDanImagenet(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24), "validation": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):
                pixels = np.full((24, 32, 3), 8 * i, np.uint8)
                pixels[:4, :16] = 255
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "PNG")
                yield i, {"image": buf.getvalue(), "label": i % NUM_CLASSES}

    return TinyDanImagenet


def tiny_imagenet(data_dir) -> str:
    """A 2-split image-classification TFDS set (ArrayRecord, written without TensorFlow): train 24 and
    validation 6 examples; example i is a 24 x 32 image of grey level 8 * i with a bright band over
    the left half of its top 4 rows, label i % 5."""
    _builder_class()(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "tiny_dan_imagenet"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    tiny_imagenet(str(directory))
    return str(directory)


def data_config(tfds_dir, **values):
    return SimpleNamespace(data=dict(config_lib.data_config(
        **dict(dict(name="tfds_imagenet", tfds_name="tiny_dan_imagenet", tfds_dir=tfds_dir, global_batch=6),
               **values)), image_size=16))


def test_a_split_the_set_lacks_is_an_error_naming_the_ones_it_has(tfds_dir):
    with pytest.raises(ValueError, match=r"no split \['val'\]; it has \['train', 'validation'\]"):
        pipeline.make_data(data_config(tfds_dir, split="val"), 0, 1)


def test_the_full_training_chain_gives_soft_targets_repeats_and_resumes(tfds_dir):
    config = data_config(tfds_dir, rand_augment="rand-m9-mstd0.5-inc1", random_erase=0.25, mixup=0.8,
                         cutmix=1.0, mix_prob=1.0, mix_switch_prob=0.5, label_smoothing=0.1, repeated_aug=3)
    it = pipeline.make_data(config, 0, 1)
    batches = [next(it) for _ in range(4)]   # one epoch: 24 examples, 8 distinct records x 3
    state = it.get_state()
    after = next(it)
    smooth = augment.smooth_labels(np.arange(NUM_CLASSES), NUM_CLASSES, 0.1)
    for batch in batches:
        assert batch["pixels"].shape == (6, 16, 16, 3) and batch["label_probs"].shape == (6, NUM_CLASSES)
        probs, label = batch["label_probs"], batch["label"]
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
        # label_probs = lam * smooth(label) + (1 - lam) * smooth(mirrored label), one lam per batch.
        lam = [np.linalg.lstsq(np.stack([smooth[label[i]] - smooth[label[-1 - i]]], 1),
                               probs[i] - smooth[label[-1 - i]], rcond=None)[0][0]
               for i in range(6) if label[i] != label[-1 - i]]
        assert np.ptp(lam) < 1e-5 and 0 <= lam[0] <= 1
    # Repeated augmentation: every record three times in a row, each copy augmented differently.
    index = np.concatenate([b["index"] for b in batches])
    assert (index.reshape(8, 3) == index[::3, None]).all() and len(set(index)) == 8
    first = batches[0]["pixels"]
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])
    # The resumed iterator gives the same batch, mixing included.
    it2 = pipeline.make_data(config, 0, 1)
    it2.set_state(state)
    again = next(it2)
    for key in ("pixels", "label", "label_probs", "index"):
        np.testing.assert_array_equal(again[key], after[key])


def test_the_eval_view_resizes_by_crop_pct_and_centre_crops(tfds_dir):
    # 24 x 32 -> short side 16 / 0.5 = 32 -> 32 x 42, centre crop 16: rows 8..23 of the resized image,
    # so the bright band (rows 0..3 of 24, i.e. 0..5 of 32) is cut away and the crop is flat grey.
    config = data_config(tfds_dir, split="validation", augment=False, shuffle=False, num_epochs=1, crop_pct=0.5)
    (batch,) = list(pipeline.make_data(config, 0, 1))
    assert sorted(batch["label"]) == [0, 0, 1, 2, 3, 4]
    np.testing.assert_array_equal(batch["label_probs"], np.eye(NUM_CLASSES)[batch["label"]])
    grey = (batch["pixels"] * np.asarray((0.229, 0.224, 0.225)) + np.asarray((0.485, 0.456, 0.406))) * 255
    assert np.ptp(grey, axis=(1, 2, 3)).max() < 0.01
    np.testing.assert_allclose(np.sort(grey[:, 0, 0, 0]), 8 * np.arange(6), atol=0.01)
    # With crop_pct 1 the short side is 16: the band's rows 0..2 are inside the crop.
    (batch,) = list(pipeline.make_data(data_config(tfds_dir, split="validation", augment=False, num_epochs=1,
                                                   crop_pct=1.0), 0, 1))
    assert (np.ptp(batch["pixels"], axis=(1, 2, 3)) > 1).all()


def test_rand_augment_policy_and_ops_in_closed_form():
    assert augment.parse_rand_augment("rand-m9-mstd0.5-inc1") == augment.RandAugmentPolicy(2, 9.0, 0.5, 0.5)
    assert augment.parse_rand_augment("") is None
    with pytest.raises(ValueError, match="inc1"):
        augment.parse_rand_augment("rand-m9-mstd0.5")
    image = Image.fromarray(np.tile(np.arange(0, 200, 10, dtype=np.uint8)[None, :, None], (4, 1, 3)))
    ops, rng = augment.RAND_INCREASING_OPS, np.random.default_rng(0)
    row = np.asarray(image)[0, :, 0].astype(int)
    np.testing.assert_array_equal(np.asarray(ops["SolarizeAdd"](image, 10.0, rng, None))[0, :, 0],
                                  np.where(row < 128, np.minimum(row + 110, 255), row))
    np.testing.assert_array_equal(np.asarray(ops["SolarizeIncreasing"](image, 5.0, rng, None))[0, :, 0],
                                  np.where(row >= 128, 255 - row, row))
    np.testing.assert_array_equal(np.asarray(ops["PosterizeIncreasing"](image, 5.0, rng, None))[0, :, 0],
                                  row & 0b11000000)
    # Translate by 0.45 x width = 9 px of 20 (sign random), exposed columns take the fill.
    shifted = np.asarray(ops["TranslateXRel"](image, 10.0, np.random.default_rng(1), (1, 2, 3)))
    moved = (shifted[0, :11, 0] == row[9:]).all() or (shifted[0, 9:, 0] == row[:11]).all()
    assert moved and ((shifted[0, :, :] == (1, 2, 3)).all(-1).sum() == 9)
    # With probability 0 nothing changes; the chain is a function of the rng.
    policy = augment.RandAugmentPolicy(prob=0.0)
    assert augment.rand_augment(image, np.random.default_rng(3), policy) is image
    full = augment.RandAugmentPolicy(prob=1.0)
    np.testing.assert_array_equal(np.asarray(augment.rand_augment(image, np.random.default_rng(3), full)),
                                  np.asarray(augment.rand_augment(image, np.random.default_rng(3), full)))


def test_random_erasing_fills_one_box_of_the_documented_size():
    pixels = np.zeros((40, 50, 3), np.float32)
    for seed in range(20):
        erased = augment.random_erasing(pixels, np.random.default_rng(seed), prob=1.0)
        rows, cols = np.nonzero((erased != 0).any(-1))
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert (erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1] != 0).all()
        assert 0.02 * 2000 * 0.8 <= h * w <= 2000 / 3 * 1.2 and 0.3 / 1.5 <= h / w <= 1.5 / 0.3
    assert augment.random_erasing(pixels, np.random.default_rng(0), prob=0.0) is pixels


def test_cutmix_pastes_the_mirrored_rows_box_and_corrects_lambda():
    pixels = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 10, 10, 3), np.float32)
    label = np.asarray([0, 1, 2, 3])
    mixed, probs, lam = augment.mix_batch(pixels, label, np.random.default_rng(0), 4, mixup_alpha=0.0,
                                          cutmix_alpha=1.0, prob=1.0, switch_prob=0.0, smoothing=0.0)
    for i in range(4):
        from_mirror = mixed[i, ..., 0] == 3 - i
        assert np.isclose(1 - from_mirror.mean(), lam)
        np.testing.assert_allclose(probs[i], lam * np.eye(4)[i] + (1 - lam) * np.eye(4)[3 - i], atol=1e-6)
    # mixup: a convex combination of the row and its mirror with the same lam as the targets.
    mixed, probs, lam = augment.mix_batch(pixels, label, np.random.default_rng(0), 4, mixup_alpha=0.8,
                                          cutmix_alpha=0.0, prob=1.0, switch_prob=0.0, smoothing=0.1)
    np.testing.assert_allclose(mixed[:, 0, 0, 0], lam * np.arange(4) + (1 - lam) * np.arange(4)[::-1], atol=1e-5)
    np.testing.assert_allclose(probs[0], lam * (0.9 * np.eye(4)[0] + 0.025) + (1 - lam) * (0.9 * np.eye(4)[3] + 0.025),
                               atol=1e-6)
