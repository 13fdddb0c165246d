"""The registry tag whose mask ships inside the package: pretrained=True offline, and its card's accuracy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import timm_popup
from timm_popup.data import FASHION_MNIST_APT_DIR

SHIPPED = Path(timm_popup.__file__).parent / "pretrained" / "popup_conv4.ep_k50_fmnist"


def test_shipped_mask_loads_offline_in_a_fresh_process(tmp_path):
    code = ("import json, timm, timm_popup, torch; "
            "m = timm.create_model('popup_conv4.ep_k50_fmnist', pretrained=True).eval(); "
            "y = m(torch.zeros(2, 1, 28, 28)); "
            "print(json.dumps(dict(classes=list(m.pretrained_cfg['label_names']), shape=list(y.shape), "
            "seed=m.popup_config.seed, k=m.popup_config.k, masks=len(timm_popup.popup_masks(m)))))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    card = json.loads((SHIPPED / "config.json").read_text())
    assert got == dict(classes=card["pretrained_cfg"]["label_names"], shape=[2, 10], seed=0, k=0.5, masks=7)
    assert (SHIPPED / "model.safetensors").stat().st_size < 300_000


@pytest.mark.skipif(not (Path(FASHION_MNIST_APT_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (the README's install line adds it)")
def test_shipped_mask_reproduces_its_cards_accuracy(capsys):
    from timm_popup.cli import main

    assert main(["eval", "popup_conv4.ep_k50_fmnist", "--pretrained", "--dataset", "fashion-mnist",
                 "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((SHIPPED / "config.json").read_text())["timm_popup"]["metrics"]
    assert (result["top1"], result["top5"], result["images"]) == (metrics["top1"], metrics["top5"], 10_000)
