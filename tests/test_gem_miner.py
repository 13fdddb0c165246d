"""Gem-Miner (Sreenivasan et al., NeurIPS 2022) as a mask mode, and global top-k's density schedule (biprop's).

Gem-Miner trains through ``train_accelerate.py`` (in process) to a format-4 artifact a fresh process loads to the
same logits; its pieces (rounding among the alive weights, the regulariser's gradient, clipping, iterative freezing)
are checked on their own.
"""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from test_methods import TINY, data, run  # noqa: F401  (module-scoped fixtures)
from test_slt_methods import _fresh_logits, _load

import timm_popup
from timm_popup.layers import num_kept
from timm_popup.maskfile import META, checksum
from timm_popup.masks import MaskError, artifact_info, filter_state_dict
from timm_popup.methods import MethodOptions, Schedule, gem_miner_update, global_density_update, make_mask_method
from timm_popup.modes import freeze_lowest, global_density

K = 0.3


def _conv2(**kwargs) -> torch.nn.Module:
    return timm_popup.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                                  torch.nn.Linear(8 * 6 * 6, 4)), k=K, seed=2, **kwargs)


def test_gem_miner_trains_to_an_artifact_that_reloads_bit_exactly(run, data, tmp_path):  # noqa: F811
    out = tmp_path / "gem"
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "3", "--method", "gem-miner",
                "--k", str(K), "--freeze-every", "1", "--score-l2", "1e-3"]) == 0
    artifact = out / "model.safetensors"
    info = artifact_info(safetensors.torch.load_file(str(artifact)))
    assert info["method"] == "gem-miner" and info["format_version"] == 4 and info["density"] == "learned (at most k)"
    # two freezing events (ends of epochs 1 and 2) leave round-ups of k of the weights; rounding keeps at most those
    assert 0 < info["kept_weights"] <= math.ceil(K * info["total_weights"]) + 2
    config = json.loads((out / "config.json").read_text())
    assert config["timm_popup"]["method"] == "gem-miner" and config["model_args"]["score_init"] == "uniform"
    card = (out / "README.md").read_text()
    assert "Gem-Miner" in card and "arxiv.org/abs/2202.12002" in card and "`uniform`" in card
    model = _load(artifact)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    fresh, method = _fresh_logits(artifact, tmp_path)
    assert method == "gem-miner" and torch.equal(fresh, logits)


def test_gem_miner_mode_rounds_regularises_and_clips():
    model = _conv2()
    make_mask_method(model, "gem-miner", MethodOptions(score_l2=0.5))
    masks = list(timm_popup.popup_masks(model).values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith("scores") for n in trainable)  # nothing else trains
    mask = masks[0]
    assert mask.scores.min() >= 0 and mask.scores.max() <= 1  # its U(0, 1) start
    assert torch.equal(mask.get_mask(), mask.scores.detach() > 0.5)
    # no loss gradient: only the regulariser's, 2 * 0.5 * scores
    model.train()(torch.randn(2, 3, 8, 8)).sum().mul(0).backward()
    assert torch.allclose(mask.scores.grad, mask.scores.detach())
    with torch.no_grad():
        mask.scores.add_(2.0)
    gem_miner_update(model, 1, Schedule(epochs=10, updates_per_epoch=100))  # mid-epoch: clip only
    assert torch.equal(mask.scores, torch.ones_like(mask.scores)) and bool(mask.alive.all())


def test_freezing_removes_the_lowest_alive_scores_for_good():
    model = _conv2()
    make_mask_method(model, "gem-miner")
    masks = list(timm_popup.popup_masks(model).values())
    total = sum(m.scores.numel() for m in masks)
    with torch.no_grad():
        masks[0].scores.fill_(0.0)  # ties with masks[1]'s first score: the lowest index in model order goes first
        masks[1].scores.copy_(torch.linspace(0, 1, masks[1].scores.numel()).view_as(masks[1].scores))
    count = freeze_lowest(masks, 0.1)
    assert count == math.ceil(0.1 * total) < masks[0].scores.numel()
    assert not bool(masks[0].alive.reshape(-1)[:count].any()) and bool(masks[0].alive.reshape(-1)[count:].all())
    assert bool(masks[1].alive.all())
    alive = torch.cat([m.alive.reshape(-1) for m in masks])
    frozen_before = ~alive.clone()
    with torch.no_grad():
        for m in masks:
            m.scores.fill_(1.0)  # a frozen weight never comes back, whatever its score
    assert not bool((torch.cat([m.get_mask().reshape(-1) for m in masks]) & frozen_before).any())
    # the schedule: epochs - 1 = 4 boundaries, freeze_every 2 -> 2 events, at the ends of epochs 2 and 4
    model = _conv2()
    make_mask_method(model, "gem-miner", MethodOptions(freeze_every=2))
    schedule = Schedule(epochs=5, updates_per_epoch=3)
    counts = []
    for update in range(1, 16):
        gem_miner_update(model, update, schedule)
        counts.append(sum(int(m.alive.sum()) for m in timm_popup.popup_masks(model).values()))
    assert len(set(counts)) == 3 and counts[5] < counts[4] and counts[11] < counts[10] and counts[14] == counts[11]
    assert abs(counts[-1] - K * total) <= 2


def test_a_tampered_gem_miner_artifact_is_one_line(tmp_path):
    model = timm_popup.convert(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                               k=K, seed=1)
    make_mask_method(model, "gem-miner")
    sd = timm_popup.masks.mask_state_dict(model)
    assert int(sd[META + "format_version"].item()) == 4
    loaded = timm_popup.convert(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                                k=K, seed=1)
    state = filter_state_dict(dict(sd), loaded)
    loaded.load_state_dict(state)
    for a, b in zip(timm_popup.popup_masks(model).values(), timm_popup.popup_masks(loaded).values(), strict=True):
        assert torch.equal(a.get_mask(), b.get_mask())
    bad = dict(sd)
    bad["0.weight.kept"] = bad["0.weight.kept"] + 1
    bad[META + "checksum"] = checksum(bad)
    with pytest.raises(MaskError, match="not the count the file records") as e:
        filter_state_dict(bad, loaded)
    assert "\n" not in str(e.value)


def test_global_topk_reaches_k_over_epochs_as_biprop(run, data, tmp_path):  # noqa: F811
    assert global_density(0.1, 0, 4) == 0.5 and global_density(0.1, 4, 4) == 0.1
    assert global_density(0.1, 2, 4) == pytest.approx(0.1 + 0.4 * 0.125)
    assert global_density(0.7, 0, 4) == 0.7  # biprop schedules only k <= 0.5
    model = _conv2()
    make_mask_method(model, "global-topk", MethodOptions(density_epochs=2))
    masks = list(timm_popup.popup_masks(model).values())
    total = sum(m.scores.numel() for m in masks)

    def kept() -> int:
        return sum(int(m.get_mask().sum()) for m in masks)

    assert kept() == num_kept(total, 0.5)
    global_density_update(model, 10, Schedule(epochs=3, updates_per_epoch=10))  # end of epoch 1
    assert kept() == num_kept(total, global_density(K, 1, 2))
    global_density_update(model, 20, Schedule(epochs=3, updates_per_epoch=10))
    assert kept() == num_kept(total, K)
    out = tmp_path / "global"
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "2", "--method", "global-topk",
                "--k", str(K), "--density-epochs", "1"]) == 0
    info = artifact_info(safetensors.torch.load_file(str(out / "model.safetensors")))
    assert info["kept_weights"] == num_kept(info["total_weights"], K)
    # an option of another method is refused in one line
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(tmp_path / "x"), "--method", "edge-popup",
                "--density-epochs", "2"]) == 2
