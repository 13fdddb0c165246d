"""The timm coverage harness (bench/timm_coverage.py) on a fast subset of families.

Each family below stands for a class of model that once broke edge-popup; tiny variants (small widths and
depths, small inputs) keep the whole file well under a minute on two cores. Nothing downloads.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "timm_coverage.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("timm_coverage", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


cov = _load_bench()

# family -> (model, model kwargs, input size when the model takes no img_size), with the failure class it covers
FAST = {
    # attention reads self.qkv.weight directly through F.linear (not by calling the Linear)
    "beit": ("beit_base_patch16_224", dict(img_size=32, embed_dim=64, depth=2, num_heads=2), None),
    # ScaledStdConv2d with a `gain` parameter; conv3 gain and skipinit gain initialised to 0
    "nfnet": ("test_nfnet", dict(skipinit=True), (3, 64, 64)),
    # StdConv2dSame stem (a Conv2d subclass that standardises its weight in forward)
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2, embed_dim=64, num_heads=2),
                                  None),
    # nn.LSTM: weight_ih_l0 / weight_hh_l0 read by the fused kernel
    "sequencer": ("sequencer2d_s", dict(img_size=56, layers=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32),
                                        hidden_sizes=(8, 8, 8, 8)), None),
    # Conv1d `aggregate` with a one-element bias (trivially "constant")
    "coat": ("coat_tiny", dict(img_size=64, embed_dims=(32, 32, 32, 32), serial_depths=(1, 1, 1, 1),
                               parallel_depth=1), None),
    # rel_indices: a buffer filled lazily on the first forward
    "convit": ("convit_tiny", dict(img_size=64, depth=2, local_up_to_layer=1, embed_dim=16), None),
    # LayerNorm(1): a one-element norm weight
    "csatv2": ("csatv2", dict(dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), transformer_depths=(0, 0, 1, 1)),
               (3, 128, 128)),
    # pos_embed / cls_token: random non-weight parameters frozen at a seeded draw
    "vision_transformer": ("test_vit", dict(img_size=32), None),
    # Conv1d layers (3-dim weights)
    "efficientvim": ("efficientvim_m1", dict(embed_dim=(16, 24, 32), depths=(1, 1, 1)), (3, 64, 64)),
}


@pytest.mark.parametrize("family", list(FAST))
def test_family_passes_every_check(family: str, tmp_path: Path) -> None:
    model, kwargs, input_size = FAST[family]
    result = cov.run_checks(model, kwargs, family=family, input_size=input_size,
                            workdir=tmp_path)
    failed = {name: f"{c.reason}\n{c.detail}" for name, c in result.checks.items() if not c.ok}
    assert not failed, f"{family} ({model}):\n" + "\n".join(f"[{n}] {r}" for n, r in failed.items())
    assert result.k1_max_diff is not None and result.k1_max_diff <= 1e-5


def test_child_reports_each_check_and_the_parent_reads_them(capsys) -> None:
    """The --one child prints one tagged line per check and one for the result; the parent parses them back."""
    assert cov.main(["--one", "vision_transformer", "--model", "test_vit", "--kwargs", '{"img_size": 32}',
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert [json.loads(ln[len(cov.TAG):]).get("check") for ln in out.splitlines() if ln.startswith(cov.TAG)] == [
        *cov.CHECKS[:3], "e", "export", "d", None]  # run order; None: the final result line
    parsed = cov.FamilyResult(family="vision_transformer", model="test_vit")
    assert cov._parse_child(parsed, out) and parsed.passed and parsed.params > 0, parsed.reason()
    assert parsed.k1_bitwise is not None and parsed.kwargs == {"img_size": 32}


def test_a_hung_family_becomes_a_timeout_row() -> None:
    hung = cov.run_family("vision_transformer", "test_vit", dict(img_size=32), timeout=0.5)
    assert hung.error == "timeout after 0.5 s in check a" and not hung.passed
    assert all(c.ok is None for c in hung.checks.values())


def test_unknown_model_fails_check_a_with_its_reason() -> None:
    bad = cov.run_checks("no_such_model_anywhere", {}, family="nope")
    assert bad.error == "" and not bad.passed and bad.family == "nope"
    assert bad.checks["a"].ok is False and "no_such_model_anywhere" in bad.checks["a"].reason
    assert all(c.ok is None for name, c in bad.checks.items() if name != "a")  # nothing to run them on


def test_child_crash_is_a_failed_row_not_a_crashed_run(monkeypatch) -> None:
    monkeypatch.setattr(cov.sys, "executable", "/bin/false")  # a child that dies without a word
    crashed = cov.run_family("vision_transformer", "test_vit", {}, timeout=60)
    assert crashed.error == "child exited 1: no output" and not crashed.passed


def test_tables_show_each_check_and_the_reason() -> None:
    good = cov.FamilyResult(family="resnet", model="test_resnet", params=1_234_567,
                            checks={c: cov.Check(ok=True) for c in cov.CHECKS}, k1_max_diff=0.0, k1_bitwise=True)
    bad = cov.FamilyResult(family="beit", model="beit_base_patch16_224", params=86_000_000,
                           checks={c: cov.Check(ok=c != "b", reason="3/40 scores with all-zero grad | x"
                                                if c == "b" else "") for c in cov.CHECKS})
    text = cov.format_table([good, bad])
    assert "test_resnet" in text and "1.2M" in text and "b: 3/40 scores with all-zero grad" in text
    md = cov.format_markdown([good, bad], {"skipped": {"eva": {"model": "eva_giant", "params": 1_000_000_000}}},
                             wall=120.0)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # header + two families
    assert rows[2].count(" FAIL ") == 1 and "\\| x" in rows[2]  # a pipe in a reason cannot break the table
    assert "1/2 timm families pass" in md and "eva (`eva_giant`" in md and "0 (bitwise)" in rows[1]


def test_selection_picks_the_smallest_model_and_skips_large_families(tmp_path: Path, monkeypatch) -> None:
    import timm

    monkeypatch.setattr(timm, "list_modules", lambda: ["vgg", "convmixer"])
    path = tmp_path / "models.json"
    sel = cov.select_models(refresh=True, path=path, max_params=150_000_000)
    assert sel["families"]["vgg"]["model"] == "vgg11"  # the fewest parameters of vgg11..vgg19_bn
    assert sel["families"]["vgg"]["params"] == 132_863_336 and sel["families"]["vgg"]["candidates"] == 8
    assert sel["families"]["convmixer"]["model"] == "convmixer_768_32" and not sel["skipped"]
    assert json.loads(path.read_text()) == sel

    def no_counting(module: str) -> dict:
        raise AssertionError("the cached counts should have been used")

    monkeypatch.setattr(cov, "_count_family", no_counting)
    assert cov.select_models(path=path, max_params=150_000_000) == sel
    smaller = cov.select_models(path=path, max_params=100_000_000)  # re-picked from the cached counts
    assert smaller["skipped"] == {"vgg": sel["families"]["vgg"]} and list(smaller["families"]) == ["convmixer"]
    assert json.loads(path.read_text())["max_params"] == 100_000_000


def test_checks_catch_what_they_look_for() -> None:
    """Each check names what broke: an unlisted parameter, a stray trainable one, a branch without gradient."""
    import timm
    import torch

    import timm_popup

    plain = timm.create_model("test_vit", img_size=32)
    popup = timm_popup.convert(timm.create_model("test_vit", img_size=32))
    x = torch.randn(2, 3, 32, 32)
    assert cov.check_coverage(popup, plain) is None and cov.check_train_step(popup, x) is None

    del popup.popup_config.frozen["pos_embed"]
    assert cov.check_coverage(popup, plain) == "1 parameters neither masked nor frozen: pos_embed"

    popup.stray = torch.nn.Parameter(torch.zeros(1))
    assert cov.check_train_step(popup, x) == "1 trainable non-score parameters: stray"
    del popup.stray

    with torch.no_grad():  # a dead MLP branch: fc2 passes nothing back, so fc1 and fc2 learn nothing
        timm_popup.popup_masks(popup)["blocks.0.mlp.fc2.weight"].weight.zero_()
    reason = cov.check_train_step(popup, x)
    assert reason.startswith("2/") and "blocks.0.mlp.fc1.weight, blocks.0.mlp.fc2.weight" in reason, reason
