"""The PyTorch De-focus Mamba reference: official names, order and counts, the sequential scan
against its closed form, the RoPE quirk, causality, the official init."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from evejax.port.torch_ref.dan import (  # noqa: E402
    DefocusAttentionNetwork,
    DefocusMambaConfig,
    MambaMixer,
    selective_scan,
)

TINY = DefocusMambaConfig(embed_dim=32, depth=2, intermediate_size=64, state_size=8, time_step_rank=4,
                          group_norm_size=16, num_classes=10)

# dan.md §8 / §12: a block's tensors in the order the released state dicts hold them.
BLOCK = ["norm.weight", "mixer.A_log", "mixer.D", "mixer.freq", "mixer.conv1d.weight", "mixer.conv1d.bias",
         "mixer.in_proj.weight", "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias",
         "mixer.out_proj.weight"]


def _count(config):
    with torch.device("meta"):
        return sum(p.numel() for p in DefocusAttentionNetwork(config).parameters())


def test_small_state_dict_is_the_official_layout():
    config = DefocusMambaConfig.small()
    with torch.device("meta"):
        state = DefocusAttentionNetwork(config).state_dict()
    official = (["cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
                + [f"blocks.{i}.{name}" for i in range(24) for name in BLOCK]
                + ["norm.weight", "norm.bias", "head.weight", "head.bias", "head2.weight", "head2.bias"])
    assert list(state) == official
    assert {k: tuple(v.shape) for k, v in state.items()} == config.param_shapes()
    assert state["blocks.0.mixer.in_proj.weight"].shape == (1536, 384)
    assert state["blocks.23.mixer.x_proj.weight"].shape == (80, 768)
    assert state["blocks.0.mixer.conv1d.weight"].shape == (768, 1, 4)
    assert state["head2.weight"].shape == (1000, 384)


def test_parameter_counts_of_the_released_sizes():
    """dan.md §12, counted by building the official models."""
    assert _count(DefocusMambaConfig.small()) == 25_092_944
    assert _count(DefocusMambaConfig.base()) == 92_650_832
    assert _count(DefocusMambaConfig.base(use_aux_loss=False)) == 92_650_832 - 769_000
    large = DefocusMambaConfig.large()
    assert _count(large) == 330_117_840 and len(large.param_shapes()) == 541
    assert len(DefocusMambaConfig.base().param_shapes()) == 273
    assert large.param_shapes()["head.2.weight"] == (1000, 3072)
    assert _count(DefocusMambaConfig.large(head_type="IN22k_cls", num_classes=21841)) == 458_206_626


@pytest.mark.parametrize("slicing", ["time_major", "mamba_ssm"])
def test_selective_scan_matches_the_closed_form(slicing):
    """y_t[e] = sum_{s<=t} C_t . exp(A[e] sum_{r=s+1..t} delta_r[e]) B_s delta_s[e] u_s[e], in float64."""
    rng = np.random.default_rng(0)
    b, e, n, length = 2, 3, 4, 6
    u, delta = rng.standard_normal((b, e, length)), rng.uniform(0.1, 1.0, (b, e, length))
    A, B, C = -rng.uniform(0.5, 2.0, (e, n)), rng.standard_normal((b, n, length)), rng.standard_normal((b, n, length))
    want = np.zeros((b, e, length))
    for t in range(length):
        for s in range(t + 1):
            gap = delta[:, :, s + 1:t + 1].sum(-1)                                  # [b, e]
            weight = np.exp(gap[..., None] * A[None])                               # [b, e, n]
            want[:, :, t] += np.einsum("bn,ben,bn->be", C[:, :, t], weight, B[:, :, s]) * delta[:, :, s] * u[:, :, s]
    got = selective_scan(*(torch.from_numpy(a.astype(np.float32)) for a in (u, delta, A, B, C)), slicing)
    assert got.dtype == torch.float32 and got.shape == (b, e, length)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_both_scan_slicings_give_the_same_gradients():
    """The time-major slicing changes only how autograd takes tokens apart, not the result."""
    rng = np.random.default_rng(1)
    shapes = [(2, 3, 9), (2, 3, 9), (3, 4), (2, 4, 9), (2, 4, 9)]
    inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    inputs[1], inputs[2] = np.abs(inputs[1]) * 0.3, -np.abs(inputs[2])
    grads = {}
    for slicing in ("time_major", "mamba_ssm"):
        xs = [torch.from_numpy(x).requires_grad_() for x in inputs]
        y = selective_scan(*xs, slicing)
        y.backward(torch.from_numpy(np.cos(np.arange(y.numel(), dtype=np.float32)).reshape(y.shape)))
        grads[slicing] = [y.detach().numpy()] + [x.grad.numpy() for x in xs]
    for got, want in zip(grads["time_major"], grads["mamba_ssm"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scan_slicing 'loop'"):
        DefocusMambaConfig(scan_slicing="loop")


def test_rope_turns_pairs_by_sixteen_distinct_angles():
    """v'[2j] = v[2j] cos(t f[2j]/s) - v[2j+1] sin(t f[2j]/s); v'[2j+1] = v[2j+1] cos(t f[2j+1]/s) + v[2j] sin(..)."""
    mixer = MambaMixer(DefocusMambaConfig(intermediate_size=64, group_norm_size=64, rope_scale_factor=4.0))
    x = torch.randn(1, 7, 16)
    got = mixer.rope(x)[0, 5].detach().numpy()
    v, angle = x[0, 5].numpy(), 5 / 4.0 * mixer.freq.detach().numpy()
    want = np.empty(16)
    want[0::2] = v[0::2] * np.cos(angle[0::2]) - v[1::2] * np.sin(angle[0::2])
    want[1::2] = v[1::2] * np.cos(angle[1::2]) + v[0::2] * np.sin(angle[1::2])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_official_init():
    """dan.md §2 / §12: freq, A_log, D, the log-spaced dt, the dt_proj bound."""
    torch.manual_seed(0)
    model = DefocusAttentionNetwork(DefocusMambaConfig.base(depth=1))
    mixer = model.blocks[0].mixer
    freq = [0.7474, 0.5579, 0.4159, 0.3093, 0.2294, 0.1695, 0.1246, 0.0909, 0.0656, 0.0467, 0.0325, 0.0218,
            0.0139, 0.0079, 0.0034, 0.0]
    np.testing.assert_allclose(mixer.freq.detach().numpy(), freq, atol=5e-5)
    np.testing.assert_allclose(mixer.A_log.detach().numpy(), np.log(np.arange(1, 17))[None].repeat(1536, 0), rtol=1e-6)
    assert bool((mixer.D == 1).all())
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias).detach().numpy()
    np.testing.assert_allclose([dt[0], dt[-1]], [1e-3, 0.1], rtol=1e-4)
    assert 0.14 < float(mixer.dt_proj.weight.detach().abs().max()) <= 48 ** -0.5
    assert abs(float(mixer.in_proj.weight.detach().std()) - 0.02) < 1e-3 and not model.head.bias.any()


def test_forward_is_causal_with_the_class_token_last():
    """Changing the last patch row moves only the tokens after it (and the class token): the
    conv pads on the left and the scan runs forward. Non-square input, aux output layout."""
    torch.manual_seed(0)
    model = DefocusAttentionNetwork(TINY).eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(images)
        changed = images.clone()
        changed[:, :, 16:] += 1.0
        out2 = model(changed)
    assert out.shape == (2, 2 * 3 + 1, 10)
    assert torch.equal(out[:, :3], out2[:, :3])
    assert not torch.allclose(out[:, 3:], out2[:, 3:])
    no_aux = DefocusAttentionNetwork(DefocusMambaConfig(**{**TINY.__dict__, "use_aux_loss": False})).eval()
    no_aux.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head2")})
    with torch.no_grad():
        torch.testing.assert_close(no_aux(images), out[:, -1])


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="head_type 'avg'"):
        DefocusMambaConfig(head_type="avg")
    with pytest.raises(ValueError, match="group_norm_size 48 must divide"):
        DefocusMambaConfig(group_norm_size=48, intermediate_size=64)
    assert math.isclose(DefocusMambaConfig.large().delta_scale_factor, 2.0)
