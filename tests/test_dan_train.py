"""De-focus Attention Networks end to end on CPU: configs/dan.py:tiny trains a tiny De-focus Mamba
from a tiny TFDS set on disk (RandAugment, random erasing, mixup / cutmix, smoothing, repeated
augmentation, EMA, the drop-path schedule), and `evejax eval` reads its checkpoint."""
import json
import re

import jax
import ml_collections
import numpy as np
import pytest
from types import SimpleNamespace

from evejax import cli
from evejax import config as config_lib
from evejax import sharding
from evejax.data import pipeline
from evejax.models import registry
from evejax.train import checkpoint as ckpt_lib
from evejax.train import optimizer as optimizer_lib
from evejax.train import trainer
from test_data_dan import tiny_imagenet


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dan")
    tiny_imagenet(str(base / "tfds"))
    config = config_lib.apply_overrides(config_lib.load("configs/dan.py:tiny"),
                                        [f"--config.data.tfds_dir={base / 'tfds'}", "--config.checkpoint.every=1"])
    result = trainer.train(config, str(base / "run"))
    return base, config, result


def test_tiny_dan_trains_with_the_whole_chain_ema_and_drop_path_schedule(run):
    base, config, result = run
    assert config.data.rand_augment == "rand-m9-mstd0.5-inc1" and config.data.repeated_aug == 3
    assert result["step"] == config.train.steps == 6 and np.isfinite(result["metrics"]["loss"])
    # The last step (update 5, epoch 1 of 2) ran at the schedule's end value 0.5.
    assert result["metrics"]["drop_path_rate"] == pytest.approx(0.5)
    # The EMA (decay 0.9999) kept in the checkpoints follows ema_t = d ema_{t-1} + (1 - d) params_t.
    (_, p6), (_, e6), (_, e5) = (ckpt_lib.load_params(str(base / "run"), step, weights)
                                 for step, weights in ((6, "params"), (6, "ema_params"), (5, "ema_params")))
    for want_p, e_prev, e_now in zip(jax.tree.leaves(p6), jax.tree.leaves(e5), jax.tree.leaves(e6)):
        np.testing.assert_allclose(e_now, e_prev * 0.9999 + want_p * (1 - 0.9999), rtol=1e-6, atol=1e-7)
    assert max(float(np.abs(p - e).max()) for p, e in zip(jax.tree.leaves(p6), jax.tree.leaves(e6))) > 1e-4


def test_the_decay_mask_is_the_official_one(run):
    _, config, _ = run
    def decayed(model):
        spec = registry.build(model)
        shapes = sharding.unbox(jax.eval_shape(
            lambda: spec.module.init(jax.random.PRNGKey(0), *spec.init_args)["params"]))
        paths = [optimizer_lib.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(shapes)]
        return sorted(p for p in paths if not any(re.fullmatch(n, p) for n in config.optim.no_decay))

    # utils/optimizer.py build_optimizer run on the model (reference/dan.md §12).
    assert decayed(config.model) == [
        "blocks/mixer/conv1d/kernel", "blocks/mixer/dt_proj/kernel", "blocks/mixer/in_proj/kernel",
        "blocks/mixer/out_proj/kernel", "blocks/mixer/x_proj/kernel", "head/kernel", "head2/kernel",
        "patch_embed/kernel"]
    # The De-focus ViT: weight matrices only (DeiT's rule), not its learned decay and rotation.
    vit = dict(config.model.to_dict(), size="vit_tiny")
    assert decayed(ml_collections.ConfigDict(vit)) == [
        f"blocks/layers/{m}/kernel" for m in ("attention/key", "attention/out", "attention/query", "attention/value",
                                              "mlp/wi", "mlp/wo")] + ["head/kernel", "head2/kernel", "patch_embed/kernel"]


def test_eval_reads_the_checkpoint_raw_and_ema(run, capsys):
    base, config, _ = run
    out = {}
    for weights in ("params", "ema"):
        path = base / f"{weights}.json"
        assert cli.main(["eval", str(base / "run"), "--tfds-dir", str(base / "tfds"), "--tfds-name",
                         "tiny_dan_imagenet", "--weights", weights, "--batch-size", "8", "--no-progress",
                         "--json", str(path)]) == 0
        out[weights] = json.loads(path.read_text())
    assert out["params"]["examples"] == out["ema"]["examples"] == 6 and out["params"]["skipped"] == 0
    assert 0 <= out["params"]["top1"] <= out["params"]["top5"] == 1.0   # 5 classes: top-5 is every class
    assert "top-1" in capsys.readouterr().out
    # The figure is the model's own: recompute top-1 from the checkpoint's EMA weights directly.
    model = config.model
    spec = registry.build(model)
    _, ema = ckpt_lib.load_params(str(base / "run"), weights="ema_params")
    data = config_lib.data_config(name="tfds_imagenet", tfds_name="tiny_dan_imagenet", tfds_dir=str(base / "tfds"),
                                  split="validation", augment=False, shuffle=False, num_epochs=1, global_batch=8)
    (batch,) = list(pipeline.make_data(SimpleNamespace(data=data, model=model), 0, 1))
    logits = spec.module.apply({"params": ema}, batch["pixels"], deterministic=True).logits
    real = batch["label"] >= 0
    want = float(np.mean(np.argmax(logits, -1)[real] == batch["label"][real]))
    assert out["ema"]["top1"] == pytest.approx(want)
    # --class-map (the official 22k -> 1k scoring): class j's logit is the model's logit of line j.
    (base / "map.txt").write_text("4\n3\n2\n1\n0\n")
    assert cli.main(["eval", str(base / "run"), "--tfds-dir", str(base / "tfds"), "--tfds-name", "tiny_dan_imagenet",
                     "--weights", "ema", "--batch-size", "8", "--no-progress", "--class-map", str(base / "map.txt"),
                     "--json", str(base / "mapped.json")]) == 0
    mapped = float(np.mean(4 - np.argmax(logits, -1)[real] == batch["label"][real]))
    assert json.loads((base / "mapped.json").read_text())["top1"] == pytest.approx(mapped)
    # A split that does not exist is named with the ones that do.
    assert cli.main(["eval", str(base / "run"), "--tfds-dir", str(base / "tfds"), "--tfds-name",
                     "tiny_dan_imagenet", "--split", "test", "--no-progress"]) == 1
    assert "has no split ['test']; it has ['train', 'validation']" in capsys.readouterr().err
