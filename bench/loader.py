"""Images per second of our loader against timm's, on the same ImageNet-size JPEGs, side by side in one run.

    python bench/loader.py [--images 1536] [--workers 1 2] [--batch-size 64] [--rounds 2]

The images: ``--images`` JPEGs of 500x375 at quality 90 (ImageNet's typical size; generated once, seeded, into
``--cache``), as an image folder and as its Arrow copy (``save_to_disk`` with the bytes embedded, the layout of
``ILSVRC/imagenet-1k`` after download). The transforms, for every row: RandomResizedCrop 224 (scale 0.08-1, bilinear),
horizontal flip 0.5, colour jitter 0.4, normalisation; batch 64. Rows:

* ``timm``: ``timm.data.create_loader`` as timm's train.py calls it (``use_prefetcher=True``: the workers hand on
  uint8, its ``PrefetchLoader`` normalises in the consuming process, here on the CPU device) over
  ``timm.data.ImageDataset`` (folder) or over the Arrow rows decoded by ``datasets`` (Arrow);
* ``timm, no pf``: the same with ``use_prefetcher=False`` (the workers normalise);
* ``timm, uint8`` and ``ours, uint8``: the batches the workers hand over (timm's: the DataLoader inside its
  PrefetchLoader), counted as they arrive: what a GPU run's CPUs supply; its GPU then finishes them (normalises;
  ours also jitters), work the GPU does in a fraction of a step;
* ``ours, pil``: our loader's reference path (Pillow in the workers, timm's transforms: the default before
  ``--decode``);
* ``ours, cpu``: the tensor pipeline, decoding in the workers (``--decode cpu``); colour jitter and normalisation run
  in the consuming process (on a GPU run, on the GPU), and they are timed here, on this CPU, inside the row;
* ``ours, prep``: the same on the Arrow copy after ``timm-popup prepare --max-side`` ``--prepared-side`` (other
  data: the images made smaller once; what the command buys).

Each row reads every image once per round after one warm-up batch; rows are interleaved over ``--rounds`` and the
best round is reported, with its ratio to the faster of timm's two finished rows (a ``uint8`` row: to timm's). With
a CUDA GPU: ``ours, gpu`` (the training GPU decodes, images/s per GPU, CPU cores busy) and the ResNet-50 b256 bf16
step fed by the GPU pipeline against the same step on synthetic data.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import timm
import timm.data
import torch
from machine import check_idle, load_line
from PIL import Image
from torchvision import transforms as T

from timm_popup.data import (
    Augmentation,
    ImageDataset,
    PrepareOptions,
    build_transforms,
    choose_decode,
    create_loader,
    finish_images,
    load_image_dataset,
    prepare_dataset,
)
from timm_popup.data.decode import decode_cpu, read_encoded
from timm_popup.data.ops import normalize, resized_crop

SIZE = (500, 375)
CFG = dict(input_size=(3, 224, 224), interpolation="bilinear", mean=timm.data.IMAGENET_DEFAULT_MEAN,
           std=timm.data.IMAGENET_DEFAULT_STD, crop_pct=0.875)
AUG = Augmentation(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4)


def _photo(rng: np.random.Generator) -> np.ndarray:
    """A photo-like 500x375 image: smooth shapes at several scales plus sensor noise (JPEG sizes near ImageNet's)."""
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for scale in (80, 25, 7):
        phase = rng.uniform(0, 2 * np.pi, (3, 2))
        for c in range(3):
            img[..., c] += 40 * np.sin(x / scale + phase[c, 0]) * np.cos(y / (scale * 1.3) + phase[c, 1])
    img += 128 + rng.normal(0, 10, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` JPEGs in ``root/folder/class_k/`` and their Arrow copy in ``root/arrow`` (made once)."""
    folder, arrow = root / "folder", root / "arrow"
    if not arrow.is_dir():
        rng = np.random.default_rng(0)
        rows = {"image": [], "label": []}
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(_photo(rng)).save(buf, "JPEG", quality=90)
            path = folder / f"class_{i % 10}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.getvalue())
            rows["image"].append({"bytes": buf.getvalue(), "path": path.name})
            rows["label"].append(i % 10)
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=[f"class_{k}" for k in range(10)])})
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(arrow))
    return folder, arrow


class _ArrowForTimm(torch.utils.data.Dataset):
    """The Arrow rows decoded by ``datasets`` into PIL images, for timm's create_loader (it sets ``transform``)."""

    def __init__(self, rows: datasets.Dataset) -> None:
        self.rows, self.transform = rows, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        return self.transform(row["image"].convert("RGB")), row["label"]


def timm_loader(source: str, path: Path, workers: int, batch: int, prefetcher: bool) -> torch.utils.data.DataLoader:
    dataset = (timm.data.ImageDataset(str(path)) if source == "folder"
               else _ArrowForTimm(datasets.load_from_disk(str(path))))
    return timm.data.create_loader(dataset, input_size=CFG["input_size"], batch_size=batch, is_training=True,
                                   use_prefetcher=prefetcher, device=torch.device("cpu"), scale=AUG.scale,
                                   ratio=AUG.ratio, hflip=AUG.hflip, color_jitter=AUG.color_jitter,
                                   interpolation=CFG["interpolation"], mean=CFG["mean"], std=CFG["std"],
                                   num_workers=workers, persistent_workers=False)


def our_loader(source: str, path: Path, workers: int, batch: int, decode: str | None, device: str = "cpu"
               ) -> torch.utils.data.DataLoader:
    if source == "prepared":
        ds = load_image_dataset(path)
    else:
        split = (datasets.load_dataset("imagefolder", data_dir=str(path), split="train") if source == "folder" else
                 datasets.load_from_disk(str(path)))
        ds = ImageDataset(str(path), {"train": split}, "image", "label", split.features["label"].names, "train",
                          None, num_rows={"train": len(split)})
    transform = build_transforms(CFG, is_training=True, cifar_style=False, augmentation=AUG)
    if decode is not None:
        transform, _ = choose_decode(decode, transform, device=device)
    return create_loader(ds, "train", transform, batch_size=batch, shuffle=True, num_workers=workers, seed=0,
                         drop_last=True, seeded_draws=True)


def images_per_s(loader, device: str = "cpu", finish: bool = True) -> float:
    """Images/s after one warm-up batch: delivered as normalised float batches on ``device``, or (``finish``
    False) as the batches the workers hand over, before any work of the device's."""
    it = iter(loader)
    next(it)
    start, seen = time.perf_counter(), 0
    for images, labels in it:
        if finish:
            finish_images(images, device)
        seen += len(labels)
    if device != "cpu":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def _loader(name: str, src: str, path: Path, prepared: Path, workers: int, batch: int):
    if name.startswith("timm"):  # "timm, uint8": the DataLoader inside timm's PrefetchLoader (uint8 batches)
        loader = timm_loader(src, path, workers, batch, name != "timm, no pf")
        return loader.loader if name == "timm, uint8" else loader
    if name == "ours, prep":
        return our_loader("prepared", prepared, workers, batch, "cpu")
    if name == "ours, uint8":  # the workers of a GPU run, which leave the channel means to the GPU
        return our_loader(src, path, workers, batch, "cpu", device="cuda")
    return our_loader(src, path, workers, batch, None if name == "ours, pil" else "cpu")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "timm-popup" / "bench-loader")
    p.add_argument("--prepared-side", type=int, default=320,
                   help="also time our loader on the Arrow copy after `timm-popup prepare --max-side N` (0: not)")
    p.add_argument("--allow-busy", action="store_true")
    args = p.parse_args()
    check_idle(args.allow_busy)
    torch.set_num_threads(1)  # the consuming process takes one core, as a training process leaves the rest to workers
    folder, arrow = make_images(args.cache / str(args.images), args.images)
    prepared = args.cache / str(args.images) / f"prepared-{args.prepared_side}"
    if args.prepared_side and not prepared.is_dir():
        prepare_dataset(load_image_dataset(arrow), prepared, PrepareOptions(args.prepared_side), progress=False)
    sizes = [f.stat().st_size for f in folder.rglob("*.jpg")]
    print(f"{len(sizes)} JPEGs {SIZE[0]}x{SIZE[1]} q90, mean {np.mean(sizes) / 1024:.0f} KiB; RandomResizedCrop 224 + "
          f"flip + jitter 0.4 + normalize, batch {args.batch_size}; torch {torch.__version__}, timm {timm.__version__}")
    finished = ("timm", "timm, no pf", "ours, pil", "ours, cpu")
    handed = ("timm, uint8", "ours, uint8")
    rows = [(src, w, name) for w in args.workers for src in ("arrow", "folder")
            for name in finished + (("ours, prep",) if args.prepared_side and src == "arrow" else ()) + handed]
    best: dict[tuple, float] = {}
    for _ in range(args.rounds):
        for src, w, name in rows:
            loader = _loader(name, src, folder if src == "folder" else arrow, prepared, w, args.batch_size)
            rate = images_per_s(loader, finish=name not in handed)
            best[src, w, name] = max(best.get((src, w, name), 0.0), rate)
            del loader
    print("finished: normalised float batches made in the consuming process (ours jitters there too; the device is "
          "this CPU)\nuint8: the batches the workers hand over, what a GPU run moves to its GPU and finishes there")
    print(f"{'source':<7} {'workers':>7}  {'loader':<11} {'images/s':>9} {'vs timm':>8}")
    for src, w, name in rows:
        timm_rate = (best[src, w, "timm, uint8"] if name in handed else
                     max(best[src, w, "timm"], best[src, w, "timm, no pf"]))
        print(f"{src:<7} {w:>7}  {name:<11} {best[src, w, name]:>9.1f} {best[src, w, name] / timm_rate:>7.2f}x")
    stages(folder, args.batch_size)
    if torch.cuda.is_available():
        gpu_rows(folder, arrow, args)
    else:
        print("ours, gpu: not timed: no CUDA device here (the GPU decode and the ResNet-50 step rows need one)")
    print(f"after: {load_line()}; CPU seconds of this process {resource.getrusage(resource.RUSAGE_SELF).ru_utime:.0f}")
    return 0


def stages(folder: Path, batch: int, n: int = 512) -> None:
    """What gave what: each stage of one example, timm's way against ours, on the same images and crop boxes in
    this process (one core), then the device's per-batch finishing on this CPU."""
    files = sorted(folder.rglob("*.jpg"))[:n]
    raw = [f.read_bytes() for f in files]
    encoded = [read_encoded(str(f)) for f in files]
    crop = timm.data.transforms.RandomResizedCropAndInterpolation(224, scale=AUG.scale)
    random.seed(0)
    boxes = [crop.get_params(Image.new("RGB", SIZE), crop.scale, crop.ratio) for _ in files]
    pils = [Image.open(io.BytesIO(b)).convert("RGB") for b in raw]
    full = [decode_cpu(e, 3)[0] for e in encoded]
    jitter = T.ColorJitter(*(AUG.color_jitter,) * 3)
    small = [p.resize((224, 224)) for p in pils]

    def per_image(fn) -> float:
        start = time.perf_counter()
        for i in range(len(files)):
            fn(i)
        return (time.perf_counter() - start) / len(files) * 1e3

    pixels = torch.stack([resized_crop(f, b, (224, 224), "bilinear")
                          for f, b in zip(full[:batch], boxes[:batch], strict=True)])
    draws = torch.tensor([[0, 1, 2, 3, 1.2, 0.8, 1.1]] * batch, dtype=torch.float64)
    start = time.perf_counter()
    for _ in range(8):
        normalize(pixels, CFG["mean"], CFG["std"], draws)
    device_ms = (time.perf_counter() - start) / 8 / batch * 1e3
    rows = [
        ("decode", "Pillow, whole image", per_image(lambda i: Image.open(io.BytesIO(raw[i])).convert("RGB")),
         "region of the crop", per_image(lambda i: decode_cpu(encoded[i], 3, tuple(boxes[i]))[0])),
        ("", "", 0.0, "torchvision, whole image", per_image(lambda i: decode_cpu(encoded[i], 3)[0])),
        ("crop + resize", "Pillow", per_image(lambda i: crop_resize_pil(pils[i], boxes[i])),
         "uint8 tensor", per_image(lambda i: resized_crop(full[i], boxes[i], (224, 224), "bilinear"))),
        ("jitter + to float", "Pillow + ToTensor + Normalize", per_image(lambda i: TIMM_TAIL(jitter(small[i]))),
         "device, per image of a batch", device_ms),
    ]
    print(f"per image, one core, ms ({len(files)} images, the same crop boxes): {'stage':<17} timm's way  ours")
    for stage, theirs, t_theirs, ours, t_ours in rows:
        left = f"{theirs} {t_theirs:.3f}" if theirs else ""
        print(f"  {stage:<17} {left:<34} {ours} {t_ours:.3f}")


def crop_resize_pil(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    top, left, height, width = box
    return image.resize((224, 224), Image.BILINEAR, box=(left, top, left + width, top + height))


TIMM_TAIL = T.Compose([T.ToTensor(), T.Normalize(CFG["mean"], CFG["std"])])


def gpu_rows(folder: Path, arrow: Path, args: argparse.Namespace) -> None:
    """GPU decode images/s per GPU (CPU cores busy meanwhile), and the ResNet-50 b256 bf16 step fed by it against
    synthetic data."""
    for w in args.workers:
        loader = our_loader("arrow", arrow, w, args.batch_size, "gpu")
        cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        rate = images_per_s(loader, "cuda")
        wall = time.perf_counter() - t0
        self1, cpu1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        busy = ((self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime)
                + (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime)) / wall
        print(f"arrow   {w:>7}  ours, gpu   {rate:>9.1f}  per GPU ({torch.cuda.get_device_name()}), "
              f"{busy:.1f} CPU cores busy")
    model = timm.create_model("resnet50").cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    synth = torch.randn(256, 3, 224, 224, device="cuda"), torch.randint(0, 10, (256,), device="cuda")
    for _ in range(5):
        step(*synth)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step(*synth)
    torch.cuda.synchronize()
    synthetic = 20 * 256 / (time.perf_counter() - t0)
    loader = our_loader("arrow", arrow, max(args.workers), 256, "gpu")
    n, t0 = 0, None
    for _ in range(3):
        for images, labels in loader:
            x = finish_images(images, "cuda")
            step(x, labels.cuda(non_blocking=True))
            if t0 is None:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            else:
                n += x.shape[0]
    torch.cuda.synchronize()
    fed = n / (time.perf_counter() - t0)
    print(f"ResNet-50 b256 bf16 step: synthetic {synthetic:.0f} img/s, fed by the GPU pipeline {fed:.0f} img/s "
          f"({fed / synthetic:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
