"""EVE checkpoints: official release layout (.bin shards, duplicated teacher) -> evejax ->
official safetensors, with and without the training-only PAL and CLIP teacher."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

transformers = pytest.importorskip("transformers")

from test_eve_model import CFG, official_state_dict, reference_model  # noqa: E402

from evejax.data import shapes  # noqa: E402
from evejax.models import eve, vit  # noqa: E402
from evejax.port import clip as clip_port  # noqa: E402
from evejax.port import commands  # noqa: E402
from evejax.port import eve as eve_port  # noqa: E402
from evejax.port import io  # noqa: E402
from evejax.port.io import CheckpointError  # noqa: E402
from evejax.port.torch_ref import eve as ref  # noqa: E402

# The official EVE-7B-v1.0 config.json fields (reference/eve.md §1.1).
OFFICIAL_7B_CONFIG = {
    "architectures": ["EVELlamaForCausalLM"], "model_type": "eve", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16", "transformers_version": "4.31.0",
    "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
    "mm_vision_tower": "openai/eve-patch14-anypixel-672",
    "mm_vision_tower_clip": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch", "requires_cliploss": True, "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False, "image_aspect_ratio": "square"}


@pytest.fixture(scope="module")
def official():
    model, teacher = reference_model()
    state = official_state_dict(model, teacher)
    state["model.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # older transformers saved it
    return state


def _write_bin_shards(state, directory):
    """The release layout: two pytorch_model-*.bin shards + index + config.json."""
    directory.mkdir()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: torch.from_numpy(np.asarray(state[k])) for k in keys}, directory / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / io.BIN_INDEX_NAME).write_text(json.dumps(index))
    io.save_config_json(eve_port.hf_config(CFG, "float32"), directory)


def _flat(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_import_release_then_export_both_ways(official, tmp_path):
    _write_bin_shards(official, tmp_path / "release")
    notes = eve_port.import_eve(tmp_path / "release", tmp_path / "ckpt")
    assert any("equals" in n for n in notes)
    assert commands.import_main(["--family", "eve", str(tmp_path / "release"), str(tmp_path / "ckpt")]) == 1
    cfg, params = eve_port.load_checkpoint(tmp_path / "ckpt")
    assert cfg == CFG
    expected, _ = eve_port.to_flax(official, CFG)
    got, want = _flat(params), _flat(expected)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    # Training export: official names, teacher once, sharded safetensors with an index.
    files = eve_port.export_eve(tmp_path / "ckpt", tmp_path / "train", max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "train" / io.SAFETENSORS_INDEX_NAME).is_file()
    written = io.load_state_dict(tmp_path / "train")
    kept = {k: v for k, v in official.items()
            if not k.startswith(eve_port.DUPLICATE_CLIP_PREFIX) and "rotary_emb" not in k}
    assert written.keys() == kept.keys()
    assert all(np.array_equal(written[k], kept[k]) for k in kept)
    config = io.load_config_json(tmp_path / "train")
    assert {k: config[k] for k in ("architectures", "model_type", "mm_hidden_size", "mm_projector_type",
                                   "mm_vision_select_layer", "requires_cliploss", "mm_vision_tower")} == {
        "architectures": ["EVELlamaForCausalLM"], "model_type": "eve", "mm_hidden_size": 48,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "requires_cliploss": True,
        "mm_vision_tower": "openai/eve-patch4-anypixel-64"}

    # The export reads back into the same model.
    eve_port.import_eve(tmp_path / "train", tmp_path / "ckpt2")
    _, again = eve_port.load_checkpoint(tmp_path / "ckpt2")
    assert all(np.array_equal(v, want[k]) for k, v in _flat(again).items())

    # Inference export through the CLI: no PAL, no teacher; loads strictly into the official
    # layout without them.
    assert commands.export_main([str(tmp_path / "ckpt"), str(tmp_path / "infer"), "--inference"]) == 0
    inference = io.load_state_dict(tmp_path / "infer")
    assert not any(k.startswith((eve_port.PAL_PREFIX, "model.vision_clip.")) for k in inference)
    assert io.load_config_json(tmp_path / "infer")["requires_cliploss"] is False
    model, _ = reference_model(with_pal=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in inference.items()}, strict=True)
    assert inference.keys() == ref.strip_teacher_keys(kept, keep_pal=False).keys()


def test_teacher_copies(official):
    only_duplicate = {k: v for k, v in official.items() if not k.startswith(eve_port.CLIP_PREFIX)}
    params, notes = eve_port.to_flax(only_duplicate, CFG)
    assert any("copy" in n for n in notes)
    reference, _ = eve_port.to_flax(official, CFG)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["clip"]),
                                                    jax.tree.leaves(reference["clip"])))

    differing = dict(official)
    name = eve_port.DUPLICATE_CLIP_PREFIX + "vision_model.post_layernorm.bias"
    differing[name] = differing[name] + 1
    with pytest.raises(CheckpointError, match="different contents"):
        eve_port.to_flax(differing, CFG)

    no_teacher = {k: v for k, v in official.items() if "clip" not in k}
    with pytest.raises(CheckpointError, match="no CLIP teacher"):
        eve_port.to_flax(no_teacher, CFG)
    params, notes = eve_port.to_flax(no_teacher, CFG.replace(with_pal=False))
    assert set(params) == {"llm", "vision_tokenizer", "mm_projector"} and any("dropped" in n for n in notes)

    broken = dict(official)
    del broken["model.vision_tower.split_embedding"]
    broken["model.vision_tower.extra"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="split_embedding"):
        eve_port.to_flax(broken, CFG)


def test_official_config_json():
    for tower, size in (("openai/eve-patch14-anypixel-672", "7b"), ("openai/eve-patch14-anypixel-1344", "7b_hd")):
        cfg = eve_port.config_from_hf({**OFFICIAL_7B_CONFIG, "mm_vision_tower": tower})
        assert cfg == eve.get_config(size)
    assert eve_port.config_from_hf(OFFICIAL_7B_CONFIG, with_pal=False) == eve.get_config("7b", with_pal=False)
    written = eve_port.hf_config(eve.get_config("7b"), "bfloat16")
    assert {k: written[k] for k in OFFICIAL_7B_CONFIG if k != "transformers_version"} == {
        k: v for k, v in OFFICIAL_7B_CONFIG.items() if k != "transformers_version"}
    with pytest.raises(CheckpointError, match="teacher"):
        eve_port.config_from_hf({**OFFICIAL_7B_CONFIG, "mm_vision_tower_clip": "someone/other-clip"})


def test_family_converters_do_not_import_the_command_module():
    """Imports point one way: port.commands dispatches to port.eve / port.clip, which
    take their shared command-line pieces from port.command_line, never from commands."""
    import ast
    import importlib

    for name in ("evejax.port.eve", "evejax.port.clip", "evejax.port.command_line"):
        tree = ast.parse(open(importlib.import_module(name).__file__).read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {f"{node.module}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     for a in node.names}
        assert not {"evejax.port.commands", "evejax.port.eve"} & imported - {name}, name


# ---- issue 11: names and teacher on export, preprocessing of inference checkpoints, strict loads ----

# The demo size with the shapes tokenizer's vocabulary, so `evejax eval` decodes what it generates.
DEMO = eve.get_config("demo").replace(llm=eve.get_config("demo").llm.replace(vocab_size=shapes.tokenizer().vocab_size))


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A demo-size EVE training checkpoint (no imported names), random weights."""
    from test_eve_model import random_jax_params

    directory = tmp_path_factory.mktemp("demo_ckpt") / "ckpt"
    params = random_jax_params(DEMO, seed=3)
    eve_port.save_checkpoint(directory, DEMO, params)
    return directory, params


def test_export_writes_a_teacher_the_reference_builds_from_its_name(demo_checkpoint, tmp_path):
    ckpt, params = demo_checkpoint
    out = tmp_path / "out"
    assert commands.export_main([str(ckpt), str(out)]) == 0
    config = io.load_config_json(out)
    teacher_dir = out / eve_port.TEACHER_DIR
    # The demo teacher is no hub CLIP: it is written next to the export and named by its path.
    assert config["mm_vision_tower_clip"] == str(teacher_dir.absolute())
    assert io.load_config_json(teacher_dir) == {**clip_port.hf_config(DEMO.clip), "torch_dtype": "float32"}
    assert transformers.CLIPImageProcessor.from_pretrained(teacher_dir).crop_size == {"height": 32, "width": 32}

    # The PyTorch reference builds the teacher from that name, as the official builder does,
    # and its features equal the JAX teacher's (CLIP layer -2, CLS dropped).
    model = ref.from_pretrained(out)
    assert model.model.vision_tower_compressor.clip_layer is model.model.vision_clip
    pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    hidden = vit.ClipViT(DEMO.clip).apply({"params": params["clip"]}, pixels, return_hidden=True).hidden_states
    want = np.asarray(hidden[DEMO.teacher_layer][:, 1:])
    with torch.no_grad():
        got = model.model.vision_clip(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
    assert got.shape == want.shape == (2, 16, 32)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5

    # Read back, the name survives; a second export writes no second teacher.
    eve_port.import_eve(out, tmp_path / "again")
    cfg, _ = eve_port.load_checkpoint(tmp_path / "again")
    assert cfg == DEMO
    eve_port.export_eve(tmp_path / "again", tmp_path / "out2")
    assert io.load_config_json(tmp_path / "out2")["mm_vision_tower_clip"] == str(teacher_dir.absolute())
    assert not (tmp_path / "out2" / eve_port.TEACHER_DIR).exists()


def test_imported_names_survive_export(official, tmp_path):
    _, teacher = reference_model()
    teacher_dir = tmp_path / "my_teacher"
    teacher.save_pretrained(teacher_dir)
    transformers.CLIPImageProcessor(crop_size=32, size=32).save_pretrained(teacher_dir)
    _write_bin_shards(official, tmp_path / "release")
    config = io.load_config_json(tmp_path / "release")
    config.update(mm_vision_tower="my-org/eve-processor-tiny", mm_vision_tower_clip=str(teacher_dir))
    del config["evejax"]["clip"]  # the teacher's sizes come from its directory, as official code reads them
    io.save_config_json(config, tmp_path / "release")

    eve_port.import_eve(tmp_path / "release", tmp_path / "ckpt")
    assert eve_port.load_checkpoint(tmp_path / "ckpt")[0] == CFG
    for inference in (False, True):
        out = tmp_path / f"out_{inference}"
        eve_port.export_eve(tmp_path / "ckpt", out, inference=inference)
        written = io.load_config_json(out)
        assert (written["mm_vision_tower"], written["mm_vision_tower_clip"]) == (
            "my-org/eve-processor-tiny", str(teacher_dir))
        assert not (out / eve_port.TEACHER_DIR).exists()


def test_export_refuses_a_teacher_path_the_official_builder_misreads(demo_checkpoint, tmp_path):
    out = tmp_path / "evaluation" / "out"
    with pytest.raises(CheckpointError, match="'eva'"):
        eve_port.export_eve(demo_checkpoint[0], out)
    assert not out.exists()
    eve_port.export_eve(demo_checkpoint[0], out, inference=True)  # no teacher, nothing to misread


def test_inference_checkpoints_keep_their_preprocessing(official, tmp_path):
    assert eve_port.config_from_hf(OFFICIAL_7B_CONFIG, with_pal=False).anyres() == eve.get_config("7b").anyres()
    _write_bin_shards(official, tmp_path / "release")
    eve_port.import_eve(tmp_path / "release", tmp_path / "infer", inference=True)
    cfg, _ = eve_port.load_checkpoint(tmp_path / "infer")
    assert not cfg.with_pal and cfg.anyres() == CFG.anyres()
    # Exported and imported again, from a training and from an inference checkpoint.
    eve_port.import_eve(tmp_path / "release", tmp_path / "train")
    for src in ("train", "infer"):
        eve_port.export_eve(tmp_path / src, tmp_path / f"{src}_hf", inference=True)
        geometry = io.load_config_json(tmp_path / f"{src}_hf")["evejax"]
        assert (geometry["teacher_image_size"], geometry["teacher_patch_size"]) == (32, 4)
        eve_port.import_eve(tmp_path / f"{src}_hf", tmp_path / f"{src}_again")
        assert eve_port.load_checkpoint(tmp_path / f"{src}_again")[0].anyres() == CFG.anyres()


def test_an_inference_checkpoint_runs_in_evejax_eval(demo_checkpoint, tmp_path, capsys):
    from evejax import cli

    eve_port.export_eve(demo_checkpoint[0], tmp_path / "hf", inference=True)
    eve_port.import_eve(tmp_path / "hf", tmp_path / "infer", inference=True)
    figures = tmp_path / "figures.json"
    assert cli.main(["eval", str(tmp_path / "infer"), "--num-questions", "6", "--batch-size", "3",
                     "--show", "0", "--json", str(figures)]) == 0
    assert "6 held-out questions: accuracy" in capsys.readouterr().out
    assert sum(json.loads(figures.read_text())["counts"].values()) == 6


def test_both_teacher_copies_load_strictly(demo_checkpoint, tmp_path):
    ckpt, params = demo_checkpoint
    eve_port.export_eve(ckpt, tmp_path / "once")
    model = ref.from_pretrained(tmp_path / "once")
    once = {k: torch.from_numpy(v) for k, v in io.load_state_dict(tmp_path / "once").items()}
    with pytest.raises(RuntimeError, match="Missing key.*clip_layer"):
        model.load_state_dict(once, strict=True)

    assert commands.export_main([str(ckpt), str(tmp_path / "twice"), "--both-teacher-copies"]) == 0
    twice = io.load_state_dict(tmp_path / "twice")
    assert twice.keys() == model.state_dict().keys()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in twice.items()}, strict=True)
    notes = eve_port.import_eve(tmp_path / "twice", tmp_path / "again")
    assert any("equals" in n for n in notes)
    _, again = eve_port.load_checkpoint(tmp_path / "again")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)))
