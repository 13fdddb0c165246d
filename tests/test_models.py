"""The popup_* registry and convert(): counts, timm protocol, training invariants, learning."""

import copy
import hashlib
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_popup
from timm_popup import convert, popup_masks

ALL_MODELS = [
    "popup_conv2", "popup_conv4", "popup_conv6", "popup_conv8", "popup_fc", "popup_resnet18_cifar",
    "popup_resnet18", "popup_resnet34", "popup_resnet50", "popup_resnet101", "popup_wide_resnet50_2",
    "popup_wide_resnet101_2", "popup_vit_tiny_patch16_224", "popup_vit_small_patch16_224",
    "popup_convnext_atto", "popup_convnext_tiny",
]


def _small_input(model: nn.Module, name: str) -> torch.Tensor:
    c, h, w = model.pretrained_cfg["input_size"]
    if "vit" in name:
        return torch.randn(1, c, 32, 32)
    return torch.randn(1, c, min(h, 64), min(w, 64))


def _create(name: str, **kwargs) -> nn.Module:
    if "vit" in name:
        kwargs.setdefault("img_size", 32)
    return timm.create_model(name, **kwargs)


def test_registry_lists_every_model():
    assert set(ALL_MODELS) <= set(timm.list_models("popup_*"))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_builds_and_runs_batch_size_one(name):
    model = _create(name).eval()
    x = _small_input(model, name)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
    assert [n for n, _ in model.named_parameters() if not n.endswith("scores")] == []
    assert len(popup_masks(model)) > 0


@pytest.mark.parametrize("name", ["popup_conv4", "popup_fc", "popup_resnet18_cifar"])
def test_batch_size_one_in_training_mode(name):
    model = _create(name).train()
    out = model(_small_input(model, name))
    out.sum().backward()
    assert out.shape == (1, model.num_classes)


@pytest.mark.parametrize("name,count", [
    ("popup_conv2", 4_300_992), ("popup_conv4", 2_425_024), ("popup_conv6", 2_261_184),
    ("popup_conv8", 5_275_840), ("popup_resnet50", 25_502_912), ("popup_wide_resnet50_2", 68_814_016),
])
def test_masked_weight_counts(name, count):
    model = _create(name)
    layers = popup_masks(model)
    assert sum(layer.weight.numel() for layer in layers.values()) == count
    if name == "popup_resnet50":
        kept = sum(int(layer.get_mask().sum()) for layer in layers.values())
        assert kept == sum(round(0.3 * layer.weight.numel()) for layer in layers.values())
        assert 7.64e6 < kept < 7.66e6  # the paper's 7.6M subnetwork


def test_defaults_follow_the_paper_and_kwargs_pass_through():
    conv4 = timm.create_model("popup_conv4")
    assert conv4.popup_config.popup_args() == dict(k=0.5, weight_init="signed_constant", seed=0, dense=[])
    r18 = timm.create_model("popup_resnet18", k=0.7, weight_init="kaiming_normal", seed=4, num_classes=7)
    assert r18.popup_config.k == 0.7 and r18.num_classes == 7
    layer = popup_masks(r18)["layer1.0.conv1.weight"]
    assert (layer.k, layer.weight_init, layer.seed) == (0.7, "kaiming_normal", 4)
    assert timm.create_model("popup_resnet18").popup_config.k == 0.3
    wide = timm.create_model("popup_conv4", width=2.0, in_chans=1, img_size=28, num_classes=3)
    assert wide.features[0].out_channels == 128 and wide(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("k", [0.1, 0.3, 0.5, 0.7, 1.0])
def test_every_layer_keeps_round_kn(k):
    for name in ("popup_conv4", "popup_resnet18_cifar"):
        model = timm.create_model(name, k=k)
        for layer in popup_masks(model).values():
            assert int(layer.get_mask().sum()) == round(k * layer.weight.numel())


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"k=1.5 is outside \(0, 1\]"):
        timm.create_model("popup_conv4", k=1.5)
    with pytest.raises(ValueError, match=r"k=0.0 is outside"):
        timm.create_model("popup_resnet18", k=0.0)
    with pytest.raises(ValueError, match="unknown weight_init 'xavier'; choose one of"):
        timm.create_model("popup_conv2", weight_init="xavier")
    with pytest.raises(RuntimeError, match=r"Unknown model \(popup_resnet51\)"):
        timm.create_model("popup_resnet51")
    # a k so small that a tensor keeps nothing would silently build a network that outputs constants
    with pytest.raises(ValueError, match=r"k=1e-09 keeps 0 of the weights of features.0.weight \(64, 3, 3, 3\)"):
        timm.create_model("popup_conv4", k=1e-9)


def _state_hash(model: nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(b.detach().numpy().tobytes()).hexdigest() for n, b in model.named_buffers()}


def test_same_seed_same_network_in_another_process():
    model = timm.create_model("popup_conv4", seed=3)
    code = ("import hashlib, json, timm, timm_popup; m = timm.create_model('popup_conv4', seed=3); "
            "print(json.dumps({n: hashlib.sha256(b.detach().numpy().tobytes()).hexdigest() "
            "for n, b in m.named_buffers()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
    import json
    assert json.loads(out.stdout) == _state_hash(model)
    other = timm.create_model("popup_conv4", seed=4)
    with torch.no_grad():
        assert not torch.equal(other.features[0].weight, model.features[0].weight)


def test_twenty_sgd_steps_train_only_scores():
    torch.manual_seed(0)
    model = timm.create_model("popup_resnet18_cifar", num_classes=4).train()
    frozen = {n: b.clone() for n, b in model.named_buffers() if "running" not in n and "num_batches" not in n}
    scores = {n: p.clone() for n, p in model.named_parameters()}
    running = model.bn1.running_mean.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # weights, norm scale/shift and biases are buffers: bitwise unchanged
    assert {n for n in frozen if n.endswith("bn1.weight")} and {n for n in frozen if n.endswith("fc.bias")}
    for n, b in model.named_buffers():
        if n in frozen:
            assert torch.equal(b, frozen[n]), n
    assert torch.equal(model.bn1.weight, torch.ones(64)) and torch.equal(model.bn1.bias, torch.zeros(64))
    assert all(not torch.equal(p, scores[n]) for n, p in model.named_parameters())
    assert not torch.equal(model.bn1.running_mean, running)  # running stats still tracked


def test_popup_mlp_learns_a_generated_task():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 20, generator=g) * 2
    y = torch.randint(0, 4, (2048,), generator=g)
    x = centers[y] + torch.randn(2048, 20, generator=g)
    model = convert(nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 4)), k=0.5, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for i in range(0, 1536, 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.eval()
    acc = (model(x[1536:]).argmax(1) == y[1536:]).float().mean().item()
    assert acc > 0.85, acc  # chance is 0.25; the weights never moved


def test_convert_keeps_class_protocol_and_popup_classifier():
    model = timm.create_model("resnet18", num_classes=10)
    cls = type(model)
    convert(model, k=0.5, seed=1).eval()
    assert type(model) is cls
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert torch.equal(model(x), model.forward_head(feats))
    assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
    model.reset_classifier(5)
    assert "fc.weight" in popup_masks(model) and model(x).shape == (2, 5)
    assert popup_masks(model)["fc.weight"].weight.shape == (5, 512)
    assert [n for n, _ in model.named_parameters() if not n.endswith("scores")] == []
    clone = copy.deepcopy(model)
    clone.reset_classifier(3)
    assert clone(x).shape == (2, 3) and model(x).shape == (2, 5)


def test_convert_can_leave_layers_dense():
    model = convert(timm.create_model("resnet18", num_classes=10), k=0.5, dense=("conv1", "fc"))
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert "layer1.0.conv1.weight" in popup_masks(model) and "conv1.weight" not in popup_masks(model)
    trainable = {n for n, p in model.named_parameters() if not n.endswith("scores")}
    assert trainable == {"conv1.weight", "fc.weight", "fc.bias"}


def test_convert_freezes_other_parameters_deterministically():
    a = timm.create_model("popup_vit_tiny_patch16_224", img_size=32, seed=2)
    b = timm.create_model("popup_vit_tiny_patch16_224", img_size=32, seed=2)
    assert torch.equal(a.pos_embed, b.pos_embed) and torch.equal(a.cls_token, b.cls_token)
    assert "blocks.0.attn.qkv.weight" in popup_masks(a)
    assert torch.equal(a.blocks[0].norm1.weight, torch.ones(192))
    frozen = a.popup_config.frozen
    assert frozen["pos_embed"] == "draw:0.02" and frozen["blocks.0.norm1.weight"] == "norm:1"


def test_frozen_embeddings_have_the_documented_std():
    """Generator v1 drew them at 0.02/sqrt(numel) (ViT-Tiny pos_embed 6.5e-4); the documented std is 0.02."""
    model = timm.create_model("popup_vit_tiny_patch16_224")
    for name in ("pos_embed", "cls_token"):
        std = model.get_buffer(name).std().item()
        assert abs(std - 0.02) < 0.05 * 0.02 or name == "cls_token" and abs(std - 0.02) < 0.25 * 0.02, (name, std)
    big = model.pos_embed.flatten()
    assert abs(big.std().item() - 0.02) / 0.02 < 0.05 and abs(big.mean().item()) < 0.002


def test_parameter_policy_keeps_every_branch_alive():
    """Norm over one feature, zero residual gains, layer scales: frozen values that do not zero a branch."""
    ln1 = convert(nn.LayerNorm(1))
    assert ln1.popup_config.frozen == {"weight": "norm:1", "bias": "norm:1"}
    assert torch.equal(ln1(torch.randn(3, 1)), torch.ones(3, 1))  # non-affine it would output 0 forever

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.skipinit_gain = nn.Parameter(torch.tensor(0.0))
            self.gamma = nn.Parameter(1e-6 * torch.ones(4))
            self.temperature = nn.Parameter(torch.full((4,), 2.0))
            self.w_g = nn.Parameter(torch.randn(4, 1))

        def forward(self, x):
            return x + self.fc(x) * self.skipinit_gain * self.gamma * self.temperature + x @ self.w_g

    # fan-in 1 (csatv2's Linear(1, 3) qkv): each weight is a whole output; masking one would cut a branch
    tiny = convert(nn.Sequential(nn.Linear(1, 3, bias=False), nn.Linear(3, 2, bias=False)), k=0.5)
    assert tiny.popup_config.frozen == {"0.weight": "weight:all"} and list(popup_masks(tiny)) == ["1.weight"]
    assert torch.equal(tiny[0].weight, timm_popup.random_weight((3, 1), seed=0, name="0.weight",
                                                               weight_init="signed_constant", k=0.5))
    block = convert(Block(), seed=5)
    assert block.popup_config.frozen == {"fc.bias": "bias:0", "skipinit_gain": "gain:1", "gamma": "gain:1",
                                          "temperature": "const", "w_g": "draw:0.02"}
    assert block.skipinit_gain.item() == 1.0 and torch.equal(block.temperature, torch.full((4,), 2.0))
    x = torch.randn(2, 4)
    block(x).sum().backward()
    assert popup_masks(block)["fc.weight"].scores.grad.abs().sum() > 0


def test_public_api():
    assert timm_popup.__version__ and callable(timm_popup.convert)


def test_features_only_of_the_cifar_resnet():
    model = timm.create_model("popup_resnet18_cifar", features_only=True)
    feats = model(torch.randn(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 8, 4] and model.feature_info.reduction() == [1, 1, 2, 4, 8]


@pytest.mark.parametrize("name,kwargs,size", [
    ("popup_beit_base_patch16_224", dict(img_size=32, depth=2), 32),  # F.linear(x, self.qkv.weight) in attention
    ("popup_test_nfnet", {}, 32),  # ScaledStdConv2d: weight standardisation and gain
    ("popup_sequencer2d_s", dict(layers=(1, 1, 1, 1)), 32),  # LSTM weights
])
def test_any_timm_model_as_popup_learns_every_score(name, kwargs, size):
    model = timm.create_model(name, num_classes=3, **kwargs).train()
    assert type(model).__module__.startswith("timm.models")  # timm's own class, forward and protocol
    assert model.pretrained_cfg["architecture"] == name and not model.pretrained_cfg.get("hf_hub_id")
    masks = popup_masks(model)
    assert {n for n, p in model.named_parameters()} == {n for n, p in model.named_parameters() if n.endswith("scores")}
    assert len(masks) == len([p for p in model.parameters()])
    model(torch.randn(2, 3, size, size)).pow(2).mean().backward()
    dead = [n for n, m in masks.items() if m.scores.grad is None or not m.scores.grad.abs().sum() > 0]
    assert dead == []
    assert name in timm.list_models("popup_*")


def test_popup_of_every_timm_name_is_creatable_and_listed():
    assert timm.models.is_model("popup_efficientnet_b0") and not timm.models.is_model("popup_popup_conv4")
    assert not timm.models.is_model("popup_not_a_model")
    listed = set(timm.list_models("popup_*"))
    plain = [name for name in timm.list_models() if not name.startswith("popup_")]
    assert {"popup_conv4", "popup_resnet50"} <= listed and {"popup_" + name for name in plain} <= listed


def test_import_time_stays_low():
    code = "import time, timm; t = time.perf_counter(); import timm_popup; print(time.perf_counter() - t)"
    base = "import time; t = time.perf_counter(); import timm; print(time.perf_counter() - t)"
    ours = min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                    check=True).stdout) for _ in range(2))
    timm_alone = min(float(subprocess.run([sys.executable, "-c", base], capture_output=True, text=True, timeout=120,
                                          check=True).stdout) for _ in range(2))
    assert ours < max(1.0, timm_alone), (ours, timm_alone)  # registering popup_<every model> costs nothing here


def test_built_without_dense_init_where_the_policy_allows():
    """A model whose frozen values all follow from the policy is built on the meta device (no dense init, no
    memory for it) and comes out identical to converting a CPU build; others are built on the CPU."""
    from timm_popup.convert import build_converted

    calls = []

    def factory(name, **kw):
        def make():
            calls.append(torch.empty(0).device.type)  # the device the factory ran under
            return timm.create_model(name, **kw)
        return make

    fast = build_converted(factory("resnet18", num_classes=10), k=0.3, seed=2)
    assert calls == ["meta"]
    reference = convert(timm.create_model("resnet18", num_classes=10), k=0.3, seed=2)
    assert dict(fast.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    assert all(torch.equal(b, reference.get_buffer(n)) for n, b in fast.named_buffers())
    assert all(torch.equal(p, reference.get_parameter(n)) for n, p in fast.named_parameters())
    calls.clear()
    build_converted(factory("test_nfnet"), k=0.5)  # ScaledStdConv2d's gain: a constant only timm's init knows
    assert calls == ["meta", "cpu"]
    calls.clear()
    build_converted(factory("resnet18"), dense=("fc",))  # a dense module keeps timm's init
    assert calls == ["cpu"]


def test_published_tags_of_a_generic_architecture_are_registry_tags(monkeypatch):
    """popup_<name> registers the masks the project declares for it as timm pretrained tags (hf_hub_id; as in
    timm, the first tag with weights is the default), and never the dense weights of <name>."""
    from timm_popup.models import popup_any

    monkeypatch.setitem(popup_any.PUBLISHED, "popup_test_mambaout", {"ep_k50_test": "timm-popup/mambaout-test"})
    assert timm.models.is_model("popup_test_mambaout")
    tagged = timm.models.get_pretrained_cfg("popup_test_mambaout.ep_k50_test")
    assert tagged.hf_hub_id == "timm-popup/mambaout-test" and tagged.hf_hub_filename == "model.safetensors"
    assert timm.models.get_pretrained_cfg("popup_test_mambaout").hf_hub_id == "timm-popup/mambaout-test"
    assert timm.models.get_pretrained_cfg("test_mambaout").hf_hub_id != "timm-popup/mambaout-test"
