"""De-focus Mamba: the official-names PyTorch reference <-> evejax DANClassifier through `evejax import
--family dan` (raw 'model' and EMA 'model_ema' weights of one .pth) and `evejax export` (a .pth that
loads with strict=True), logits parity at the tiny size's resolution and a non-square one, and the
refusals (missing / unexpected / mis-shaped keys at once, a pickle that would run code)."""
import functools
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from evejax.models import dan  # noqa: E402
from evejax.port import commands, io  # noqa: E402
from evejax.port import dan as dan_port  # noqa: E402
from evejax.port import hovle as hovle_port  # noqa: E402
from evejax.port.torch_ref.dan import DefocusAttentionNetwork, DefocusMambaConfig  # noqa: E402

TOLERANCE = 1e-5  # max |diff| / max |reference| in float32
# Non-default rope and delta scales, so a knob the port dropped would show in the logits.
SETTINGS = {"rope_scale_factor": 2.0, "delta_scale_factor": 1.5}
IMPORT = ["--size", "mamba_tiny"] + [arg for k, v in SETTINGS.items() for arg in ("--set", f"{k}={v}")]


def tiny(**kw):
    return dan.get_config("mamba_tiny", **SETTINGS, **kw)


def reference(cfg, seed):
    """The reference with the official init plus noise on every tensor (norms and D included)."""
    torch.manual_seed(seed)
    model = DefocusAttentionNetwork(dan_port.official_config(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@functools.cache
def _forward(cfg):
    module = dan.DANClassifier(cfg)
    return jax.jit(lambda params, pixels: module.apply({"params": params}, pixels))


def compare(model, cfg, params, size):
    """(class-token logits, per-token head2 logits) relative differences at `size` (H, W)."""
    pixels = torch.from_numpy(np.random.default_rng(sum(size)).standard_normal((2, 3, *size)).astype(np.float32))
    with torch.no_grad():
        want = model(pixels).numpy()
    got = _forward(cfg.replace(image_size=size))(params, pixels.permute(0, 2, 3, 1).numpy())
    return rel(got.logits, want[:, -1]), rel(got.token_logits, want[:, :-1])


def save_official(path, raw, ema):
    torch.save({"model": raw.state_dict(), "model_ema": ema.state_dict(), "epoch": 299, "max_accuracy": 82.0},
               path)


def test_official_layout_of_the_released_sizes():
    """The table's names, order and shapes are the official state dicts (dan.md §8, §12)."""
    for size, official in (("mamba_s", DefocusMambaConfig.small()), ("mamba_b", DefocusMambaConfig.base()),
                           ("mamba_l", DefocusMambaConfig.large())):
        cfg = dan.get_config(size)
        assert dan_port.official_config(cfg) == official
        assert list(dan_port.official_shapes(cfg).items()) == list(official.param_shapes().items())


# The MLP heads (Large) differ only in the head rows: raw weights suffice for them.
@pytest.mark.parametrize("head,entries", [("linear", ("raw", "ema")), ("mlp", ("raw",))])
def test_import_export_parity_raw_and_ema(head, entries, tmp_path, capsys):
    cfg = tiny(head=head)
    models = {"raw": reference(cfg, seed=0), "ema": reference(cfg, seed=1)}
    src = tmp_path / "official.pth"
    save_official(src, models["raw"], models["ema"])
    native, wide = cfg.image_size, (cfg.image_size[0], cfg.image_size[1] * 3 // 2)
    for entry in entries:
        model = models[entry]
        ckpt = tmp_path / f"ckpt_{entry}"
        flags = ["--ema"] if entry == "ema" else []
        assert commands.import_main(["--family", "dan", str(src), str(ckpt), *IMPORT, "--set", f"head={head!r}",
                                     *flags]) == 0
        got_cfg, params = dan_port.load_checkpoint(ckpt)
        assert got_cfg == cfg
        for size in (native, wide):
            cls_diff, token_diff = compare(model, cfg, params, size)
            print(f"{head} {entry} after import {size}: logits {cls_diff:.2e}, head2 token logits {token_diff:.2e}")
            assert cls_diff <= TOLERANCE and token_diff <= TOLERANCE

        out = tmp_path / f"exported_{entry}.pth"
        assert commands.export_main([str(ckpt), str(out)]) == 0
        written = torch.load(out, weights_only=True)
        assert sorted(written) == ["model", "model_ema"]
        assert list(written["model"]) == list(model.state_dict())  # the official order
        assert all(torch.equal(written["model"][k], v) and torch.equal(written["model_ema"][k], v)
                   for k, v in model.state_dict().items())
        exported = DefocusAttentionNetwork(dan_port.official_config(cfg)).eval()
        exported.load_state_dict(written["model"], strict=True)
        for size in (native, wide):
            cls_diff, token_diff = compare(exported, cfg, params, size)
            print(f"{head} {entry} after export {size}: logits {cls_diff:.2e}, head2 token logits {token_diff:.2e}")
            assert cls_diff <= TOLERANCE and token_diff <= TOLERANCE


def test_refusals_name_every_problem_and_write_nothing(tmp_path, capsys):
    cfg = tiny()
    state = reference(cfg, seed=0).state_dict()

    # Missing, unexpected and mis-shaped tensors: one error naming all of them.
    bad = dict(state)
    del bad["blocks.1.mixer.D"], bad["head2.bias"]
    bad["blocks.0.mixer.extra"] = torch.zeros(3)
    bad["blocks.0.mixer.x_proj.weight"] = torch.zeros(5, 64)
    torch.save({"model": bad, "model_ema": state}, tmp_path / "bad.pth")
    assert commands.import_main(["--family", "dan", str(tmp_path / "bad.pth"), str(tmp_path / "a"), *IMPORT]) == 1
    err = capsys.readouterr().err
    assert "2 missing, 1 unexpected, 1 shape mismatches" in err
    for name in ("blocks.1.mixer.D", "head2.bias", "blocks.0.mixer.extra", "blocks.0.mixer.x_proj.weight"):
        assert name in err
    assert not (tmp_path / "a").exists()
    # The same file's EMA entry is whole: --ema reads that one.
    assert commands.import_main(["--family", "dan", str(tmp_path / "bad.pth"), str(tmp_path / "a"), *IMPORT,
                                 "--ema"]) == 0

    # A pickle that would run code (here: make a directory) is refused, naming what it holds;
    # nothing in it runs.
    marker = tmp_path / "code_ran"

    class Config:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"model": state, "config": Config()}, tmp_path / "code.pth")
    assert commands.import_main(["--family", "dan", str(tmp_path / "code.pth"), str(tmp_path / "b"), *IMPORT]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "posix.mkdir" in err and "would run code" in err
    assert not marker.exists() and not (tmp_path / "b").exists()

    # --ema on a file without EMA weights; a bare state dict reads as the raw weights.
    torch.save(state, tmp_path / "bare.pth")
    assert commands.import_main(["--family", "dan", str(tmp_path / "bare.pth"), str(tmp_path / "c"), *IMPORT,
                                 "--ema"]) == 1
    assert "no 'model_ema' entry (a bare state dict)" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert commands.import_main(["--family", "dan", str(tmp_path / "bare.pth"), str(tmp_path / "c"), *IMPORT]) == 0

    # A config field that does not exist.
    assert commands.import_main(["--family", "dan", str(tmp_path / "bare.pth"), str(tmp_path / "d"), *IMPORT,
                                 "--set", "depht=3"]) == 1
    assert "depht" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_an_interrupted_export_leaves_the_old_file(tmp_path, monkeypatch):
    state = {k: v.numpy() for k, v in reference(tiny(), seed=0).state_dict().items()}
    out = tmp_path / "out.pth"
    out.write_bytes(b"the user's file")

    def torch_save_dies(obj, path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torch_save_dies)
    with pytest.raises(KeyboardInterrupt):
        dan_port.write_official(state, out)
    assert out.read_bytes() == b"the user's file" and [p.name for p in tmp_path.iterdir()] == ["out.pth"]
    monkeypatch.undo()
    dan_port.write_official(state, out)
    assert list(torch.load(out, weights_only=True)["model_ema"]) == list(state)


@pytest.mark.parametrize("with_ema", [True, False])
def test_export_takes_a_training_workdir(tmp_path, with_ema):
    """A workdir of `evejax train` with model name "dan": its newest step's params go to 'model'
    and its EMA (the params again when the run keeps none) to 'model_ema'."""
    from evejax.train import checkpoint as ckpt_lib

    model = {"name": "dan", "size": "mamba_tiny", "overrides": SETTINGS}
    cfg, rng = tiny(), np.random.default_rng(3)
    draw = lambda: jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), dan.abstract_params(cfg))  # noqa: E731
    params, ema = draw(), draw()
    state = {"params": params, "step": np.int32(5), **({"ema_params": ema} if with_ema else {})}
    store = ckpt_lib.Checkpoints(str(tmp_path / "run"), async_save=False)
    store.save(5, state, {}, {"model": model}, {"loss": 1.0})
    store.wait()
    store.close()
    assert commands.export_main([str(tmp_path / "run"), str(tmp_path / "out.pth")]) == 0
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    for entry, source in (("model", params), ("model_ema", ema if with_ema else params)):
        want = dan_port.to_torch(source, cfg)
        got = written[entry]
        assert list(got) == list(want) and all(np.array_equal(got[k].numpy(), want[k]) for k in want), entry
    # Given straight to another family's exporter, the workdir is refused by its model name.
    with pytest.raises(io.CheckpointError, match=r"trains a 'dan' model, not 'hovle'"):
        hovle_port.export_hovle(tmp_path / "run", tmp_path / "hovle_out")
    assert not (tmp_path / "hovle_out").exists()


def test_import_refuses_a_vit_size_by_name(tmp_path, capsys):
    torch.save({"model": reference(tiny(), seed=0).state_dict()}, tmp_path / "m.pth")
    assert commands.import_main(["--family", "dan", str(tmp_path / "m.pth"), str(tmp_path / "v"),
                                 "--size", "vit_tiny"]) == 1
    err = capsys.readouterr().err
    assert "size 'vit_tiny' is a De-focus ViT, which has no official release" in err and "mamba_b" in err
    assert not (tmp_path / "v").exists()


def test_windows_patch_order_is_the_official_patch_embed_change_res(tmp_path):
    """patch_order="windows" is PatchEmbedChangeRes (2 x 2 windows): the same weights load unchanged
    (nothing is resized) and give the reference's logits, which the raster order does not."""
    cfg = tiny(patch_order="windows", image_size=(32, 48))
    model = reference(cfg, seed=0)
    assert model.config.patch_embed_change_res
    params = dan_port.to_flax({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    cls_diff, token_diff = compare(model, cfg, params, cfg.image_size)
    assert cls_diff <= TOLERANCE and token_diff <= TOLERANCE
    assert compare(model, cfg.replace(patch_order="raster"), params, cfg.image_size)[0] > 1e-3
    with pytest.raises(ValueError, match="2 x 2 windows"):
        tiny(patch_order="windows", image_size=(24, 32))


def test_class_map_keeps_the_named_head_rows_as_convert_22k_to_1k(tmp_path, capsys):
    """A 12-class pre-train cut to 4 classes by a map with a repeated line (as map22kto1k.txt
    repeats 11136): both heads' last layers keep the named rows, so the logits are the
    reference's logits at those columns, the repeated class twice."""
    source = tiny(head="mlp", num_classes=12)
    model = reference(source, seed=0)
    torch.save({"model": reference(source, seed=1).state_dict(), "model_ema": model.state_dict()},
               tmp_path / "22k.pth")
    (tmp_path / "map.txt").write_text("7\n2\n2\n11\n")
    args = ["--family", "dan", str(tmp_path / "22k.pth"), str(tmp_path / "1k"), *IMPORT, "--set", "head='mlp'",
            "--ema", "--class-map", str(tmp_path / "map.txt")]
    assert commands.import_main(args + ["--set", "num_classes=5"]) == 1
    assert "keeps 4 classes, but size 'mamba_tiny' has num_classes=5" in capsys.readouterr().err
    assert commands.import_main(args + ["--set", "num_classes=4"]) == 0
    cfg, params = dan_port.load_checkpoint(tmp_path / "1k")
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        want = model(pixels).numpy()[..., [7, 2, 2, 11]]
    got = _forward(cfg)(params, pixels.permute(0, 2, 3, 1).numpy())
    assert rel(got.logits, want[:, -1]) <= TOLERANCE and rel(got.token_logits, want[:, :-1]) <= TOLERANCE
    (tmp_path / "bad.txt").write_text("7\n12\n")
    bad = [str(tmp_path / "bad") if a == str(tmp_path / "1k") else a for a in args[:-1]]
    assert commands.import_main(bad + [str(tmp_path / "bad.txt"), "--set", "num_classes=2"]) == 1
    assert "names class 12, but head.2.weight has 12 rows" in capsys.readouterr().err
