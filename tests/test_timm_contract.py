"""timm's own model checks (pytorch-image-models tests/test_models.py), our version, on popup_ models.

The checks are bench/timm_contract.py's (the 96-family sweep, results/timm_contract/): features_only with the default
feature class and with feature_cls='getter', torchvision fx feature extraction forward and backward, TorchScript
directly and after fx. Adaptations to timm's file, each for a reason:

* tiny models and inputs (timm's test_* models, small variants of 20 other families, 32-64 px): CI time;
* backward: timm asserts that *every* parameter gets a gradient; a popup model's only trainable tensors are its
  scores (edge-popup never trains a weight), so every score must get one, and nothing else may be trainable;
* features: the popup model's feature_info (channels, reductions, module names) must equal the plain model's: a
  popup backbone must plug in wherever its base does;
* TorchScript: the scripted popup model must compute the eager popup model's output (it compiles the folded
  network, timm_popup.folded), not only run;
* fx and TorchScript run on a subset of the models: the sweep runs them on every family; here they stay fast.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import timm_popup

BENCH = Path(__file__).resolve().parents[1] / "bench" / "timm_contract.py"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("timm_contract", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


contract = _load_bench()

# model -> (kwargs, input size): timm's tiny test_* models and the smallest member of 20 other families, made
# smaller still; ViT-like models take their img_size (fixed) and keep >= 3 blocks (features_only returns the last 3)
MODELS: dict[str, tuple[dict[str, Any], tuple[int, int, int]]] = {
    **{name: ({}, (3, 64, 64)) for name in timm.list_models("test_*") if not name.startswith("test_vit")},
    # their windows are sized for 160 px; img_size resizes them
    "test_coatnet": (dict(img_size=64), (3, 64, 64)),
    "test_maxvit": (dict(img_size=64), (3, 64, 64)),
    **{name: (dict(img_size=32), (3, 32, 32)) for name in timm.list_models("test_vit*")},
    "deit_tiny_patch16_224": (dict(img_size=32, depth=3, embed_dim=32, num_heads=2), (3, 32, 32)),
    "eva02_tiny_patch14_224": (dict(img_size=28, depth=3, embed_dim=32, num_heads=2), (3, 28, 28)),
    "beit_base_patch16_224": (dict(img_size=32, embed_dim=32, depth=3, num_heads=2), (3, 32, 32)),
    "cait_xxs24_224": (dict(img_size=32, depth=3, embed_dim=32, num_heads=2, depth_token_only=1), (3, 32, 32)),
    "xcit_nano_12_p8_224": (dict(img_size=32, depth=3), (3, 32, 32)),
    "coat_tiny": (dict(img_size=64, embed_dims=(32, 32, 32, 32), serial_depths=(1, 1, 1, 1), parallel_depth=1),
                  (3, 64, 64)),
    "swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=2, embed_dim=16, depths=(1, 1, 1, 1),
                                          num_heads=(1, 1, 1, 1)), (3, 64, 64)),
    "davit_tiny": (dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)), (3, 64, 64)),
    "fastvit_t8": (dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128)), (3, 64, 64)),
    "repvit_m1": (dict(embed_dim=(16, 32, 64, 128), depth=(1, 1, 1, 1)), (3, 64, 64)),
    "pvt_v2_b0": (dict(depths=(1, 1, 1, 1)), (3, 64, 64)),
    "edgenext_xx_small": (dict(depths=(1, 1, 1, 1)), (3, 64, 64)),
    "densenet121": (dict(growth_rate=8, block_config=(1, 1, 1, 1)), (3, 64, 64)),
    "hgnetv2_b0": ({}, (3, 64, 64)),
    "mobilenetv3_small_050": ({}, (3, 64, 64)),
    "regnetx_002": ({}, (3, 64, 64)),
    "ghostnet_050": ({}, (3, 64, 64)),
    "mobilevit_xxs": ({}, (3, 64, 64)),
    "inception_next_atto": (dict(depths=(1, 1, 1, 1)), (3, 64, 64)),
    "starnet_s050": ({}, (3, 64, 64)),
    "dla46x_c": ({}, (3, 64, 64)),
    # nn.LSTM: its weights are read through _flat_weights, which the scripted (folded) copy must rebuild
    "sequencer2d_s": (dict(img_size=56, layers=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32), hidden_sizes=(8, 8, 8, 8)),
                      (3, 56, 56)),
    # the paper's family (hand-written popup_resnet18 ...), one block per stage
    "resnet18": (dict(layers=(1, 1, 1, 1)), (3, 64, 64)),
}
# fx (forward and backward) on these, TorchScript (direct and after fx) on the first of them
# (ViT, DeiT, EVA-02, CoaT and BEiT read frozen class tokens with traced sizes: the fx failure this issue fixed)
FX_MODELS = ["test_vit", "test_resnet", "test_efficientnet", "deit_tiny_patch16_224", "eva02_tiny_patch14_224",
             "coat_tiny", "beit_base_patch16_224"]
JIT_MODELS = [*FX_MODELS[:3], "sequencer2d_s"]


def _sizes(name: str) -> dict[str, tuple[int, int, int]]:
    size = MODELS[name][1]
    return dict(feat=size, fx=size, jit=size)


def _check(name: str, checks: tuple[str, ...], reference: dict[str, Any] | None = None) -> None:
    kwargs = MODELS[name][0]
    result = contract.run_contract(name, kwargs, popup=True, sizes=_sizes(name), reference=reference, checks=checks)
    failed = {c: result[c]["reason"] for c in checks if not result[c]["ok"]}
    assert not failed, f"popup_{name}: {failed}"


@pytest.mark.parametrize("name", list(MODELS))
def test_model_forward_features(name: str) -> None:
    """features_only, default feature class and 'getter': the plain model's feature_info, outputs as announced."""
    _check(name, ("features", "getter"), reference=contract.plain_feature_info(name, MODELS[name][0]))


@pytest.mark.parametrize("name", FX_MODELS)
def test_model_forward_and_backward_fx(name: str) -> None:
    _check(name, ("fx_fwd", "fx_bwd"))


@pytest.mark.parametrize("name", JIT_MODELS)
def test_model_forward_torchscript_direct_and_after_fx(name: str) -> None:
    _check(name, ("jit", "fx_jit"))


def test_model_forward_intermediates_and_backward() -> None:
    """timm's forward / backward / forward_intermediates checks, on one model of each kind (they passed before)."""
    for name in ("test_vit", "test_convnext"):
        kwargs, size = MODELS[name]
        model = timm.create_model("popup_" + name, num_classes=42, **kwargs).eval()
        x = torch.randn(2, *size)
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x)) and len(intermediates) == len(model.feature_info)
        model.train()
        model(x).mean().backward()
        scores = {id(m.scores) for m in timm_popup.popup_masks(model).values()}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(id(p) in scores for p in model.parameters() if p.requires_grad), trainable
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _features_equal_intermediates(features: Any, whole: Any, indices: tuple[int, ...], x: torch.Tensor) -> None:
    with torch.no_grad():
        got = features(x)
        _, expected = whole.eval().forward_intermediates(x, indices=list(indices))
    assert len(got) == len(expected) == len(indices)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_saved_popup_resnet50_mask_loads_as_a_features_backbone(tmp_path: Path) -> None:
    """A detection / segmentation user's call on the paper's network: features equal the masked model's stages."""
    # popup_resnet50 with one bottleneck per stage (config.json records it): its stages, names and widths, in CI time
    model = timm.create_model("popup_resnet50", layers=(1, 1, 1, 1)).eval()
    with torch.no_grad():  # a mask that is not the initial one (every score drawn anew)
        for mask in timm_popup.popup_masks(model).values():
            mask.scores.normal_()
    timm_popup.save_pretrained(model, tmp_path)
    x = torch.randn(1, 3, 32, 32)
    local = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, features_only=True, out_indices=(1, 2, 3))
    assert local.feature_info.channels() == [256, 512, 1024] and local.feature_info.reduction() == [4, 8, 16]
    assert local.feature_info.module_name() == ["layer1", "layer2", "layer3"]  # as timm's resnet50 names them
    _features_equal_intermediates(local.eval(), model, (1, 2, 3), x)
    file = timm.create_model("popup_resnet50", pretrained=True, features_only=True, out_indices=(1, 2, 3),
                             layers=(1, 1, 1, 1), pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    _features_equal_intermediates(file.eval(), model, (1, 2, 3), x)


def test_a_mask_loads_into_a_family_whose_features_model_is_its_own_class(tmp_path: Path) -> None:
    """EfficientNet / MobileNetV3 build features_only as another class, without the head the mask verifies."""
    model = timm.create_model("popup_test_efficientnet").eval()
    timm_popup.save_pretrained(model, tmp_path)
    features = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, features_only=True, out_indices=(2, 3))
    assert type(features).__name__ == "EfficientNetFeatures"  # the class plain timm builds
    _features_equal_intermediates(features.eval(), model, (2, 3), torch.randn(1, 3, 64, 64))


def test_torchscript_and_export_leave_the_popup_model_as_it_was() -> None:
    """Scripting compiles a folded copy: the popup model keeps its masks and trains its scores afterwards."""
    model = timm.create_model("popup_test_vit", img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    scripted = torch.jit.script(model)
    assert torch.equal(scripted(x), expected)
    assert not any(n.endswith("scores") for n, _ in scripted.named_parameters())  # the deployed, folded network
    exported = torch.export.export(model, (x,)).module()
    assert torch.equal(exported(x), expected)
    masks = timm_popup.popup_masks(model)
    assert len(masks) == len(timm_popup.popup_masks(timm.create_model("popup_test_vit", img_size=32)))
    model.train()
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert all(m.scores.grad is not None for m in masks.values())


def test_features_backbone_scripts_and_keeps_output_stride() -> None:
    """A scripted features_only popup backbone computes its features; scripting it (or a submodule of a popup
    model) folds a copy and leaves every mask in place; output_stride passes to the base as for plain timm."""
    features = timm.create_model("popup_test_resnet", features_only=True, out_indices=(1, 2), output_stride=8).eval()
    plain = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2), output_stride=8)
    assert features.feature_info.reduction() == plain.feature_info.reduction() == [4, 8]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = features(x)
    masks = len(timm_popup.popup_masks(features))
    assert all(torch.equal(a, b) for a, b in zip(torch.jit.script(features)(x), expected, strict=True))
    model = timm.create_model("popup_test_resnet")
    before = len(timm_popup.popup_masks(model))
    torch.jit.script(model.layer1)
    assert len(timm_popup.popup_masks(features)) == masks and len(timm_popup.popup_masks(model)) == before


class _Tokens(torch.nn.Module):
    """A class token read with the batch's traced size (what FrozenValue is for), a masked layer and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        return self.head(x[:, 0] + x[:, 1:].mean(1))


def test_weight_learning_methods_train_a_frozen_token_and_save_it_dense() -> None:
    """random-subnet / dense make a FrozenValue-read token a plain trainable parameter again (its parametrization
    removed, its drawn value kept), and the checkpoint save_dense writes (dense_state_dict, unshared) reloads into a
    fresh make_dense model with the same logits: the beit / vit export check of tests/test_coverage.py, small."""
    import safetensors.torch

    from timm_popup.export import dense_state_dict, unshared
    from timm_popup.methods import make_dense, make_random_subnet

    model = timm_popup.convert(_Tokens(), seed=3)
    assert model.popup_config.frozen["cls_token"].startswith("draw:")
    drawn = model.cls_token.clone()
    trained = make_random_subnet(model)
    assert not torch.nn.utils.parametrize.is_parametrized(trained, "cls_token")
    assert isinstance(trained._parameters["cls_token"], torch.nn.Parameter) and "cls_token" not in trained._buffers
    assert torch.equal(trained.cls_token, drawn) and trained.cls_token.requires_grad
    x = torch.randn(2, 4, 8)
    trained(x).sum().backward()
    assert trained.cls_token.grad is not None
    torch.fx.symbolic_trace(trained)  # a plain parameter to fx now
    state = safetensors.torch.load(safetensors.torch.save(unshared(dense_state_dict(trained))))
    reloaded = make_dense(timm_popup.convert(_Tokens(), seed=3))
    reloaded.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained(x))


def test_onnx_check_exports_plain_and_popup_and_reports_what_fails() -> None:
    """The sweep's onnx column: timm's export of the plain model against ours (checked with ONNX Runtime)."""
    pytest.importorskip("onnxruntime")
    sizes = _sizes("test_resnet")
    for popup in (False, True):
        result = contract.run_contract("test_resnet", {}, popup=popup, sizes=sizes, checks=("onnx",))
        assert result["onnx"] == dict(ok=True, reason="") and set(result) == {"info", "onnx"}
    # a ViT resampling its position embedding (antialiased bicubic, no ONNX operator) fails on both sides, each with
    # its one-line reason
    vit = dict(img_size=32, dynamic_img_size=True)
    plain, popup = (contract.run_contract("test_vit", vit, popup=p, sizes=dict(jit=(3, 48, 48)), checks=("onnx",))[
        "onnx"] for p in (False, True))
    assert not plain["ok"] and not popup["ok"] and "\n" not in plain["reason"] + popup["reason"]
    assert "_upsample_bicubic2d_aa" in plain["reason"] and "timm cannot export the plain test_vit" in popup["reason"]
    rows = [dict(family="resnet", model="test_resnet", plain=dict(onnx=dict(ok=True)), popup=dict(onnx=plain))]
    assert contract.summary(rows, ("onnx",))[0]["regressions"] == ["resnet"]  # popup fails where plain passes
