"""Mask artifacts: round trip through timm's loading path, size, and every bad input a clear error."""

import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from timm_popup.convert import convert, popup_masks
from timm_popup.masks import (
    FORMAT_VERSION,
    MaskError,
    artifact_info,
    load_masks,
    pack_mask,
    read_mask_file,
    save_masks,
    unpack_mask,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking popup_conv4 (scores moved, BN-free) and a popup_resnet18 with BN stats, saved."""
    out = {}
    torch.manual_seed(0)
    for name, kw in (("popup_conv4", dict(seed=7, k=0.4)), ("popup_resnet18", dict(seed=3, num_classes=10))):
        model = timm.create_model(name, **kw)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 3, 32, 32))  # update BN running stats
        model.eval()
        path = tmp_path_factory.mktemp(name) / "model.safetensors"
        save_masks(model, path)
        out[name] = (model, path, kw)
    return out


def _load(name, path, **kw):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()


@pytest.mark.parametrize("name", ["popup_conv4", "popup_resnet18"])
def test_file_route_gives_identical_logits_and_adopts_seed_and_k(saved, name):
    model, path, kw = saved[name]
    loaded = _load(name, path, **{k: v for k, v in kw.items() if k == "num_classes"})
    assert loaded.popup_config.seed == kw["seed"] and loaded.popup_config.k == kw.get("k", 0.3)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    for (n, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(a, b), n


def test_file_route_generates_each_weight_once(saved, monkeypatch):
    """The mask's seed / k are read before the build, so no layer is generated for the defaults first."""
    import timm_popup.layers

    model, path, _ = saved["popup_conv4"]
    calls = []
    real = timm_popup.layers.random_weight
    monkeypatch.setattr(timm_popup.layers, "random_weight", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    loaded = _load("popup_conv4", path)
    assert len(calls) == len(popup_masks(loaded)) and {c["seed"] for c in calls} == {7}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_load_masks_reseeds_a_model_built_for_other_defaults(saved):
    model, path, _ = saved["popup_conv4"]
    other = timm.create_model("popup_conv4").eval()  # seed 0, k 0.5: the file says seed 7, k 0.4
    load_masks(other, path)
    assert (other.popup_config.seed, other.popup_config.k) == (7, 0.4)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), other(x))


def test_fresh_process_reproduces_logits(saved, tmp_path):
    model, path, _ = saved["popup_resnet18"]
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x), tmp_path / "y.pt")
    code = (f"import torch, timm, timm_popup; m = timm.create_model('popup_resnet18', pretrained=True, num_classes=10, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r})).eval(); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True); "
            f"y = torch.load({str(tmp_path / 'y.pt')!r}, weights_only=True); print(torch.equal(m(x), y))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_other_num_classes_reinitialises_only_the_classifier(saved):
    model, path, _ = saved["popup_resnet18"]
    loaded = _load("popup_resnet18", path, num_classes=5)
    assert loaded.fc.out_features == 5
    name = "layer1.0.conv1.weight"
    assert torch.equal(popup_masks(loaded)[name].get_mask(), popup_masks(model)[name].get_mask())
    assert torch.equal(loaded.bn1.running_var, model.bn1.running_var)


def test_pack_roundtrip_and_bit_order():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    packed = pack_mask(mask)
    assert packed.tolist() == [1, 2]  # element i is bit i % 8 of byte i // 8
    assert torch.equal(unpack_mask(packed, (10,)), mask)


def test_artifact_is_about_one_bit_per_weight(saved):
    model, path, _ = saved["popup_conv4"]
    n = 2_425_024
    assert n / 8 < os.path.getsize(path) < n / 8 + 64_000
    info = artifact_info(read_mask_file(path))
    assert info["total_weights"] == n and info["kept_weights"] == sum(round(0.4 * layer.numel()) for layer in (
        model.features[0].weight, model.features[2].weight, model.features[5].weight, model.features[7].weight,
        model.fc1.weight, model.fc2.weight, model.fc.weight))
    assert (info["seed"], info["k"], info["weight_init"]) == (7, 0.4, "signed_constant")


def _rewrite(path, out, **changes):
    sd = safetensors.torch.load_file(str(path))
    for key, fn in changes.items():
        sd[key] = fn(sd[key])
    safetensors.torch.save_file(sd, str(out))
    return out


def test_bad_inputs_each_give_a_clear_error(saved, tmp_path):
    _, conv4, _ = saved["popup_conv4"]
    _, r18, _ = saved["popup_resnet18"]
    cases = []
    cases.append(("popup_conv4", tmp_path / "missing.safetensors", {}, "does not exist"))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(conv4.read_bytes()[:5000])
    cases.append(("popup_conv4", trunc, {}, "truncated or corrupt"))
    flipped = bytearray(conv4.read_bytes())
    flipped[-100] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    cases.append(("popup_conv4", tmp_path / "flip.safetensors", {}, "checksum"))
    dense = tmp_path / "dense.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18").state_dict(), str(dense))
    cases.append(("popup_resnet18", dense, {}, "dense checkpoint .*methods.load_dense"))
    cases.append(("popup_conv4", r18, {}, "another architecture"))
    cases.append(("popup_conv2", conv4, {}, "another architecture"))
    cases.append(("popup_conv4", conv4, dict(seed=8), "found with seed=7"))
    cases.append(("popup_conv4", conv4, dict(k=0.5), "found with k=0.4"))
    cases.append(("popup_conv4", conv4, dict(weight_init="kaiming_normal"), "found with weight_init='signed_constant'"))
    newer = _rewrite(conv4, tmp_path / "newer.safetensors",
                     **{"__popup__.format_version": lambda t: torch.tensor([FORMAT_VERSION + 1])})
    cases.append(("popup_conv4", newer, {}, f"format version {FORMAT_VERSION + 1}, newer"))
    older = _rewrite(conv4, tmp_path / "older.safetensors", **{"__popup__.format_version": lambda t: t - 1})
    cases.append(("popup_conv4", older, {}, "format version 1 .* no longer reads"))
    other_w = _rewrite(conv4, tmp_path / "fp.safetensors", **{"features.0.weight.fingerprint": lambda t: 255 - t})
    cases.append(("popup_conv4", other_w, {}, "checksum"))
    cases.append(("popup_conv4", conv4, dict(width=2.0), "shape"))
    for name, path, kw, message in cases:
        with pytest.raises((MaskError, RuntimeError), match=message):
            _load(name, path, **kw)


def test_fingerprint_catches_other_random_weights(saved, tmp_path):
    # A mask whose checksum is consistent but that was found on other weights (e.g. another generator).
    from timm_popup import maskfile

    _, conv4, _ = saved["popup_conv4"]
    sd = safetensors.torch.load_file(str(conv4))
    sd["features.0.weight.fingerprint"] = 255 - sd["features.0.weight.fingerprint"]
    sd["__popup__.checksum"] = maskfile.checksum(sd)
    safetensors.torch.save_file(sd, str(tmp_path / "other.safetensors"))
    with pytest.raises(MaskError, match="features.0.weight: the weights regenerated from seed 7 do not match"):
        _load("popup_conv4", tmp_path / "other.safetensors")
    # a rejected file leaves the model as it was (it used to be re-seeded before the check)
    model = timm.create_model("popup_conv4").eval()
    before = {n: b.clone() for n, b in model.named_buffers()}
    scores = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(MaskError, match="do not match"):
        load_masks(model, tmp_path / "other.safetensors")
    assert (model.popup_config.seed, model.popup_config.k) == (0, 0.5)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, scores[n]) for n, p in model.named_parameters())


def test_artifact_info_counts_bits_of_tensors_not_a_multiple_of_8(tmp_path):
    """Kept counts read with the same (little-endian) bit order the masks were packed in."""
    model = convert(nn.Sequential(*[nn.Linear(n, 1, bias=False) for n in range(9, 16)]), k=0.4, seed=1)
    with torch.no_grad():
        for mask in popup_masks(model).values():
            mask.scores.copy_(torch.arange(mask.scores.numel(), dtype=torch.float32).view_as(mask.scores))
    save_masks(model, tmp_path / "m.safetensors")
    info = artifact_info(read_mask_file(tmp_path / "m.safetensors"))
    assert info["kept_weights"] == sum(round(0.4 * n) for n in range(9, 16))


def test_registry_model_without_a_published_mask_says_how_to_load_one():
    with pytest.raises(MaskError, match="no mask is published for popup_resnet18: .*pretrained_cfg_overlay"):
        timm.create_model("popup_resnet18", pretrained=True)


def test_unpublished_registry_mask_says_so(monkeypatch):
    code = ("import timm, timm_popup\ntry:\n    timm.create_model('popup_wide_resnet50_2', pretrained=True)\n"
            "except RuntimeError as e:\n    print(e)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert "may not have published it yet" in out.stdout and "pretrained_cfg_overlay" in out.stdout
