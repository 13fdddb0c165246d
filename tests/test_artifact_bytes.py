"""Artifacts are byte-identical across refactors: every file each method writes (mask artifacts, dense checkpoints,
config.json, model card) for a tiny model in a fixed state, against digests recorded before the artifact code was
reorganised (commit 2b23df7; the package version is masked out). A change here changes what users download:
make it deliberately, with a format or generator version, and regenerate with ``python tests/test_artifact_bytes.py``.
"""
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import timm
import torch

import timm_popup
from timm_popup.methods import METHODS, MethodOptions, get_method

OPTIONS = MethodOptions(slots=4, redraw_every=1, redraw_rate=0.5)


def _fixed_scores(model):
    with torch.no_grad():
        for j, (name, p) in enumerate(sorted(model.named_parameters())):
            if name.endswith("scores"):
                n = p.numel()
                p.copy_(torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + j).float().view_as(p))


def _digest(path: Path) -> str:
    data = path.read_bytes().replace(timm_popup.__version__.encode(), b"<version>")
    return hashlib.sha256(data).hexdigest()


def digests(tmp: Path) -> dict[str, str]:
    out = {}
    first = None
    for method in METHODS:
        spec = get_method(method)
        init = spec.weight_init
        model = timm.create_model("popup_test_resnet", k=0.3 if spec.uses_k else 1.0, num_classes=5,
                                  **({"weight_init": init} if init else {}))
        if spec.init_artifact == "required":
            model = spec.prepare(model, init_artifact=first, options=OPTIONS)
        else:
            model = spec.prepare(model, options=OPTIONS)
        _fixed_scores(model)
        if spec.after_update:
            spec.after_update(model, 1)
        d = tmp / method
        spec.save(model, d, metrics={"top1": 50.0, "top5": 90.0}, dataset="fashion_mnist", recipe={"lr": 0.1})
        if method == "edge-popup":
            first = d
        for f in sorted(d.iterdir()):
            out[f"{method}/{f.name}"] = _digest(f)
    return out


GOLDEN = {
    'biprop/README.md': '2ae46f0dc7cbc31dfc8f7a13b388c93b402e839b684e5de95d6b6338ccf0947f',
    'biprop/config.json': '8fa083f6176828be3be32a1cf2f4c2e3208920ef176da4e56cc6f9dde3922f69',
    'biprop/model.safetensors': '2220a33f55a59bd8b33455f75563223e865de6703b18023e93f1fda03dc26036',
    'dense/README.md': '6e5ec14d6c6b2cf2935dfbaf685ace4b75b80b97689e022453bcf693ff8bca22',
    'dense/config.json': '3db527f6382ea4248242f4f950bf4360c0e6327e6311ceb577e6bb1601333d58',
    'dense/model.safetensors': 'accc6891975314b394fa0652965a7b5a015465a9edb09a02683ae55bc79f6791',
    'edge-popup/README.md': '4d9c3f51af0c0a084b438fe7f2f6b502408753052f42cd9c412dff4462cce0a8',
    'edge-popup/config.json': '65156477f089de04105ed2884934f75487caea9f870aaf06a595b210536875c9',
    'edge-popup/model.safetensors': '91598e5ace237b676cd879581472f1c24e06098b060d2446ece48bc7f9e98a86',
    'finetune/README.md': '645171338a6e2c6e1645aa8bf057a38c63b8efb39e7819904c275d5c41a5a908',
    'finetune/config.json': 'c50c5daa0e4e60806eaad2c7869e2859ea7fec1b7946eec6d7e5909982f7f2df',
    'finetune/model.safetensors': '9c69bf65be55b9e4eae2d167517e97d69b11b7880399f04d2e4db81df5002b4f',
    # added with the method (issue 26); every digest above and below is the one recorded before it
    'gem-miner/README.md': 'b92d5730c7e40b8c3c78b1c359335d5a7dbeca2fb715128892302187bc316de8',
    'gem-miner/config.json': '28525b6540d93d56e935aeb40ceb4ea23f9ec525b4b77019a5615731593bcffc',
    'gem-miner/model.safetensors': 'daca45796c5ecb0d767de6f8864dbcf04abb61ab3474b430e8a3b4c961a6aece',
    'global-topk/README.md': 'fbb7b6f2368578ae32c35d5aa4c9b046f8e2df6d5bdf404f926559cfdacf8290',
    'global-topk/config.json': '1fac54e6617ac8e14f811ffee064d12b7ac1ce035934d620836c8ae591361ff0',
    'global-topk/model.safetensors': '5905b2dd226f33cf386c672b15078383bb30b087c690356c0d3166d2f66176bc',
    'iterand/README.md': '05fa2d64ee5610a8e8d1f69fb8b47a3694a65e710f62382cc8d831936432e949',
    'iterand/config.json': 'd5f90f25d13a706d1d474e8a3ca9745ab088a3c168c94b0e89b3d47d62363cdd',
    'iterand/model.safetensors': '83f0d9352d9cc5d416cbe39f7a0fcdd61f68e887d1d381f65f344c1c429ff9ed',
    'random-subnet/README.md': '4d588c035b00e35d280808f53c97e52744df859641aaeee6bd8f0f58f088e22f',
    'random-subnet/config.json': '983aeaa2075160a4e04cfda66055a93fb5dd64201ca0323540ebee739830b129',
    'random-subnet/model.safetensors': 'e71feffe3a8a45f57e32530b9320d1ddcdc4c9244d4a7d3b477b1559a2babf84',
    'signed-supermask/README.md': 'e75252d6c16a9eff06fcf3b75d20cba03ec6ba3369f4970002666d0774765608',
    'signed-supermask/config.json': '24e59b15ac9a51497d8d0ebf9b40d10750d34c40e3cbc14c0ee2004004c3243c',
    'signed-supermask/model.safetensors': '7e9fc0afc15fc3aa824918b912b7d4e7608222bef965f069ff81cc97ab83c3b1',
    'slot-machine/README.md': 'fd1b1c556e3c03fb88383c5ea8f6ed077804b0e2a43faab40358754b9e6a86de',
    'slot-machine/config.json': '9dc083666de25102a2a230a193b3080aa9eb0fa729e7fa03f93e746a150ff788',
    'slot-machine/model.safetensors': 'e01b5c1247ce5b45de4f9bf3cf692e1a8c754666c5f1b8e82feb67c6c1facf2a',
    'supermask/README.md': '42b77229d9458d18b015ef984617e4820ed2fe39a49a73d725c581e04e09ff62',
    'supermask/config.json': 'e708213726e767636ad76031ad4050bab1e530dc2465b57f0a1709339cce87b7',
    'supermask/model.safetensors': 'df3bb0c111d7160f81b37ec9d561b34f2c3fe47c0e8beae47ac9ed47c7d03717',
}


def test_every_artifact_file_is_byte_identical_to_the_recorded_one(tmp_path):
    got = digests(tmp_path)
    assert set(got) == set(GOLDEN)
    changed = sorted(name for name in GOLDEN if got[name] != GOLDEN[name])
    assert not changed, f"these artifact files changed bytes: {changed}"

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(digests(Path(tmp)), sys.stdout, indent=1, sort_keys=True)
