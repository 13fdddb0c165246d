"""The paper's baselines as --method modes of the same popup layers: supermask, finetune, random-subnet.

Every run is in-process (``train_accelerate.main(argv)``) on a tiny generated dataset; finetune and random-subnet
start from a 1-epoch edge-popup artifact made here. Each run's artifact must reproduce its logged accuracy.
"""

from __future__ import annotations

import os

# Before datasets / huggingface_hub are imported: both read these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import timm  # noqa: E402
import timm.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import timm_popup  # noqa: E402
from timm_popup import train  # noqa: E402
from timm_popup.masks import unpack_mask  # noqa: E402
from timm_popup.methods import get_method, load_dense, make_supermask, random_subnet_mask  # noqa: E402

try:
    from in_process import train_main
except ImportError:  # tests/ turned into a package
    from tests.in_process import train_main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue", "square"]
TINY = ["--model", "popup_conv2", "--model-kwargs", "width=0.125", "--batch-size", "16", "--workers", "0",
        "--log-every", "1", "--log-with", "none"]
SEED = "3"


def _split(n: int, seed: int) -> datasets.Dataset:
    """Noisy images whose class shows as a tinted channel (or a bright square): learnable, not trivial."""
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    images = []
    for y in labels:
        a = rng.integers(0, 140, (32, 32, 3)).astype(np.uint8)
        if y < 3:
            a[:, :, y] += rng.integers(30, 100, dtype=np.uint8)
        else:
            a[8:24, 8:24] += 80
        images.append(Image.fromarray(a))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shapes"
    datasets.DatasetDict({"train": _split(96, 0), "test": _split(48, 1)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def run():
    """``main(argv)`` of train_accelerate.py in this process (tests/in_process.py)."""
    datasets.config.HF_HUB_OFFLINE = True
    return train_main()


@pytest.fixture(scope="module")
def found(run, data, tmp_path_factory) -> Path:
    """The subnetwork finetune / random-subnet start from: a 1-epoch edge-popup run."""
    out = tmp_path_factory.mktemp("found") / "edge-popup"
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "1", "--seed", SEED]) == 0
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / train.METRICS_JSONL).read_text().splitlines()]


def _evaluate(model: torch.nn.Module, data: Path) -> dict[str, float]:
    _, val_loader, _ = train.build_loaders(train.load_data(str(data)), timm.data.resolve_data_config({}, model=model),
                                        batch_size=16, workers=0, seed=0)
    return train.evaluate(model, val_loader)


def _found_masks(found: Path) -> dict[str, torch.Tensor]:
    sd = safetensors.torch.load_file(str(found / "model.safetensors"))
    return {n[: -len(".mask")]: unpack_mask(sd[n], tuple(sd[n + "_shape"].tolist())) for n in sd
            if n.endswith(".mask")}


def _seeded_weights(k: float) -> dict[str, torch.Tensor]:
    model = timm.create_model("popup_conv2", width=0.125, num_classes=4, seed=int(SEED), k=k)
    return {name: layer.weight for name, layer in timm_popup.popup_masks(model).items()}


# ------------------------------------------------------------------------------------------------- supermask


def test_supermask_samples_in_training_and_is_deterministic_in_eval():
    model = make_supermask(timm.create_model("popup_conv2", width=0.125, num_classes=4, seed=1))
    layers = timm_popup.popup_masks(model)
    assert {layer.mode for layer in layers.values()} == {"sample"}
    x = torch.randn(4, 3, 32, 32)
    model.train()
    first, second = model(x), model(x)
    assert not torch.equal(first, second)  # a fresh Bernoulli mask every training forward
    second.sum().backward()
    layer = layers["features.0.weight"]
    assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0
    assert not layer.weight.requires_grad  # weights stay at their seeded values
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    # the eval mask is sigmoid(score) > 0.5; at k=0.5 the scores start around logit(0.5) = 0: about half kept
    assert torch.equal(layer.get_mask(), layer.scores.detach() > 0)
    assert 0.4 < layer.get_mask().float().mean() < 0.6
    # --k sets the initial keep probability
    low = make_supermask(timm.create_model("popup_conv2", width=0.125, num_classes=4, seed=1, k=0.2))
    p = torch.sigmoid(timm_popup.popup_masks(low)["features.0.weight"].scores.detach())
    assert p.mean().item() == pytest.approx(0.2, abs=0.02)


def test_supermask_run_writes_a_compact_artifact_that_reproduces_its_accuracy(run, data, tmp_path):
    out = tmp_path / "supermask"
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "2", "--method",
                "supermask"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["timm_popup"]["recipe"]["lr"] == 200  # the paper's section 4.4
    sd = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert sd["__popup__.free_density"].item() == 1
    masks = _found_masks(out)
    for name, mask in masks.items():
        assert sd[f"{name}.kept"].item() == int(mask.sum())
    info = timm_popup.masks.artifact_info(sd)
    assert info["density"] == "free" and info["kept_weights"] == sum(int(m.sum()) for m in masks.values())
    mean_std = {key: tuple(config["pretrained_cfg"][key]) for key in ("mean", "std")}
    model = timm.create_model("popup_conv2", pretrained=True, width=0.125, num_classes=4,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), **mean_std))
    assert {layer.mode for layer in timm_popup.popup_masks(model).values()} == {"sample"}
    measured, logged = _evaluate(model, data), _rows(out)[-1]
    assert measured["top1"] == logged["val_top1"]
    assert measured["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    for name, layer in timm_popup.popup_masks(model).items():
        assert torch.equal(layer.get_mask(), masks[name])
    # a free-density file is verified: a changed kept count is caught (the checksum, recomputed, passes)
    from timm_popup.maskfile import checksum

    bad = dict(sd)
    bad["features.0.weight.kept"] = bad["features.0.weight.kept"] + 1
    bad["__popup__.checksum"] = checksum(bad)
    fresh = timm.create_model("popup_conv2", width=0.125, num_classes=4)
    with pytest.raises(timm_popup.MaskError, match="count the file records"):
        timm_popup.masks.filter_state_dict(bad, fresh)
    assert {layer.mode for layer in timm_popup.popup_masks(fresh).values()} == {"topk"}  # left as it was


# ------------------------------------------------------------------------------- finetune and random-subnet


@pytest.mark.parametrize("method", ["finetune", "random-subnet"])
def test_subnetwork_weights_train_masked_ones_stay_zero(run, data, found, tmp_path, method):
    outs = []
    for i in range(2):  # twice: a seed fixes the run
        out = tmp_path / f"{method}-{i}"
        assert run([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "1", "--seed", SEED,
                    "--method", method, "--init-artifact", str(found)]) == 0
        outs.append(out)
    out = outs[0]
    assert (out / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    umask = os.umask(0)  # written like every other file of the package: the mode a plain open() gives
    os.umask(umask)
    assert {(out / n).stat().st_mode & 0o777 for n in ("config.json", "model.safetensors", "README.md")} == {
        0o666 & ~umask}
    config = json.loads((out / "config.json").read_text())["timm_popup"]
    assert config["method"] == method and config["recipe"]["init_artifact"].endswith("model.safetensors")
    k = config["k"]
    # the trained (unfolded) weights of the last checkpoint: masked entries exactly zero, kept ones moved
    trained = safetensors.torch.load_file(str(train.list_checkpoints(out)[-1] / "model.safetensors"))
    found_masks, seeded = _found_masks(found), _seeded_weights(k)
    kept_total = 0
    for name, mask in found_masks.items():
        owner, _, tensor = name.rpartition(".")  # checkpoints keep the mask's trainable weight unfolded
        weight = trained[f"{owner}.parametrizations.{tensor}.0.weight"]
        nonzero = weight != 0
        if method == "finetune":
            assert torch.equal(nonzero, mask)
        else:
            assert int(nonzero.sum()) == round(k * mask.numel())  # round(k*n), up to exact zeros (none here)
            assert not torch.equal(nonzero, mask)
            assert torch.equal(nonzero, random_subnet_mask(mask.shape, seed=int(SEED), name=name, k=k))
        assert not torch.equal(weight[nonzero], seeded[name][nonzero])
        kept_total += int(nonzero.sum())
    assert config["kept_weights"] == kept_total
    # the dense checkpoint reproduces the logged accuracy
    model = load_dense(out)
    measured, logged = _evaluate(model, data), _rows(out)[-1]
    assert measured["top1"] == logged["val_top1"]
    assert measured["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_random_subnet_masks_have_the_found_sizes():
    shape = (16, 8, 3, 3)
    for k in (0.1, 0.3, 0.5, 0.77):
        mask = random_subnet_mask(shape, seed=5, name="features.3", k=k)
        assert int(mask.sum()) == round(k * math.prod(shape))
        assert torch.equal(mask, random_subnet_mask(shape, seed=5, name="features.3", k=k))
    assert not torch.equal(random_subnet_mask(shape, seed=5, name="a", k=0.5),
                           random_subnet_mask(shape, seed=6, name="a", k=0.5))


@pytest.mark.parametrize("extra, expected", [
    (["--method", "finetune"], "needs --init-artifact"),
    (["--method", "edge-popup", "--init-artifact", "{found}"], "no meaning for --method edge-popup"),
    (["--method", "finetune", "--init-artifact", "{found}/nope"], "no such file"),
    (["--method", "finetune", "--init-artifact", "{found}", "--seed", "4"], "found with seed=3"),
    (["--method", "finetune", "--init-artifact", "{found}", "--seed", SEED, "--k", "0.3"], "found with k=0.5"),
])
def test_bad_subnetwork_settings_fail_in_one_line(run, data, found, tmp_path, capsys, extra, expected):
    extra = [a.format(found=found) for a in extra]
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(tmp_path / "bad"), "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_method_recipes_and_k():
    recipe = train.resolve_recipe("cifar", model_name="popup_conv2", method=get_method("supermask"), overrides={})
    assert recipe.lr == 200 and recipe.momentum == 0.9 and recipe.weight_decay == 1e-4 and recipe.sched == "cosine"
    for name in ("supermask", "finetune", "random-subnet"):
        assert get_method(name).uses_k
    for name in ("finetune", "random-subnet"):
        assert get_method(name).learns_weights and get_method(name).save is get_method("dense").save


def test_norm_statistics_are_reestimated_under_the_eval_mask_of_a_sampled_supermask():
    """A supermask trains on sampled masks: BatchNorm statistics gathered there do not describe its eval network
    (on Fashion-MNIST a ResNet-18 supermask evaluated with them was at chance, 10%; re-estimated, 51%)."""
    model = make_supermask(timm.create_model("popup_test_resnet", num_classes=4, seed=1))
    assert train.needs_norm_calibration(model)
    assert not train.needs_norm_calibration(timm.create_model("popup_test_resnet", num_classes=4))  # edge-popup
    assert not train.needs_norm_calibration(make_supermask(timm.create_model("popup_conv2", width=0.125,
                                                                             num_classes=4)))  # no norms
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=gen) + i, torch.zeros(8, dtype=torch.long)) for i in range(3)]
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = first.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        for images, _ in batches:
            model(images)  # the eval (deterministic) masks feed the first norm its inputs
    hook.remove()
    momentum = first.momentum
    assert train.recalibrate_norms(model, batches) == 24
    assert torch.allclose(first.running_mean, torch.cat(seen).mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    assert torch.allclose(first.running_var, per_batch_var, rtol=1e-4)
    assert not model.training and first.momentum == momentum  # left as evaluate expects, its momentum restored


def test_a_supermask_run_writes_the_statistics_of_its_eval_mask(run, data, tmp_path):
    out = tmp_path / "supermask-bn"
    assert run(["--model", "popup_test_resnet", "--batch-size", "16", "--workers", "0", "--log-with", "none",
                "--dataset", str(data), "--output-dir", str(out), "--epochs", "1", "--method", "supermask"]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    written = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    ds = train.load_data(str(data))
    loader = train.build_calibration_loader(ds, timm.data.resolve_data_config({}, model=model), batch_size=16,
                                            workers=0, seed=0, decode="auto")  # the run's --decode
    assert train.recalibrate_norms(model, loader) == 96  # the whole (small) train split, in order
    for m, (mean, var) in zip(norms, written, strict=True):  # re-estimating changes nothing: it was done
        assert torch.allclose(m.running_mean, mean, atol=1e-5) and torch.allclose(m.running_var, var, rtol=1e-4)


def test_mask_drift_script_measures_how_far_training_moved_a_mask(found, tmp_path):
    spec = importlib.util.spec_from_file_location("mask_drift", ROOT / "scripts" / "mask_drift.py")
    drift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drift)
    moved = drift.kept_from_the_start(str(found))
    assert 50.0 < moved < 100.0  # one epoch reorders some scores, far from all
    untrained = tmp_path / "untrained"
    model = timm.create_model(f"local-dir:{found}", pretrained=False)  # the seeded initial scores
    get_method("edge-popup").save(model, untrained, metrics={"top1": 0.0, "top5": 0.0}, dataset="shapes",
                                  recipe={"lr": 0.1})
    assert drift.kept_from_the_start(str(untrained)) == 100.0
