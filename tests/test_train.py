"""train_accelerate.py end to end on tiny generated datasets (CPU, nothing downloaded), and timm_popup.train.

The expensive runs (``accelerate launch`` subprocesses) are module-scoped fixtures shared by several tests:
one uninterrupted single-process run (which also pushes to a loopback Hub), a run killed after its first
checkpoint and resumed, and a 2-process bf16 run. Cheaper variants run in-process through ``main(argv)``.
"""

from __future__ import annotations

import os

# Before datasets / huggingface_hub are imported: both read these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import timm  # noqa: E402
import timm.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import timm_popup  # noqa: E402
from timm_popup import runstate, train  # noqa: E402
from timm_popup.data import DataError, load_image_dataset  # noqa: E402
from timm_popup.methods import get_method, load_dense  # noqa: E402

try:
    from hub_server import HubServer
except ImportError:  # tests/ turned into a package
    from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_accelerate.py"
TIMEOUT = 300
CLASSES = ["red", "green", "blue", "square"]
# popup_conv2 at 1/8 width: 8-channel convs, a few ms per step on a CPU.
TINY = ["--model", "popup_conv2", "--model-kwargs", "width=0.125", "--batch-size", "16", "--workers", "0",
        "--log-every", "1"]
REPO = "popup-tests/conv2-run"
CPUS = len(os.sched_getaffinity(0))


def _images(n: int, seed: int, size: int = 32, mode: str = "RGB") -> tuple[list[Image.Image], list[int]]:
    """Noisy images whose class shows as a tinted channel (or a bright square): learnable, not trivial."""
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    images = []
    for y in labels:
        a = rng.integers(0, 140, (size, size, 3)).astype(np.uint8)
        if y < 3:
            a[:, :, y] += rng.integers(30, 100, dtype=np.uint8)
        else:
            a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 80
        img = Image.fromarray(a)
        images.append(img.convert(mode) if mode != "RGB" else img)
    return images, labels


def _split(n: int, seed: int, *, image_col: str = "image", label_col: str = "label", **kwargs) -> datasets.Dataset:
    images, labels = _images(n, seed, **kwargs)
    features = datasets.Features({image_col: datasets.Image(), label_col: datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({image_col: images, label_col: labels}, features=features)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shapes"
    datasets.DatasetDict({"train": _split(96, 0), "test": _split(48, 1)}).save_to_disk(str(path))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate() -> str:
    local = Path(sys.executable).parent / "accelerate"
    return str(local) if local.exists() else (shutil.which("accelerate") or "accelerate")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "ACCELERATE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def _launch_cmd(args: list[str], processes: int = 1, precision: str = "no") -> list[str]:
    flags = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", precision,
             "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    if processes > 1:
        flags.insert(0, "--multi_gpu")
    return [_accelerate(), "launch", *flags, str(SCRIPT), *args]


def _launch(args: list[str], *, processes: int = 1, precision: str = "no", env: dict | None = None) -> str:
    proc = subprocess.run(_launch_cmd(args, processes, precision), cwd=ROOT, env=env or _env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"rc={proc.returncode}\n{out[-6000:]}"
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / train.METRICS_JSONL).read_text().splitlines()]


def _masks(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in safetensors.torch.load_file(str(run / "model.safetensors")).items()
            if k.endswith(".mask")}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_accelerate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture
def in_process(script, monkeypatch):
    """Run ``main(argv)`` here: a fresh Accelerate state each time, the global RNG and thread count left as they
    were."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()

    def run(argv: list[str]) -> int:
        AcceleratorState._reset_state(True)
        return script.main(argv)

    yield run
    AcceleratorState._reset_state(True)
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)  # the script sets its own count


# ------------------------------------------------------------------------------------------- the main run


MAIN_ARGS = [*TINY, "--epochs", "3", "--keep-checkpoints", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def main_run(data, tmp_path_factory):
    """One uninterrupted `accelerate launch` run (3 epochs), pushed to a loopback Hub at the end."""
    out = tmp_path_factory.mktemp("main") / "run"
    server = HubServer()
    url = server.start()
    try:
        env = _env(HF_ENDPOINT=url, HF_TOKEN="dummy-token", HF_HOME=str(out.parent / "hf"), HF_HUB_DISABLE_XET="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        env.pop("HF_HUB_OFFLINE")
        log = _launch([*MAIN_ARGS, "--dataset", str(data), "--output-dir", str(out), "--push-to-hub", REPO], env=env)
        repo = server.root / "repos" / "model" / REPO
        head = json.loads((repo / "refs.json").read_text())["main"]
        tree = json.loads((repo / "commits" / f"{head}.json").read_text())["tree"]
        pushed = {path: (server.root / "objects" / e["oid"][:2] / e["oid"][2:]).read_bytes()
                  for path, e in tree.items()}
    finally:
        server.stop()
    return out, log, pushed


def test_artifact_loads_and_reproduces_logged_accuracy(main_run, data):
    out, log, _ = main_run
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    # the artifact is config.json (preprocessing: the data's own mean/std) + model.safetensors (the mask)
    preprocessing = {key: tuple(config["pretrained_cfg"][key]) for key in ("mean", "std")}
    assert preprocessing["mean"] != timm.models.get_pretrained_cfg("popup_conv2").mean
    model = timm.create_model("popup_conv2", pretrained=True, width=0.125, num_classes=len(CLASSES),
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), **preprocessing))
    ds = train.load_data(str(data))
    _, val_loader, _ = train.build_loaders(ds, timm.data.resolve_data_config({}, model=model), batch_size=16, workers=0,
                                        seed=0)
    measured = train.evaluate(model, val_loader)
    assert measured["top1"] == rows[-1]["val_top1"]
    assert measured["top5"] == rows[-1]["val_top5"]
    assert measured["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    assert 25 < measured["top1"] <= 100  # it learned something on 4 classes
    assert config["timm_popup"]["metrics"]["top1"] == rows[-1]["val_top1"]
    assert config["timm_popup"]["recipe"]["epochs"] == 3 and config["timm_popup"]["recipe"]["seed"] == 7
    assert config["timm_popup"]["dataset"] == data.name
    card = (out / "README.md").read_text()
    assert "Top-1 accuracy" in card and f"{rows[-1]['val_top1']:.4g}" in card
    # the same artifact through config.json (local-dir:) predicts the same
    again = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))


def test_log_checkpoints_and_progress(main_run):
    out, log, _ = main_run
    assert (out / train.METRICS_CSV).read_text().splitlines()[0].startswith("epoch,lr,train_loss,train_top1,val_loss")
    assert len((out / train.METRICS_CSV).read_text().splitlines()) == 4
    assert [p.name for p in train.list_checkpoints(out)] == ["epoch_0002", "epoch_0003"]  # keep the last 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    ckpt = out / "checkpoints" / "epoch_0003"
    state = json.loads((ckpt / train.TRAINER_STATE).read_text())
    assert state["epoch"] == 3 and state["run"]["seed"] == 7 and state["num_updates"] == 3 * (96 // 16)
    # the checkpoint holds scores, never a weight
    assert all(name.endswith("scores") for name in safetensors.torch.load_file(str(ckpt / "model.safetensors")))
    assert "epoch 3/3: train loss" in log and "all 1 process(es) hold the same mask" in log
    assert "recipe cifar: 3 epochs, global batch 16" in log
    # `accelerate launch` gave the process OMP_NUM_THREADS=1; the run computes with every CPU it may use
    assert f"threads: {CPUS} per process (the {CPUS} CPUs this process may use" in log
    assert state["run"]["threads"] == CPUS
    # TensorBoard (a dependency, so on by default): one scalar per epoch, the same values as the CSV
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))  # the scalars; hparams go to a subdirectory
    acc.Reload()
    logged = [(e.step, round(e.value, 4)) for e in acc.Scalars("val_top1")]
    assert logged == [(r["epoch"], round(r["val_top1"], 4)) for r in _rows(out)]


def test_push_to_hub_uploads_the_artifact_only(main_run):
    out, log, pushed = main_run
    assert "pushed to" in log
    assert set(pushed) - {".gitattributes"} == {"config.json", "model.safetensors", "README.md"}
    assert pushed["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert f"hf-hub:{REPO}" in pushed["README.md"].decode()


# ---------------------------------------------------------------------------------------- kill and resume


def test_killed_run_resumes_to_the_same_mask(main_run, data, tmp_path):
    reference = main_run[0]
    out = tmp_path / "run"
    args = [*MAIN_ARGS, "--dataset", str(data), "--output-dir", str(out)]
    proc = subprocess.Popen(_launch_cmd(args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    first = out / "checkpoints" / "epoch_0001"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher process group, mid-run
    finally:
        proc.wait(timeout=60)
    assert first.is_dir(), proc.stdout.read().decode()[-4000:]
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    done = train.list_checkpoints(out)[-1]
    assert int(done.name.split("_")[1]) < 3

    log = _launch([*args, "--resume", "latest"])
    assert f"resumed from {done}" in log
    masks, expected = _masks(out), _masks(reference)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in expected)
    # (both ran with the same thread count: another count sums in another order)
    assert {train.read_trainer_state(train.list_checkpoints(run)[-1])["run"]["threads"]
            for run in (out, reference)} == {CPUS}
    # every epoch logged exactly once, with the same numbers as the uninterrupted run
    keys = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
    assert [{k: r[k] for k in keys} for r in _rows(out)] == [{k: r[k] for k in keys} for r in _rows(reference)]


# ------------------------------------------------------------------- preemption, recovery checkpoints, one run per dir


# augmented (the draws must repeat too), a recovery checkpoint every 2 updates, 6 updates per epoch on one process
PREEMPT_ARGS = [*TINY, "--epochs", "2", "--hflip", "0.5", "--pad-crop", "4", "--checkpointing-steps", "2",
                "--seed", "3", "--cpu"]
# the preemption recipe on a network with BatchNorm
BN_PREEMPT_ARGS = ["--model", "popup_test_resnet", "--img-size", "32",
                   *PREEMPT_ARGS[PREEMPT_ARGS.index("--batch-size"):]]


@pytest.fixture(scope="module")
def preempt_reference(data, tmp_path_factory):
    """The uninterrupted runs the interrupted ones must end equal to: one process, and two (another global batch)."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp("preempt") / f"reference-{processes}"
        _launch([*PREEMPT_ARGS, "--dataset", str(data), "--output-dir", str(out)], processes=processes)
        assert not train.list_checkpoints(out)[-1].name.startswith("step_")  # recovery ones end with their epoch
        runs[processes] = out
    return runs


def _interrupt(args: list[str], out: Path, sig: signal.Signals, when: str, *, processes: int = 1,
               pause: str | None = None) -> str:
    """Launch a run and send ``sig`` to its whole process tree (as a scheduler does) once ``out/when`` exists; with
    ``pause``, the run stops inside the write of that checkpoint until signalled (``when`` is then ignored)."""
    marker = out.parent / f"{out.name}-writing"
    env = _env(TIMM_POPUP_PAUSE_IN_CHECKPOINT=f"{pause}={marker}") if pause else _env()
    when = marker if pause else out / when
    proc = subprocess.Popen(_launch_cmd([*args, "--output-dir", str(out), "--resume", "latest"], processes), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not when.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, sig)
        marker.unlink(missing_ok=True)  # the paused write goes on (unless killed)
        log = proc.communicate(timeout=TIMEOUT)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert when.exists() or pause, log[-4000:]
    assert not (out / "model.safetensors").exists(), "the run finished before it could be stopped"
    return log


def _same_run(out: Path, reference: Path) -> None:
    """The artifact's mask file byte for byte, and every epoch's logged numbers, equal the uninterrupted run's."""
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    keys = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
    assert [{k: r[k] for k in keys} for r in _rows(out)] == [{k: r[k] for k in keys} for r in _rows(reference)]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (out / runstate.LOCK_FILE).exists()


def test_sigterm_then_sigkill_mid_epoch_resume_to_the_same_bytes(preempt_reference, data, tmp_path):
    out, args = tmp_path / "run", [*PREEMPT_ARGS, "--dataset", str(data), "--workers", "2"]
    # SIGTERM (to the launcher and the run, as a scheduler sends it) while step_00000002 is written: that write
    # completes, the processes agree at the next update, write a checkpoint there and say so in one line
    log = _interrupt(args, out, signal.SIGTERM, "", pause="step_00000002")
    stopped = re.search(r"stopped by SIGTERM after step (3) of epoch 1; saved (\S+); resume with: accelerate launch "
                        r"\S*train_accelerate\.py (.*) --resume latest \(exit status 75\)", log)
    assert stopped, log[-4000:]
    assert [p.name for p in train.list_checkpoints(out)] == ["step_00000002", "step_00000003"]
    assert Path(stopped[2]).name == "step_00000003" and "--output-dir" in stopped[3]
    # resumed inside epoch 1, then SIGKILL after a recovery checkpoint in epoch 2
    log = _interrupt(args, out, signal.SIGKILL, "checkpoints/step_00000008")
    assert f"resumed from {stopped[2]} (epoch 0 done, {stopped[1]} updates, then step {stopped[1]} of epoch 1)" in log
    newest = train.list_checkpoints(out)[-1]
    assert newest.name.startswith("step_")
    log = _launch([*args, "--output-dir", str(out), "--resume", "latest"])
    assert f"resumed from {newest}" in log and "of epoch 2)" in log
    _same_run(out, preempt_reference[1])  # with 2 workers where the reference had none: the draws are per example


def test_sigkill_inside_a_checkpoint_write_leaves_the_one_before_usable(preempt_reference, data, tmp_path):
    out, args = tmp_path / "run", [*PREEMPT_ARGS, "--dataset", str(data)]
    _interrupt(args, out, signal.SIGKILL, "", pause="step_00000004")  # its tensors on disk, not yet complete
    partial = out / "checkpoints" / ".tmp-step_00000004"
    assert (partial / "model.safetensors").is_file() and not (out / "checkpoints" / "step_00000004").exists()
    assert train.find_checkpoint("latest", out).name == "step_00000002"
    log = _launch([*args, "--output-dir", str(out), "--resume", "latest"])
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'}" in log
    _same_run(out, preempt_reference[1])


def test_two_processes_stop_together_and_resume_to_the_same_bytes(preempt_reference, data, tmp_path, in_process,
                                                                   capsys, monkeypatch):
    out, args = tmp_path / "run", [*PREEMPT_ARGS, "--dataset", str(data), "--workers", "2", "--checkpointing-steps",
                                   "1"]
    log = _interrupt(args, out, signal.SIGTERM, "", processes=2, pause="step_00000001")
    assert re.search(r"stopped by SIGTERM after step 2 of epoch 1; saved \S+step_00000002; resume with: accelerate "
                     r"launch --multi_gpu --num_processes 2 \S*train_accelerate.py", log), log[-4000:]
    newest = train.list_checkpoints(out)[-1]
    assert {p.name for p in newest.glob("progress_*.json")} == {"progress_0.json", "progress_1.json"}
    _resumed_by_one_process_trains_the_rest_of_the_epoch_once(in_process, capsys, monkeypatch, args, out, tmp_path)
    log = _launch([*args, "--output-dir", str(out), "--resume", "latest"], processes=2)
    assert f"resumed from {newest}" in log
    _same_run(out, preempt_reference[2])


def _resumed_by_one_process_trains_the_rest_of_the_epoch_once(in_process, capsys, monkeypatch, args: list[str],
                                                              out: Path, tmp_path: Path) -> None:
    """A copy of the 2-process recovery checkpoint written after step 2 of epoch 1 (2 x 2 x 16 of the epoch's 96
    examples trained) resumed by one process: the rest of epoch 1 is each of the other 32 examples once, read from
    the dataset's own indices; then epoch 2 is every example once, as usual."""
    import timm_popup.data.loaders as popup_data

    copy = tmp_path / "one-process"
    shutil.copytree(out, copy)
    read: list[tuple[int, int]] = []
    seeded = popup_data._SeededImages.__getitems__

    def recording(self, indices):
        read.extend((self.epoch, int(i)) for i in indices)
        return seeded(self, indices)

    monkeypatch.setattr(popup_data._SeededImages, "__getitems__", recording)
    assert in_process([*args, "--workers", "0", "--output-dir", str(copy), "--resume", "latest"]) == 0
    said = capsys.readouterr().out
    assert "then the rest of epoch 1 after its first 64 examples, each remaining one once, over 1 process(es) " \
        "where 2 wrote it: not the uninterrupted run's bytes" in said, said[-3000:]
    from accelerate.data_loader import SeedableRandomSampler

    order = list(SeedableRandomSampler(range(96), data_seed=3))  # epoch 0's order, as Accelerate draws it
    rest = [i for epoch, i in read if epoch == 0]
    assert sorted(rest) == sorted(order[64:]) and len(set(rest)) == 32  # none skipped, none twice, none done before
    assert sorted(i for epoch, i in read if epoch == 1) == list(range(96))
    assert [r["epoch"] for r in _rows(copy)] == [1, 2] and (copy / "model.safetensors").is_file()


def test_two_processes_accumulating_on_batchnorm_resume_mid_epoch_to_the_same_bytes(data, tmp_path):
    """--grad-accum 2 on a BatchNorm network, 2 processes: an update spans two batches per process (and the norms'
    running statistics move on each); stopped inside epoch 2 and resumed, the run ends with the uninterrupted one's
    bytes and logged numbers."""
    args = [*BN_PREEMPT_ARGS, "--batch-size", "8", "--grad-accum", "2", "--dataset", str(data),
            "--checkpointing-steps", "1"]  # 6 batches per process, 3 updates per epoch
    reference, out = tmp_path / "reference", tmp_path / "run"
    _launch([*args, "--output-dir", str(reference)], processes=2)
    log = _interrupt(args, out, signal.SIGTERM, "", processes=2, pause="step_00000004")
    assert re.search(r"stopped by SIGTERM after step 4 of epoch 2; saved \S+step_00000005;", log), log[-4000:]
    log = _launch([*args, "--output-dir", str(out), "--resume", "latest"], processes=2)
    assert "(epoch 1 done, 5 updates, then step 4 of epoch 2)" in log, log[-4000:]
    _same_run(out, reference)


def _machines(args: list[str], out: Path, port: int, name: str, *, pause: str | None = None) -> tuple[list, Path]:
    """Start two "machines" (one `accelerate launch` each, one gloo process per machine) meeting over loopback at
    ``port``; with ``pause``, the main process stops inside the write of that checkpoint until the returned marker
    is removed. Logs go to ``out.parent/{name}-{rank}.log``."""
    marker = out.parent / f"{name}-writing"
    env = _env(TIMM_POPUP_PAUSE_IN_CHECKPOINT=f"{pause}={marker}") if pause else _env()
    procs = []
    for rank in (0, 1):
        cmd = [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank",
               str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision",
               "no", "--dynamo_backend", "no", str(SCRIPT), *args, "--output-dir", str(out), "--resume", "latest"]
        with open(out.parent / f"{name}-{rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs, marker


def _trainer(launcher: subprocess.Popen) -> int:
    """The pid of the training process an `accelerate launch` started (its child)."""
    import psutil

    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            if str(SCRIPT) in " ".join(child.cmdline()):
                return child.pid
        time.sleep(0.05)
    raise AssertionError("no training process")


def _wait_for(path: Path, procs: list) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert path.exists(), [p.poll() for p in procs]


def _ended(procs: list, timeout: float = TIMEOUT) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_two_machines_preempted_or_frozen_stop_in_bounded_time_and_resume_to_the_same_bytes(preempt_reference, data,
                                                                                           tmp_path):
    """Two machines over loopback, one gloo process each. SIGTERM to one machine's trainer only: both stop after the
    same update, write a recovery checkpoint, record "retry" and print the resume command of the job that ran. Then
    one machine frozen (SIGSTOP: no reset is sent, as from a host that lost power): the other gives it up after
    --dist-timeout, prints one line naming it, records "retry". Relaunched, the run ends with the uninterrupted
    2-process run's bytes."""
    out, port = tmp_path / "run", _free_port()
    # each machine's one process takes the thread count each of the reference's two processes on this one had
    args = [*PREEMPT_ARGS, "--dataset", str(data), "--checkpointing-steps", "1", "--dist-timeout", "5", "--threads",
            str(max(1, CPUS // 2))]
    resume = (rf"accelerate launch --multi_gpu --num_processes 2 --num_machines 2 --machine_rank 0 --main_process_ip "
              rf"127.0.0.1 --main_process_port {port} \S*train_accelerate\.py .* --resume latest \(exit status 75\)")

    procs, marker = _machines(args, out, port, "term", pause="step_00000001")
    _wait_for(marker, procs)
    os.kill(_trainer(procs[1]), signal.SIGTERM)  # a spot machine reclaimed with notice: its trainer only
    signalled = time.monotonic()
    marker.unlink()
    statuses = _ended(procs)
    term_s = time.monotonic() - signalled
    log = (tmp_path / "term-0.log").read_text()
    stop = re.search(rf"(?m)^stopped by a signal on another process after step 2 of epoch 1; saved \S+step_00000002; "
                     rf"resume with: {resume}$", log)
    assert stop, log[-4000:]
    ended = runstate.read_status(out)
    assert (ended["status"], ended["exit_status"], ended["reason"]) == ("retry", 75, "preempted"), ended
    assert ended["line"] == stop[0]
    assert runstate.main([str(out)]) == 75  # what a scheduler's restart rule reads: retry

    procs, marker = _machines(args, out, port, "stop", pause="step_00000004")
    _wait_for(marker, procs)
    frozen = [procs[1].pid, _trainer(procs[1])]  # machine 1 whole: launcher and trainer (its own session)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    marker.unlink()
    try:
        survivor = procs[0].wait(timeout=TIMEOUT)
        stop_s = time.monotonic() - frozen_at
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)
        _ended(procs)
    log = (tmp_path / "stop-0.log").read_text()
    lost = re.findall(rf"(?m)^lost rank 1 on {re.escape(socket.gethostname())}: no answer within --dist-timeout 5s "
                      rf"\(rank 0 on \S+ gave up waiting\); resume with: {resume}$", log)
    assert len(lost) == 1 and "Timed out waiting" not in log, log[-4000:]
    ended = runstate.read_status(out)
    assert (ended["status"], ended["exit_status"], ended["reason"]) == ("retry", 75, "lost-peer"), ended
    assert stop_s < 5 + 10, stop_s  # --dist-timeout plus the launcher's teardown
    print(f"SIGTERM: both machines ended {term_s:.1f}s after the signal, launchers' statuses {statuses}; SIGSTOP: "
          f"machine 0 ended {stop_s:.1f}s after it, its launcher's status {survivor}")

    procs, _ = _machines(args, out, port, "resume")
    assert _ended(procs) == [0, 0], (tmp_path / "resume-0.log").read_text()[-4000:]
    assert "resumed from" in (tmp_path / "resume-0.log").read_text()
    assert runstate.read_status(out)["status"] == "done" and runstate.main([str(out)]) == 0
    _same_run(out, preempt_reference[2])


def _signal_when(path: Path, sig: signal.Signals) -> threading.Thread:
    """Send ``sig`` to this process (an in-process run) once ``path`` exists."""
    def watch() -> None:
        deadline = time.monotonic() + TIMEOUT
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_stream_resumes_mid_epoch_where_it_was(in_process, capsys, data, tmp_path):
    args = [*PREEMPT_ARGS, "--dataset", str(data), "--streaming", "--workers", "2", "--checkpointing-steps", "1"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert in_process([*args, "--output-dir", str(reference)]) == 0
    watcher = _signal_when(out / "checkpoints" / "step_00000003", signal.SIGUSR1)  # SLURM's --signal
    assert in_process([*args, "--output-dir", str(out)]) == runstate.EXIT_PREEMPTED
    watcher.join()
    stopped = re.search(r"stopped by SIGUSR1 after step (\d) of epoch 1; saved (\S+);", capsys.readouterr().out)
    assert stopped and 3 <= int(stopped[1]) < 6, stopped
    assert in_process([*args, "--output-dir", str(out), "--resume", "latest"]) == 0
    said = capsys.readouterr().out
    assert f"then step {stopped[1]} of epoch 1 (the stream is read again up to there, decoding nothing" in said
    _same_run(out, reference)


def test_one_run_per_output_directory(in_process, capsys, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    args = [*TINY, "--dataset", str(data), "--output-dir", str(out), "--resume", str(tmp_path / "none")]
    with runstate.hold_output_dir(out, notify=lambda line: None):
        assert in_process(args) == 2
    err = _errors(capsys)
    assert len(err) == 1 and f"another run is using {out}: the run of pid {os.getpid()} on {socket.gethostname()} " \
        f"since 20" in err[0] and "choose another --output-dir" in err[0], err
    # the lock of a run that died (its file is left; the kernel's lock went with the process) is taken over
    (out / runstate.LOCK_FILE).write_text('{"host": "node7", "pid": 4242, "since": "2026-01-01T00:00:00+00:00"}')
    assert in_process(args) == 2  # past the lock: the --resume path is what fails
    said = capsys.readouterr()
    assert f"took over {out / runstate.LOCK_FILE} from the run of pid 4242 on node7 since " \
        "2026-01-01T00:00:00+00:00, which is no longer running" in said.out
    assert "does not exist" in said.err and not (out / runstate.LOCK_FILE).exists()


# ------------------------------------------------------------------------------------- two processes, bf16


def test_two_processes_bf16_end_with_identical_masks(tmp_path):
    path = tmp_path / "shapes"
    datasets.DatasetDict({"train": _split(64, 2), "test": _split(24, 3)}).save_to_disk(str(path))
    out = tmp_path / "run"
    # a ResNet (BatchNorm: running statistics are reduced across processes) at a tiny width
    log = _launch(["--model", "popup_resnet18_cifar", "--model-kwargs", "layers=(1,1,1,1)",
                   "channels=(8,16,32,64)", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--cpu",
                   "--dataset", str(path), "--output-dir", str(out)], processes=2, precision="bf16")
    # the two ranks print concurrently: their lines may run together, so match the pattern, not whole lines
    digests = dict(re.findall(r"rank (\d/2): result sha256 ([0-9a-f]{64})", log))
    assert set(digests) == {"0/2", "1/2"} and len(set(digests.values())) == 1, log[-3000:]
    assert "all 2 process(es) hold the same mask" in log and "bf16 mixed precision" in log
    assert "global batch 16 (2 process(es) x 8 x 1)" in log
    assert f"threads: {max(1, CPUS // 2)} per process (a 1/2 share of the {CPUS} CPUs" in log
    model = timm.create_model("popup_resnet18_cifar", pretrained=True, layers=(1, 1, 1, 1),
                              channels=(8, 16, 32, 64), num_classes=len(CLASSES),
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert train.mask_digest(model) == next(iter(digests.values()))  # the artifact holds what the ranks agreed on
    running = [b for n, b in model.named_buffers() if n.endswith("running_var")]
    assert running and not all(torch.equal(b, torch.ones_like(b)) for b in running)


# ------------------------------------------------------------------------------ other datasets, in-process


def _image_folder(root: Path, splits: dict[str, tuple[int, int]], *, size: int = 28, mode: str = "L",
                  suffix: str = ".png") -> Path:
    """An image folder ``root/<split>/<class>/<i><suffix>`` with ``splits[split] = (images, seed)``."""
    for split, (n, seed) in splits.items():
        images, labels = _images(n, seed, size=size, mode=mode)
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            (root / split / CLASSES[y]).mkdir(parents=True, exist_ok=True)
            img.save(root / split / CLASSES[y] / f"{i}{suffix}")
    return root


def test_image_folder_trains_with_grad_accum_and_clipping(in_process, tmp_path):
    root = _image_folder(tmp_path / "folder", {"train": (32, 4), "val": (32, 5)})
    out = tmp_path / "run"
    assert in_process([*TINY, "--dataset", str(root), "--output-dir", str(out), "--epochs", "1", "--grad-accum",
                       "2", "--clip-grad", "1.0", "--batch-size", "8", "--data-cache", str(tmp_path / "cache")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]  # grayscale 28x28 data -> a 1x28x28 model
    assert config["timm_popup"]["recipe"]["grad_accum"] == 2 and config["timm_popup"]["recipe"]["clip_grad"] == 1.0
    state = json.loads((out / "checkpoints" / "epoch_0001" / train.TRAINER_STATE).read_text())
    assert state["num_updates"] == 32 // 8 // 2


def test_non_default_columns_streaming(in_process, tmp_path):
    path = tmp_path / "odd"
    splits = {"training": _split(48, 6, image_col="photo", label_col="y"),
              "holdout": _split(24, 7, image_col="photo", label_col="y")}
    for name, split in splits.items():
        splits[name] = split.add_column("note", ["x"] * len(split))
    datasets.DatasetDict(splits).save_to_disk(str(path))
    out = tmp_path / "run"
    assert in_process([*TINY, "--dataset", str(path), "--output-dir", str(out), "--epochs", "1", "--streaming",
                       "--image-column", "photo", "--label-column", "y", "--train-split", "training",
                       "--val-split", "holdout"]) == 0
    row = _rows(out)[0]
    assert row["epoch"] == 1 and 0 <= row["val_top1"] <= 100
    model = timm.create_model("popup_conv2", pretrained=True, width=0.125, num_classes=len(CLASSES),
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert model.popup_config.seed == 0


def test_dense_method_writes_a_dense_checkpoint(in_process, data, tmp_path):
    out = tmp_path / "dense"
    assert in_process([*TINY, "--dataset", str(data), "--output-dir", str(out), "--epochs", "1", "--method",
                       "dense"]) == 0
    weights = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert "features.0.weight" in weights and not any(k.endswith("scores") or k.startswith("__popup__")
                                                      for k in weights)
    config = json.loads((out / "config.json").read_text())
    assert config["timm_popup"]["method"] == "dense" and config["timm_popup"]["recipe"]["lr"] == 0.01  # paper
    assert config["timm_popup"]["weight_init"] == "kaiming_normal"
    model = load_dense(out)
    ds = train.load_data(str(data))
    _, val_loader, _ = train.build_loaders(ds, timm.data.resolve_data_config({}, model=model), batch_size=16, workers=0,
                                        seed=0)
    assert train.evaluate(model, val_loader)["top1"] == _rows(out)[-1]["val_top1"]
    # the weights moved away from their seeded start
    start = timm.create_model("popup_conv2", width=0.125, num_classes=4, weight_init="kaiming_normal", k=1.0)
    assert not torch.equal(start.features[0].weight, model.features[0].weight)
    with pytest.raises(timm_popup.MaskError, match="dense checkpoint"):
        timm.create_model("popup_conv2", pretrained=True, width=0.125, num_classes=4,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    # --push-to-hub's dense path, in a fresh process (huggingface_hub reads HF_ENDPOINT at import)
    with HubServer() as url:
        env = _env(HF_ENDPOINT=url, HF_TOKEN="dummy-token", HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        env.pop("HF_HUB_OFFLINE")
        code = "import sys; from timm_popup.methods import push_dense; print(push_dense(sys.argv[1], sys.argv[2]))"
        proc = subprocess.run([sys.executable, "-c", code, str(out), "popup-tests/dense"], env=env, text=True,
                              capture_output=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "popup-tests/dense" in proc.stdout


# popup_resnet18 on 32x32 images: a BatchNorm network (norm scales, shifts and statistics), one step per epoch
RESNET = ["--model", "popup_resnet18", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
          "--log-every", "1"]


@pytest.mark.parametrize("method", ["dense", "finetune", "random-subnet"])
def test_weight_learning_methods_write_a_checkpoint_of_a_batchnorm_network(in_process, tmp_path, method):
    folder = _image_folder(tmp_path / "folder", {"train": (8, 11), "val": (8, 12)}, size=16, mode="RGB")
    extra = []
    if method != "dense":  # the mask of the same network (untrained: what matters here is that it verifies)
        found = timm_popup.save_pretrained(timm.create_model("popup_resnet18", num_classes=len(CLASSES)),
                                           tmp_path / "found")
        extra = ["--init-artifact", str(found)]
    out = tmp_path / method
    assert in_process([*RESNET, "--dataset", str(folder), "--output-dir", str(out), "--method", method,
                       "--data-cache", str(tmp_path / "cache"), *extra]) == 0
    weights = safetensors.torch.load_file(str(out / "model.safetensors"))
    # the norms learned their scale and shift again (the parameter policy had frozen them), with their statistics
    assert {"bn1.weight", "bn1.bias", "bn1.running_mean", "layer1.0.conv1.weight"} <= set(weights)
    assert not any(k.endswith("scores") or k.startswith("__popup__") for k in weights)
    model = load_dense(out)  # loads back, and computes what the run measured
    ds = train.load_data(str(folder), cache_dir=tmp_path / "cache")
    _, val_loader, _ = train.build_loaders(ds, timm.data.resolve_data_config({}, model=model), batch_size=8, workers=0,
                                        seed=0)
    assert train.evaluate(model, val_loader)["top1"] == _rows(out)[-1]["val_top1"]
    conv = model.layer1[0].conv1.weight
    kept = int((conv != 0).sum())
    assert kept == (conv.numel() if method == "dense" else round(0.3 * conv.numel()))  # the subnetwork, k=0.3


def test_any_timm_model_with_shared_modules_trains_and_resumes(in_process, capsys, tmp_path):
    """popup_<any timm name> is trainable (timm registers it on first lookup, so timm.list_models does not list it
    yet), and CoaT's shared modules, whose tensors Accelerate's checkpoint stores under one name, resume."""
    folder = _image_folder(tmp_path / "folder", {"train": (8, 16), "val": (8, 17)}, size=16, mode="RGB")
    run = ["--model", "popup_coat_tiny", "--model-kwargs", "embed_dims=(16,16,16,16)", "serial_depths=(1,1,1,1)",
           "parallel_depth=1", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--dataset", str(folder),
           "--output-dir", str(tmp_path / "run"), "--data-cache", str(tmp_path / "cache")]
    assert in_process([*run, "--epochs", "1"]) == 0
    assert in_process([*run, "--epochs", "2", "--resume", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == [1, 2]


# ------------------------------------------------------------------------------- bad input, before training


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unlabeled") / "ds"
    images, _ = _images(8, 0)
    split = datasets.Dataset.from_dict({"image": images, "brightness": [0.5] * 8},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "brightness": datasets.Value("float32")}))
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("case,extra,expected", [
    ("unknown dataset path", ["--dataset", "./no/such/dataset"], "does not exist"),
    ("unknown hub dataset", ["--dataset", "no-such-org/no-such-dataset"], "could not load dataset"),
    ("unknown split", ["--dataset", "{data}", "--val-split", "validation"], "unknown split 'validation'"),
    ("no label column", ["--dataset", "{unlabeled}"], "no label column"),
    ("k above 1", ["--dataset", "{data}", "--k", "1.5"], "outside (0, 1]"),
    ("k zero", ["--dataset", "{data}", "--k", "0"], "fraction of weights KEPT"),
    ("unwritable output", ["--dataset", "{data}", "--output-dir", "{blocker}/run"], "cannot write to output"),
    ("resume without checkpoint", ["--dataset", "{data}", "--resume", "{empty}"], "holds no checkpoint"),
    ("resume missing path", ["--dataset", "{data}", "--resume", "{empty}/nope"], "does not exist"),
    ("unknown model", ["--dataset", "{data}", "--model", "popup_conv5"], "did you mean popup_conv"),
    ("plain timm model", ["--dataset", "{data}", "--model", "resnet50"], "did you mean popup_resnet50"),
    ("unknown method", ["--dataset", "{data}", "--method", "supermask2"], "unknown method"),
    ("k with dense", ["--dataset", "{data}", "--method", "dense", "--k", "0.5"], "no meaning"),
    ("bad weight init", ["--dataset", "{data}", "--weight-init", "kaiming_normall"], "did you mean kaiming_normal"),
    ("bad recipe", ["--dataset", "{data}", "--recipe", "mnist"], "unknown recipe"),
    ("bad repo id", ["--dataset", "{data}", "--push-to-hub", "a/b/c"], "not a valid repo id"),
    ("negative seed", ["--dataset", "{data}", "--seed", "-1"], "--seed -1 is outside 0 .. 4294967295"),
    ("seed above 32 bits", ["--dataset", "{data}", "--seed", str(2**32)], "pass e.g. --seed 0"),
    ("zero threads", ["--dataset", "{data}", "--threads", "0"], "--threads 0: pass at least 1"),
    ("overlapping slices", ["--dataset", "{data}", "--train-split", "train[:80%]", "--val-split", "train[50%:]"],
     "shares 29 images with the train split"),
    ("val slice of the train split", ["--dataset", "{data}", "--val-split", "train[80%:]"],
     "shares 19 images with the train split 'train'"),
    ("malformed slice", ["--dataset", "{data}", "--train-split", "train[:80%", "--val-split", "test"],
     "is not a split name or a slice like 'train[:80%]'"),
    ("slice of an unknown split", ["--dataset", "{data}", "--train-split", "training[:80%]"],
     "unknown split in 'training[:80%]'"),
])
def test_bad_input_is_one_line_before_training(in_process, capsys, data, unlabeled, tmp_path, case, extra, expected):
    (tmp_path / "blocker").write_text("a file, not a directory")
    (tmp_path / "empty").mkdir()
    subs = dict(data=data, unlabeled=unlabeled, blocker=tmp_path / "blocker", empty=tmp_path / "empty")
    argv = [*TINY, "--output-dir", str(tmp_path / "out"), *[a.format(**subs) for a in extra]]
    assert in_process(argv) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_accelerate.py: error:") and expected in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / train.METRICS_JSONL).exists()


def test_fresh_run_refuses_an_output_dir_with_checkpoints(in_process, capsys, main_run, data):
    out = main_run[0]
    assert in_process([*MAIN_ARGS, "--dataset", str(data), "--output-dir", str(out)]) == 2
    assert "--resume latest" in capsys.readouterr().err


def test_resume_with_other_structural_setting_fails(in_process, capsys, main_run, data, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(main_run[0], out)
    assert in_process([*MAIN_ARGS, "--dataset", str(data), "--output-dir", str(out), "--resume", "latest",
                       "--seed", "8"]) == 2
    assert "made with seed=7" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["model header", "model data", "optimizer"])
def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_one_before(in_process, capsys, main_run, data, tmp_path,
                                                                        damage):
    out = tmp_path / "copy"
    shutil.copytree(main_run[0], out)
    newest = out / "checkpoints" / "epoch_0003"
    name = "optimizer.bin" if damage == "optimizer" else "model.safetensors"
    content = (newest / name).read_bytes()
    (newest / name).write_bytes(content[:5] if damage == "model header" else content[: len(content) // 2])
    assert in_process([*MAIN_ARGS, "--dataset", str(data), "--output-dir", str(out), "--resume", "latest"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith("train_accelerate.py: error: the checkpoint"), err
    expected = {"model header": "header too small", "model data": "file not fully covered",
                "optimizer": "cannot be loaded"}[damage]
    assert f"{newest} {'cannot be loaded' if damage == 'optimizer' else 'is damaged'}" in err[0], err
    assert expected in err[0], err
    assert f"delete it (rm -r {newest}) to resume from the one before, epoch_0002" in err[0]
    assert (newest / name).stat().st_size < len(content)  # nothing was overwritten


# --------------------------------------------------------------------------------------------- units


def test_help_lists_every_method_with_its_line_of_the_methods_table(script, capsys):
    from timm_popup.methods import METHODS

    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(METHODS) == 11
    for name, method in METHODS.items():
        rows = [line for line in lines if re.match(rf"\s+{re.escape(name)}\s", line)]
        assert len(rows) == 1 and method.summary in rows[0], (name, rows)  # one line each, its own summary


@pytest.mark.parametrize("env,threads,cpus,expected", [
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}, None, 2, 2),  # accelerate launch's default
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "3"}, None, 2, 3),  # --num_cpu_threads_per_process 3
    ({"OMP_NUM_THREADS": "1"}, None, 2, 1),  # set by the user for a plain python run: respected
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, None, 8, 4),  # torchrun, 2 processes: a share each
    ({"LOCAL_WORLD_SIZE": "4"}, None, 2, 1),  # more processes than CPUs: at least one thread
    ({}, None, 6, 6),
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}, 1, 2, 1),  # --threads wins
    ({"OMP_NUM_THREADS": "4"}, 2, 8, 2),
])
def test_thread_count_is_the_cpus_share_unless_chosen(env, threads, cpus, expected):
    assert train.choose_threads(threads, env=env, cpus=cpus)[0] == expected


def test_split_slices_carve_a_validation_part_out_of_a_train_only_folder(in_process, capsys, tmp_path):
    folder = _image_folder(tmp_path / "folder", {"train": (40, 13)})  # no val/ folder
    out = tmp_path / "run"
    assert in_process([*TINY, "--dataset", str(folder), "--output-dir", str(out), "--epochs", "1",
                       "--train-split", "train[:80%]", "--val-split", "train[80%:]",
                       "--data-cache", str(tmp_path / "cache")]) == 0
    assert "splits [train[:80%]=32, train[80%:]=8], train='train[:80%]', eval='train[80%:]'" in capsys.readouterr().out
    assert json.loads((out / "checkpoints" / "epoch_0001" / train.TRAINER_STATE).read_text())["metrics"]["count"] == 8
    assert (timm.create_model(f"local-dir:{out}", pretrained=True).num_classes == len(CLASSES))
    # the two parts: 32 + 8 different images, all of the folder's
    ds = train.load_data(str(folder), train_split="train[:80%]", val_split="train[80%:]", cache_dir=tmp_path / "c")
    whole = load_image_dataset(folder, cache_dir=tmp_path / "c")
    pixels = [[np.asarray(img).tobytes() for img in split["image"]] for split in
              (ds.splits["train[:80%]"], ds.splits["train[80%:]"], whole.splits["train"])]
    assert len(pixels[0]) == 32 and len(pixels[1]) == 8 and not set(pixels[0]) & set(pixels[1])
    assert sorted(pixels[0] + pixels[1]) == sorted(pixels[2])


def test_split_slices_of_a_saved_dataset_streamed_or_not(data):
    ds = train.load_data(str(data), train_split="train[:25%]+test[:50%]", val_split="test[50%:]")
    assert ds.num_rows == {"train[:25%]+test[:50%]": 24 + 24, "test[50%:]": 24}
    # one part given, the other detected: the validation split is the dataset's own test split
    ds = train.load_data(str(data), train_split="train[:50%]")
    assert (ds.train_split, ds.eval_split) == ("train[:50%]", "test") and ds.num_rows["train[:50%]"] == 48
    # a stream of unknown size: sliced by rows (skip / take), a percentage of it is refused in one line
    ds = train.load_data(str(data), train_split="train[:24]+test[:24]", val_split="test[24:]", streaming=True)
    assert [sum(1 for _ in ds.splits[s]) for s in ("train[:24]+test[:24]", "test[24:]")] == [48, 24]
    with pytest.raises(DataError, match=r"cannot take a percentage of it; slice it by rows \('test\[:1000\]'\)"):
        train.load_data(str(data), train_split="train", val_split="test[50%:]", streaming=True)
    with pytest.raises(DataError, match="shares its images with the train split 'test'"):
        train.load_data(str(data), train_split="test", val_split="test[24:]", streaming=True)


def test_a_truncated_jpeg_is_one_line_naming_it_and_the_checkpoint_stays(in_process, capsys, tmp_path):
    folder = _image_folder(tmp_path / "folder", {"train": (32, 14), "val": (16, 15)}, size=32, mode="RGB",
                           suffix=".jpg")
    run = [*TINY, "--dataset", str(folder), "--output-dir", str(tmp_path / "run"), "--workers", "1", "--mean",
           "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--data-cache", str(tmp_path / "cache")]
    assert in_process([*run, "--epochs", "1"]) == 0
    capsys.readouterr()
    broken = folder / "train" / CLASSES[-1] / "31.jpg"  # not the first image, which sizes the model
    content = broken.read_bytes()
    broken.write_bytes(content[: len(content) * 2 // 3])  # the header intact, the pixels cut short
    assert in_process([*run, "--epochs", "2", "--resume", "latest"]) == 2  # read in a DataLoader worker
    err = _errors(capsys)
    assert len(err) == 1 and f"cannot read image {broken} (image file is truncated" in err[0], err
    assert "the last checkpoint" in err[0] and "epoch_0001, is kept: continue from it with --resume latest" in err[0]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch_0001"]
    # read before training (the data's statistics for the small network): the same line, nothing written
    assert in_process([*TINY, "--dataset", str(folder), "--output-dir", str(tmp_path / "fresh"),
                       "--data-cache", str(tmp_path / "cache")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and f"cannot read image {broken}" in err[0], err
    assert not (tmp_path / "fresh" / "checkpoints").exists()


def test_recipes_follow_the_paper_and_every_value_is_overridable():
    popup, dense = get_method("edge-popup"), get_method("dense")
    cifar = train.resolve_recipe("auto", model_name="popup_conv4", method=popup, overrides={})
    assert (cifar.name, cifar.lr, cifar.momentum, cifar.weight_decay, cifar.batch_size, cifar.epochs) == (
        "cifar", 0.1, 0.9, 1e-4, 128, 100)
    assert train.scaled_lr(cifar, 256) == 0.1  # the paper's CIFAR lr is absolute
    assert train.resolve_recipe("auto", model_name="popup_conv4", method=dense, overrides={}).lr == 0.01
    imagenet = train.resolve_recipe("auto", model_name="popup_wide_resnet50_2", method=popup, overrides={})
    assert (imagenet.name, imagenet.momentum, imagenet.weight_decay, imagenet.label_smoothing,
            imagenet.warmup_epochs) == ("imagenet", 0.875, 3.0517578125e-5, 0.1, 5)
    assert train.scaled_lr(imagenet, 2048) == pytest.approx(2.048)  # NVIDIA: linear in the global batch
    mine = train.resolve_recipe("imagenet", model_name="popup_resnet50", method=popup,
                                overrides=dict(lr=0.5, epochs=3, nesterov=True, clip_grad=None))
    assert (mine.lr, mine.epochs, mine.nesterov, train.scaled_lr(mine, 4096)) == (0.5, 3, True, 0.5)
    assert mine.warmup_epochs == pytest.approx(0.15)  # 5 of 100 epochs -> the same share of 3
    with pytest.raises(train.TrainError, match="--epochs"):
        train.resolve_recipe("cifar", model_name="popup_conv4", method=popup, overrides=dict(epochs=0))


def test_optimizer_never_sees_a_weight():
    model = train.create_model("popup_conv2", method=get_method("edge-popup"), num_classes=4, input_size=(3, 32, 32),
                               model_kwargs=dict(width=0.125))
    recipe = train.RECIPES["cifar"]
    optimizer = train.build_optimizer(model, recipe, lr=0.1)
    seen = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert seen == {id(layer.scores) for layer in timm_popup.popup_masks(model).values()}
    dense = train.create_model("popup_conv2", method=get_method("dense"), num_classes=4, input_size=(3, 32, 32),
                               model_kwargs=dict(width=0.125))
    seen = {id(p) for g in train.build_optimizer(dense, recipe, lr=0.01).param_groups for p in g["params"]}
    # dense: the plain timm model, every weight trainable, starting from the seeded values
    assert seen == {id(p) for p in dense.parameters()} and not timm_popup.popup_masks(dense)
    fresh = timm.create_model("popup_conv2", width=0.125, num_classes=4, weight_init="kaiming_normal", k=1.0)
    masks = timm_popup.popup_masks(fresh)
    assert {n for n, _ in dense.named_parameters()} == set(masks)
    assert all(torch.equal(dense.get_parameter(name), m.weight) for name, m in masks.items())


def test_metrics_log_keeps_only_checkpointed_epochs_on_resume(tmp_path):
    log = train.MetricsLog(tmp_path)
    for epoch in (1, 2, 3):
        log.append(dict(epoch=epoch, val_top1=float(epoch)))
    resumed = train.MetricsLog(tmp_path, keep_epochs=2)
    assert [r["epoch"] for r in resumed.rows()] == [1, 2]
    assert (tmp_path / train.METRICS_CSV).read_text().splitlines() == ["epoch,val_top1", "1,1.0", "2,2.0"]
    assert train.MetricsLog(tmp_path).rows() == []  # a fresh run starts anew


@pytest.mark.parametrize("total, done, batch_size, processes", [(37, 5, 4, 3), (96, 64, 16, 1), (20, 2, 3, 4),
                                                                  (13, 0, 4, 3)])
def test_the_rest_of_an_epoch_is_each_example_once_in_equal_steps(total, done, batch_size, processes):
    order = list(np.random.default_rng(total).permutation(total))
    shares = [runstate.rest_of_epoch(order, done, batch_size=batch_size, num_processes=processes, process_index=p)
              for p in range(processes)]
    assert len({len(batches) for batches in shares}) == 1  # every process takes the same number of steps
    assert all(batch for batches in shares for batch in batches)  # none empty
    read = [i for batches in shares for batch in batches for i in batch]
    assert sorted(read) == sorted(order[done:])  # each remaining example once
    steps = zip(*shares, strict=True)  # in the epoch's order, step after step
    assert [i for step in steps for batch in step for i in batch] == order[done:]


def test_find_checkpoint(tmp_path):
    assert train.find_checkpoint(None, tmp_path) is None
    assert train.find_checkpoint("latest", tmp_path) is None  # nothing yet: a fresh start
    for epoch in (1, 2):
        (tmp_path / "checkpoints" / f"epoch_{epoch:04d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"epoch_{epoch:04d}" / train.TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoints" / "epoch_0003").mkdir()  # incomplete: no trainer state
    (tmp_path / "checkpoints" / ".tmp-epoch_0004").mkdir()
    assert train.find_checkpoint("latest", tmp_path).name == "epoch_0002"
    assert train.find_checkpoint(str(tmp_path), tmp_path / "elsewhere").name == "epoch_0002"
    first = tmp_path / "checkpoints" / "epoch_0001"
    assert train.find_checkpoint(str(first), tmp_path) == first
    with pytest.raises(train.TrainError, match="holds no checkpoint"):
        train.find_checkpoint(str(tmp_path / "checkpoints" / "epoch_0003"), tmp_path)


def test_data_subsets_and_input_size(data):
    ds = train.load_data(str(data), train_samples=10, val_samples=5, seed=3)
    assert ds.num_rows == {"train": 10, "test": 5} and (ds.train_split, ds.eval_split) == ("train", "test")
    assert ds.splits["test"]["label"] == load_image_dataset(data).splits["test"]["label"][:5]
    assert train.resolve_input_size("popup_conv4", ds) == (3, 32, 32)
    assert train.resolve_input_size("popup_conv4", ds, in_chans=1, img_size=28) == (1, 28, 28)
    assert train.resolve_input_size("popup_resnet50", ds) == (3, 224, 224)
    mean, std = train.input_stats("popup_conv4", ds, (3, 32, 32))  # small nets: the data's statistics
    pixels = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float64) / 255) for img in ds["train"]["image"]])
    assert mean == pytest.approx(pixels.mean((0, 1, 2)).tolist(), abs=1e-4)
    assert std == pytest.approx(pixels.std((0, 1, 2), unbiased=False).tolist(), abs=1e-4)
    assert train.input_stats("popup_conv4", ds, (1, 32, 32), mean=[0.5], std=[0.25]) == ((0.5,), (0.25,))
    assert train.input_stats("popup_resnet50", ds, (3, 224, 224)) == (timm.data.IMAGENET_DEFAULT_MEAN,
                                                                      timm.data.IMAGENET_DEFAULT_STD)


# ------------------------------------------------------------------------------------ augmentation, class names

DIGITS = ["seven", "one", "four"]  # string labels, in an order that is not sorted


def _digits_split(n: int, seed: int, names: list[str] = DIGITS) -> datasets.Dataset:
    """Grayscale 28x28 'digits': a bright horizontal bar whose height is the class; flipping left-right keeps the
    class here, but the test is about what the default does to such data, not about the data."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        y = i % len(names)
        a = rng.integers(0, 100, (28, 28)).astype(np.uint8)
        a[4 + 6 * y: 10 + 6 * y, :] += 120
        images.append(Image.fromarray(a, "L"))
        labels.append(names[y])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "digits"
    datasets.DatasetDict({"train": _digits_split(48, 0), "test": _digits_split(24, 1)}).save_to_disk(str(path))
    return path


def _recorded(out: Path) -> dict:
    config = json.loads((out / "config.json").read_text())
    return config["timm_popup"]["recipe"]


def test_augmentation_flags_are_applied_printed_and_recorded(in_process, capsys, data, tmp_path):
    base = [*TINY, "--dataset", str(data), "--train-samples", "32", "--val-samples", "16"]
    # a long (paper) budget on 32x32 RGB data: the paper's CIFAR augmentation, unless a flag changes it
    assert in_process([*base, "--epochs", "10", "--hflip", "0", "--output-dir", str(tmp_path / "hflip0")]) == 0
    assert _recorded(tmp_path / "hflip0")["augmentation"] == "pad-crop 4"
    assert "augmentation: pad-crop 4\n" in capsys.readouterr().out
    assert in_process([*base, "--epochs", "1", "--no-aug", "--output-dir", str(tmp_path / "noaug")]) == 0
    assert _recorded(tmp_path / "noaug")["augmentation"] == "none"
    assert "augmentation: none\n" in capsys.readouterr().out
    assert "augmentation" in (tmp_path / "noaug" / "README.md").read_text()
    # timm's flags reach timm's transforms and Mixup
    assert in_process([*base, "--epochs", "1", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--vflip", "0.5",
                       "--mixup", "0.2", "--cutmix", "1.0", "--label-smoothing", "0.1",
                       "--output-dir", str(tmp_path / "timm")]) == 0
    assert _recorded(tmp_path / "timm")["augmentation"] == (
        "vflip 0.5, aa rand-m9-mstd0.5, reprob 0.25 (pixel, x1), mixup 0.2, cutmix 1")
    # --no-aug with an augmentation flag contradicts itself; mixup needs pairs
    assert in_process([*base, "--no-aug", "--hflip", "0.5", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--no-aug turns every augmentation off" in capsys.readouterr().err
    assert in_process([*base, "--mixup", "0.2", "--batch-size", "15", "--output-dir", str(tmp_path / "x")]) == 2
    assert "even --batch-size" in capsys.readouterr().err


def test_default_augmentation_never_flips_grayscale_and_is_none_on_a_short_budget():
    def default(size, epochs):
        return train.default_augmentation(dict(input_size=size), epochs=epochs)

    assert default((3, 32, 32), 100) == timm_popup.data.Augmentation(pad_crop=4, hflip=0.5)  # the paper's CIFAR
    assert default((1, 28, 28), 100) == timm_popup.data.Augmentation(pad_crop=4)  # digits: never flipped
    assert default((3, 32, 32), 1).describe() == default((1, 28, 28), 1).describe() == "none"  # short budget
    assert default((3, 224, 224), 100).hflip == 0.5 and default((1, 224, 224), 100).hflip == 0
    transform = timm_popup.data.build_transforms(dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,)),
                                                 is_training=True, cifar_style=True,
                                                 augmentation=default((1, 28, 28), 100))
    assert not any("Flip" in type(t).__name__ for t in transform.transforms)


def test_digits_train_without_flips_and_record_their_class_names(in_process, capsys, digits, tmp_path):
    out = tmp_path / "digits"
    assert in_process([*TINY, "--dataset", str(digits), "--epochs", "10", "--output-dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert "augmentation: pad-crop 4 (the default" in log and "flip" not in log.split("augmentation:")[1][:60]
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["label_names"] == sorted(DIGITS)  # string labels: a fixed, sorted mapping
    assert _recorded(out)["augmentation"] == "pad-crop 4"
    card = (out / "README.md").read_text()
    assert "**Classes:** 3: four, one, seven" in card
    # timm's own loader hands the names on
    assert timm.create_model(f"local-dir:{out}", pretrained=True).pretrained_cfg["label_names"] == sorted(DIGITS)


def _eval(args: list[str]) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "timm-popup"
    return subprocess.run([str(cli), "eval", *args, "--workers", "0"], env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_class_labels_travel_and_eval_matches_them_by_name(main_run, data, tmp_path):
    out = main_run[0]
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["label_names"] == CLASSES  # from the ClassLabel feature, in its order
    assert "red, green, blue, square" in (out / "README.md").read_text()
    same = _eval([str(out), "--dataset", str(data)])
    assert same.returncode == 0, same.stderr
    # the same images with the classes in another order: labels are mapped by name, the accuracy is the same
    shuffled = tmp_path / "shuffled"
    order = [3, 1, 0, 2]
    names = [CLASSES[i] for i in order]
    test = datasets.load_from_disk(str(data))["test"]
    remapped = test.cast_column("label", datasets.Value("int64")).map(
        lambda row: {"label": order.index(row["label"])}).cast_column("label", datasets.ClassLabel(names=names))
    datasets.DatasetDict({"test": remapped}).save_to_disk(str(shuffled))
    moved = _eval([str(out), "--dataset", str(shuffled)])
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["top1"] == json.loads(same.stdout)["top1"]
    # other class names: one line, exit status 2
    other = tmp_path / "other"
    datasets.DatasetDict({"test": test.cast_column("label", datasets.ClassLabel(
        names=["cat", "dog", "blue", "square"]))}).save_to_disk(str(other))
    bad = _eval([str(out), "--dataset", str(other)])
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1, bad.stderr
    assert "the dataset's classes do not match" in err[0] and "'cat', 'dog'" in err[0]


# ----------------------------------------------------------------------------------- pre-flight and write faults


def test_push_preflight_fails_before_training(tmp_path):
    closed = _free_port()
    with HubServer() as url:
        for endpoint, token, expected in ((f"http://127.0.0.1:{closed}", "dummy-token", "cannot reach the Hub"),
                                          (url, None, "no Hub token")):
            env = _env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                       NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
            env.pop("HF_HUB_OFFLINE")
            if token:
                env["HF_TOKEN"] = token
            out = tmp_path / "run"
            proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--dataset", "./never/read", "--output-dir",
                                   str(out), "--push-to-hub", REPO], env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT, cwd=ROOT)
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(err) == 1 and expected in err[0], proc.stderr
            assert "dummy-token" not in proc.stderr
            assert not (out / "checkpoints").exists() and not (out / train.METRICS_JSONL).exists()


def _errors(capsys) -> list[str]:
    """The error lines of an in-process run's stderr (which also holds its progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line]


def test_a_write_fault_is_one_line_and_keeps_the_previous_checkpoint(in_process, capsys, data, tmp_path,
                                                                    monkeypatch):
    import errno

    import accelerate.utils.other

    real = accelerate.utils.other.safe_save_file
    calls = []

    def full_disk(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:  # the second checkpoint's first file: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full_disk)
    out = tmp_path / "run"
    assert in_process([*TINY, "--dataset", str(data), "--epochs", "2", "--output-dir", str(out)]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert f"cannot write the checkpoint {out / 'checkpoints' / 'epoch_0002'}" in err[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0001"]  # no .tmp-*, the previous intact
    assert train.read_trainer_state(out / "checkpoints" / "epoch_0001")["epoch"] == 1
    # the artifact: a read-only file system at its first rename
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", real)
    import timm_popup._io

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(timm_popup._io.os, "replace", read_only)
    out = tmp_path / "run2"
    assert in_process([*TINY, "--dataset", str(data), "--epochs", "1", "--output-dir", str(out)]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and f"cannot write the artifact to {out}: Read-only file system" in err[0], err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    assert train.list_checkpoints(out)


def _stopped_in_epoch_2_resumes_to_the_same_run(in_process, capsys, args: list[str], tmp_path: Path) -> None:
    """An in-process run of ``args`` (6 steps per epoch, a checkpoint every step) stopped by SIGUSR1 inside epoch 2,
    then resumed, ends with the uninterrupted run's bytes and logged numbers."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert in_process([*args, "--output-dir", str(reference)]) == 0
    watcher = _signal_when(out / "checkpoints" / "step_00000008", signal.SIGUSR1)  # inside epoch 2 (6 steps each)
    assert in_process([*args, "--output-dir", str(out)]) == runstate.EXIT_PREEMPTED
    watcher.join()
    assert re.search(r"stopped by SIGUSR1 after step \d of epoch 2", capsys.readouterr().out)
    assert in_process([*args, "--output-dir", str(out), "--resume", "latest"]) == 0
    _same_run(out, reference)


def test_a_scheduled_global_density_resumes_on_its_schedule(in_process, capsys, data, tmp_path):
    """global-topk with --density-epochs: the density of the epoch a run resumes in is set before its first step
    (it is a function of the update count, not in the checkpoint), so the artifact is the uninterrupted run's."""
    args = [*PREEMPT_ARGS, "--dataset", str(data), "--method", "global-topk", "--k", "0.2", "--density-epochs", "2",
            "--checkpointing-steps", "1"]
    _stopped_in_epoch_2_resumes_to_the_same_run(in_process, capsys, args, tmp_path)


def test_a_supermask_with_batchnorm_resumes_to_the_same_bytes(in_process, capsys, data, tmp_path):
    """A supermask's norm statistics are re-estimated under its eval mask after each epoch: stopped inside epoch 2 and
    resumed, the run still ends with the uninterrupted run's bytes (statistics included) and logged numbers."""
    args = [*BN_PREEMPT_ARGS, "--dataset", str(data), "--method", "supermask", "--checkpointing-steps", "1"]
    _stopped_in_epoch_2_resumes_to_the_same_run(in_process, capsys, args, tmp_path)
