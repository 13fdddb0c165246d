"""timm's own model tests (pytorch-image-models tests/test_models.py, the version of the installed timm), our version,
run on popup_ models: the registry queries first, before any model is built, then timm's model tests in timm's order.

Each test selects its models as timm's does (the same registry calls: ``list_models`` with timm's include / exclude
filters, ``name_matches_cfg``, ``include_tags``, ``module=``) and reads its input size with
``get_pretrained_cfg_value`` before ``create_model``, as timm does; the names are ``popup_<name>``. What differs:

* the models: four of timm's tiny ``test_*`` models by default (a convnet, an EfficientNet, a ConvNeXt, a ViT: CI
  time); ``TIMM_REGISTRY_MODELS`` takes other comma-separated name filters (``'test_*'`` for all 18 of them,
  ``'*'`` for every model, hours), and ``TIMM_REGISTRY_PLAIN=1`` runs the same tests on the plain timm models, to
  compare the counts (bench/timm_registry.py runs both);
* timm's tests that download weights (``test_model_inference``, ``test_model_load_pretrained``,
  ``test_model_features_pretrained``) are left out: they read timm's Hub weights, and a popup model's masks load
  through tests/test_pretrained.py's loopback Hub;
* timm's NaFlex / Gemma-4 unit tests are left out: they build timm modules directly, not registered models.

One check is read through the folded network: timm checks that its cfg's ``first_conv`` / ``classifier`` name
``X.weight`` in the model's state dict (what its loader adapts to ``in_chans`` / ``num_classes``); a popup model
stores ``X``'s scores instead (``X.parametrizations.weight.0.scores``), so the names are looked up in the state dict
of the network it computes (``export.dense_state_dict``: ``X.weight`` as masked), which is also what timm loads
when the popup model is exported. Nothing else is adapted: a popup model's parameters are its scores, and timm's
backward tests ask every parameter for a gradient, as they ask a plain model's.
"""

from __future__ import annotations

import fnmatch
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm import create_model, get_pretrained_cfg_value, list_models, set_scriptable
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import timm_popup  # noqa: F401  (popup_<name> for every timm name)
from timm_popup.export import dense_state_dict

DEFAULT_MODELS = "test_resnet,test_efficientnet,test_convnext,test_vit"
PREFIX = "" if os.environ.get("TIMM_REGISTRY_PLAIN") == "1" else "popup_"
MODELS = [f.strip() for f in os.environ.get("TIMM_REGISTRY_MODELS", DEFAULT_MODELS).split(",") if f.strip()]

# timm's selection lists, as its test file has them off GitHub Actions
FEAT_INTER_MODULES = [
    "vision_transformer", "vision_transformer_sam", "vision_transformer_hybrid", "vision_transformer_relpos",
    "beit", "mvitv2", "eva", "cait", "xcit", "volo", "twins", "deit", "swin_transformer", "swin_transformer_v2",
    "swin_transformer_v2_cr", "maxxvit", "efficientnet", "mobilenetv3", "levit", "efficientformer", "resnet",
    "regnet", "byobnet", "byoanet", "mlp_mixer", "hiera", "fastvit", "hieradet_sam2", "aimv2*", "tnt",
    "tiny_vit", "vovnet", "tresnet", "rexnet", "resnetv2", "repghost", "repvit", "pvt_v2", "nextvit", "nest",
    "mambaout", "inception_next", "inception_v4", "hgnet", "gcvit", "focalnet", "efficientformer_v2", "edgenext",
    "davit", "rdnet", "convnext", "pit", "starnet", "shvit", "fasternet", "swiftformer", "ghostnet", "naflexvit",
    "csatv2"]
NON_STD_FILTERS = [
    "vit_*", "naflexvit*", "tnt_*", "pit_*", "coat_*", "cait_*", "*mixer_*", "gmlp_*", "resmlp_*", "twins_*",
    "convit_*", "levit*", "visformer*", "deit*", "xcit_*", "crossvit_*", "beit*", "aimv2*", "swiftformer_*",
    "poolformer_*", "volo_*", "sequencer2d_*", "mvitv2*", "gcvit*", "efficientformer*", "sam_hiera*", "eva_*",
    "flexivit*", "eva02*", "samvit_*", "efficientvit_m*", "tiny_vit_*", "hiera_*", "vitamin*", "test_vit*",
    "gemma4_vit*"]
EXCLUDE_FILTERS = ["*enormous*", "*_7b_*"]
NON_STD_EXCLUDE_FILTERS = ["*gigantic*", "*enormous*", "*_3b_*", "*_7b_*"]
EXCLUDE_JIT_FILTERS = ["hiera_*", "*naflex*", "*_7b_*", "hrnet*", "dpn*", "densenet*", "selecsls*", "gemma4_vit*"]
EXCLUDE_FX_FILTERS = ["vit_gi*", "hiera*", "gemma4_vit*"]
EXCLUDE_FX_JIT_FILTERS = ["deit_*_distilled_patch16_224", "levit*", "pit_*_distilled_224", *EXCLUDE_FX_FILTERS]

TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE, MAX_BWD_SIZE = 128, 320
MAX_FWD_OUT_SIZE = 448
TARGET_JIT_SIZE, MAX_JIT_SIZE = 128, 320
TARGET_FFEAT_SIZE, MAX_FFEAT_SIZE = 96, 256
TARGET_FWD_FX_SIZE, MAX_FWD_FX_SIZE = 128, 256
TARGET_BWD_FX_SIZE, MAX_BWD_FX_SIZE = 128, 224

EARLY_POOL_MODELS = (timm.models.EfficientVit, timm.models.EfficientVitLarge, timm.models.FasterNet,
                     timm.models.HighPerfGpuNet, timm.models.GhostNet, timm.models.MetaNeXt, timm.models.MobileNetV3,
                     timm.models.RepGhostNet, timm.models.VGG)


def _filters(filters: list[str]) -> list[str]:
    return [PREFIX + f for f in filters]


def _select(filter: list[str] | None = None, exclude: list[str] = (), *, module: list[str] | None = None,
            **kwargs) -> list[str]:
    """timm's ``list_models(filter, exclude_filters=..., **kwargs)`` asked of the registry for the prefixed names,
    within the models this run covers. ``module=`` (timm's module names) keeps the names whose base is in them."""
    names = list_models(_filters(MODELS), exclude_filters=_filters(exclude) + ([] if PREFIX else ["popup_*"]),
                        **kwargs)
    if filter is not None:
        keep = set(list_models(_filters(filter), **kwargs))
        names = [n for n in names if n in keep]
    if module is not None:
        names = [n for n in names if timm.models.is_model_in_modules(n.removeprefix(PREFIX), module)]
    return names


def _get_input_size(model=None, model_name: str = "", target: int | None = None) -> tuple[int, ...]:
    if model is None:  # timm's route: the registry's cfg, before any model is built
        input_size = get_pretrained_cfg_value(model_name, "input_size")
        fixed = get_pretrained_cfg_value(model_name, "fixed_input_size")
        smallest = get_pretrained_cfg_value(model_name, "min_input_size")
    else:
        cfg = model.default_cfg
        input_size, fixed, smallest = cfg["input_size"], cfg.get("fixed_input_size"), cfg.get("min_input_size")
    assert input_size is not None
    if fixed:
        return input_size
    if target and max(input_size) > target:
        input_size = smallest if smallest else tuple(min(x, target) for x in input_size)
    return input_size


def _sized(*, limit: int, target: int | None = None, **model_or_name) -> tuple[int, ...]:
    """timm's input size for a test, or the test skipped as timm skips it (a fixed input size above ``limit``)."""
    input_size = _get_input_size(target=target, **model_or_name)
    if max(input_size) > limit:
        pytest.skip("Fixed input size model > limit.")
    return input_size


# ------------------------------------------------------------------------------------- the registry, before any build

_REGISTRY_CHECK = r"""
import sys, timm, timm_popup
from timm.models import _registry
plain = [n for n in timm.list_models() if not n.startswith("popup_")]
assert plain and all(timm.is_model("popup_" + n) for n in plain)
listed = set(timm.list_models("popup_*"))
assert {"popup_" + n for n in plain} <= listed, sorted({"popup_" + n for n in plain} - listed)[:5]
assert set(timm.list_models("popup_*", name_matches_cfg=True)) == listed  # every one has a cfg
assert timm.list_models("popup_efficientvit_b*") == ["popup_" + n for n in timm.list_models("efficientvit_b*")]
assert set(timm.list_models(module="popup_any")) <= listed
tagged = timm.list_models("popup_*", include_tags=True)
assert "popup_caformer_s18" in tagged and "popup_conv4.ep_k50_fmnist" in tagged
pretrained = timm.list_models("popup_*", pretrained=True)  # the masks the project publishes, never dense weights
assert "popup_resnet50.ep_k30_in1k" in pretrained and "popup_caformer_s18" not in pretrained
assert timm.list_pretrained("popup_*") == pretrained
for name in ("caformer_s18", "efficientvit_b0", "vit_base_patch16_224", "test_resnet"):
    popup = "popup_" + name
    entry = timm.models.model_entrypoint(popup)
    assert callable(entry) and entry.__name__ == popup
    for key in ("input_size", "fixed_input_size", "min_input_size", "first_conv", "classifier", "num_classes",
                "mean", "std", "crop_pct", "pool_size"):
        assert timm.get_pretrained_cfg_value(popup, key) == timm.get_pretrained_cfg_value(name, key), (popup, key)
    cfg = timm.get_pretrained_cfg(popup)
    assert cfg.architecture == popup and not cfg.has_weights and cfg.hf_hub_id is None
    assert list(timm.models.get_arch_pretrained_cfgs(popup)) == [popup]
    assert timm.models.model_entrypoint(popup) is entry  # the same function once its cfg is made
try:
    timm.get_pretrained_cfg("popup_caformer_s18.no_such_tag")
except RuntimeError as e:
    assert "Invalid pretrained tag" in str(e)
else:
    raise AssertionError("a wrong tag was accepted")
assert not timm.is_model("popup_not_a_model") and not timm.is_model("popup_popup_conv4")
assert timm.get_pretrained_cfg("popup_not_a_model") is None
assert not any(isinstance(o, __import__("torch").nn.Module) for o in __import__("gc").get_objects())  # none built
print("ok", len(listed))
"""


def test_registry_answers_every_popup_name_before_any_model_is_built() -> None:
    """A fresh interpreter (no model built, no name looked up before): is_model, list_models (filters, module,
    include_tags, pretrained, name_matches_cfg), get_pretrained_cfg(_value), model_entrypoint all see popup_<name>
    of every timm name, with <name>'s cfg values and none of its weight sources."""
    done = subprocess.run([sys.executable, "-c", _REGISTRY_CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok ")


# ------------------------------------------------------------------------------------- timm's model tests, its order

@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward(model_name: str, batch_size: int) -> None:
    model = create_model(model_name, pretrained=False).eval()
    input_size = _sized(target=TARGET_FWD_SIZE, limit=MAX_FWD_SIZE, model=model)
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    try:
        model.set_grad_checkpointing()
    except Exception:  # noqa: BLE001 - timm's test: a model without grad checkpointing raises
        return
    again = model(inputs)
    assert torch.allclose(outputs, again, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS, name_matches_cfg=True))
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward(model_name: str, batch_size: int) -> None:
    input_size = _sized(target=TARGET_BWD_SIZE, limit=MAX_BWD_SIZE, model_name=model_name)
    model = create_model(model_name, pretrained=False, num_classes=42)
    encoder_only = model.num_classes == 0
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    outputs = model(torch.randn((batch_size, *input_size)))
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    _check_gradients(model, outputs, num_params)
    if encoder_only:
        assert outputs.shape[get_channel_dim(getattr(model, "output_fmt", "NCHW"))] == model.num_features
    else:
        assert outputs.shape[-1] == 42
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors timm's loader sees: a popup model's folded network's (module docstring)."""
    return dense_state_dict(model) if hasattr(model, "popup_config") else model.state_dict()


def _check_gradients(model: torch.nn.Module, outputs: torch.Tensor, num_params: int) -> None:
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert num_params == num_grad, "Some parameters are missing gradients"


def _built_with_cfg(model_name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict]:
    model = create_model(model_name, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    return model, _state_dict(model), model.default_cfg


def _check_cfg_names(cfg: dict, state_dict: dict) -> None:
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in (classifier if isinstance(classifier, (tuple, list)) else (classifier,)):
            assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS + NON_STD_FILTERS, include_tags=True))
@pytest.mark.parametrize("batch_size", [1])
def test_model_default_cfgs(model_name: str, batch_size: int) -> None:
    model, state_dict, cfg = _built_with_cfg(model_name)
    pool_size, input_size = cfg["pool_size"], cfg["input_size"]
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2
    feat_axis = get_channel_dim(output_fmt)
    if all(x <= MAX_FWD_OUT_SIZE for x in input_size) and not any(fnmatch.fnmatch(model_name, x)
                                                                   for x in EXCLUDE_FILTERS):
        input_tensor = torch.randn((batch_size, *(min(x, MAX_FWD_OUT_SIZE) for x in input_size)))
        outputs = model.forward_features(input_tensor)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
        assert outputs.shape[feat_axis] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 2 and outputs.shape[1] == model.head_hidden_size
        assert outputs.shape == outputs_pre.shape
        if not isinstance(model, EARLY_POOL_MODELS):
            model.reset_classifier(0, "")
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
        if "pruned" not in model_name and not isinstance(model, EARLY_POOL_MODELS):
            model = create_model(model_name, pretrained=False, num_classes=0, global_pool="").eval()
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
    _check_cfg_names(cfg, state_dict)


@pytest.mark.parametrize("model_name", _select(NON_STD_FILTERS, NON_STD_EXCLUDE_FILTERS, include_tags=True))
@pytest.mark.parametrize("batch_size", [1])
def test_model_default_cfgs_non_std(model_name: str, batch_size: int) -> None:
    model, state_dict, cfg = _built_with_cfg(model_name)
    input_size = _sized(limit=320, model=model)
    input_tensor = torch.randn((batch_size, *input_size))
    feat_dim = getattr(model, "feature_dim", None)
    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    if not isinstance(outputs, (tuple, list)):
        feat_dim = feat_dim if feat_dim is not None else (-1 if outputs.ndim == 3 else 1)
        assert outputs.shape[feat_dim] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    outputs = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    feat_dim = feat_dim if feat_dim is not None else (-1 if outputs.ndim == 3 else 1)
    assert outputs.shape[feat_dim] == model.head_hidden_size and outputs.shape == outputs_pre.shape
    model = create_model(model_name, pretrained=False, num_classes=0).eval()
    outputs = model.forward(input_tensor)
    outputs = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    assert outputs.shape[feat_dim] == model.num_features
    _check_cfg_names(cfg, state_dict)


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS + EXCLUDE_JIT_FILTERS, name_matches_cfg=True))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_torchscript(model_name: str, batch_size: int) -> None:
    _run_scripted(model_name, batch_size)


def _run_scripted(model_name: str, batch_size: int, through_fx: bool = False) -> None:
    input_size = _sized(target=TARGET_JIT_SIZE, limit=MAX_JIT_SIZE, model_name=model_name)
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False).eval()
    scripted = torch.jit.script(_create_fx_model(model) if through_fx else model)
    with torch.inference_mode():
        outputs = scripted(torch.randn((batch_size, *input_size)))
    outputs = torch.cat(tuple(outputs.values())) if through_fx else outputs
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def _check_features(outputs, channels, reductions, input_size, output_fmt, batch_size) -> None:
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    assert len(channels) == len(outputs)
    for e, r, o in zip(channels, reductions, outputs, strict=True):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(input_size[-2] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(input_size[-1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


def _run_features(model: torch.nn.Module, batch_size: int, min_levels: int = 0) -> None:
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= min_levels
    input_size = _sized(target=TARGET_FFEAT_SIZE, limit=MAX_FFEAT_SIZE, model=model)
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_features(outputs, channels, reductions, input_size, getattr(model, "output_fmt", "NCHW"), batch_size)


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS + NON_STD_FILTERS))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_features(model_name: str, batch_size: int) -> None:
    _run_features(create_model(model_name, pretrained=False, features_only=True).eval(), batch_size, min_levels=3)


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS, module=FEAT_INTER_MODULES))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_intermediates_features(model_name: str, batch_size: int) -> None:
    _run_features(create_model(model_name, pretrained=False, features_only=True, feature_cls="getter").eval(),
                  batch_size)


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS, module=FEAT_INTER_MODULES))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_intermediates(model_name: str, batch_size: int) -> None:
    model = create_model(model_name, pretrained=False).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reductions = feature_info.channels(), feature_info.reduction()
    assert len(channels) >= 3
    input_size = _sized(target=TARGET_FFEAT_SIZE, limit=MAX_FFEAT_SIZE, model=model)
    inputs = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(inputs, output_fmt="NCHW")
    _check_features(intermediates, channels, reductions, input_size, "NCHW", batch_size)
    assert torch.allclose(output, model.forward_features(inputs))
    try:
        model.set_grad_checkpointing()
    except Exception:  # noqa: BLE001 - timm's test: a model without grad checkpointing raises
        return
    again, _ = model.forward_intermediates(inputs, output_fmt="NCHW")
    assert torch.allclose(output, again, rtol=1e-4, atol=1e-5), "Output does not match"


def _create_fx_model(model, train: bool = False):
    """timm's: trace, and return the node(s) feeding the output (several in train mode for some models)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_names = [n.name for n in graph_nodes[0]._input_nodes]
        names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-names.index(name)] for name in output_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes,
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS + EXCLUDE_FX_FILTERS))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_fx(model_name: str, batch_size: int) -> None:
    model = create_model(model_name, pretrained=False).eval()
    input_size = _sized(target=TARGET_FWD_FX_SIZE, limit=MAX_FWD_FX_SIZE, model=model)
    with torch.inference_mode():
        inputs = torch.randn((batch_size, *input_size))
        outputs = model(inputs)
        outputs = torch.cat(outputs) if isinstance(outputs, tuple) else outputs
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(inputs).values()))
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", _select(exclude=EXCLUDE_FILTERS + EXCLUDE_FX_FILTERS, name_matches_cfg=True))
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward_fx(model_name: str, batch_size: int) -> None:
    input_size = _sized(target=TARGET_BWD_FX_SIZE, limit=MAX_BWD_FX_SIZE, model_name=model_name)
    model = create_model(model_name, pretrained=False, num_classes=42).train()
    num_params = sum(x.numel() for x in model.parameters())
    model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(model(torch.randn((batch_size, *input_size))).values()))
    _check_gradients(model, outputs, num_params)
    assert outputs.shape[-1] == 42
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", _select(
    exclude=EXCLUDE_FILTERS + EXCLUDE_JIT_FILTERS + EXCLUDE_FX_JIT_FILTERS, name_matches_cfg=True))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_fx_torchscript(model_name: str, batch_size: int) -> None:
    _run_scripted(model_name, batch_size, through_fx=True)


@pytest.mark.parametrize("model_name", [PREFIX + "regnetx_002"])
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_torchscript_with_features_fx(model_name: str, batch_size: int) -> None:
    allowed = list_models(exclude_filters=_filters(EXCLUDE_FILTERS + EXCLUDE_JIT_FILTERS + EXCLUDE_FX_JIT_FILTERS),
                          name_matches_cfg=True)
    assert model_name in allowed, f"{model_name=} not supported for this test"
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    assert max(input_size) <= MAX_JIT_SIZE
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False, features_only=True, feature_cfg={"feature_cls": "fx"})
    model = torch.jit.script(model.eval())
    with torch.inference_mode():
        outputs = model(torch.randn((batch_size, *input_size)))
    assert isinstance(outputs, list)
    for tensor in outputs:
        assert tensor.shape[0] == batch_size
        assert not torch.isnan(tensor).any(), "Output included NaNs"
