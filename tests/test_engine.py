"""The mask engine a GPU runs (the keyed selection: ``timm_popup.native`` without the C kernels), on the CPU.

What each test catches: a keyed mask that differs from the C kernels' by one entry (ties, sizes, every method, every
tensor of real models), a training step that dispatches more device ops per masked tensor than the budget, a graph
break or a different mask under ``torch.compile``, and ``train_accelerate.py --compile`` not training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_popup
from timm_popup import layers, native
from timm_popup.methods import MethodOptions, get_method

try:
    from reference_topk import reference_topk_mask
except ImportError:  # tests/ turned into a package
    from tests.reference_topk import reference_topk_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from opcount import extra_ops_per_masked_tensor  # noqa: E402

KS = (0.1, 0.5, 0.9)


@pytest.fixture
def keyed(monkeypatch):
    """The path a GPU runs: no C kernels (as ``TIMM_POPUP_NATIVE=0``, a CUDA tensor, or no compiler)."""
    monkeypatch.setattr(native, "_library", lambda: None)


def _tied(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    random = torch.randn(n, generator=gen)
    half = random.clone()
    half[: n // 2] = half[n // 2: 2 * (n // 2)].neg()  # every value twice, +-: ties across the threshold
    return {"random": random, "halves": half, "all_tied": torch.full((n,), -0.5),
            "few_values": (torch.arange(n) % 5).float() - 2.0, "zeros": torch.zeros(n) * torch.sign(random)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # tells -0.0 from 0.0


@pytest.mark.parametrize("n", [1, 2, 33, 4097, 100_003])
def test_keyed_masks_and_masked_weights_are_the_c_kernels_bit_for_bit_on_ties(n, monkeypatch):
    for pattern, scores in _tied(n, n).items():
        weight = torch.randn(n, generator=torch.Generator().manual_seed(1))
        grad = torch.randn(n, generator=torch.Generator().manual_seed(2))
        for k in (*KS, 1 / n, 1.0):
            ref = reference_topk_mask(scores, k)
            s_c = scores.clone().requires_grad_()
            out_c = layers.fused_masked_weight(s_c, weight, k, native.Selection())
            out_c.backward(grad)
            with monkeypatch.context() as m:
                m.setattr(native, "_library", lambda: None)
                mask_k = native.topk_mask(scores, k)
                s_k = scores.clone().requires_grad_()
                selection = native.Selection()
                for _ in range(2):  # a second step with the same state
                    s_k.grad = None
                    out_k = layers.fused_masked_weight(s_k, weight, k, selection)
                    out_k.backward(grad)
            assert torch.equal(mask_k, ref), (pattern, k)
            assert torch.equal(_bits(out_k), _bits(out_c)), (pattern, k)
            assert torch.equal(_bits(s_k.grad), _bits(s_c.grad)), (pattern, k)


def test_channels_last_scores_select_by_their_logical_index_without_a_copy(keyed):
    # model.to(memory_format=torch.channels_last) converts 4-D scores and weights too (the GPU benchmark's setting)
    gen = torch.Generator().manual_seed(5)
    scores, weight, grad = (torch.randn(16, 8, 3, 3, generator=gen) for _ in range(3))
    scores.view(-1)[:500] = 0.25  # ties across the channels_last reordering
    ref = reference_topk_mask(scores, 0.3)
    s = scores.to(memory_format=torch.channels_last).requires_grad_()
    out = layers.fused_masked_weight(s, weight.to(memory_format=torch.channels_last), 0.3, native.Selection())
    out.backward(grad)
    assert torch.equal(out, weight * ref)
    assert torch.equal(s.grad, (grad * weight) * scores.sign())


@pytest.mark.parametrize("name,kwargs", [("popup_resnet18", {}), ("popup_vit_tiny_patch16_224", dict(img_size=32))])
@pytest.mark.parametrize("k", KS)
def test_keyed_training_weights_equal_the_c_kernels_on_every_tensor(name, kwargs, k, monkeypatch):
    model = timm.create_model(name, k=k, **kwargs)
    for tensor_name, mask in timm_popup.popup_masks(model).items():
        c_out = layers.fused_masked_weight(mask.scores, mask.weight, k, native.Selection())
        with monkeypatch.context() as m:
            m.setattr(native, "_library", lambda: None)
            keyed_out = layers.fused_masked_weight(mask.scores, mask.weight, k, native.Selection())
        assert torch.equal(_bits(keyed_out), _bits(c_out)), tensor_name


def _trained_weights(method: str, keyed_path: bool, monkeypatch) -> tuple[dict, dict]:
    """The masked weights of a training forward and the scores' gradients, for ``method`` on a small model."""
    with monkeypatch.context() as m:
        if keyed_path:
            m.setattr(native, "_library", lambda: None)
        torch.manual_seed(0)  # supermask samples its training masks from torch's RNG
        model = timm.create_model("popup_resnet18_cifar", num_classes=4, width=0.125, k=0.3)
        get_method(method).prepare(model, options=MethodOptions(slots=3))
        model.train()
        masks = timm_popup.popup_masks(model)
        if method == "iterand":  # its re-draw picks the pruned weights with the same selection
            for mk in masks.values():
                mk.redraw(1, 0.5)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        weights = {n: mk(torch.empty(0)).detach() for n, mk in masks.items()}
        grads = {n: mk.scores.grad for n, mk in masks.items()}
    return weights, grads


@pytest.mark.parametrize("method", ["edge-popup", "global-topk", "biprop", "signed-supermask", "slot-machine",
                                    "iterand", "supermask"])
def test_every_method_trains_with_the_same_weights_and_gradients_on_the_keyed_path(method, monkeypatch):
    c_weights, c_grads = _trained_weights(method, False, monkeypatch)
    k_weights, k_grads = _trained_weights(method, True, monkeypatch)
    for name in c_weights:
        assert torch.equal(_bits(k_weights[name]), _bits(c_weights[name])), (method, name)
        assert torch.equal(k_grads[name], c_grads[name]), (method, name)


def test_keyed_path_is_few_device_ops_per_masked_tensor():
    # The step of popup_resnet50 against resnet50's (optimizer included: the frozen norms and biases are updates
    # the popup step does not make), and the forward + backward alone (the mask work itself); bench/gpu.py
    # prints both.
    step, fwd_bwd = extra_ops_per_masked_tensor("resnet50", image_size=32, keyed=True)
    assert step <= 4, step
    # 21 and 31 before the keyed selection; now index words, abs, topk, min (and its fill), compare, multiply
    # forward, multiply, sign, multiply backward
    assert fwd_bwd <= 10.5, fwd_bwd


@pytest.mark.parametrize("use_keyed", [True, False])
def test_compiled_training_step_has_no_graph_break_and_gives_the_eager_masks(use_keyed, monkeypatch):
    if use_keyed:
        monkeypatch.setattr(native, "_library", lambda: None)
    torch._dynamo.reset()
    model = timm.create_model("popup_test_resnet", num_classes=4, k=0.5).train()
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    masks = timm_popup.popup_masks(model)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    explained = torch._dynamo.explain(loss_fn)(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    # aot_eager: dynamo and AOTAutograd capture the mask path as inductor would (without its minute of codegen)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    compiled(x, y).backward()
    compiled_grads = {n: mk.scores.grad.clone() for n, mk in masks.items()}
    compiled_weights = torch.compile(lambda: {n: mk(torch.empty(0)) for n, mk in masks.items()},
                                     backend="aot_eager", fullgraph=True)()
    for mk in masks.values():
        mk.scores.grad = None
    loss_fn(x, y).backward()
    for name, mk in masks.items():
        assert torch.equal(compiled_weights[name].detach(), mk.weight * reference_topk_mask(mk.scores, 0.5)), name
        torch.testing.assert_close(compiled_grads[name], mk.scores.grad)
    torch._dynamo.reset()


def test_train_accelerate_compile_trains_and_writes_the_mask_eager_evaluation_reproduces(tmp_path, monkeypatch):
    import importlib.util

    import datasets
    from accelerate.state import AcceleratorState
    from PIL import Image

    from timm_popup import train

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()) for _ in range(48)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(48)]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "data"))
    spec = importlib.util.spec_from_file_location("train_accelerate", Path(__file__).parents[1] / "train_accelerate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch._dynamo.reset()
    base = ["--model", "popup_conv2", "--model-kwargs", "width=0.125", "--batch-size", "16", "--workers", "0",
            "--epochs", "1", "--dataset", str(tmp_path / "data"), "--log-with", "none"]
    rng = torch.get_rng_state()
    try:
        AcceleratorState._reset_state(True)
        assert script.main([*base, "--compile", "no-such-backend", "--output-dir", str(tmp_path / "bad")]) == 2
        AcceleratorState._reset_state(True)
        assert script.main([*base, "--compile", "aot_eager", "--output-dir", str(tmp_path / "run")]) == 0
    finally:
        AcceleratorState._reset_state(True)
        torch.set_rng_state(rng)
        torch._dynamo.reset()
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    logged = [line for line in (tmp_path / "run" / train.METRICS_JSONL).read_text().splitlines()]
    model = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)  # eager, from the artifact
    ds = train.load_data(str(tmp_path / "data"))
    _, val_loader, _ = train.build_loaders(ds, timm.data.resolve_data_config({}, model=model), batch_size=16, workers=0,
                                        seed=0)
    import json
    assert train.evaluate(model, val_loader)["top1"] == pytest.approx(json.loads(logged[-1])["val_top1"], abs=1e-6)


def test_gpu_benchmark_without_a_gpu_prints_the_proxy_and_its_smoke_run_covers_every_part():
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    if not torch.cuda.is_available():
        proxy = subprocess.run([sys.executable, str(bench), "--proxy-model", "resnet18"], capture_output=True,
                               text=True, timeout=300)
        assert proxy.returncode == 0, proxy.stderr[-3000:]
        assert "needs one" in proxy.stdout and "leaf device ops per masked tensor" in proxy.stdout
    smoke = subprocess.run([sys.executable, str(bench), "--smoke", "--reps", "1", "--warm", "0", "--models",
                            "resnet50", "--methods", "biprop"], capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    lines = smoke.stdout.splitlines()
    assert any(line.startswith("resnet50,") for line in lines) and any("biprop" in line for line in lines)
    assert any(line.startswith("CPU (C kernels) vs GPU (keyed) masks: ") and "DIFFERENT" not in line
               for line in lines), smoke.stdout
