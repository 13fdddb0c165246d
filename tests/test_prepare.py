"""``timm-popup prepare`` (issue 33): a dataset re-encoded once at a maximum side, into Parquet shards that
``--dataset`` reads; images within the side keep their bytes; a stopped run is finished by the same command, which
skips the shards already written; an unfinished or different preparation is refused in one line; a run trained on
the output records the preparation in its config and on its card. Generated images, nothing downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from timm_popup import cli  # noqa: E402
from timm_popup.data import DataError, load_image_dataset  # noqa: E402
from timm_popup.data import prepare as prepare_module  # noqa: E402

try:
    from in_process import train_main
except ImportError:  # tests/ turned into a package
    from tests.in_process import train_main

CLASSES = ["a", "b", "c"]


def _encoded(rng: np.random.Generator, width: int, height: int, fmt: str) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([128 + 90 * np.sin(x / (4 + c)) * np.cos(y / (5 + c)) for c in range(3)], -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)).save(buf, fmt, quality=90)
    return buf.getvalue()


def _split(n: int, seed: int) -> datasets.Dataset:
    """JPEGs larger and smaller than the side 40 used below, landscape and portrait, and PNGs."""
    rng = np.random.default_rng(seed)
    sizes = [(90, 60), (30, 20), (48, 96), (40, 40), (64, 50)]
    images = [{"bytes": _encoded(rng, *sizes[i % 5], "PNG" if i % 4 == 3 else "JPEG"), "path": f"img{i}.x"}
              for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "extra": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)],
                                       "extra": ["x"] * n}, features=features)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "shapes"
    datasets.DatasetDict({"train": _split(11, 0), "test": _split(7, 1)}).save_to_disk(str(path))
    return path


def _prepare(src: Path, dst: Path, *extra: str) -> int:
    return cli.main(["prepare", str(src), str(dst), "--max-side", "40", "--shard-size", "4", *extra])


def _stored(split: datasets.Dataset) -> list[bytes]:
    return [v["bytes"] for v in split.cast_column("image", datasets.Image(decode=False))["image"]]


def test_prepared_images_fit_the_side_small_ones_keep_their_bytes_and_labels_survive(source, tmp_path, capsys):
    dst = tmp_path / "prepared"
    assert _prepare(source, dst) == 0
    assert "train on it with --dataset" in capsys.readouterr().out
    assert sorted(p.name for p in (dst / "data").iterdir()) == [
        "test-00000-of-00002.parquet", "test-00001-of-00002.parquet", "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    before, after = load_image_dataset(source), load_image_dataset(dst)
    assert after.class_names == CLASSES and after.prepared == (
        f"images re-encoded by timm-popup prepare at a maximum side of 40 px (JPEG quality 90) from {source}")
    assert json.loads((dst / "timm_popup_prepare.json").read_text())["complete"] is True
    for name in ("train", "test"):
        old, new = before.splits[name], after.splits[name]
        assert new["label"] == old["label"] and new.column_names == ["image", "label"]
        for raw, stored, image in zip(_stored(old), _stored(new), new["image"], strict=True):
            with Image.open(io.BytesIO(raw)) as original:
                size, fmt = original.size, original.format
            if max(size) <= 40:
                assert stored == raw  # kept byte for byte: no second lossy encode
                continue
            assert image.format == fmt and max(image.size) == 40  # resized, in its own format
            assert abs(image.size[0] / image.size[1] - size[0] / size[1]) < 0.05  # the aspect kept


def test_a_stopped_preparation_is_refused_until_the_same_command_finishes_it(source, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "prepared"
    written = []
    real = prepare_module._Shard.write

    def write_then_fill_the_disk(shard):
        if written:
            raise OSError(28, "No space left on device")
        written.append(shard.target)
        return real(shard)

    monkeypatch.setattr(prepare_module._Shard, "write", write_then_fill_the_disk)
    assert _prepare(source, dst) == 1
    assert "No space left on device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert [p for p in (dst / "data").iterdir()] == written  # the finished shard, no temp file
    with pytest.raises(DataError, match=r"is an unfinished timm-popup prepare: run the same `timm-popup prepare` "):
        load_image_dataset(dst)
    first = written[0].stat().st_mtime_ns
    monkeypatch.setattr(prepare_module._Shard, "write", real)
    assert _prepare(source, dst) == 0
    assert written[0].stat().st_mtime_ns == first  # skipped, not written again
    fresh = tmp_path / "fresh"
    assert _prepare(source, fresh) == 0
    for name in ("train", "test"):
        assert _stored(load_image_dataset(dst).splits[name]) == _stored(load_image_dataset(fresh).splits[name])


def test_another_preparation_or_a_foreign_directory_is_refused_in_one_line(source, tmp_path, capsys):
    dst = tmp_path / "prepared"
    assert _prepare(source, dst) == 0
    capsys.readouterr()
    assert cli.main(["prepare", str(source), str(dst), "--max-side", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("holds another preparation (its max_side, shard_size differ): pass the same options to finish "
                        "it, or a new directory") and len(err.splitlines()) == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _prepare(source, foreign) == 2
    assert "exists and is not a timm-popup prepare output" in capsys.readouterr().err
    assert _prepare(source, tmp_path / "q", "--quality", "0") == 2
    assert capsys.readouterr().err.strip().endswith("--quality must be 1-100, got 0")


def test_a_run_trained_on_a_prepared_dataset_records_it_on_its_card(tmp_path):
    rng = np.random.default_rng(2)
    big = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    rows = {"image": [{"bytes": _encoded(rng, 48, 48, "JPEG"), "path": None} for _ in range(24)],
            "label": [i % 3 for i in range(24)]}
    src = tmp_path / "src"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=big),
                          "test": datasets.Dataset.from_dict(rows, features=big)}).save_to_disk(str(src))
    dst = tmp_path / "prepared"
    assert cli.main(["prepare", str(src), str(dst), "--max-side", "32"]) == 0
    assert train_main()(["--model", "popup_conv2", "--model-kwargs", "width=0.125", "--dataset", str(dst),
                         "--epochs", "1", "--batch-size", "8", "--workers", "0", "--log-with", "none",
                         "--output-dir", str(tmp_path / "out")]) == 0
    line = f"images re-encoded by timm-popup prepare at a maximum side of 32 px (JPEG quality 90) from {src}"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert line in json.dumps(config)
    assert f"| prepared | `{line}` |" in (tmp_path / "out" / "README.md").read_text()
