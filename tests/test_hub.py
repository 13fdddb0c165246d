"""Artifacts through all four timm loading routes, pushed to and downloaded from a loopback Hub, and model cards.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import, so every client runs in a fresh subprocess, which
is also the "fresh process" the round trip must survive: nothing but the artifact files crosses over.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

import timm_popup
from timm_popup.masks import MaskError

try:
    from hub_server import HubServer, client_env
except ImportError:  # tests/ turned into a package
    from tests.hub_server import HubServer, client_env

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
ORG = "popup-tests"
# name -> (architecture, build kwargs, input size, registry name whose hf_hub_id serves it, or None)
MODELS = {
    "cifar": ("popup_resnet18_cifar", dict(seed=5), 32, "popup_resnet18_cifar.ep_k50_cifar10"),
    "resnet": ("popup_resnet18", dict(seed=3, k=0.4, num_classes=10), 32, None),
    "vit": ("popup_vit_tiny_patch16_224", dict(seed=11, img_size=32, num_classes=10), 32, None),
    # any timm model as popup_<name> (registered on first use), its attention reading F.linear(x, qkv.weight)
    "beit": ("popup_beit_base_patch16_224", dict(seed=2, img_size=32, depth=2, num_classes=10), 32, None),
}
METRICS, DATASET = {"top1": 91.25, "top5": 99.5, "loss": 0.31}, "uoft-cs/cifar10"
RECIPE = {"method": "edge-popup", "epochs": 100, "lr": 0.1, "batch_size": 128}


def _trained_looking(arch: str, kwargs: dict, size: int) -> torch.nn.Module:
    """Scores moved away from their init and BN statistics updated, as after training."""
    model = timm.create_model(arch, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(4, 3, size, size))
    return model.eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Each model saved with save_pretrained, with an input batch and its logits kept beside it."""
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    out = {}
    for name, (arch, kwargs, size, _) in MODELS.items():
        model = _trained_looking(arch, kwargs, size)
        directory = timm_popup.save_pretrained(model, root / name, metrics=METRICS, dataset=DATASET, recipe=RECIPE)
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            safetensors.torch.save_file({"x": x, "y": model(x), "features": model.forward_features(x)},
                                        str(root / f"{name}.io.safetensors"))
        out[name] = directory
    return root, out


def _run(code: str, env: dict[str, str], spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, f"client failed (rc={proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Runs in a fresh process: compare the logits of every route with the saving model's.
_ROUTES = r"""
import json, sys
import safetensors.torch, timm, torch
import timm_popup

spec = json.loads(sys.argv[1])
results = {}
for name, m in spec["models"].items():
    io = safetensors.torch.load_file(m["io"])
    kwargs = m["kwargs"]
    routes = {}
    for route in spec["routes"]:
        if route == "registry":
            if m["registry"]:  # a real pretrained tag of the registry, its hf_hub_id served by the loopback hub
                model = timm.create_model(m["registry"], pretrained=True, **kwargs)
            else:  # the same mechanism for a family without a tag: hf_hub_id in the pretrained cfg
                model = timm.create_model(m["arch"], pretrained=True, **kwargs,
                                          pretrained_cfg_overlay=dict(hf_hub_id=m["repo"]))
        elif route == "file":
            model = timm.create_model(m["arch"], pretrained=True, **kwargs,
                                      pretrained_cfg_overlay=dict(file=m["dir"] + "/model.safetensors"))
        elif route == "local-dir":
            model = timm.create_model("local-dir:" + m["dir"], pretrained=True)
        elif route == "hf-hub":
            model = timm.create_model("hf-hub:" + m["repo"], pretrained=True)
        elif route == "hf-hub-4-classes":
            model = timm.create_model("hf-hub:" + m["repo"], pretrained=True, num_classes=4)
        model.eval()
        with torch.no_grad():
            if route.endswith("classes"):
                ok = torch.equal(model.forward_features(io["x"]), io["features"]) and model.num_classes == 4
            else:
                ok = torch.equal(model(io["x"]), io["y"])
        routes[route] = dict(equal=bool(ok), seed=model.popup_config.seed, k=model.popup_config.k)
    results[name] = routes
print(json.dumps(results))
"""

_PUSH = r"""
import json, sys
import timm_popup
from huggingface_hub import HfApi, ModelCard, hf_hub_download

spec = json.loads(sys.argv[1])
urls, cards = {}, {}
for name, m in spec["models"].items():
    urls[name] = timm_popup.push_artifact(m["dir"], m["repo"])
    files = sorted(HfApi().list_repo_files(m["repo"]))
    card = ModelCard.load(hf_hub_download(m["repo"], "README.md"))
    cards[name] = dict(files=files, data=card.data.to_dict(), text=card.text)
print(json.dumps(dict(urls=urls, cards=cards)))
"""


def _spec(artifacts, repos: dict[str, str]) -> dict:
    root, dirs = artifacts
    build = ("num_classes", "img_size", "depth")
    return {"models": {name: dict(arch=arch, kwargs={k: v for k, v in kw.items() if k in build},
                                  registry=registry, repo=repos[name], dir=str(dirs[name]),
                                  io=str(root / f"{name}.io.safetensors"))
                       for name, (arch, kw, _, registry) in MODELS.items()}}


def _repos() -> dict[str, str]:
    from timm.models import get_pretrained_cfg

    return {name: get_pretrained_cfg(registry).hf_hub_id if registry else f"{ORG}/{name}-mask"
            for name, (_, _, _, registry) in MODELS.items()}


def test_push_then_load_through_all_routes_online_and_offline(artifacts, tmp_path):
    repos = _repos()
    spec = _spec(artifacts, repos)
    with HubServer() as endpoint:
        env = client_env(endpoint, tmp_path / "hf_home")
        pushed = _run(_PUSH, env, spec)
        spec["routes"] = ["registry", "file", "local-dir", "hf-hub", "hf-hub-4-classes"]
        online = _run(_ROUTES, env, spec)
    # the server is gone: the same cache must serve the Hub routes with HF_HUB_OFFLINE=1
    spec["routes"] = ["registry", "hf-hub"]
    offline = _run(_ROUTES, client_env("http://127.0.0.1:9", tmp_path / "hf_home", HF_HUB_OFFLINE="1"), spec)

    for name, (_, kwargs, _, _) in MODELS.items():
        assert pushed["urls"][name].startswith(endpoint) and repos[name] in pushed["urls"][name]
        assert pushed["cards"][name]["files"] == [".gitattributes", "README.md", "config.json", "model.safetensors"]
        for results in (online[name], offline[name]):
            for route, r in results.items():
                assert r["equal"], (name, route)
                default_k = 0.3 if name in ("resnet", "vit") else 0.5
                assert r["seed"] == kwargs["seed"] and r["k"] == kwargs.get("k", default_k)


def test_uploaded_card_parses_and_carries_metadata_and_metrics(artifacts, tmp_path):
    repos = _repos()
    spec = _spec(artifacts, repos)
    spec["models"] = {"vit": spec["models"]["vit"]}
    with HubServer() as endpoint:
        card = _run(_PUSH, client_env(endpoint, tmp_path / "hf_home"), spec)["cards"]["vit"]
    data = card["data"]
    assert data["library_name"] == "timm" and data["license"] == "apache-2.0"
    assert data["tags"] == ["image-classification", "timm", "edge-popup", "supermask"]
    assert data["datasets"] == [DATASET]
    results = data["model-index"][0]["results"][0]
    assert results["task"]["type"] == "image-classification" and results["dataset"]["type"] == DATASET
    assert {m["name"]: m["value"] for m in results["metrics"]} == {"Top-1 accuracy": 91.25, "Top-5 accuracy": 99.5}
    text = card["text"]
    # the pushed card names the repo it landed in, and the body carries what a user needs
    assert f'timm.create_model("hf-hub:{repos["vit"]}", pretrained=True)' in text
    for expected in ("| seed | 11 |", "| k (fraction of weights KEPT, per layer) | 0.3 |", "`signed_constant`",
                     "| lr | `0.1` |", "| epochs | `100` |", "ramanujan2020s", "x larger)"):
        assert expected in text, expected


def test_local_card_and_config(artifacts):
    _, dirs = artifacts
    card = ModelCard.load(dirs["cifar"] / "README.md")
    assert card.data.library_name == "timm" and card.data.eval_results[0].metric_value == 91.25
    assert f'"local-dir:{dirs["cifar"].name}"' in card.text
    config = json.loads((dirs["cifar"] / "config.json").read_text())
    assert config["architecture"] == "popup_resnet18_cifar"
    assert config["model_args"]["seed"] == 5 and config["model_args"]["k"] == 0.5
    assert config["timm_popup"]["metrics"] == METRICS and config["timm_popup"]["recipe"] == RECIPE
    assert sorted(p.name for p in dirs["cifar"].iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_wide_resnet50_2_artifact_is_under_9_mb(tmp_path):
    model = timm.create_model("popup_wide_resnet50_2")
    directory = timm_popup.save_pretrained(model, tmp_path / "wrn")
    size = (directory / "model.safetensors").stat().st_size
    assert size <= 9.0e6, size  # the fp32 dense checkpoint is ~276 MB
    assert 68_814_016 / 8 < size  # one bit per masked weight, plus BN statistics
    config = json.loads((directory / "config.json").read_text())
    assert config["timm_popup"]["dense_bytes"] > 270e6


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ERROR = r"""
import json, sys
import timm, timm_popup
spec = json.loads(sys.argv[1])
try:
    if spec["what"] == "push":
        timm_popup.push_artifact(spec["dir"], spec["repo"])
    else:
        timm.create_model(spec["name"], pretrained=True)
    print(json.dumps({"error": None}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def test_wrong_repo_unpublished_tag_and_unreachable_endpoint_are_clear_errors(artifacts, tmp_path):
    _, dirs = artifacts
    dead = client_env(f"http://127.0.0.1:{_closed_port()}", tmp_path / "hf_home2")
    # huggingface_hub retries a refused connection with backoff (~23 s, not configurable): run it alongside
    slow = subprocess.Popen([sys.executable, "-c", _ERROR, json.dumps({"what": "load", "name": _repos_registry()})],
                            env=dead, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with HubServer() as endpoint:
            env = client_env(endpoint, tmp_path / "hf_home")
            missing_repo = _run(_ERROR, env, {"what": "load", "name": f"hf-hub:{ORG}/no-such-mask"})
            unpublished = _run(_ERROR, env, {"what": "load", "name": "popup_resnet50.ep_k30_in1k"})
        pushed = _run(_ERROR, dead, {"what": "push", "dir": str(dirs["cifar"]), "repo": f"{ORG}/x"})
        out, err = slow.communicate(timeout=TIMEOUT)
    finally:
        slow.kill()
    loaded = json.loads(out.strip().splitlines()[-1])
    assert missing_repo["error"] == "RepositoryNotFoundError" and f"{ORG}/no-such-mask" in missing_repo["message"]
    assert unpublished["error"] == "RuntimeError"
    assert "may not have published it yet" in unpublished["message"] and "hf-hub:" in unpublished["message"]
    assert pushed["error"] == "RuntimeError" and "could not push to popup-tests/x on http://127.0.0.1:" in \
        pushed["message"], pushed
    assert loaded["error"] == "RuntimeError" and "could not download the mask" in loaded["message"], (loaded, err)
    assert "pytorch_model.bin" not in err  # only the safetensors mask is ever looked up


def _repos_registry() -> str:
    return MODELS["cifar"][3]


def test_push_refuses_a_folder_that_is_not_a_valid_artifact(artifacts, tmp_path):
    _, dirs = artifacts
    with pytest.raises(MaskError, match="not a timm-popup artifact .*missing config.json, model.safetensors"):
        timm_popup.push_artifact(tmp_path, f"{ORG}/x")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((dirs["cifar"] / name).read_bytes())
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    # checked before any network call: HF_ENDPOINT is not even set up for this process
    with pytest.raises(MaskError, match="checksum does not match"):
        timm_popup.push_artifact(broken, f"{ORG}/x")


def test_save_pretrained_bad_inputs(tmp_path):
    with pytest.raises(MaskError, match="no popup layers"):
        timm_popup.save_pretrained(timm.create_model("resnet18"), tmp_path / "dense")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError, match="cannot create the output directory .*choose a writable path"):
        timm_popup.save_pretrained(timm.create_model("popup_conv2"), tmp_path / "file" / "out")


_PICKLE_TRAP = r"""
import json, os, pickle, sys
from pathlib import Path
from huggingface_hub import HfApi
import timm, timm_popup

spec = json.loads(sys.argv[1])
marker = Path(spec["marker"])


class Trap:
    def __reduce__(self):  # unpickling this runs code: it must never happen
        return (os.system, (f"touch {marker}",))


api = HfApi()
for repo in spec["repos"]:
    api.create_repo(repo, exist_ok=True)
    api.upload_file(path_or_fileobj=pickle.dumps({"weight": Trap()}), path_in_repo="pytorch_model.bin", repo_id=repo)
    api.upload_file(path_or_fileobj=spec["config"].encode(), path_in_repo="config.json", repo_id=repo)
errors = []
for name in spec["names"]:
    try:
        timm.create_model(name, pretrained=True)
        errors.append(None)
    except Exception as e:
        errors.append(type(e).__name__)
print(json.dumps({"errors": errors, "unpickled": marker.exists()}))
"""


def test_a_repo_holding_only_a_pickle_is_never_unpickled(artifacts, tmp_path):
    """Registry and hf-hub: ask for model.safetensors only; timm's pytorch_model.bin fallback is never reached."""
    _, dirs = artifacts
    registry_repo = _repos()["cifar"]
    spec = dict(marker=str(tmp_path / "unpickled"), config=(dirs["cifar"] / "config.json").read_text(),
                repos=[registry_repo, f"{ORG}/pickle-only"],
                names=[MODELS["cifar"][3], f"hf-hub:{ORG}/pickle-only"])
    with HubServer() as endpoint:
        result = _run(_PICKLE_TRAP, client_env(endpoint, tmp_path / "hf_home"), spec)
    assert result["errors"] == ["RuntimeError", "RuntimeError"], result  # "could not download the mask ..."
    assert not result["unpickled"] and not (tmp_path / "unpickled").exists()


# -------------------------------------------------------------------------------------- the card a person reads


def _tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table markdown-it-py (CommonMark + GFM tables) finds: (header cells, body rows of cells)."""
    from markdown_it import MarkdownIt

    tables, row, cells, header = [], None, [], None
    for token in MarkdownIt("commonmark").enable("table").parse(markdown):
        if token.type == "table_open":
            header, cells = None, []
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            if header is None:
                header = row
            else:
                cells.append(row)
            row = None
        elif token.type == "table_close":
            tables.append((header, cells))
    return tables


def _headings(markdown: str) -> list[str]:
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(markdown)
    return [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]


@pytest.fixture(scope="module")
def named_artifact(tmp_path_factory):
    """A grayscale 28x28 Conv4 with named classes, as train_accelerate.py writes it."""
    names = ("T-shirt/top", "Trouser", "Pullover")
    overlay = dict(input_size=(1, 28, 28), mean=(0.29,), std=(0.35,), crop_pct=1.0, label_names=names, num_classes=3)
    model = timm.create_model("popup_conv4", num_classes=3, in_chans=1, img_size=28, width=0.25,
                              pretrained_cfg_overlay=overlay)
    recipe = dict(RECIPE, augmentation="pad-crop 4", model_kwargs='{"width": 0.25}')
    directory = timm_popup.save_pretrained(model.eval(), tmp_path_factory.mktemp("named") / "fmnist",
                                           metrics=METRICS, dataset="zalando-datasets/fashion_mnist", recipe=recipe)
    return directory, names


def test_card_renders_like_timms_with_whole_tables(artifacts, named_artifact):
    _, dirs = artifacts
    for directory in [*dirs.values(), named_artifact[0]]:
        card = ModelCard.load(directory / "README.md")
        text = card.text
        tables = _tables(text)
        # every table line belongs to a parsed table: nothing fell out as a stray paragraph
        table_lines = [line for line in text.splitlines() if line.startswith("|")]
        assert len(table_lines) == sum(2 + len(rows) for _, rows in tables), directory
        mask, results, recipe = tables
        assert mask[0] == ["mask", "value"] and len(mask[1]) == 8
        assert results[0] == ["metric", "value"] and len(results[1]) == len(METRICS)
        assert recipe[0] == ["hyper-parameter", "value"] and len(recipe[1]) >= len(RECIPE)
        for header, rows in tables:
            assert all(len(row) == len(header) and row[0] for row in rows), (header, rows)
        headings = _headings(text)
        for section in ("Model Details", "Results", "Model Usage", "Image Classification", "Training recipe",
                        "Citation"):
            assert section in headings, (section, headings)
        for expected in ("Params (M): ", "GMACs: ", "Activations (M): ", "Image size: ", "https://arxiv.org/abs/1911",
                         "resolve_model_data_config", "create_transform(**data_config, is_training=False)",
                         "torch.topk", "pip install ./timm-popup", "the directory that holds its `pyproject.toml`"):
            assert expected in text, expected
        _assert_names_no_undeclared_address(text)
    config = json.loads((dirs["resnet"] / "config.json").read_text())
    assert config["timm_popup"]["stats"]["params"] == 11_181_642  # resnet18, 10 classes (timm: 11.18 M)
    card = (dirs["resnet"] / "README.md").read_text()
    assert "GMACs: 1.81" in card and "Activations (M): 2.48" in card and "Image size: 224 x 224" in card  # timm's


def _assert_names_no_undeclared_address(card: str) -> None:
    """Every web address a card names is a paper's, or the source address the package metadata declares."""
    from timm_popup.hub import source_url

    allowed = {"https://arxiv.org/abs/1911.13299", *filter(None, [source_url()])}
    addresses = set(re.findall(r"https?://[^\s)\]\"'>]+", card))
    assert addresses <= allowed | {a for a in addresses if a.startswith("https://arxiv.org/abs/")}, addresses
    assert "pip install timm-popup" not in card  # no package index serves it


def test_card_source_address_comes_from_the_package_metadata_only(named_artifact, monkeypatch):
    import importlib.metadata

    from timm_popup import hub

    directory, _ = named_artifact
    # this package declares none ([project.urls] in pyproject.toml): no link, and an install line that works
    assert hub.source_url() is None
    card = hub._render_card(directory, None).text
    assert "**Original:**" not in card and "[timm-popup](" not in card and "git+" not in card
    assert "timm-popup (0.1.0 wrote this card) has no public source address" in card
    _assert_names_no_undeclared_address(card)
    for path in (ROOT / "timm_popup" / "pretrained").glob("*/README.md"):  # the cards that ship in the package
        _assert_names_no_undeclared_address(path.read_text())
        assert "pip install ./timm-popup" in path.read_text(), path
    # declared: the link and the install line use it, and nothing else
    real = importlib.metadata.metadata("timm-popup")

    class Declared:
        def get_all(self, name):
            return ["Documentation, https://docs.example.org/popup", "Source, https://git.example.org/lab/popup"] \
                if name == "Project-URL" else real.get_all(name)

    monkeypatch.setattr(hub, "metadata", lambda name: Declared())
    assert hub.source_url() == "https://git.example.org/lab/popup"
    card = hub._render_card(directory, None).text
    assert "[timm-popup](https://git.example.org/lab/popup)" in card
    assert "**Original:** https://git.example.org/lab/popup" in card
    assert 'pip install "timm-popup @ git+https://git.example.org/lab/popup"' in card
    assert "pip install ./timm-popup" not in card and "docs.example.org" not in card


def test_card_usage_code_runs_and_names_the_classes(named_artifact, tmp_path):
    directory, names = named_artifact
    card = ModelCard.load(directory / "README.md")
    assert f"**Classes:** 3: {', '.join(names)}" in card.text
    assert "| augmentation | `pad-crop 4` |" in card.text
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    from PIL import Image

    Image.new("L", (28, 28), 128).save(directory.parent / "image.png")
    proc = subprocess.run([sys.executable, "-c", code], cwd=directory.parent, capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()
    assert len(printed) == 3 and sorted(line.rsplit(":", 1)[0] for line in printed) == sorted(names), printed


def test_push_preflight_names_what_is_missing(monkeypatch):
    """check_push_access's answers to a read-only token and to a repo it may not write (the loopback server's
    token always writes; the unreachable endpoint and the missing token run end to end in test_train.py)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from timm_popup.hub import PushError, check_push_access

    def whoami(role):
        return lambda self, *a, **k: {"name": "me", "auth": {"accessToken": {"role": role}}}

    created = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: created.append((repo_id, kwargs))
                        or f"https://hub.example/{repo_id}")
    monkeypatch.setattr(HfApi, "whoami", whoami("read"))
    with pytest.raises(PushError, match="the token is read-only"):
        check_push_access("org/name")
    assert not created
    monkeypatch.setattr(HfApi, "whoami", whoami("write"))
    assert check_push_access("org/name", private=True) == "https://hub.example/org/name"
    assert created == [("org/name", dict(repo_type="model", private=True, exist_ok=True))]

    class Forbidden:  # the parts of an HTTP response HfHubHTTPError reads
        status_code, headers, url, text, request = 403, {}, "https://hub.example/api/repos/create", "", None

    def forbidden(self, repo_id, **kwargs):
        raise HfHubHTTPError("403 Forbidden: you don't have the rights to create a model under this namespace",
                             response=Forbidden())

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    with pytest.raises(PushError, match=r"cannot create or use the repo .* \(no write access\)"):
        check_push_access("someone-else/name")
