"""The strong-lottery-ticket methods that followed edge-popup, as modes of the same popup layers.

Each method trains on generated data through ``train_accelerate.py`` (in process), writes a format-3 artifact
that a fresh process loads through timm's loader to the same logits bit for bit, reproduces the logged accuracy,
is refused when tampered with, states its bits per weight, and exports to a plain timm checkpoint.
"""

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
from test_methods import TINY, _evaluate, _rows, data, run  # noqa: F401  (module-scoped fixtures)

import timm_popup
from timm_popup.export import export_plain
from timm_popup.layers import MAX_SLOTS, MaskGroup, num_kept
from timm_popup.maskfile import checksum
from timm_popup.masks import MaskError, artifact_info, filter_state_dict
from timm_popup.methods import MethodOptions, get_method, make_mask_method

K = 0.3
# per method: extra flags, and the bits per masked weight its artifact must store (k of the 1+k*b kind given as
# a bound where the content decides: iterand's event width)
METHODS = {
    "global-topk": ([], (1.0, 1.01)),
    "biprop": ([], (1.0, 1.01)),
    "signed-supermask": ([], (1 + K - 0.01, 1 + K + 0.01)),
    "iterand": (["--redraw-every", "2", "--redraw-rate", "0.5"], (1 + K, 1 + 4 * K)),
    "slot-machine": (["--slots", "4"], (2.0, 2.01)),
}
FRESH = """
import sys, torch, timm, timm_popup, safetensors.torch
model = timm.create_model("popup_conv2", pretrained=True, width=0.125, num_classes=4,
                          pretrained_cfg_overlay=dict(file=sys.argv[1])).eval()
x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    safetensors.torch.save_file({"logits": model(x), "method": torch.tensor(list(model.popup_config.method.encode()))},
                                sys.argv[2])
"""


def _fresh_logits(artifact: Path, tmp_path: Path) -> tuple[torch.Tensor, str]:
    out = tmp_path / "fresh.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", FRESH, str(artifact), str(out)], check=True, env=env, timeout=300)
    sd = safetensors.torch.load_file(str(out))
    return sd["logits"], bytes(sd["method"].tolist()).decode()


def _load(artifact: Path) -> torch.nn.Module:
    return timm.create_model("popup_conv2", pretrained=True, width=0.125, num_classes=4,
                             pretrained_cfg_overlay=dict(file=str(artifact))).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_writes_an_artifact_that_reloads_bit_exactly(run, data, tmp_path, capsys, method):  # noqa: F811
    flags, (low, high) = METHODS[method]
    out = tmp_path / method
    k_flags = ["--k", str(K)] if get_method(method).uses_k else []
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "2", "--method", method,
                *k_flags, *flags]) == 0
    artifact = out / "model.safetensors"
    config = json.loads((out / "config.json").read_text())
    sd = safetensors.torch.load_file(str(artifact))
    info = artifact_info(sd)
    assert config["timm_popup"]["method"] == method and info["method"] == method and info["format_version"] == 3
    assert low <= info["bits_per_weight"] <= high, info
    assert "stored bits per masked weight" in (out / "README.md").read_text()
    from timm_popup.cli import main as cli

    assert cli(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"method        {method}" in shown and f"bits/weight   {info['bits_per_weight']} stored" in shown
    assert "verification  OK" in shown

    # timm's loader in this process reproduces the logged accuracy; a fresh process, the same logits bit for bit
    model = _load(artifact)
    assert model.popup_config.method == method
    mean_std = {key: tuple(config["pretrained_cfg"][key]) for key in ("mean", "std")}
    measured = _evaluate(timm.create_model(
        "popup_conv2", pretrained=True, width=0.125, num_classes=4,
        pretrained_cfg_overlay=dict(file=str(artifact), **mean_std)), data)
    logged = _rows(out)[-1]
    assert measured["top1"] == logged["val_top1"]
    assert measured["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        here = model(x)
    fresh, fresh_method = _fresh_logits(artifact, tmp_path)
    assert fresh_method == method and torch.equal(here, fresh)

    # what each method computes with
    masks = timm_popup.popup_masks(model)
    weights = {name: getattr(*_owner(model, name)) for name in masks}
    if method == "global-topk":
        kept = {name: int(mask.get_mask().sum()) for name, mask in masks.items()}
        total = sum(mask.weight.numel() for mask in masks.values())
        assert sum(kept.values()) == num_kept(total, K)
        assert len({round(kept[n] / masks[n].weight.numel(), 2) for n in masks}) > 1  # density free per tensor
    if method == "biprop":
        for name, w in weights.items():
            assert len(torch.unique(w[w != 0].abs())) == 1  # +-alpha
            assert w[w != 0].abs()[0].item() == pytest.approx(sd[f"{name}.alpha"].item())
    if method == "signed-supermask":
        flipped = sum(int(((w * masks[n].weight) < 0).sum()) for n, w in weights.items())
        assert flipped > 0
        for name, w in weights.items():
            assert torch.equal(w.abs(), masks[name].weight.abs() * masks[name].get_mask())
    if method == "iterand":
        redrawn = sum(int(mask.redraws.ne(0).sum()) for mask in masks.values())
        assert redrawn > 0  # kept weights that were re-drawn during the search
        for mask in masks.values():
            seeded = mask.weight_seeded()
            assert torch.equal(mask.weight[mask.redraws == 0], seeded[mask.redraws == 0])
    if method == "slot-machine":
        for name, mask in masks.items():
            assert mask.candidates.shape[0] == 4
            assert torch.equal(weights[name], mask.candidates.gather(0, mask.slot_choice().unsqueeze(0))[0])

    # tampered: any changed byte fails the checksum; a consistent forgery fails the method's own checks
    bad = dict(sd)
    payload = next(n for n in sd if n.endswith((".mask", ".slot")))
    bad[payload] = bad[payload].clone()
    bad[payload][0] ^= 1
    fresh_model = timm.create_model("popup_conv2", width=0.125, num_classes=4)
    with pytest.raises(MaskError, match="checksum"):
        filter_state_dict(bad, fresh_model)
    forged = {
        "global-topk": ("features.0.weight.kept", lambda t: t + 1, "count the file records"),
        "biprop": ("features.0.weight.alpha", lambda t: t * 1.01, "binary scale"),
        "slot-machine": ("__popup__.slots", lambda t: t - 2, "not the .* bytes"),
        "signed-supermask": ("features.0.weight.fingerprint", lambda t: t.flip(0), "fingerprint"),
        "iterand": ("__popup__.seed", lambda t: t + 1, "fingerprint"),
    }[method]
    bad = dict(sd)
    bad[forged[0]] = forged[1](bad[forged[0]])
    bad["__popup__.checksum"] = checksum(bad)
    with pytest.raises(MaskError, match=forged[2]):
        filter_state_dict(bad, fresh_model)
    assert {mask.mode for mask in timm_popup.popup_masks(fresh_model).values()} == {"topk"}  # left as it was


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module, _, attr = name.rpartition(".")
    return model.get_submodule(module), attr


@pytest.mark.parametrize("method", list(METHODS))
def test_method_exports_to_a_plain_timm_checkpoint(method, tmp_path):
    options = MethodOptions(slots=4, redraw_every=1, redraw_rate=0.5)
    init = get_method(method).weight_init
    model = timm.create_model("popup_test_resnet", k=K if get_method(method).uses_k else 1.0, num_classes=5,
                              **({"weight_init": init} if init else {}))
    model = make_mask_method(model, method, options)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    for step in range(1, 3):
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if get_method(method).after_update:
            get_method(method).after_update(model, step)
    plain, diff = export_plain(model, "test_resnet")
    assert type(plain).__name__ == "ResNet" and diff == 0.0
    with torch.no_grad():
        assert torch.equal(plain(x), model.eval()(x))


def test_global_topk_keeps_round_k_n_over_the_network_with_ties_in_order():
    model = timm.create_model("popup_conv2", width=0.125, num_classes=4, k=0.1)
    masks = list(timm_popup.popup_masks(model).values())
    with torch.no_grad():
        for mask in masks:
            mask.scores.fill_(1.0)  # all tied: the lowest indices in model order win
    group = MaskGroup(masks, 0.1)
    total = sum(m.weight.numel() for m in masks)
    keep = [group.mask_of(m) for m in masks]
    assert sum(int(k.sum()) for k in keep) == num_kept(total, 0.1)
    assert bool(keep[0].all())  # the first tensor (fewer weights than the budget) is kept whole
    flat = torch.cat([k.flatten() for k in keep])
    assert bool(flat[: num_kept(total, 0.1)].all()) and not bool(flat[num_kept(total, 0.1):].any())


def test_iterand_redraws_are_a_function_of_seed_and_events_and_survive_a_checkpoint():
    def build() -> torch.nn.Module:
        model = timm.create_model("popup_conv2", width=0.125, num_classes=4, k=K)
        return make_mask_method(model, "iterand", MethodOptions(redraw_every=1, redraw_rate=0.3))

    a, b = build(), build()
    for event in (1, 2):
        for model in (a, b):
            for mask in timm_popup.popup_masks(model).values():
                mask.redraw(event, 0.3)
    for (name, ma), mb in zip(timm_popup.popup_masks(a).items(), timm_popup.popup_masks(b).values(), strict=True):
        assert torch.equal(ma.weight, mb.weight) and torch.equal(ma.redraws, mb.redraws)
        pruned = ~ma.get_mask()
        share = float((ma.redraws[pruned] != 0).float().mean())
        assert 0.3 < share < 0.6, name  # two events at rate 0.3: 1 - 0.7**2 = 0.51 of the pruned weights
        assert not bool(ma.redraws[~pruned].any())  # kept weights are never re-drawn
    resumed = build()
    resumed.load_state_dict(a.state_dict())  # a checkpoint: the weights are rebuilt from the seed and the events
    for ma, mr in zip(timm_popup.popup_masks(a).values(), timm_popup.popup_masks(resumed).values(), strict=True):
        assert torch.equal(ma.weight, mr.weight)


def test_method_options_belong_to_their_method():
    from timm_popup.train import TrainError, check_method_options

    assert check_method_options(get_method("slot-machine"), slots=4).slots == 4
    with pytest.raises(TrainError, match="--slots is an option of --method slot-machine"):
        check_method_options(get_method("edge-popup"), slots=4)
    with pytest.raises(TrainError, match="outside"):
        check_method_options(get_method("iterand"), redraw_rate=1.5)
    assert math.isclose(MethodOptions().redraw_rate, 0.1)
    # a file holds at most MAX_SLOTS candidates: a larger run is refused before it trains, not after it saves
    assert check_method_options(get_method("slot-machine"), slots=MAX_SLOTS).slots == MAX_SLOTS
    with pytest.raises(TrainError, match=f"--slots {MAX_SLOTS + 1}: .* 2 to {MAX_SLOTS} values"):
        check_method_options(get_method("slot-machine"), slots=MAX_SLOTS + 1)
    mask = next(iter(timm_popup.popup_masks(timm.create_model("popup_test_resnet", num_classes=2)).values()))
    with pytest.raises(ValueError, match=f"2 to {MAX_SLOTS} candidate values"):
        mask.set_slots(MAX_SLOTS + 1)


def test_convert_takes_the_method_as_an_option():
    from timm_popup.convert import convert

    model = convert(timm.create_model("test_resnet", num_classes=3), k=0.2, method="global-topk")
    masks = timm_popup.popup_masks(model)
    assert model.popup_config.method == "global-topk" and {m.mode for m in masks.values()} == {"global"}
    model = convert(timm.create_model("test_resnet", num_classes=3), method="slot-machine",
                    options=MethodOptions(slots=3))
    assert {m.scores.shape[0] for m in timm_popup.popup_masks(model).values()} == {3}
    with pytest.raises(ValueError, match="unknown mask method 'dense'"):
        convert(timm.create_model("test_resnet", num_classes=3), method="dense")


def test_global_topk_starts_near_k_in_every_layer_and_rescales_scaled_weights():
    model = timm.create_model("popup_conv4", width=0.5, num_classes=10, k=0.05, weight_init="scaled_signed_constant")
    model = make_mask_method(model, "global-topk")
    masks = timm_popup.popup_masks(model)
    # scores start on one scale: Kaiming-scaled ones would keep none of fc1 (layer collapse, chance accuracy)
    for name, mask in masks.items():
        assert 0.03 < float(mask.get_mask().float().mean()) < 0.08, name
    model.eval()
    for name, mask in masks.items():
        density = float(mask.get_mask().float().mean())
        used = getattr(*_owner(model, name))
        kept = used[mask.get_mask()].abs()
        # U_k scaled by sqrt(1/k) at conversion, then to sqrt(1/density) of the tensor itself
        assert torch.allclose(kept, mask.weight.abs().max() * math.sqrt(0.05 / density)), name


@pytest.mark.parametrize("method", ["global-topk", "slot-machine", "iterand"])
def test_a_new_head_learns_the_models_method_and_saves(method, tmp_path):
    from timm_popup.convert import convert

    model = convert(timm.create_model("test_resnet", num_classes=3), k=0.3, method=method,
                    options=MethodOptions(slots=3))
    model.reset_classifier(7)
    masks = timm_popup.popup_masks(model)
    head = masks["fc.weight"]  # test_resnet's classifier
    assert tuple(head.weight.shape) == (7, model.num_features)
    assert {mask.mode for mask in masks.values()} == {{"global-topk": "global", "slot-machine": "slots",
                                                       "iterand": "topk"}[method]}
    if method == "global-topk":
        assert {id(mask.group) for mask in masks.values()} == {id(head.group)}
        assert len(head.group.members) == len(masks)
    if method == "slot-machine":
        assert head.scores.shape[0] == 3
    if method == "iterand":
        assert "redraws" in head._buffers
    timm_popup.save_pretrained(model.eval(), tmp_path / "a")
    again = timm.create_model("popup_test_resnet", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "a" / "model.safetensors"))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))

