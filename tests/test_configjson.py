"""config.json follows timm's own schema (issue 32): every pretrained cfg in timm's registry, rendered as an artifact's
config.json renders it, passes the check (no model is built); models whose cfg names several heads, several stems or
none, or whose stem does not read ``in_chans`` channels, save, reload bit-exactly through ``local-dir:``, export and
reload in plain timm."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import timm.data
import torch
from timm.models import get_pretrained_cfg
from timm.models._pretrained import filter_pretrained_cfg

import timm_popup
from timm_popup import MaskError, cli, configjson
from timm_popup.configjson import PRETRAINED_CFG_TYPES, check_config
from timm_popup.hub import WEIGHTS_NAME


def _as_config_json(name: str) -> dict:
    """The config.json an artifact of registry entry ``name`` holds: timm's save_config_for_hf keeps the pretrained
    cfg without its sources or empty fields, save_pretrained adds the mask file's name; JSON makes tuples lists."""
    cfg = get_pretrained_cfg(name)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "state_dict"}
    pretrained_cfg = filter_pretrained_cfg(fields, remove_source=True, remove_null=True)
    pretrained_cfg["hf_hub_filename"] = WEIGHTS_NAME
    config = dict(architecture=f"popup_{cfg.architecture}", num_classes=cfg.num_classes,
                  pretrained_cfg=pretrained_cfg, timm_popup={"format_version": 4})
    return json.loads(json.dumps(config))


def _refused() -> dict[str, str]:
    """Every tagged pretrained cfg of timm's own models that the check refuses, with its message."""
    refused = {}
    for name in timm.list_models(include_tags=True):
        if name.startswith("popup_"):
            continue
        try:
            check_config(_as_config_json(name))
        except MaskError as e:
            refused[name] = str(e)
    return refused


def test_every_pretrained_cfg_in_timms_registry_passes():
    names = [n for n in timm.list_models(include_tags=True) if not n.startswith("popup_")]
    assert len(names) > 2000  # every tag of every model is read
    refused = _refused()
    assert not refused, f"{len(refused)} refused, e.g. " + "; ".join(list(refused.values())[:3])


def test_a_schema_narrowed_to_the_annotations_refuses_timms_own_cfgs(monkeypatch):
    """The registry test catches a check narrower than timm: classifier / first_conv as timm annotates them
    (Optional[str]) refuse the distilled heads, CrossViT's stems and CSATv2's empty stem, naming field and value."""
    monkeypatch.setitem(PRETRAINED_CFG_TYPES, "classifier", str | None)
    monkeypatch.setitem(PRETRAINED_CFG_TYPES, "first_conv", str | None)
    refused = _refused()
    assert {"deit_tiny_distilled_patch16_224.fb_in1k", "crossvit_9_240.in1k", "csatv2.r512_in1k",
            "efficientvim_m1.e300_in1k", "levit_128s.fb_dist_in1k"} <= set(refused)
    assert "pretrained_cfg.classifier is ['head', 'head_dist'], not str | None" in refused[
        "deit_tiny_distilled_patch16_224.fb_in1k"]
    assert "pretrained_cfg.first_conv is [], not str | None" in refused["csatv2.r512_in1k"]


@pytest.mark.parametrize(("field", "value", "says"), [
    ("classifier", ["head", "bad name!"], "'bad name!' is not a layer name"),
    ("first_conv", 3, "not str | tuple[str, ...] | None"),
    ("input_size", [3, 0, 224], "not a list of sizes in [1, 65536]"),
    ("mean", [0.5, 0.5], None),  # a list of any length is timm's Tuple[float, ...]
    ("crop_mode", 1, "not <class 'str'>".replace("<class '", "").replace("'>", "")),
    ("state_dict", {}, "not fields of timm's PretrainedCfg"),
    ("not_a_field", 1, "not fields of timm's PretrainedCfg"),
])
def test_a_value_no_timm_model_carries_is_one_line_naming_field_value_and_expectation(field, value, says):
    config = _as_config_json("resnet18.a1_in1k")
    config["pretrained_cfg"][field] = value
    if says is None:
        check_config(config)
        return
    with pytest.raises(MaskError) as e:
        check_config(config)
    message = str(e.value)
    assert says in message and "\n" not in message, message
    assert "release" not in message  # no claim about what releases write: what is wrong, and what was expected


# one model of each shape: (timm name, small model args)
SHAPES = {
    "two heads": ("deit_tiny_distilled_patch16_224",
                  dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)),
    "two stems, two heads": ("crossvit_tiny_240", dict(img_size=(32, 32), patch_size=(8, 16), embed_dim=(16, 32),
                                                        depth=((1, 1, 0),), num_heads=(2, 2),
                                                        mlp_ratio=(2.0, 2.0, 2.0))),
    "no stem named": ("csatv2", dict(dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), transformer_depths=(0, 0, 1, 1))),
    "a Linear stem over flattened patches": ("naflexvit_base_patch16_parfac_gap",
                                             dict(img_size=32, depth=1, embed_dim=32, num_heads=2)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_round_trip_local_dir_export_plain_reload(shape, tmp_path, capsys):
    name, kwargs = SHAPES[shape]
    model = timm.create_model(f"popup_{name}", num_classes=5, **kwargs).eval()
    timm_popup.save_pretrained(model, tmp_path / "artifact")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'artifact'}", pretrained=True).eval()
    size = timm.data.resolve_model_data_config(loaded)["input_size"]  # config.json records the model's own size
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        assert torch.equal(loaded(x), want)
        assert cli.main(["export", str(tmp_path / "artifact"), str(tmp_path / "plain")]) == 0
        plain = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True).eval()
        assert not timm_popup.popup_masks(plain)
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-5)


def test_num_classes_must_match_every_head_the_mask_file_holds(tmp_path):
    """The one cross-field size check kept: each head has one row per class (both heads of a distilled model)."""
    name, kwargs = SHAPES["two heads"]
    timm_popup.save_pretrained(timm.create_model(f"popup_{name}", num_classes=5, **kwargs), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pretrained_cfg"]["num_classes"] = 7
    from timm_popup.maskfile import read_mask_file

    with pytest.raises(MaskError, match=r"pretrained_cfg.num_classes is 7 but the mask file's classifier head has 5"):
        check_config(config, read_mask_file(tmp_path / "model.safetensors"))
    assert configjson.MAX_CLASSES >= 1000
