"""Data layer tests on tiny generated datasets; nothing is downloaded."""

import os

# Set before datasets/huggingface_hub are imported: both read these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gzip  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from timm_popup.data import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    DataError,
    ImageDataset,
    build_transforms,
    create_loader,
    fashion_mnist_to_disk,
    load_image_dataset,
    main,
)

CLASSES = ["ant", "bee", "cat"]
PER_CLASS = 8
CIFAR_CFG = {"input_size": (3, 32, 32), "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26), "crop_pct": 1.0,
             "interpolation": "bilinear"}
TIMM_CFG = {"input_size": (3, 48, 48), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "crop_pct": 0.95, "crop_mode": "center"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


def _image(rng: np.random.Generator, size: int = 28, mode: str = "RGB") -> Image.Image:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _rows(seed: int, mode: str = "RGB", size: int = 28) -> tuple[list[Image.Image], list[int]]:
    rng = np.random.default_rng(seed)
    labels = [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]
    return [_image(rng, size, mode) for _ in labels], labels


def _split(seed: int, *, image_col: str = "image", label_col: str = "label", mode: str = "RGB",
           class_label: bool = True) -> datasets.Dataset:
    images, labels = _rows(seed, mode)
    label_feature = datasets.ClassLabel(names=CLASSES) if class_label else datasets.Value("int64")
    features = datasets.Features({image_col: datasets.Image(), label_col: label_feature})
    return datasets.Dataset.from_dict({image_col: images, label_col: labels}, features=features)


@pytest.fixture(scope="module")
def disk_dict(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "ds"
    datasets.DatasetDict({"train": _split(0), "test": _split(1)}).save_to_disk(str(path))
    return path


def _image_folder(root: Path, split_dirs: list[str]) -> Path:
    rng = np.random.default_rng(3)
    for split in split_dirs:
        for name in CLASSES[:2]:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                _image(rng, 16).save(folder / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------------- loading


def test_save_to_disk_dict(disk_dict):
    ds = load_image_dataset(disk_dict)
    assert isinstance(ds, ImageDataset)
    assert (ds.image_column, ds.label_column) == ("image", "label")
    assert ds.class_names == CLASSES and ds.num_classes == 3
    assert (ds.train_split, ds.eval_split) == ("train", "test")
    assert ds.num_rows == {"train": 24, "test": 24}
    assert "3 classes" in ds.describe()


def test_save_to_disk_single_dataset(tmp_path):
    _split(0).save_to_disk(str(tmp_path / "one"))
    ds = load_image_dataset(tmp_path / "one")
    assert list(ds.splits) == ["train"] and ds.train_split == "train" and ds.eval_split is None


def test_split_selection_and_roles(disk_dict):
    only_test = load_image_dataset(disk_dict, split="test")
    assert list(only_test.splits) == ["test"]
    assert (only_test.train_split, only_test.eval_split) == (None, "test")
    # Two names: explicit (train, eval) order, even against the names.
    swapped = load_image_dataset(disk_dict, split=["test", "train"])
    assert (swapped.train_split, swapped.eval_split) == ("test", "train")


def test_nondefault_column_names(tmp_path):
    # CIFAR-100 layout: img + fine_label + coarse_label; fine_label must win over coarse_label.
    images, labels = _rows(0)
    features = datasets.Features({"img": datasets.Image(), "coarse_label": datasets.ClassLabel(names=["x", "y"]),
                                  "fine_label": datasets.ClassLabel(names=CLASSES)})
    data = datasets.Dataset.from_dict({"img": images, "coarse_label": [y % 2 for y in labels], "fine_label": labels},
                                      features=features)
    data.save_to_disk(str(tmp_path / "c100"))
    ds = load_image_dataset(tmp_path / "c100")
    assert (ds.image_column, ds.label_column, ds.class_names) == ("img", "fine_label", CLASSES)
    assert load_image_dataset(tmp_path / "c100", label_column="coarse_label").class_names == ["x", "y"]


def test_columns_given_by_argument_int_and_string_labels(tmp_path):
    images, labels = _rows(0)
    data = datasets.Dataset.from_dict({"photo": images, "y": labels, "name": [CLASSES[y] for y in labels]},
                                      features=datasets.Features({"photo": datasets.Image(), "y": datasets.Value(
                                          "int64"), "name": datasets.Value("string")}))
    data.save_to_disk(str(tmp_path / "odd"))
    ints = load_image_dataset(tmp_path / "odd", label_column="y")
    assert (ints.image_column, ints.label_column, ints.class_names) == ("photo", "y", ["0", "1", "2"])
    names = load_image_dataset(tmp_path / "odd", label_column="name", image_column="photo")
    assert names.class_names == sorted(CLASSES)
    assert isinstance(names["train"].features["name"], datasets.ClassLabel)
    assert names["train"][PER_CLASS]["name"] == sorted(CLASSES).index(CLASSES[1])


def test_image_folder_with_splits(tmp_path):
    root = _image_folder(tmp_path / "folder", ["train", "val"])
    ds = load_image_dataset(root, cache_dir=tmp_path / "cache")
    assert (ds.train_split, ds.eval_split) == ("train", "validation")
    assert ds.class_names == CLASSES[:2] and ds.num_rows == {"train": 8, "validation": 8}
    images, labels = next(iter(create_loader(ds, "validation", build_transforms(CIFAR_CFG, is_training=False,
                                                                                   cifar_style=True),
                                             batch_size=8, shuffle=False)))
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == [0] * 4 + [1] * 4


def test_flat_image_folder_has_no_eval_split(tmp_path):
    root = _image_folder(tmp_path / "flat", [""])
    ds = load_image_dataset(root, cache_dir=tmp_path / "cache")
    assert (ds.train_split, ds.eval_split, ds.num_classes) == ("train", None, 2)


# ----------------------------------------------------------------------------------------------------------- errors


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, DataError) and "\n" not in str(info.value)
    return str(info.value)


def test_error_missing_path(tmp_path):
    msg = _raises("does not exist", load_image_dataset, str(tmp_path / "nope" / "data"))
    assert "nope" in msg


def test_error_unknown_hub_dataset():
    msg = _raises("could not load dataset", load_image_dataset, "no-such-owner-xyz/no-such-dataset")
    assert "'no-such-owner-xyz/no-such-dataset'" in msg


def test_error_unknown_split(disk_dict):
    msg = _raises("unknown split 'validaton'", load_image_dataset, disk_dict, split="validaton")
    assert "['train', 'test']" in msg
    ds = load_image_dataset(disk_dict)
    _raises("unknown split 'val'.*'train', 'test'", create_loader, ds, "val", lambda x: x, batch_size=2,
            shuffle=False)


def test_error_no_label_column(tmp_path):
    images, _ = _rows(0)
    datasets.Dataset.from_dict({"image": images, "caption": ["a"] * len(images)},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "caption": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "nolabel"))
    msg = _raises("no label column found", load_image_dataset, tmp_path / "nolabel")
    assert "['image', 'caption']" in msg and "--label-column" in msg
    _raises("label column 'labels' not found.*columns are", load_image_dataset, tmp_path / "nolabel",
            label_column="labels")
    # A flat folder of images has no class subfolders, hence no label either.
    root = tmp_path / "loose"
    root.mkdir()
    _image(np.random.default_rng(0)).save(root / "a.png")
    _raises("no label column found", load_image_dataset, root, cache_dir=tmp_path / "cache")


def test_error_image_column(disk_dict, tmp_path):
    _raises("image column 'pixels' not found.*'image', 'label'", load_image_dataset, disk_dict, image_column="pixels")
    datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [0, 1]}).save_to_disk(str(tmp_path / "tabular"))
    _raises("no image column found.*--image-column", load_image_dataset, tmp_path / "tabular")


def test_error_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises("holds no images or data files", load_image_dataset, tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_error_streaming_without_classlabel(tmp_path):
    _split(0, class_label=False).save_to_disk(str(tmp_path / "intlabels"))
    _raises("not ClassLabel.*without streaming", load_image_dataset, tmp_path / "intlabels", streaming=True)


# ------------------------------------------------------------------------------------------------------- transforms


def test_transform_shapes():
    rgb = _image(np.random.default_rng(0), 28)
    for training in (True, False):
        assert build_transforms(CIFAR_CFG, is_training=training, cifar_style=True)(rgb).shape == (3, 32, 32)
        assert build_transforms(TIMM_CFG, is_training=training, cifar_style=False)(rgb).shape == (3, 48, 48)
    mnist_cfg = {"input_size": (1, 28, 28), "mean": (0.1307,), "std": (0.3081,)}
    out = build_transforms(mnist_cfg, is_training=True, cifar_style=True)(rgb)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    # RGB statistics on a 1-channel model are averaged instead of failing in Normalize.
    assert build_transforms({**TIMM_CFG, "input_size": (1, 40, 40)}, is_training=False,
                            cifar_style=False)(rgb).shape == (1, 40, 40)


def test_cifar_eval_is_plain_normalize():
    img = _image(np.random.default_rng(0), 32)
    out = build_transforms(CIFAR_CFG, is_training=False, cifar_style=True)(img)
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(
        CIFAR_CFG["mean"]).view(3, 1, 1)) / torch.tensor(CIFAR_CFG["std"]).view(3, 1, 1)
    torch.testing.assert_close(out, expected)
    # The paper's augmentation crops with 4px padding: same shape, and zero padding shows up in some crop.
    from timm_popup.data import Augmentation

    train = build_transforms(CIFAR_CFG, is_training=True, cifar_style=True, augmentation=Augmentation(pad_crop=4))
    torch.manual_seed(0)
    assert any(not torch.equal(train(img), out) for _ in range(5))


def test_grayscale_to_rgb_and_back():
    gray = _image(np.random.default_rng(0), 32, mode="L")
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    out = build_transforms(cfg, is_training=False, cifar_style=True)(gray)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    rgb = _image(np.random.default_rng(1), 32)
    one = build_transforms({**cfg, "input_size": (1, 32, 32)}, is_training=False, cifar_style=True)(rgb)
    torch.testing.assert_close(one[0], torch.from_numpy(np.array(rgb.convert("L"))).float() / 127.5 - 1)


def test_grayscale_dataset_feeds_rgb_model(tmp_path):
    datasets.DatasetDict({"train": _split(0, mode="L")}).save_to_disk(str(tmp_path / "gray"))
    ds = load_image_dataset(tmp_path / "gray")
    loader = create_loader(ds, "train", build_transforms(TIMM_CFG, is_training=True, cifar_style=False),
                           batch_size=5, shuffle=True)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 48, 48) and labels.dtype == torch.long


# ---------------------------------------------------------------------------------------------------------- loaders


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_loader_batches_and_determinism(disk_dict):
    ds = load_image_dataset(disk_dict)
    tf = build_transforms(CIFAR_CFG, is_training=False, cifar_style=True)
    loader = create_loader(ds, "train", tf, batch_size=5, shuffle=True, seed=7)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(5, 3, 32, 32)] * 4 + [(4, 3, 32, 32)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.long for x, y in batches)
    images, labels = _epoch(create_loader(ds, "train", tf, batch_size=5, shuffle=True, seed=7))
    again_images, again_labels = _epoch(create_loader(ds, "train", tf, batch_size=5, shuffle=True, seed=7))
    assert torch.equal(labels, again_labels) and torch.equal(images, again_images)
    assert sorted(labels.tolist()) == sorted(ds["train"]["label"])
    other = _epoch(create_loader(ds, "train", tf, batch_size=5, shuffle=True, seed=8))[0]
    assert not torch.equal(images, other)
    unshuffled = _epoch(create_loader(ds, "train", tf, batch_size=5, shuffle=False))[1]
    assert unshuffled.tolist() == list(ds["train"]["label"])
    dropped = create_loader(ds, "train", tf, batch_size=5, shuffle=True, drop_last=True)
    assert len(dropped) == 4 and all(len(y) == 5 for _, y in dropped)


def test_loader_with_worker(disk_dict):
    ds = load_image_dataset(disk_dict)
    tf = build_transforms(CIFAR_CFG, is_training=True, cifar_style=True)
    first = _epoch(create_loader(ds, "test", tf, batch_size=8, shuffle=True, num_workers=1, seed=3))
    second = _epoch(create_loader(ds, "test", tf, batch_size=8, shuffle=True, num_workers=1, seed=3))
    # Worker seeds come from the loader's generator, so even the random crops repeat.
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_streaming_from_save_to_disk(disk_dict):
    ds = load_image_dataset(disk_dict, streaming=True)
    assert isinstance(ds["train"], datasets.IterableDataset) and ds.streaming
    assert ds.class_names == CLASSES and ds.num_rows["train"] is None
    tf = build_transforms(CIFAR_CFG, is_training=False, cifar_style=True)
    images, labels = _epoch(create_loader(ds, "train", tf, batch_size=5, shuffle=True, seed=1, shuffle_buffer=8))
    assert images.shape == (24, 3, 32, 32) and labels.dtype == torch.long
    assert sorted(labels.tolist()) == [c for c in range(3) for _ in range(PER_CLASS)]
    again = _epoch(create_loader(ds, "train", tf, batch_size=5, shuffle=True, seed=1, shuffle_buffer=8))[1]
    assert torch.equal(labels, again)
    assert labels.tolist() != sorted(labels.tolist())
    # set_epoch (called by Accelerate per epoch) changes the order deterministically.
    loader = create_loader(ds, "train", tf, batch_size=5, shuffle=True, seed=1, shuffle_buffer=8)
    loader.dataset.set_epoch(1)
    assert not torch.equal(_epoch(loader)[1], labels)


def test_streaming_image_folder(tmp_path):
    root = _image_folder(tmp_path / "folder", ["train", "test"])
    ds = load_image_dataset(root, streaming=True, cache_dir=tmp_path / "cache")
    assert (ds.train_split, ds.eval_split, ds.class_names) == ("train", "test", CLASSES[:2])
    loader = create_loader(ds, "test", build_transforms(TIMM_CFG, is_training=False, cifar_style=False),
                           batch_size=3, shuffle=False)
    images, labels = _epoch(loader)
    assert images.shape == (8, 3, 48, 48) and labels.tolist() == [0] * 4 + [1] * 4


def test_streaming_parquet(tmp_path):
    _split(0, image_col="img", label_col="fine_label").to_parquet(str(tmp_path / "data.parquet"))
    ds = load_image_dataset(tmp_path / "data.parquet", streaming=True, cache_dir=tmp_path / "cache")
    assert (ds.image_column, ds.label_column, ds.train_split) == ("img", "fine_label", "train")
    # shuffle=False: datasets sleeps 5 s when a shuffled multi-shard parquet stream shuts down (arrow issue 45214).
    images, labels = next(iter(create_loader(ds, "train", build_transforms(CIFAR_CFG, is_training=True,
                                                                            cifar_style=True),
                                             batch_size=6, shuffle=False)))
    assert images.shape == (6, 3, 32, 32) and labels.dtype == torch.long


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(payload)


@pytest.fixture
def idx_dir(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    folder = tmp_path / "idx"
    folder.mkdir()
    # Train gzipped (as Debian ships it), test plain: both must be found.
    _write_idx(folder / "train-images-idx3-ubyte.gz", arrays["train"], 2051)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(12, dtype=np.uint8) % 10, 2049)
    _write_idx(folder / "t10k-images-idx3-ubyte", arrays["test"], 2051)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.array([9, 0, 1, 2, 3], dtype=np.uint8), 2049)
    return folder, arrays


def test_fashion_mnist_to_disk(tmp_path, idx_dir):
    folder, arrays = idx_dir
    out = fashion_mnist_to_disk(tmp_path / "out" / "fmnist", folder)
    assert out == (tmp_path / "out" / "fmnist").resolve() and (out / "dataset_dict.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["fmnist"]  # no temp dirs left behind
    ds = load_image_dataset(out)
    assert ds.num_rows == {"train": 12, "test": 5} and ds.class_names == list(FASHION_MNIST_CLASSES)
    assert (ds.train_split, ds.eval_split) == ("train", "test")
    first = ds["test"][0]
    assert first["label"] == 9 and first["image"].mode == "L"
    assert np.array_equal(np.asarray(first["image"]), arrays["test"][0])
    assert ds["train"]["label"] == [i % 10 for i in range(12)]

    # Existing output is reused; overwrite rebuilds it through the same atomic rename.
    assert fashion_mnist_to_disk(out, folder) == out
    (folder / "t10k-labels-idx1-ubyte").unlink()
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), 2049)
    fashion_mnist_to_disk(out, folder, overwrite=True)
    assert load_image_dataset(out)["test"]["label"] == [0] * 5
    assert [p.name for p in out.parent.iterdir()] == ["fmnist"]


def test_fashion_mnist_errors(tmp_path, idx_dir):
    folder, _ = idx_dir
    msg = _raises("idx files not found", fashion_mnist_to_disk, tmp_path / "o", tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "t10k-labels-idx1-ubyte" in msg
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), 2051)  # images magic on labels
    _raises("magic 2049", fashion_mnist_to_disk, tmp_path / "o", folder)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8), 2049)
    _raises("5 images but .* 4 labels", fashion_mnist_to_disk, tmp_path / "o", folder)
    assert not (tmp_path / "o").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("x")
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), 2049)
    _raises("exists and is not a saved dataset", fashion_mnist_to_disk, tmp_path / "taken", folder)


def test_cli(tmp_path, idx_dir, capsys):
    folder, _ = idx_dir
    assert main(["fashion-mnist", str(tmp_path / "cli"), "--idx-dir", str(folder)]) == 0
    assert "train=12, test=5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path / "cli"), "--split", "validation"])
    assert exit_info.value.code == 2
    assert "unknown split 'validation'" in capsys.readouterr().err


HUB_FASHION_MNIST = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"]  # the ClassLabel names of zalando-datasets/fashion_mnist on the Hub


def test_fashion_mnist_sources_debian_first_then_the_hub(tmp_path, idx_dir, monkeypatch):
    import timm_popup.data.sources as data

    folder, _ = idx_dir
    said: list[str] = []
    monkeypatch.setattr(data, "FASHION_MNIST_APT_DIR", str(folder))
    ds = data.open_dataset("fashion-mnist", cache_dir=tmp_path / "cache", notify=said.append)
    converted = tmp_path / "cache" / "fashion-mnist"
    assert ds.num_rows == {"train": 12, "test": 5}
    assert said == [f"fashion-mnist: Debian's dataset-fashion-mnist ({folder}), converted to {converted}"]

    # without Debian's package: the same data from the Hub (its loader replaced by a generated copy with the Hub
    # dataset's features: nothing is downloaded)
    monkeypatch.setattr(data, "FASHION_MNIST_APT_DIR", str(tmp_path / "not-installed"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=HUB_FASHION_MNIST)})
    rng = np.random.default_rng(1)
    hub = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [_image(rng, mode="L") for _ in range(n)], "label": [i % 10 for i in range(n)]}, features=features)
        for split, n in (("train", 20), ("test", 10))})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kwargs: asked.append(name) or hub)
    said.clear()
    ds = data.open_dataset("fashion-mnist", cache_dir=tmp_path / "cache2", notify=said.append)
    assert asked == ["zalando-datasets/fashion_mnist"] and ds.num_rows == {"train": 20, "test": 10}
    assert (ds.train_split, ds.eval_split) == ("train", "test")
    assert "not installed" in said[0] and "using the Hub dataset zalando-datasets/fashion_mnist" in said[0]
    # a mask trained on Debian's copy evaluates on the Hub's: the names differ only in spacing
    assert data.label_mapping(ds.class_names, list(FASHION_MNIST_CLASSES)) is None

    def offline(name, **kwargs):
        raise ConnectionError("Couldn't reach 'zalando-datasets/fashion_mnist' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = _raises("not installed and the Hub copy could not be loaded", data.open_dataset, "fashion-mnist")
    assert "apt-get install -y dataset-fashion-mnist" in msg and "\n" not in msg


def test_label_mapping_by_name():
    from timm_popup.data import label_mapping

    assert label_mapping(["a", "b"], ["a", "b"]) is None
    assert label_mapping(["b", "a"], ["a", "b"]) == [1, 0]
    assert label_mapping(["0", "1"], ["a", "b"]) is None  # integer ids: taken as they are
    assert label_mapping(["a", "b"], None) is None
    msg = _raises("do not match", label_mapping, ["a", "c"], ["a", "b"], what="out/run")
    assert "'c' not among its 2 classes" in msg and "out/run" in msg


def test_augmentation_settings():
    from timm_popup.data import Augmentation

    assert Augmentation().describe() == "none"
    aug = Augmentation(pad_crop=4, hflip=0.5, reprob=0.25)
    steps = [type(t).__name__ for t in build_transforms(CIFAR_CFG, is_training=True, cifar_style=True,
                                                        augmentation=aug).transforms]
    assert steps[2:4] == ["RandomCrop", "RandomHorizontalFlip"] and steps[-1] == "RandomErasing"
    assert "Flip" not in str(build_transforms(CIFAR_CFG, is_training=True, cifar_style=True))  # default: none
    timm_tf = str(build_transforms(TIMM_CFG, is_training=True, cifar_style=False,
                                   augmentation=Augmentation(scale=(0.5, 1.0), vflip=0.5, aa="rand-m9-mstd0.5")))
    assert "scale=(0.5, 1.0)" in timm_tf and "RandomVerticalFlip" in timm_tf and "RandAugment" in timm_tf
    assert "HorizontalFlip" not in timm_tf
    _raises("--hflip is a probability", Augmentation, hflip=2.0)
    _raises("unknown --aa policy", Augmentation, aa="bogus")
    _raises("--pad-crop is the paper's crop", build_transforms, TIMM_CFG, is_training=True, cifar_style=False,
            augmentation=Augmentation(pad_crop=4))


def test_images_decode_with_their_features_mode_and_a_bad_one_names_what_it_is(tmp_path):
    import io

    from timm_popup.data import UnreadableImageError, peek_image

    gray = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8), "L")
    good = io.BytesIO()
    gray.save(good, format="PNG")
    rows = {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": good.getvalue()[:20], "path": None}],
            "label": [0, 1]}
    features = datasets.Features({"image": datasets.Image(mode="RGB"), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "ds"))
    ds = load_image_dataset(tmp_path / "ds")
    assert peek_image(ds, "train").mode == "RGB"  # the feature's mode, as datasets itself decodes it
    loader = create_loader(ds, "train", lambda img: torch.zeros(1), batch_size=2, shuffle=False)
    with pytest.raises(UnreadableImageError, match=r"cannot read image an image stored in the dataset \(no file"):
        next(iter(loader))


_LEFT_OPEN = """
import multiprocessing, subprocess, sys, time
from timm_popup.data import build_transforms, create_loader, load_image_dataset
loader = create_loader(load_image_dataset(sys.argv[1]), "train", build_transforms(
    {cfg}, is_training=False, cifar_style=False), batch_size=2, shuffle=False, num_workers=1)
batches = iter(loader)  # never closed: an error can leave a loader so
next(batches)
(worker,) = multiprocessing.active_children()
subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # a scheduler's SIGTERM to the process tree
worker.join(timeout=2)
assert worker.is_alive(), "a worker died of a scheduler's SIGTERM"
next(batches)  # and it still serves its loader
print(worker.pid, flush=True)
"""


def test_workers_outlive_a_schedulers_sigterm_and_never_hang_the_exit(disk_dict):
    """A scheduler's SIGTERM to the whole process tree leaves the workers running (the trainer stops after its
    checkpoint and ends them itself); a process that exits with a loader left open still exits (multiprocessing ends
    daemonic children with SIGTERM and waits for them, which hung the exit after the whole test suite had passed)."""
    import subprocess
    import sys

    code = _LEFT_OPEN.format(cfg=repr(TIMM_CFG))
    proc = subprocess.run([sys.executable, "-c", code, str(disk_dict)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not Path(f"/proc/{proc.stdout.split()[0]}").exists()  # and the worker is gone
