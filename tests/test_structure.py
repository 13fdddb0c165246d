"""N:M structured masks (issue 28): every group of M consecutive weights along dim 1 keeps exactly its N largest
|scores| (ties to the lower index), the same as a per-group reference, eager and compiled (the keyed path a GPU
runs); the straight-through gradient; every top-k method takes it and the others refuse it in one line; artifacts
record it, store it in fewer bits, round-trip (local-dir and the loopback Hub) and are checked on load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_popup
from timm_popup import maskfile, native
from timm_popup.export import ExportError, export_semi_structured, semi_structured_unsupported
from timm_popup.layers import PopupMask, use_structure
from timm_popup.masks import MaskError
from timm_popup.methods import make_supermask
from timm_popup.modes import make_mask_method

try:
    from hub_server import HubServer, client_env
except ImportError:  # tests/ turned into a package
    from tests.hub_server import HubServer, client_env


def python_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group, in plain Python: the n entries of largest |score|, ties to the lower index within the group;
    groups are m consecutive entries along dim 1 at every other index (the input channels of one kernel tap)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    a = scores.detach().abs()
    for index in torch.cartesian_prod(*[torch.arange(s) for s in (scores.shape[0], *scores.shape[2:])]).tolist():
        index = index if isinstance(index, list) else [index]
        for start in range(0, scores.shape[1], m):
            members = [(index[0], c, *index[1:]) for c in range(start, start + m)]
            ranked = sorted(members, key=lambda at: (-float(a[at]), at[1]))
            for at in ranked[:n]:
                mask[at] = True
    return mask


def reference_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The same rule vectorised another way (for large tensors): a stable descending sort of each group's |scores|
    keeps tied entries in index order; its first n positions are kept."""
    a = scores.detach().abs().movedim(1, -1)
    groups = a.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return kept.reshape(a.shape).movedim(-1, 1)


def _tied_scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Scores of few distinct |values| and both signs (-0.0 included): most groups hold ties."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-2, 3, shape, generator=g).float() * 0.5
    s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    return s


@pytest.mark.parametrize("shape,n,m", [((6, 8), 2, 4), ((5, 12, 3, 3), 2, 4), ((4, 9, 2), 1, 3),
                                       ((3, 16, 1, 2), 3, 8), ((2, 8), 7, 8)])
def test_nm_mask_keeps_n_of_every_group_as_the_per_group_reference_with_ties(shape, n, m):
    for seed in range(3):
        scores = _tied_scores(shape, seed)
        mask = native.nm_mask(scores, n, m)
        assert torch.equal(mask, python_nm_mask(scores, n, m)), (shape, seed)
        assert torch.equal(mask, reference_nm_mask(scores, n, m)), (shape, seed)
        assert (native.nm_groups(mask, m).sum(dim=1) == n).all()


@pytest.mark.parametrize("shape,n,m", [((6, 8), 2, 4), ((5, 12, 3, 3), 2, 4), ((4, 9, 2), 1, 3), ((2, 64), 5, 32),
                                       ((64, 64, 3, 3), 2, 4)])  # the last: above the kernels' parallel threshold
def test_nm_c_kernel_is_bit_identical_to_the_keyed_path(shape, n, m):
    """The eager CPU path (one C pass) against weight * the keyed mask, bit for bit: ties, -0.0 and a NaN score (ranked
    above every number, as its key is), and a dropped negative weight is -0.0 as weight * 0 is."""
    if not native.available():
        pytest.skip("no C compiler: the keyed path is the only one")
    for seed in range(3):
        for scores in (_tied_scores(shape, seed), torch.randn(shape, generator=torch.Generator().manual_seed(seed))):
            scores.view(-1)[seed] = float("nan") if seed == 2 else scores.view(-1)[seed]
            weight = torch.randn(shape, generator=torch.Generator().manual_seed(10 + seed))
            assert native.nm_fusable(scores, weight)
            got = native.nm_masked_weight(scores, weight, n, m)
            assert torch.equal(got.view(torch.int32), (weight * reference_nm_mask(scores, n, m)).view(torch.int32))


def test_nm_mask_compiled_without_graph_break_is_the_eager_one():
    """torch.compile traces the keyed selection as plain device ops (what a CUDA run executes): same mask."""
    scores = _tied_scores((8, 16, 3, 3), 5)
    explained = torch._dynamo.explain(lambda s: native.nm_mask(s, 2, 4))(scores)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(lambda s: native.nm_mask(s, 2, 4), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(scores), reference_nm_mask(scores, 2, 4))


@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_structured_layer_forward_mask_and_straight_through_gradient(native_kernels, monkeypatch):
    monkeypatch.setenv("TIMM_POPUP_NATIVE", native_kernels)
    native._reset()
    try:
        layer = PopupMask((8, 12, 3, 3), name="conv.weight", k=0.5, weight_init="signed_constant", seed=1)
        with torch.no_grad():
            layer.scores.copy_(_tied_scores(layer.scores.shape, 2))
        use_structure([layer], "2:4")
        out = layer(torch.empty(0))
        expected = reference_nm_mask(layer.scores, 2, 4)
        assert torch.equal(out, layer.weight * expected)
        grad = torch.randn_like(out)
        out.backward(grad)
        assert torch.equal(layer.scores.grad, grad * layer.weight * layer.scores.detach().sign())
        layer.eval()
        assert torch.equal(layer.get_mask(), expected) and torch.equal(layer(torch.empty(0)), layer.weight * expected)
    finally:
        native._reset()


def test_tensors_whose_dim_1_does_not_divide_keep_one_top_k_at_n_over_m():
    model = timm.create_model("popup_conv4", structure="1:4", num_classes=10)
    assert model.popup_config.k == 0.25 and model.popup_config.structure == "1:4"
    masks = timm_popup.popup_masks(model)
    assert masks["features.0.weight"].structure is None  # 3 input channels
    assert all(masks[n].structure.name == "1:4" for n in masks if n != "features.0.weight")
    first = masks["features.0.weight"].get_mask()
    assert int(first.sum()) == round(0.25 * first.numel())


def test_structure_refuses_a_wrong_k_and_the_methods_that_keep_no_per_tensor_top_k():
    with pytest.raises(ValueError, match=r"structure 2:4 keeps k = 0.5 of the weights, not k=0.3: pass k=0.5"):
        timm.create_model("popup_conv2", structure="2:4", k=0.3, num_classes=10)
    for bad in ("4:4", "2-4", "0:4"):
        with pytest.raises(ValueError, match="N:M"):
            timm.create_model("popup_conv2", structure=bad, num_classes=10)
    for method, why in (("global-topk", "density per tensor is free"), ("slot-machine", "prunes nothing")):
        model = timm.create_model("popup_conv2", structure="2:4", num_classes=10)
        with pytest.raises(ValueError, match=why) as err:
            make_mask_method(model, method)
        assert "\n" not in str(err.value)
    model = timm.create_model("popup_conv2", structure="2:4", num_classes=10)
    with pytest.raises(ValueError, match="samples each weight"):
        make_supermask(model)


def _train_steps(model: torch.nn.Module, steps: int = 3) -> torch.nn.Module:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method", ["edge-popup", "biprop", "signed-supermask", "iterand"])
def test_every_top_k_method_keeps_the_structure_and_its_artifact_round_trips_smaller(method, tmp_path):
    kwargs = dict(num_classes=10, seed=3)
    model = timm.create_model("popup_conv4", structure="2:4", **kwargs)
    if method != "edge-popup":
        make_mask_method(model, method)
    _train_steps(model)
    if method == "iterand":
        for mask in timm_popup.popup_masks(model).values():
            mask.redraw(1, 0.5)
    for name, mask in timm_popup.popup_masks(model).items():
        if mask.structure is not None:
            kept = mask.get_mask()
            assert torch.equal(kept, reference_nm_mask(mask.scores, 2, 4)), name
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    directory = timm_popup.save_pretrained(model, tmp_path / "structured")
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    assert loaded.popup_config.structure == "2:4" and loaded.popup_config.method == method
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    sd = maskfile.read_mask_file(directory / "model.safetensors")
    assert int(sd["__popup__.format_version"]) == 4
    assert "fc1.weight.nm" in sd and "fc1.weight.mask" not in sd and "features.0.weight.mask" in sd
    assert "| N:M structure | 2:4: N of every M" in (directory / "README.md").read_text()  # the card says it
    plain = timm.create_model("popup_conv4", **kwargs)
    if method != "edge-popup":
        make_mask_method(plain, method)
    unstructured = timm_popup.save_pretrained(plain.eval(), tmp_path / "plain") / "model.safetensors"
    assert (directory / "model.safetensors").stat().st_size < unstructured.stat().st_size


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 3), (3, 8), (5, 16), (1, 2)])
def test_nm_code_round_trips_and_takes_about_log2_binomial_bits_per_group(n, m):
    shape = (7, 2 * m, 3)
    mask = native.nm_mask(torch.randn(shape), n, m)
    code = maskfile.pack_nm(mask, n, m)
    sd = {"t.nm": code}
    bits = maskfile.unpack_nm(sd, "t", shape, n, m)
    assert torch.equal(torch.from_numpy(bits).view(shape).bool(), mask)
    groups = math.prod(shape) // m
    patterns, per, width = maskfile.nm_layout(n, m, groups)
    assert code.numel() == math.ceil(math.ceil(groups / per) * width / 8)
    assert width == math.ceil(per * math.log2(patterns))  # a whole chunk costs its exact information, rounded up


def test_a_2_4_code_is_0_656_bit_per_weight():
    patterns, per, width = maskfile.nm_layout(2, 4, 10**6)
    assert (patterns, per, width) == (6, 24, 63) and round(width / (per * 4), 3) == 0.656


def _rewrite(path: Path, change) -> None:
    sd = maskfile.read_mask_file(path)
    change(sd)
    sd["__popup__.checksum"] = maskfile.checksum(sd)
    maskfile.write_mask_file(sd, path)


def test_loading_checks_every_group_and_the_code(tmp_path):
    model = _train_steps(timm.create_model("popup_conv2", structure="2:4", num_classes=10, seed=1))
    directory = timm_popup.save_pretrained(model, tmp_path / "good")
    path = directory / "model.safetensors"

    def three_of_a_group(sd):  # stored as a plain mask: one group keeps 3, another 1 (the count stays round(k*n))
        bits = native.nm_groups(torch.from_numpy(
            maskfile.unpack_nm(sd, "fc.weight", (10, 256), 2, 4)).view(10, 256), 4).clone()
        bits[0] = torch.tensor([1, 1, 1, 0])
        bits[1] = torch.tensor([1, 0, 0, 0])
        del sd["fc.weight.nm"]
        sd["fc.weight.mask"] = maskfile.pack_mask(native.nm_ungroup(bits, (10, 256)).bool())

    _rewrite(path, three_of_a_group)
    with pytest.raises(MaskError, match=r"does not keep exactly 2 of every group of 4 weights"):
        timm.create_model(f"local-dir:{directory}", pretrained=True)

    directory = timm_popup.save_pretrained(model, tmp_path / "range")
    # every chunk's bits set but the padding's (which the field check refuses first): codes past C(M, N)**g
    _rewrite(directory / "model.safetensors", lambda sd: sd["fc.weight.nm"][:-1].fill_(255))
    with pytest.raises(MaskError, match="out of range"):
        timm.create_model(f"local-dir:{directory}", pretrained=True)

    directory = timm_popup.save_pretrained(model, tmp_path / "explicit")
    with pytest.raises(MaskError, match="found with structure='2:4' but the model was built with structure='1:4'"):
        timm.create_model("popup_conv2", structure="1:4", num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors")))


_HUB_CLIENT = r"""
import json, sys
import safetensors.torch, timm, torch
import timm_popup

spec = json.loads(sys.argv[1])
timm_popup.push_artifact(spec["dir"], spec["repo"])
model = timm.create_model("hf-hub:" + spec["repo"], pretrained=True).eval()
io = safetensors.torch.load_file(spec["io"])
with torch.no_grad():
    equal = torch.equal(model(io["x"]), io["y"])
print(json.dumps(dict(equal=bool(equal), structure=model.popup_config.structure)))
"""


def test_structured_artifact_round_trips_through_the_loopback_hub(tmp_path):
    model = _train_steps(timm.create_model("popup_conv2", structure="2:4", num_classes=10, seed=4))
    directory = timm_popup.save_pretrained(model, tmp_path / "art")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        safetensors.torch.save_file({"x": x, "y": model(x)}, str(tmp_path / "io.safetensors"))
    spec = dict(dir=str(directory), repo="popup-tests/structured-2-4", io=str(tmp_path / "io.safetensors"))
    with HubServer() as endpoint:
        env = client_env(endpoint, tmp_path / "hf_home", PYTHONPATH=os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", _HUB_CLIENT, json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == dict(equal=True, structure="2:4")


_NO_SPARSE_KERNELS = semi_structured_unsupported()


@pytest.mark.skipif(_NO_SPARSE_KERNELS is not None, reason=_NO_SPARSE_KERNELS or "")
def test_semi_structured_export_computes_the_masked_models_outputs():
    torch.manual_seed(0)
    model = timm.create_model("popup_vit_tiny_patch16_224", structure="2:4", img_size=32, patch_size=4,
                              num_classes=10)
    with torch.no_grad():
        for mask in timm_popup.popup_masks(model).values():
            mask.scores.normal_()
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    sparse, dense = export_semi_structured(model, dtype=torch.float16)
    linears = [m for m in sparse.modules() if isinstance(m, torch.nn.Linear)]
    converted = [m for m in linears if isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor)]
    assert len(converted) == len(linears) - 1 and set(dense) >= {"head.weight"}  # 10 rows: below the kernels' 32
    with torch.inference_mode():
        got = sparse(x.to("cuda", torch.float16)).float().cpu()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_semi_structured_export_refuses_what_it_cannot_run_in_one_line():
    plain = timm.create_model("popup_conv2", num_classes=10)
    with pytest.raises(ExportError, match="needs a 2:4 model"):
        export_semi_structured(plain)
    model = timm.create_model("popup_conv2", structure="2:4", num_classes=10)
    with pytest.raises(ExportError, match="float16 or bfloat16"):
        export_semi_structured(model, dtype=torch.float32)
    if _NO_SPARSE_KERNELS is not None:  # this machine: the reason, not a CUDA traceback
        with pytest.raises(ExportError, match="compute capability 8.0") as err:
            export_semi_structured(model)
        assert "\n" not in str(err.value)


def _image_folder(root: Path) -> Path:
    """A tiny ImageFolder of random 32x32 RGB images, 2 classes, train and test."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("test", 8)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count // 2):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_train_accelerate_structure_flag_trains_and_writes_a_2_4_artifact(tmp_path):
    data = _image_folder(tmp_path / "images")
    base = [sys.executable, str(Path(__file__).resolve().parents[1] / "train_accelerate.py"), "--model", "popup_conv2",
            "--model-kwargs", "width=0.125", "--dataset", str(data), "--batch-size", "8", "--workers", "0",
            "--epochs", "1", "--cpu", "--structure", "2:4"]
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    refused = subprocess.run([*base, "--method", "global-topk", "--output-dir", str(tmp_path / "bad")], env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "density per tensor is free" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    run = subprocess.run([*base, "--output-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    model = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    assert model.popup_config.structure == "2:4" and model.popup_config.k == 0.5
    fc = timm_popup.popup_masks(model)["fc.weight"]
    assert (native.nm_groups(fc.get_mask(), 4).sum(dim=1) == 2).all()
