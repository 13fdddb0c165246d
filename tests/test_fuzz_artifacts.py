"""An artifact from a stranger: every field is checked before it is trusted, an invalid one is one line naming it,
memory stays bounded (issue 27). The measured cases, a sweep over every field of every method's artifact, and a
bounded Hypothesis run of the fuzz harness (tests/artifact_fuzz.py; bench/fuzz_artifacts.py runs it longer)."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import timm
import torch
from artifact_fuzz import (
    ARCH,
    METHODS,
    MODEL_KWARGS,
    READERS,
    Mutation,
    Outcomes,
    apply_to_config,
    apply_to_mask,
    bounded,
    field_space,
    make_artifacts,
    mutations,
    run_case,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timm_popup import MaskError, cli
from timm_popup.configjson import CONFIG_FIELDS, check_config
from timm_popup.maskfile import META, check_format, checksum
from timm_popup.masks import filter_state_dict


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("fuzz"))


def _crafted(base, out, *, mask=None, config=None):
    shutil.copytree(base, out)
    if mask:
        sd = safetensors.torch.load_file(str(out / "model.safetensors"))
        sd.update(mask)
        sd[META + "checksum"] = checksum(sd)  # recomputed, as a forger would
        safetensors.torch.save_file(sd, str(out / "model.safetensors"))
    if config:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _both_one_line(directory, capsys, expected):
    """create_model("local-dir:") and `timm-popup info DIR` each fail with one line that says ``expected``."""
    with bounded(), pytest.raises(MaskError) as e:
        timm.create_model(f"local-dir:{directory}", pretrained=True)
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)
    capsys.readouterr()
    with bounded():
        assert cli.main(["info", str(directory)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timm-popup: error: ") and expected in lines[0], lines


@pytest.mark.parametrize("shape", [(2**20, 2**20), (65536, 65536)])  # 1 TiB; 4 G elements, which numpy would take
def test_a_shape_the_payload_cannot_hold_is_one_line_not_an_allocation(artifacts, tmp_path, capsys, shape):
    one_byte = torch.zeros(1, dtype=torch.uint8)
    d = _crafted(artifacts["edge-popup"], tmp_path / "d",
                 mask={"features.0.weight.mask_shape": torch.tensor(shape), "features.0.weight.mask": one_byte})
    _both_one_line(d, capsys, "the mask file is invalid: features.0.weight.mask holds 1 bytes, not the "
                              f"{shape[0] * shape[1] // 8} bytes")


def test_a_plain_timm_architecture_beside_a_popup_mask_is_one_line(artifacts, tmp_path, capsys):
    d = _crafted(artifacts["edge-popup"], tmp_path / "d", config={"architecture": "resnet18"})
    expected = "config.json is invalid: architecture is 'resnet18', not a popup architecture"
    _both_one_line(d, capsys, expected)
    for command in (["export", str(d), str(tmp_path / "out")], ["push", str(d), "org/name"]):  # before any network
        assert cli.main(command) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("__popup__.k", torch.tensor([7.0], dtype=torch.float64), "__popup__.k is 7.0, outside (0, 1]"),
    ("__popup__.k", torch.tensor([float("nan")], dtype=torch.float64), "__popup__.k is nan"),
    ("__popup__.weight_init", torch.tensor(list(b"bogus"), dtype=torch.uint8), "__popup__.weight_init is 'bogus'"),
    ("__popup__.seed", torch.tensor([1.5], dtype=torch.float64), "__popup__.seed is torch.float64, not torch.int64"),
    ("__popup__.method", torch.tensor(list(b"dense"), dtype=torch.uint8), "__popup__.method is 'dense', not a known"),
])
def test_a_value_no_artifact_holds_is_an_invalid_file_not_a_mismatch(artifacts, tmp_path, capsys, key, value,
                                                                       expected):
    d = _crafted(artifacts["global-topk"], tmp_path / "d", mask={key: value})
    _both_one_line(d, capsys, f"the mask file is invalid: {expected}")


def _fresh():
    return timm.create_model(ARCH, **MODEL_KWARGS)


@pytest.mark.parametrize("method", METHODS)
def test_every_field_of_every_method_is_checked(artifacts, method):
    """Each key of a real file deleted, retyped or resized (checksum recomputed): one line, and where the file
    alone is at fault (not the model it is compared with), the line names the key."""
    sd = safetensors.torch.load_file(str(artifacts[method] / "model.safetensors"))
    fields = [k for k in sd if k.startswith(META) or k.rpartition(".")[2] in (
        "mask", "mask_shape", "fingerprint", "kept", "alpha", "flips", "redraws", "redraw_bits", "slot", "nm")]
    assert len(fields) > 10
    for key in fields:
        other = torch.float64 if sd[key].dtype != torch.float64 else torch.int64
        for mutation in (Mutation("mask", key, "delete"), Mutation("mask", key, "dtype", other),
                         Mutation("mask", key, "resize", 1)):
            if mutation.how == "delete" and key in (META + "learn_norm", META + "learn_bias"):
                continue  # popup_conv2 has no norm layer or bias: without the flag the file is still a true one
            bad = apply_to_mask(sd, mutation)
            with pytest.raises(MaskError) as e:
                check_format(bad)
                filter_state_dict(bad, _fresh())  # a deleted mask_shape leaves a file of fewer tensors
            message = str(e.value)
            assert "\n" not in message, (mutation, message)
            if "invalid" in message:
                assert key in message or mutation.how == "delete", (str(mutation), message)


def test_every_config_field_is_checked(artifacts):
    """Each field of CONFIG_FIELDS a real config.json holds, given a value of another type: one line naming it."""
    from timm_popup.maskfile import read_mask_file

    base = artifacts["slot-machine"]
    config = json.loads((base / "config.json").read_text())
    header = read_mask_file(base / "model.safetensors")
    check_config(config, header)  # the real one passes
    checked = 0
    for path in CONFIG_FIELDS:
        holder = config
        for part in path.split("."):
            holder = holder.get(part) if isinstance(holder, dict) else None
        if holder is None:
            continue
        value = "x" if isinstance(holder, (dict, list)) else {"x": 1}
        with pytest.raises(MaskError, match=f"config.json is invalid: {path} "):
            check_config(apply_to_config(config, Mutation("config", path, "set", value)), header)
        checked += 1
    assert checked >= 15


def test_fuzz_bounded_run(artifacts, tmp_path):
    """A bounded run of the harness over all methods, mask file and config.json, Python loader and CLI: only loads
    and one-line errors, each case within the time and memory bound."""
    keys, paths = field_space(artifacts)
    outcomes = Outcomes()

    @settings(max_examples=80, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        method = data.draw(st.sampled_from(METHODS))
        run_case(artifacts[method], data.draw(mutations(keys[method], paths)), tmp_path / "case", outcomes,
                 tuple(READERS))

    run()
    assert outcomes.cases >= 80
    assert not outcomes.findings, "\n".join(outcomes.findings)
    assert any(kind.endswith("one-line error") for kind in outcomes.counts)
