"""The weight generator: golden values, independence from process/torch RNG, distributions."""

import hashlib
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from timm_popup.init import WEIGHT_INITS, init_std, random_normal, random_weight, stream_key

# (shape, seed, name, weight_init, k, first values, sha256 of all float32 little-endian bytes).
# These pin every published mask's weights: if one changes, every mask ever published is invalid.
GOLDEN = [
    ((64, 64, 3, 3), 0, "layer1.0.conv1.weight", "kaiming_normal", 1.0, [-0.016518989577889442, 0.06192632392048836, -0.07834959775209427, 0.05264218896627426], "3c0c12fc37a77769cff34fc1ab1b7e47ea41431961057586d89703df73aa3bf2"),  # noqa: E501
    ((10, 512), 1, "fc.weight", "signed_constant", 1.0, [-0.0625, 0.0625, -0.0625, -0.0625], "f7952173e2a9c1747db949f8035931086001fd3e5753e8fa27e393316fac9f3b"),  # noqa: E501
    ((64, 3, 3, 3), 42, "features.0.weight", "kaiming_uniform", 1.0, [0.4382255971431732, 0.01351798977702856, -0.13293667137622833, -0.41027936339378357], "ad28c751522585d89124101f2662bea4efad1f1227a46077e96a75503ed6ccbb"),  # noqa: E501
    ((256, 128), 7, "blocks.0.mlp.fc1.weight", "xavier_normal", 1.0, [-0.08222132176160812, 0.07069652527570724, 0.021310856565833092, 0.06535778939723969], "d6958d340588c849046d683b1726ed5d48761848701c155b251521d7b2ff4b63"),  # noqa: E501
    ((128, 64, 1, 1), 3, "layer2.0.downsample.0.weight", "scaled_kaiming_normal", 0.3, [-0.21727797389030457, -0.3357067406177521, 0.15182077884674072, -0.3479330539703369], "ad150a54ba5e3a04891a3e77f3e6559c8864680f1975f87c4f32881dbd24ca53"),  # noqa: E501
    ((32, 16), 5, "fc1.weight", "scaled_signed_constant", 0.5, [-0.5, 0.5, 0.5, -0.5], "d7b3e1219da64bcf2b8a70fd9f588de1324bb0a21553efc47aafcad2ebae08fb"),  # noqa: E501
    ((16, 8), 9, "fc2.weight", "signed_xavier_constant", 1.0, [0.28867512941360474, 0.28867512941360474, 0.28867512941360474, 0.28867512941360474], "e1829295ba978029d0c591edd2d4f0ca4b5ddff23ae99dfe4077c65212277fe7"),  # noqa: E501
]


def test_golden_frozen_embedding():
    w = random_normal((1, 197, 192), seed=0, name="pos_embed", std=0.02)
    assert w.flatten()[:4].tolist() == [0.007476181723177433, 0.004261974710971117, -0.012675691395998001,
                                         -0.017268426716327667]
    assert _digest(w) == "a88d70ac28ca6715661f978b2764b085926d78fc277320dbc16c0e4f76cdd9c0"
    assert abs(w.std().item() - 0.02) < 0.05 * 0.02  # the documented std (generator v1 gave 0.02/sqrt(numel))


def _digest(w: torch.Tensor) -> str:
    return hashlib.sha256(w.numpy().astype("<f4").tobytes()).hexdigest()


@pytest.mark.parametrize("shape,seed,name,weight_init,k,first,sha", GOLDEN)
def test_golden_values(shape, seed, name, weight_init, k, first, sha):
    w = random_weight(shape, seed=seed, name=name, weight_init=weight_init, k=k)
    assert w.dtype == torch.float32 and tuple(w.shape) == shape
    assert w.flatten()[:4].tolist() == first
    assert _digest(w) == sha


def _reference_normal(seed: int, name: str, n: int, std: float) -> list[float]:
    """The module docstring's recipe re-implemented with Python ints and math.log (independent code)."""
    mask = (1 << 64) - 1
    key = int.from_bytes(hashlib.sha256(f"timm-popup/v2|{seed}|{name}".encode()).digest()[:8], "little")
    a = [-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00]
    b = [-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01]
    c = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00]
    d = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00]
    out = []
    for i in range(n):
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        p = (((z >> 11) & ((1 << 52) - 1)) + 0.5) / 2.0**53
        if p < 0.02425:
            q = math.sqrt(-2 * math.log(p))
            x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
                (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
        else:
            q = p - 0.5
            r = q * q
            x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / (
                ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
        mag = -x * std
        val = -mag if z >> 63 else mag
        out.append(struct.unpack("<f", struct.pack("<f", val))[0])
    return out


def test_matches_documented_recipe():
    shape = (40, 50)
    std = math.sqrt(2 / 50)
    w = random_weight(shape, seed=11, name="blocks.3.attn.qkv", weight_init="kaiming_normal")
    assert w.flatten().tolist() == _reference_normal(11, "blocks.3.attn.qkv", 2000, std)


def test_independent_of_torch_rng_and_process():
    torch.manual_seed(123)
    a = random_weight((300, 200), seed=5, name="x.y", weight_init="kaiming_normal")
    torch.manual_seed(456)
    torch.rand(1000)
    b = random_weight((300, 200), seed=5, name="x.y", weight_init="kaiming_normal")
    assert torch.equal(a, b)
    code = ("import hashlib, torch; torch.manual_seed(99); from timm_popup.init import random_weight; "
            "w = random_weight((300, 200), seed=5, name='x.y', weight_init='kaiming_normal'); "
            "print(hashlib.sha256(w.numpy().astype('<f4').tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == _digest(a)


def test_seed_and_name_change_the_weights():
    base = random_weight((64, 64), seed=0, name="fc", weight_init="kaiming_normal")
    assert not torch.equal(base, random_weight((64, 64), seed=1, name="fc", weight_init="kaiming_normal"))
    assert not torch.equal(base, random_weight((64, 64), seed=0, name="fc2", weight_init="kaiming_normal"))
    assert stream_key(0, "fc") != stream_key(1, "fc")


def test_normal_distributions_have_the_specified_law():
    shape = (1024, 256, 2, 2)  # fan_in 1024 -> std sqrt(2/1024)
    w = random_weight(shape, seed=3, name="big", weight_init="kaiming_normal").double()
    std = math.sqrt(2 / 1024)
    assert abs(w.mean().item()) < 3 * std / math.sqrt(w.numel())
    assert w.std().item() == pytest.approx(std, rel=0.003)
    z = (w / std).abs()
    # mass within 1, 2, 3 sigma and the far tail (which uses the separate tail formula)
    assert (z < 1).double().mean().item() == pytest.approx(0.682689, abs=0.002)
    assert (z < 2).double().mean().item() == pytest.approx(0.954500, abs=0.001)
    assert (z < 3).double().mean().item() == pytest.approx(0.997300, abs=0.0003)
    assert (z > 2.5).double().mean().item() == pytest.approx(0.012419, abs=0.0005)
    assert ((w / std) ** 4).mean().item() == pytest.approx(3.0, rel=0.02)  # kurtosis of a normal


def test_signed_constant_is_plus_minus_std_only():
    w = random_weight((512, 256, 3, 3), seed=0, name="c", weight_init="signed_constant")
    std = math.sqrt(2 / (256 * 9))
    values = torch.unique(w)
    assert torch.equal(values, torch.tensor([-std, std], dtype=torch.float32))
    assert (w > 0).double().mean().item() == pytest.approx(0.5, abs=0.002)


def test_scaled_uniform_and_xavier_stds():
    shape = (256, 512)
    k = 0.3
    kaiming = math.sqrt(2 / 512)
    assert init_std("scaled_kaiming_normal", shape, k) == pytest.approx(kaiming / math.sqrt(k))
    w = random_weight(shape, seed=1, name="s", weight_init="scaled_signed_constant", k=k)
    assert w.abs().unique().item() == pytest.approx(kaiming / math.sqrt(k), rel=1e-6)
    w = random_weight(shape, seed=1, name="s", weight_init="scaled_kaiming_normal", k=k)
    assert w.std().item() == pytest.approx(kaiming / math.sqrt(k), rel=0.01)
    w = random_weight(shape, seed=1, name="u", weight_init="kaiming_uniform")
    assert w.abs().max().item() <= math.sqrt(6 / 512)
    assert w.std().item() == pytest.approx(kaiming, rel=0.01)
    w = random_weight(shape, seed=1, name="x", weight_init="xavier_normal")
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 + 512)), rel=0.01)
    w = random_weight(shape, seed=1, name="x", weight_init="signed_xavier_constant")
    assert w.abs().unique().item() == pytest.approx(math.sqrt(2 / (256 + 512)), rel=1e-6)


def test_every_distribution_is_listed_and_runs():
    for weight_init in WEIGHT_INITS:
        w = random_weight((8, 4, 3, 3), seed=0, name="l", weight_init=weight_init, k=0.5)
        assert torch.isfinite(w).all() and w.abs().min() > 0


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="unknown weight_init 'gaussian'.*kaiming_normal"):
        random_weight((4, 4), seed=0, name="l", weight_init="gaussian")
    with pytest.raises(ValueError, match=r"k=0 is outside \(0, 1\].*KEPT"):
        random_weight((4, 4), seed=0, name="l", weight_init="scaled_kaiming_normal", k=0)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        random_weight((4,), seed=0, name="l", weight_init="kaiming_normal")


def test_uint64_arithmetic_wraps_not_saturates():
    # The generator relies on numpy's defined modulo-2**64 wrap-around.
    x = np.array([2**64 - 1], dtype=np.uint64)
    x *= np.uint64(3)
    assert int(x[0]) == (3 * (2**64 - 1)) % 2**64
