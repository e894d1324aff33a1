"""Weight-file I/O: safetensors (single and sharded), .bin pickles, damage, key checks."""
import json

import ml_dtypes
import numpy as np
import pytest

from evejax.port import io

torch = pytest.importorskip("torch")


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model.tok_embeddings.weight": rng.standard_normal((16, 8), dtype=np.float32),
        "model.layers.0.attention.wqkv.weight": rng.standard_normal((24, 8), dtype=np.float32),
        "model.norm.weight": rng.standard_normal(8, dtype=np.float32),
        "step": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "output.weight": rng.standard_normal((16, 8), dtype=np.float32)[:, ::2],  # non-contiguous
    }


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_single_file_round_trip(tmp_path):
    state = _state()
    written = io.save_state_dict(state, tmp_path)
    assert written == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporaries left
    _assert_same(io.load_state_dict(tmp_path), state)
    _assert_same(io.load_state_dict(tmp_path / "model.safetensors"), state)


def test_sharded_round_trip_and_index_format(tmp_path):
    state = _state()
    written = io.save_state_dict(state, tmp_path, max_shard_bytes=600)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert written[-1] == tmp_path / "model.safetensors.index.json"
    assert not (tmp_path / "model.safetensors").exists()

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in state.values())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    _assert_same(io.load_state_dict(tmp_path), state)


def test_resave_replaces_the_other_layout(tmp_path):
    state = _state()
    io.save_state_dict(state, tmp_path, max_shard_bytes=600)
    io.save_state_dict(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    io.save_state_dict(state, tmp_path, max_shard_bytes=600)
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    _assert_same(io.load_state_dict(tmp_path), state)


def test_metadata_is_written_with_format_pt(tmp_path):
    from safetensors import safe_open

    io.save_state_dict(_state(), tmp_path, metadata={"source": "evejax"})
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "evejax"}


def test_bfloat16_cast_and_load(tmp_path):
    state = _state()
    io.save_state_dict(state, tmp_path, dtype="bfloat16")
    kept = io.load_state_dict(tmp_path, keep_dtype=True)
    assert kept["model.norm.weight"].dtype == ml_dtypes.bfloat16
    assert kept["step"].dtype == np.int64  # integers are not cast
    widened = io.load_state_dict(tmp_path)
    assert widened["model.norm.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        widened["model.norm.weight"],
        state["model.norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32),
    )
    # The file is readable by the safetensors/torch stack as real bf16.
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


def test_bin_round_trip_with_bfloat16(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    weights = {"a": torch.randn(4, 3), "b": torch.randn(5).bfloat16(), "c": torch.arange(6).view(2, 3)}
    torch.save(weights, path)
    for source in (path, tmp_path):
        state = io.load_state_dict(source)
        np.testing.assert_array_equal(state["a"], weights["a"].numpy())
        assert state["b"].dtype == np.float32
        np.testing.assert_array_equal(state["b"], weights["b"].float().numpy())
        np.testing.assert_array_equal(state["c"], weights["c"].numpy())
    assert io.load_state_dict(path, keep_dtype=True)["b"].dtype == ml_dtypes.bfloat16


def test_bin_nested_under_state_dict_key(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    np.testing.assert_array_equal(io.load_state_dict(path)["w"], np.ones(2, np.float32))


def test_bin_that_is_not_a_tensor_dict_is_refused(tmp_path):
    path = tmp_path / "x.bin"
    torch.save([torch.ones(2)], path)
    with pytest.raises(io.CheckpointError, match="x.bin.*expected a dict"):
        io.load_state_dict(path)


class _MakesADirectory:
    """Unpickling this runs os.mkdir: the shape of a pickle that would run code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (self.path,)


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {"w": torch.ones(2)}, "config": _MakesADirectory(str(marker))}, tmp_path / "x.pth")
    with pytest.raises(io.CheckpointError, match=r"x\.pth: refused: .*posix\.mkdir.*would run code"):
        io.load_state_dict(tmp_path / "x.pth")
    assert not marker.exists()


@pytest.mark.parametrize("keep_bytes", [4, 60, -3])
def test_truncated_safetensors_names_the_file(tmp_path, keep_bytes):
    io.save_state_dict(_state(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(io.CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        io.load_state_dict(tmp_path)


def test_truncated_shard_names_the_shard(tmp_path):
    io.save_state_dict(_state(), tmp_path, max_shard_bytes=600)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(io.CheckpointError, match="model-00002-of-00003.safetensors"):
        io.load_state_dict(tmp_path)


def test_truncated_bin_names_the_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(io.CheckpointError, match=r"pytorch_model\.bin.*truncated"):
        io.load_state_dict(tmp_path)


def test_missing_shard_is_named(tmp_path):
    io.save_state_dict(_state(), tmp_path, max_shard_bytes=600)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(io.CheckpointError, match="missing: .*model-00002-of-00003.safetensors"):
        io.load_state_dict(tmp_path)


def test_sharded_bin_index(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {"total_size": 20}, "weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    state = io.load_state_dict(tmp_path)
    assert sorted(state) == ["a", "b"]


def test_empty_directory_says_what_it_looked_for(tmp_path):
    with pytest.raises(io.CheckpointError, match="model.safetensors.*pytorch_model.bin"):
        io.load_state_dict(tmp_path)


def test_check_state_dict_lists_every_problem_at_once():
    expected = {"a": (2, 3), "b": (4,), "c": (5,), "d": (1,)}
    got = {"a": np.zeros((3, 2)), "b": np.zeros(4), "e": np.zeros(1), "f": np.zeros(2)}
    with pytest.raises(io.CheckpointError) as info:
        io.check_state_dict(expected, got, source="ckpt/")
    message = str(info.value)
    assert "ckpt/" in message
    assert "2 missing, 2 unexpected, 1 shape mismatches" in message
    for line in ("missing: c", "missing: d", "unexpected: e", "unexpected: f",
                 "shape mismatch: a expected (2, 3), got (3, 2)"):
        assert line in message
    io.check_state_dict({"b": (4,)}, {"b": np.zeros(4)})


def test_config_json_round_trip(tmp_path):
    config = {"model_type": "internlm2", "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    path = io.save_config_json(config, tmp_path)
    assert path == tmp_path / "config.json"
    assert io.load_config_json(tmp_path) == config
    assert io.load_config_json(path) == config
    with pytest.raises(io.CheckpointError, match="no config.json"):
        io.load_config_json(tmp_path / "elsewhere")


def test_export_over_an_export_is_swapped_in_whole_and_keeps_other_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    io.save_hf_checkpoint(_state(0), {"model_type": "llama", "torch_dtype": "float32"}, out, family="llama",
                          max_shard_bytes=600)
    (out / "modeling_internlm2.py").write_text("# remote code the user copied in\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) >= 5  # shards, index, config.json, the user's file

    def disk_full(config, directory):
        raise OSError("No space left on device")

    # The weights are written, config.json fails: the earlier export stays whole, nothing is left beside it.
    monkeypatch.setattr(io, "save_config_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.save_hf_checkpoint(_state(1), {"model_type": "llama", "torch_dtype": "bfloat16"}, out,
                              family="llama", dtype="bfloat16")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    files = io.save_hf_checkpoint(_state(1), {"model_type": "llama"}, out, family="llama")
    assert files == [out / "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "modeling_internlm2.py"]
    assert (out / "modeling_internlm2.py").read_bytes() == before["modeling_internlm2.py"]
    _assert_same(io.load_state_dict(out), _state(1))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
