"""The paper code's options (issue 26): learned norms and biases, the weight distribution's fan mode, gain and
scale_fan, score initialisation. Each trains what it says and nothing else, round-trips through local-dir and the
loopback Hub with identical outputs, and a wrong value on load is one line; the defaults leave artifacts as they were
(tests/test_artifact_bytes.py)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from test_methods import TINY, data, run  # noqa: F401  (module-scoped fixtures)
from torch import nn

import timm_popup
from timm_popup.export import export_plain
from timm_popup.init import check_weight_init, fans, init_std, random_weight
from timm_popup.maskfile import META, checksum, read_mask_file, write_mask_file
from timm_popup.masks import MaskError, filter_state_dict, load_masks
from timm_popup.methods import make_mask_method, make_supermask

try:
    from hub_server import HubServer, client_env
except ImportError:  # tests/ turned into a package
    from tests.hub_server import HubServer, client_env

ARCH = "popup_resnet18"  # BatchNorm layers and a classifier bias
BUILD = dict(num_classes=10)
#: one artifact per option: name -> create_model arguments
OPTIONS = {
    "learn_norm": dict(learn_norm=True),
    "learn_bias": dict(learn_bias=True),
    "distribution": dict(weight_init="kaiming_normal", init_mode="fan_out", nonlinearity="leaky_relu",
                         scale_fan=True),
    "score_init": dict(score_init="constant=0.25"),
    "gem_miner": dict(method="gem-miner"),  # the method (tests/test_gem_miner.py), through the same round trip
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.bn(self.conv(x)).mean((2, 3))))


def _one_step(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` (parameters and buffers, masked weights as read) before one SGD step on it."""
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    opt.step()
    return before


@pytest.mark.parametrize("learn", [dict(learn_norm=True), dict(learn_bias=True), {}])
def test_learn_norm_and_learn_bias_train_what_they_say_and_nothing_else(learn):
    model = timm_popup.convert(Tiny(), k=0.5, seed=1, **learn)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("scores"))
    expected = {"learn_norm": ["bn.bias", "bn.weight", "ln.bias", "ln.weight"], "learn_bias": ["conv.bias", "fc.bias"]}
    assert trainable == sorted(n for key in learn for n in expected[key])
    cfg = model.popup_config
    assert set(cfg.learned) == set(trainable) and not set(cfg.learned) & set(cfg.frozen)
    before = _one_step(model)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    moved = sorted(n for n, t in before.items() if not torch.equal(t, after[n]))
    # the policy's starting values, then trained: scores, the learned tensors, BatchNorm statistics; weights never
    assert [n for n in moved if not n.endswith(("scores", "running_mean", "running_var", "num_batches_tracked"))] \
        == trainable
    assert all(torch.equal(before[n], torch.ones_like(before[n]) if n.endswith("weight") else torch.zeros_like(
        before[n])) for n in trainable)


def test_distribution_options_follow_the_paper_codes_builder():
    shape, k = (6, 4, 3, 3), 0.25
    fan_in, fan_out = fans(shape)
    gain = torch.nn.init.calculate_gain("tanh")
    spec = check_weight_init("signed_constant,nonlinearity=tanh,mode=fan_out,scale_fan")
    assert spec == "signed_constant,mode=fan_out,nonlinearity=tanh,scale_fan"  # one canonical name
    w = random_weight(shape, seed=0, name="w", weight_init=spec, k=k)
    assert torch.allclose(w.abs(), torch.full(shape, gain / math.sqrt(fan_out) * math.sqrt(1 / k)))
    # relu / fan_in / unscaled is the old name and the old value, bit for bit
    assert check_weight_init("signed_constant,mode=fan_in,nonlinearity=relu") == "signed_constant"
    assert init_std("kaiming_normal,scale_fan", shape, k) == init_std("scaled_kaiming_normal", shape, k)
    assert init_std("kaiming_normal", shape) == math.sqrt(2.0 / fan_in)
    for bad, says in [("kaiming_normal,mode=fan_avg", "init mode"), ("kaiming_normal,nonlinearity=gelu", "gelu"),
                      ("xavier_normal,mode=fan_out", "xavier_normal has no mode"),
                      ("scaled_signed_constant,scale_fan", "already scaled")]:
        with pytest.raises(ValueError, match=says) as e:
            check_weight_init(bad)
        assert "\n" not in str(e.value)


def test_score_init_choices_and_the_sampled_supermask_constant():
    default = timm_popup.convert(Tiny(), seed=3)
    uniform = timm_popup.convert(Tiny(), seed=3, score_init="uniform")
    constant = timm_popup.convert(Tiny(), seed=3, score_init="constant=-0.5")
    name = "conv.weight"
    bound = 1 / math.sqrt(fans((8, 3, 3, 3))[0])
    s = timm_popup.popup_masks(default)[name].scores
    assert s.abs().max() <= bound and s.min() < 0  # Kaiming uniform, unchanged
    u = timm_popup.popup_masks(uniform)[name].scores
    assert u.min() >= 0 and u.max() <= 1 and u.std() > 0.2
    # the paper code's --score-init-constant: the sampled supermask starts exactly there
    make_supermask(constant)
    assert all(bool((m.scores == -0.5).all()) for m in timm_popup.popup_masks(constant).values())
    with pytest.raises(ValueError, match="unknown score_init"):
        timm_popup.convert(Tiny(), score_init="constant=x")


def _trained(options: dict) -> nn.Module:
    options = dict(options)
    method = options.pop("method", None)
    model = timm.create_model(ARCH, seed=4, **BUILD, **options)
    if method:
        make_mask_method(model, method)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # scores and whatever else trains, as after training
    model.train()(torch.randn(4, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    torch.manual_seed(0)
    out = {}
    for name, options in OPTIONS.items():
        model = _trained(options)
        directory = timm_popup.save_pretrained(model, root / name)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            safetensors.torch.save_file({"x": x, "y": model(x)}, str(root / f"{name}.io.safetensors"))
        out[name] = (directory, model)
    return root, out


_LOAD = r"""
import json, sys
import safetensors.torch, timm, torch
import timm_popup

spec, out = json.loads(sys.argv[1]), {}
for name, m in spec.items():
    io = safetensors.torch.load_file(m["io"])
    for route in ("local-dir", "hf-hub"):
        if route == "hf-hub":
            timm_popup.push_artifact(m["dir"], m["repo"])
        model = timm.create_model(f"{route}:" + (m["dir"] if route == "local-dir" else m["repo"]), pretrained=True)
        cfg = model.eval().popup_config
        with torch.no_grad():
            out[f"{name}/{route}"] = dict(equal=bool(torch.equal(model(io["x"]), io["y"])), weight_init=cfg.weight_init,
                                          learn_norm=cfg.learn_norm, learn_bias=cfg.learn_bias)
print(json.dumps(out))
"""


def test_each_option_round_trips_through_local_dir_and_the_hub(saved, tmp_path):
    root, dirs = saved
    spec = {name: dict(dir=str(d), repo=f"popup-tests/{name.replace('_', '-')}",
                       io=str(root / f"{name}.io.safetensors")) for name, (d, _) in dirs.items()}
    with HubServer() as endpoint:
        proc = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(spec)],
                              env=client_env(endpoint, tmp_path / "hf"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, model) in dirs.items():
        for route in ("local-dir", "hf-hub"):
            r = results[f"{name}/{route}"]
            assert r["equal"], (name, route)
            cfg = model.popup_config
            assert (r["weight_init"], r["learn_norm"], r["learn_bias"]) == (cfg.weight_init, cfg.learn_norm,
                                                                            cfg.learn_bias)


def test_the_artifact_records_each_option_and_the_card_says_it(saved, capsys):
    from timm_popup.cli import main as cli

    _, dirs = saved
    assert cli(["info", str(dirs["learn_norm"][0])]) == 0
    assert re.search(r"^learned\s+learn_norm \(trained with the scores", capsys.readouterr().out, re.M)
    header = {name: read_mask_file(d / "model.safetensors") for name, (d, _) in dirs.items()}
    assert int(header["learn_norm"][META + "learn_norm"].item()) == 1
    assert META + "learn_bias" not in header["learn_norm"]
    assert "bn1.weight" in header["learn_norm"] and "fc.bias" in header["learn_bias"]
    assert bytes(header["distribution"][META + "weight_init"].tolist()).decode() == \
        "kaiming_normal,mode=fan_out,nonlinearity=leaky_relu,scale_fan"
    assert all(int(sd[META + "format_version"].item()) == 4 for n, sd in header.items() if n != "score_init")
    assert bytes(header["gem_miner"][META + "method"].tolist()).decode() == "gem-miner"
    assert int(header["score_init"][META + "format_version"].item()) == 2  # scores are not published
    cards = {name: (d / "README.md").read_text() for name, (d, _) in dirs.items()}
    assert "norm layers' scale and shift" in cards["learn_norm"] and "the biases (from 0)" in cards["learn_bias"]
    assert "`constant=0.25`" in cards["score_init"]
    assert "mode=fan_out" in cards["distribution"]


def test_a_wrong_value_on_load_is_one_line(saved, tmp_path):
    _, dirs = saved
    norm_dir, distribution_dir = dirs["learn_norm"][0], dirs["distribution"][0]
    wrong = [
        (dict(learn_norm=False), norm_dir, "found with learn_norm=True but the model was built with learn_norm=False"),
        (dict(init_mode="fan_in"), distribution_dir, "found with weight_init="),
    ]
    for kwargs, directory, says in wrong:
        with pytest.raises(MaskError, match=says) as e:
            timm.create_model(f"local-dir:{directory}", pretrained=True, **kwargs)
        assert "\n" not in str(e.value)
    # a model that learns norms cannot take a mask found with them frozen
    with pytest.raises(MaskError, match="learn_norm=False but the model was built with learn_norm=True"):
        load_masks(timm.create_model(ARCH, learn_norm=True, **BUILD), dirs["learn_bias"][0] / "model.safetensors")
    # a file that says its norms were learned but lost their values
    sd = read_mask_file(norm_dir / "model.safetensors")
    del sd["layer1.0.bn1.weight"]
    sd[META + "checksum"] = checksum(sd)
    write_mask_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(MaskError, match="holds no value for layer1.0.bn1.weight") as e:
        load_masks(timm.create_model(ARCH, **BUILD), tmp_path / "model.safetensors")
    assert "\n" not in str(e.value)


def test_a_default_model_adopts_what_the_artifact_learned_and_export_folds_it(saved):
    _, dirs = saved
    directory, trained = dirs["learn_norm"]
    model = load_masks(timm.create_model(ARCH, **BUILD), directory / "model.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert model.popup_config.learn_norm and "bn1.weight" in dict(model.named_parameters())
    plain, diff = export_plain(model, "resnet18", input_size=(3, 32, 32))
    assert not torch.equal(plain.bn1.weight, torch.ones_like(plain.bn1.weight))  # the learned scale, folded
    assert torch.equal(plain.bn1.weight, model.bn1.weight.detach())


@pytest.mark.parametrize("method", ["supermask", "global-topk", "biprop", "iterand", "signed-supermask",
                                    "slot-machine", "gem-miner"])
def test_every_mask_method_takes_learned_norms_and_biases(method):
    def build(**kwargs) -> nn.Module:
        return timm_popup.convert(Tiny(), k=1.0 if method == "slot-machine" else 0.5, seed=2, **kwargs)

    model = build(learn_norm=True, learn_bias=True)
    if method == "supermask":
        make_supermask(model)
    else:
        make_mask_method(model, method)
    assert sorted(n for n, p in model.named_parameters() if not n.endswith("scores")) == [
        "bn.bias", "bn.weight", "conv.bias", "fc.bias", "ln.bias", "ln.weight"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p))
    model.eval()
    loaded = build()
    loaded.load_state_dict(filter_state_dict(timm_popup.masks.mask_state_dict(model), loaded))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert loaded.popup_config.method == method and loaded.popup_config.learn_norm and loaded.popup_config.learn_bias


def test_the_training_script_takes_each_option_and_records_it(run, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert run([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "1", "--init-mode", "fan_out",
                "--nonlinearity", "tanh", "--scale-fan", "--score-init-constant", "0.5", "--method", "supermask"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["weight_init"] == "signed_constant,mode=fan_out,nonlinearity=tanh,scale_fan"
    assert config["model_args"]["score_init"] == "constant=0.5"
    assert "`constant=0.5`" in (out / "README.md").read_text()
    for flags, says in [(["--score-init", "gaussian"], "unknown score_init 'gaussian'"),
                        (["--score-init", "uniform", "--score-init-constant", "1"], "pass one"),
                        (["--weight-init", "xavier_normal", "--init-mode", "fan_out"], "xavier_normal has no mode"),
                        (["--freeze-every", "2"], "--freeze-every is an option of --method gem-miner")]:
        capsys.readouterr()
        assert run([*TINY, "--dataset", str(data), "--output-dir", str(tmp_path / "bad"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
