"""The ``timm-popup`` command: in-process ``main([...])`` calls plus subprocess runs of the console script.

Tiny models and generated data; nothing is downloaded (the push test talks to the loopback HubServer).
"""

import os

# Set before datasets/huggingface_hub are imported: both read these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from timm_popup import convert, maskfile, save_pretrained  # noqa: E402
from timm_popup.cli import main  # noqa: E402
from timm_popup.export import plain_twin  # noqa: E402

try:
    from hub_server import HubServer
except ImportError:  # tests/ turned into a package
    from tests.hub_server import HubServer

CLI = Path(sys.executable).with_name("timm-popup")
TIMEOUT = 180
# name: (architecture, create kwargs, input side used to update BN statistics and compare logits)
MODELS = {
    "conv2": ("popup_conv2", dict(num_classes=3, seed=5), 32),
    "resnet18": ("popup_resnet18", dict(seed=3), 64),
    # shrunk for speed; img_size / depth / depths travel to the exported config.json as model_args
    "vit": ("popup_vit_tiny_patch16_224", dict(seed=2, img_size=64, depth=2), 64),
    "convnext": ("popup_convnext_atto", dict(seed=4, depths=(1, 1, 2, 1)), 64),
    # any timm model made popup with timm_popup.convert (BatchNormAct, depthwise convs, squeeze-excite biases)
    "effnet": ("test_efficientnet", dict(k=0.4, seed=9), 64),
    # modules shared by several blocks (convolutional position encodings): one tensor under several names
    "coat": ("popup_coat_tiny", dict(seed=6, img_size=64, embed_dims=(32, 32, 32, 32), serial_depths=(1, 1, 1, 1),
                                     parallel_depth=1), 64),
}
# the create kwargs that shape a network (they travel in config.json's model_args)
SHAPE_ARGS = ("img_size", "depth", "depths", "embed_dims", "serial_depths", "parallel_depth")
CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Trained-looking popup models (scores moved, BN statistics updated) and their artifact directories."""
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    out = {}
    for name, (arch, kwargs, side) in MODELS.items():
        model = timm.create_model(arch, **kwargs) if arch.startswith("popup_") else convert(
            timm.create_model(arch), **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, side, side))
        out[name] = (model.eval(), save_pretrained(model, root / name))
    return out


@pytest.fixture(scope="module")
def artifacts(saved) -> dict[str, Path]:
    return {name: directory for name, (_, directory) in saved.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)

    def split(n: int) -> datasets.Dataset:
        images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)

    path = tmp_path_factory.mktemp("data") / "ds"
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": split(6), "test": split(21)}).save_to_disk(str(path))
    return path


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The single error line (progress bars aside) of a failed command, checked for tracebacks."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("timm-popup: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------- info


def test_info_directory_human_and_json(artifacts, capsys):
    code, out, _ = _run(["info", artifacts["resnet18"]], capsys)
    assert code == 0
    assert "popup_resnet18 (config.json)" in out and "seed          3" in out
    assert "verification  OK: the weights regenerated from seed 3 match all 21 tensor fingerprints" in out
    assert "method        edge-popup" in out and "bits/weight   1.0 stored per masked weight" in out

    code, out, _ = _run(["info", artifacts["resnet18"] / "model.safetensors", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["verified"] is True
    assert (info["architecture"], info["seed"], info["k"], info["layers"]) == ("popup_resnet18", 3, 0.3, 21)
    assert info["total_weights"] == 11_678_912 and info["kept_weights"] == 3_503_673  # round(0.3 * n) per layer
    assert info["dense_params"] == sum(p.numel() for p in timm.create_model("resnet18").parameters())
    assert info["file_bytes"] == (artifacts["resnet18"] / "model.safetensors").stat().st_size
    assert info["ratio"] == round(info["dense_fp32_bytes"] / info["file_bytes"], 2) and info["ratio"] > 25


def test_info_bare_mask_file_needs_model(artifacts, tmp_path, capsys):
    bare = tmp_path / "mask.safetensors"
    shutil.copy(artifacts["conv2"] / "model.safetensors", bare)
    code, _, err = _run(["info", bare], capsys)
    assert code == 2 and "pass --model" in _error_line(err)

    code, out, _ = _run(["info", bare, "--no-verify", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["verified"] is None and info["architecture"] is None and info["seed"] == 5

    # the 3-class head is read from the file (the loader would otherwise re-initialise a 10-class one)
    code, out, _ = _run(["info", bare, "--model", "popup_conv2", "--json"], capsys)
    assert code == 0 and json.loads(out)["verified"] is True


def test_info_errors_are_one_line(artifacts, tmp_path, capsys):
    # a mask found on other random weights: consistent checksum, wrong fingerprint
    other = tmp_path / "other"
    shutil.copytree(artifacts["conv2"], other)
    sd = safetensors.torch.load_file(str(other / "model.safetensors"))
    sd["features.0.weight.fingerprint"] = 255 - sd["features.0.weight.fingerprint"]
    sd["__popup__.checksum"] = maskfile.checksum(sd)
    safetensors.torch.save_file(sd, str(other / "model.safetensors"))
    code, out, err = _run(["info", other], capsys)
    assert code == 1 and "features.0.weight: the weights regenerated from seed 5 do not match" in _error_line(err)
    assert "verification  tensor features.0.weight" in out  # what the file holds is still shown

    dense = tmp_path / "dense.safetensors"
    safetensors.torch.save_file({"fc.weight": torch.zeros(2, 2)}, str(dense))
    code, _, err = _run(["info", dense], capsys)
    assert code == 1 and "dense checkpoint" in _error_line(err)

    code, _, err = _run(["info", tmp_path / "missing"], capsys)
    assert code == 2 and "does not exist" in _error_line(err)

    code, _, err = _run(["info", artifacts["conv2"], "--model", "popup_conv4"], capsys)
    assert code == 2 and "is a popup_conv2 artifact" in _error_line(err)

    # timm's name for a directory works too; a damaged config.json is one line naming it and what to do
    code, out, _ = _run(["info", f"local-dir:{artifacts['conv2']}", "--json"], capsys)
    assert code == 0 and json.loads(out)["verified"] is True
    damaged = tmp_path / "damaged"
    shutil.copytree(artifacts["conv2"], damaged)
    (damaged / "config.json").write_text('{"architecture": "popup_conv2",\n')
    for spec in (damaged, f"local-dir:{damaged}"):
        code, _, err = _run(["info", spec], capsys)
        line = _error_line(err)
        assert code == 1 and f"{damaged / 'config.json'} is not valid JSON" in line, line
        assert "write the artifact again" in line
    with pytest.raises(json.JSONDecodeError, match=r"damaged/config.json is not valid JSON, .* write the artifact "):
        timm.create_model(f"local-dir:{damaged}", pretrained=True)  # timm's own loader, in Python

    # this process is offline (HF_HUB_OFFLINE=1): an uncached Hub artifact is a one-line failure, not a traceback
    code, _, err = _run(["info", "hf-hub:popup-tests/not-cached"], capsys)
    assert code == 1 and "could not download config.json of popup-tests/not-cached" in _error_line(err)

    with pytest.raises(SystemExit) as exc:
        main(["info"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------------------------- eval


def _result(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_eval_artifact_matches_a_direct_forward(artifacts, dataset, capsys):
    code, out, err = _run(["eval", artifacts["conv2"], "--dataset", dataset, "--batch-size", 8, "--workers", 0],
                          capsys)
    assert code == 0, err
    result = _result(out)
    assert "Acc@1" in err and "eval test" in err  # summary line and tqdm bar go to stderr
    assert (result["split"], result["images"], result["img_size"], result["seed"]) == ("test", 21, 32, 5)
    for key in ("model", "top1", "top1_err", "top5", "loss", "param_count", "images_per_sec", "interpolation"):
        assert key in result, key

    # the same numbers by hand: CIFAR eval pipeline = ToTensor + Normalize with the model's statistics
    model = timm.create_model(f"local-dir:{artifacts['conv2']}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    test = datasets.load_from_disk(str(dataset))["test"]
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in test["image"]])
    x = (x - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    y = torch.tensor(test["label"])
    with torch.no_grad():
        logits = model(x)
    top1 = (logits.argmax(1) == y).float().mean().item() * 100
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert result["top1"] == pytest.approx(top1, abs=1e-3) and result["loss"] == pytest.approx(loss, abs=1e-3)


def test_eval_model_name_with_limit(dataset, capsys):
    code, out, err = _run(["eval", "popup_conv2", "--dataset", dataset, "--split", "train", "--limit", 4,
                           "--batch-size", 3, "--workers", 0, "--device", "cpu"], capsys)
    assert code == 0, err
    result = _result(out)
    assert (result["model"], result["split"], result["images"], result["k"]) == ("popup_conv2", "train", 4, 0.5)
    assert result["top5"] == 100.0 and result["top5_is_top"] == 3  # 3 classes: top-5 is top-3


def test_eval_errors(artifacts, dataset, tmp_path, capsys):
    code, _, err = _run(["eval", "popup_conv3", "--dataset", dataset], capsys)
    assert code == 2 and "unknown model 'popup_conv3'; did you mean" in _error_line(err) and "popup_conv2" in err
    code, _, err = _run(["eval", "popup_conv2", "--dataset", tmp_path / "nope"], capsys)
    assert code == 2 and "does not exist" in _error_line(err)
    code, _, err = _run(["eval", "popup_conv2", "--dataset", dataset, "--split", "validation"], capsys)
    assert code == 2 and "unknown split 'validation'" in _error_line(err)
    code, _, err = _run(["eval", tmp_path / "missing_artifact", "--dataset", dataset], capsys)
    assert code == 2 and "does not exist" in _error_line(err)


# ----------------------------------------------------------------------------------------------------------- export

_PLAIN_LOAD = r"""
import json, sys
import safetensors.torch, timm, torch

spec = json.loads(sys.argv[1])
out = {}
for name, s in spec.items():
    io = safetensors.torch.load_file(s["io"])
    routes = {
        "file": timm.create_model(s["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=s["file"]),
                                  **s["kwargs"]),
        "local-dir": timm.create_model("local-dir:" + s["dir"], pretrained=True),
    }
    for route, model in routes.items():
        with torch.no_grad():
            y = model.eval()(io["x"])
        out[f"{name}/{route}"] = dict(equal=torch.equal(y, io["y"]), diff=(y - io["y"]).abs().max().item(),
                                      type=type(model).__name__)
out["plugin_imported"] = any(m.startswith("timm_popup") for m in sys.modules)
print(json.dumps(out))
"""


def test_export_loads_in_plain_timm_with_identical_logits(saved, artifacts, tmp_path, capsys):
    code, out, err = _run(["info", artifacts["effnet"], "--json"], capsys)  # rebuilt with convert + load_masks
    assert code == 0 and json.loads(out)["verified"] is True, err
    spec = {}
    for name in ("resnet18", "vit", "convnext", "effnet", "coat"):
        arch, _, side = MODELS[name]
        out_dir = tmp_path / f"{name}-plain"
        code, out, err = _run(["export", artifacts[name], out_dir], capsys)
        assert code == 0, err
        assert "logits vs the popup model: bitwise identical" in out
        twin = plain_twin(arch)
        config = json.loads((out_dir / "config.json").read_text())
        assert config["architecture"] == twin and "timm_popup" not in config
        assert not any(n.endswith("scores") for n in safetensors.torch.load_file(str(out_dir / "model.safetensors")))
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = saved[name][0](x)  # the model that saved the artifact (test_masks: loading it is bit-exact)
        safetensors.torch.save_file({"x": x, "y": y}, str(tmp_path / f"{name}.io.safetensors"))
        kwargs = {k: v for k, v in MODELS[name][1].items() if k in SHAPE_ARGS}
        spec[name] = dict(arch=twin, kwargs=kwargs, file=str(out_dir / "model.safetensors"), dir=str(out_dir),
                          io=str(tmp_path / f"{name}.io.safetensors"))
    proc = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result.pop("plugin_imported") is False
    assert len(result) == 10
    for key, r in result.items():
        assert r["equal"], (key, r)  # bitwise: the folded weight is the very tensor the popup forward uses


def test_export_refuses_architectures_without_a_plain_twin(artifacts, tmp_path, capsys):
    code, _, err = _run(["export", artifacts["conv2"], tmp_path / "out"], capsys)
    line = _error_line(err)
    assert code == 2 and "popup_conv2 has no plain timm twin" in line and "popup_resnet50" in line
    assert not (tmp_path / "out").exists()
    # a plain architecture that does not match the popup one is caught before anything is written
    code, _, err = _run(["export", artifacts["effnet"], tmp_path / "out", "--model-name", "test_resnet"], capsys)
    assert code == 1 and "test_resnet does not match the popup model" in _error_line(err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- console script and push


def _hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_TOKEN="dummy-token", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    return env


def test_push_reports_the_commit_url_then_info_reads_it_back(artifacts, tmp_path):
    """The installed console script, end to end: push to the loopback Hub, then `info hf-hub:` verifies it."""
    assert CLI.is_file(), "the timm-popup console script is not installed: pip install -e ."
    folder = tmp_path / "artifact"
    shutil.copytree(artifacts["conv2"], folder)
    secret = "hf_secret_token_never_printed"
    with HubServer() as endpoint:
        env = _hub_env(endpoint, tmp_path / "hf_home")
        push = subprocess.run([str(CLI), "push", str(folder), "popup-tests/cli-conv2", "--token", secret,
                               "--commit-message", "from the CLI"], capture_output=True, text=True, env=env,
                              timeout=TIMEOUT)
        assert push.returncode == 0, push.stderr[-2000:]
        assert f"{endpoint}/popup-tests/cli-conv2/commit/" in push.stdout
        assert secret not in push.stdout + push.stderr
        info = subprocess.run([str(CLI), "info", "hf-hub:popup-tests/cli-conv2", "--json"], capture_output=True,
                              text=True, env=env, timeout=TIMEOUT)
    assert info.returncode == 0, info.stderr[-2000:]
    result = json.loads(info.stdout)
    assert result["verified"] is True and result["seed"] == 5 and result["architecture"] == "popup_conv2"


def test_push_refuses_bad_input_before_any_network(tmp_path, capsys):
    code, _, err = _run(["push", tmp_path / "missing", "org/name"], capsys)
    assert code == 2 and "is not a directory" in _error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["push", tmp_path / "empty", "org/name", "--token", "hf_do_not_print"], capsys)
    line = _error_line(err)
    assert code == 1 and "is not a timm-popup artifact (missing config.json, model.safetensors)" in line
    assert "hf_do_not_print" not in err
