"""ONNX export of popup models the way timm exports its own (timm.utils.onnx.onnx_export on the folded network),
checked here independently of the exporter's own check: ONNX Runtime on a batch of another size than the traced
one (the dynamic batch axis) gives the popup model's logits and top-1; the file holds no scores."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import timm_popup
from timm_popup.cli import main
from timm_popup.onnx_export import INSTALL_HINT, OnnxError, export_onnx

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

# one tiny member of each family: model -> (kwargs, input size)
FAMILIES: dict[str, tuple[dict[str, Any], tuple[int, int, int]]] = {
    "popup_conv2": ({}, (3, 32, 32)),  # the paper's VGG-like net
    "popup_fc": ({}, (1, 28, 28)),  # the paper's LeNet-300-100
    "popup_test_resnet": ({}, (3, 64, 64)),
    "popup_test_efficientnet": ({}, (3, 64, 64)),  # depthwise / SE, SAME padding made exportable
    "popup_test_convnext": ({}, (3, 64, 64)),
    "popup_test_byobnet": ({}, (3, 64, 64)),
    "popup_test_mambaout": ({}, (3, 64, 64)),
    "popup_test_vit": (dict(img_size=32), (3, 32, 32)),  # ViT: frozen class token and position embedding
    "popup_beit_base_patch16_224": (dict(img_size=32, embed_dim=32, depth=2, num_heads=2), (3, 32, 32)),  # F.linear
    "popup_test_coatnet": (dict(img_size=64), (3, 64, 64)),  # hybrid: conv stages, then attention
    "popup_swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=2, embed_dim=16, depths=(1, 1, 1, 1),
                                                num_heads=(1, 1, 1, 1)), (3, 64, 64)),
    "popup_densenet121": (dict(growth_rate=8, block_config=(1, 1, 1, 1)), (3, 64, 64)),
    "popup_sequencer2d_s": (dict(img_size=56, layers=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32),
                                 hidden_sizes=(8, 8, 8, 8)), (3, 56, 56)),  # LSTM weights
}


def _runtime_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _check_file(path: Path, model: torch.nn.Module, size: tuple[int, int, int]) -> None:
    graph = onnx.load(str(path)).graph
    assert not [t.name for t in graph.initializer if "scores" in t.name]  # the folded network, no scores
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))  # another batch size than traced (2)
    with torch.no_grad():
        expected = model(x)
    got = _runtime_logits(path, x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_popup_model_exports_as_timm_does_and_onnx_runtime_agrees(name: str, tmp_path: Path) -> None:
    kwargs, size = FAMILIES[name]
    model = timm.create_model(name, exportable=True, **kwargs).eval()
    with torch.no_grad():  # a mask that is not the initial one
        for mask in timm_popup.popup_masks(model).values():
            mask.scores.normal_(generator=torch.Generator().manual_seed(0))
    done = export_onnx(model, tmp_path / "model.onnx", input_size=size, images=4)
    assert done.path == tmp_path / "model.onnx" and done.images == 4 and done.max_abs_diff < 1e-3
    assert done.input_size == size and done.opset >= 17  # the exporter's default opset
    _check_file(done.path, model, size)
    assert timm_popup.popup_masks(model)  # the popup model itself is untouched (folded copy exported)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left


def test_cli_exports_a_local_dir_artifact_to_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = timm.create_model("popup_test_resnet", num_classes=7).eval()
    with torch.no_grad():
        for mask in timm_popup.popup_masks(model).values():
            mask.scores.normal_(generator=torch.Generator().manual_seed(2))
    timm_popup.save_pretrained(model, tmp_path / "artifact")
    out = tmp_path / "resnet.onnx"
    code = main(["export", str(tmp_path / "artifact"), "--onnx", str(out), "--img-size", "64"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "the same top-1 on every one" in printed and "max |logit diff|" in printed and "dynamic batch" in printed
    loaded = timm.create_model(f"local-dir:{tmp_path / 'artifact'}", pretrained=True).eval()
    _check_file(out, loaded, (3, 64, 64))
    _check_file(out, model, (3, 64, 64))  # the mask that was saved, found in the artifact


def test_cli_exports_a_popup_model_name_with_dynamic_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "conv2.onnx"
    assert main(["export", "popup_conv2", "--onnx", str(out), "--dynamic-size", "--images", "3"]) == 0
    assert "dynamic batch, height and width" in capsys.readouterr().out
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3]))


def test_a_model_timm_cannot_export_either_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A ViT built with dynamic_img_size, traced at another size, resamples its position embedding with antialiased
    bicubic interpolation, which ONNX has no operator for: timm's export of the plain model fails the same way."""
    model = timm.create_model("popup_test_vit", img_size=32, dynamic_img_size=True, exportable=True).eval()
    with pytest.raises(OnnxError) as caught:
        export_onnx(model, tmp_path / "vit.onnx", input_size=(3, 48, 48), images=2)
    message = str(caught.value)
    assert "\n" not in message and "timm cannot export the plain test_vit either" in message
    assert "_upsample_bicubic2d_aa" in message
    assert list(tmp_path.iterdir()) == []
    # the CLI: the same line on stderr, exit status 1, no file
    artifact = tmp_path / "artifact"
    timm_popup.save_pretrained(timm.create_model("popup_test_vit", img_size=32, dynamic_img_size=True), artifact)
    assert main(["export", str(artifact), "--onnx", str(tmp_path / "vit.onnx"), "--img-size", "48"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("timm-popup: error: ") and len(err.splitlines()) == 1 and "either" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_missing_onnx_packages_say_how_to_install(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main(["export", "popup_conv2", "--onnx", str(tmp_path / "c.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime" in err and INSTALL_HINT in err
    with pytest.raises(OnnxError, match="pip install"):
        export_onnx(timm.create_model("popup_fc"), tmp_path / "fc.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_something_to_write(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "popup_conv2"]) == 2
    assert "nothing to write" in capsys.readouterr().err
