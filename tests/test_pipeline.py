"""The tensor pipeline (issue 33): the same draws as the reference PIL path, its pixels within a stated tolerance of
it, the GPU placement's code run on the CPU device equal to the CPU placement's, resumes and worker counts changing
nothing, unreadable files named, and the choice of pipeline said in one line. Generated JPEGs, nothing downloaded."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from accelerate import skip_first_batches
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from timm_popup.data import (
    Augmentation,
    ImageDataset,
    TensorBatch,
    UnreadableImageError,
    build_transforms,
    choose_decode,
    create_loader,
    finish_images,
)
from timm_popup.data.decode import decode_cpu, read_encoded, reduction, region_decoder
from timm_popup.data.pipeline import TensorPipeline

CFG = dict(input_size=(3, 48, 48), interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
           crop_pct=0.875)
AUG = Augmentation(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4)
NO_JITTER = Augmentation(scale=(0.08, 1.0), hflip=0.5, vflip=0.5)
STD = torch.tensor(CFG["std"]).view(1, 3, 1, 1)
# Tolerances, in levels of 0..255, against the reference (Pillow's resampling and ImageEnhance, rounded to uint8
# after each operation): the geometry alone within 2 levels anywhere; with colour jitter (one colour matrix per
# example, clamped once: torchvision clamps after each operation) within 2 levels on average.
GEOMETRY_MAX, JITTER_MEAN = 2.0, 2.0


def _jpeg(rng: np.random.Generator, width: int, height: int, *, mode: str = "RGB", fmt: str = "JPEG",
          period: float = 5) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([128 + 90 * np.sin(x / (period + 3 * c) + rng.uniform(0, 6)) * np.cos(y / (period + 2 + 2 * c))
                    for c in range(3)], -1) + rng.normal(0, 8, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode).save(buf, fmt, quality=90)
    return buf.getvalue()


def _dataset(images: list[bytes], paths: list[str | None] | None = None) -> ImageDataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [{"bytes": b, "path": p} for b, p in zip(images, paths or [None] * len(images), strict=True)],
            "label": [i % 2 for i in range(len(images))]}
    split = datasets.Dataset.from_dict(rows, features=features)
    return ImageDataset("generated", {"train": split}, "image", "label", ["a", "b"], "train", None,
                        num_rows={"train": len(images)})


@pytest.fixture(scope="module")
def jpegs() -> ImageDataset:
    rng = np.random.default_rng(0)
    return _dataset([_jpeg(rng, 120 + 8 * (i % 3), 90 + 6 * (i % 2)) for i in range(12)])


def _loaders(ds, augmentation, *, training=True, workers=0, seed=3, shuffle=None):
    """The reference loader, the cpu placement's and the gpu placement's (its code on the CPU device)."""
    transform = build_transforms(CFG, is_training=training, cifar_style=False, augmentation=augmentation)
    cpu, why = choose_decode("cpu", transform, device="cpu")
    assert cpu is not None, why
    on_device = TensorPipeline(cpu.program, on_device=True)
    kwargs = dict(batch_size=4, shuffle=training if shuffle is None else shuffle, seed=seed, seeded_draws=training,
                  num_workers=workers)
    return [create_loader(ds, "train", t, **kwargs) for t in (transform, cpu, on_device)]


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) * STD * 255).abs()


@pytest.mark.parametrize("training", [True, False])
def test_geometry_matches_the_reference_and_the_gpu_placement_matches_the_cpu_one(jpegs, training):
    for (ref, _), (cpu, _), (dev, _) in zip(*_loaders(jpegs, NO_JITTER, training=training), strict=True):
        assert isinstance(cpu, TensorBatch) and isinstance(dev, TensorBatch)
        assert isinstance(cpu.images, torch.Tensor) and cpu.images.dtype == torch.uint8  # workers hand on uint8
        assert cpu.draws == dev.draws  # the same crop boxes and flips, drawn in the workers
        got_cpu, got_dev = finish_images(cpu, "cpu"), finish_images(dev, "cpu")
        assert got_cpu.dtype == torch.float32 and got_cpu.shape == ref.shape
        assert torch.equal(got_cpu, got_dev)
        assert _levels(got_cpu, ref).max() <= GEOMETRY_MAX


def test_jitter_matches_the_reference_within_the_stated_tolerance(jpegs):
    for (ref, _), (cpu, _), (dev, _) in zip(*_loaders(jpegs, AUG), strict=True):
        assert cpu.draws == dev.draws and any(d.jitter[4:] != (1.0, 1.0, 1.0) for d in cpu.draws)
        assert cpu.means is not None and dev.means is None  # the workers took them / the device takes them
        torch.testing.assert_close(cpu.means, cpu.images.float().mean(dim=(2, 3)))
        got_cpu, got_dev = finish_images(cpu, "cpu"), finish_images(dev, "cpu")
        assert _levels(got_cpu, ref).mean() <= JITTER_MEAN
        assert _levels(got_dev, got_cpu).max() <= 0.5 + 1e-3  # the workers round to uint8 once, the device does not


def test_draws_follow_seed_epoch_and_example_not_workers_or_resume(jpegs):
    # in order: the training loader's order per epoch is Accelerate's seedable sampler's (tests/test_train.py)
    _, cpu0, _ = _loaders(jpegs, AUG, workers=0, shuffle=False)
    _, cpu2, _ = _loaders(jpegs, AUG, workers=2, shuffle=False)
    for loader in (cpu0, cpu2):
        loader.dataset.set_epoch(1)
    batches0, batches2 = list(cpu0), list(cpu2)
    for (a, la), (b, lb) in zip(batches0, batches2, strict=True):
        assert a.draws == b.draws and torch.equal(a.images, b.images) and torch.equal(la, lb)
    # resumed after the first batch (what runstate.position_loader does), the rest draws exactly the same
    resumed = list(skip_first_batches(cpu0, 1))
    assert [b.draws for b, _ in resumed] == [b.draws for b, _ in batches0[1:]]
    # another epoch draws other crops
    cpu0.dataset.set_epoch(2)
    assert [b.draws for b, _ in cpu0] != [b.draws for b, _ in batches0]


def _encoded(data: bytes):
    return read_encoded({"bytes": data, "path": None})


def _boxes(rng: np.random.Generator, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Boxes at every edge, of one pixel, of the whole image, and random ones."""
    edges = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1), (0, width - 7, 5, 7),
             (height - 9, 0, 9, 13), (3, 17, height - 3, width - 17)]
    rand = []
    for _ in range(40):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        rand.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return edges + rand


@pytest.mark.parametrize("kind", ["420", "444", "grey", "progressive"])
def test_a_crops_region_decodes_to_exactly_the_full_decodes_pixels(kind):
    # the region decoder compiles wherever the tests run (gcc, libjpeg-turbo's headers): a broken build fails here
    assert region_decoder()[0] is not None, region_decoder()[1]
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:101, 0:157]
    img = np.stack([128 + 90 * np.sin(x / (3 + c)) * np.cos(y / (4 + c)) for c in range(3)], -1)
    img = Image.fromarray(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    options = {"420": dict(subsampling=2), "444": dict(subsampling=0), "progressive": dict(progressive=True),
               "grey": {}}[kind]
    (img.convert("L") if kind == "grey" else img).save(buf, "JPEG", quality=90, **options)
    encoded = _encoded(buf.getvalue())
    for channels in (1, 3):
        full = decode_jpeg(encoded.data, mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
        for box in _boxes(rng, 101, 157):
            pixels, where = decode_cpu(encoded, channels, box)
            top, left, h, w = box
            assert where == (0, 0, h, w) and pixels.shape == (channels, h, w)  # the region alone came back
            assert torch.equal(pixels, full[:, top:top + h, left:left + w]), (kind, channels, box)


def test_reduced_regions_equal_pillows_draft_and_the_decoder_off_changes_no_pixel(monkeypatch):
    rng = np.random.default_rng(5)
    jpeg, cmyk = _encoded(_jpeg(rng, 333, 250, period=30)), _encoded(_jpeg(rng, 64, 48, mode="CMYK"))
    cases = [(jpeg, box, scale) for scale in (1, 2, 4, 8) for box in _boxes(rng, 250, 333)[::4]]
    regions = [decode_cpu(image, 3, box, scale) for image, box, scale in cases]
    assert all(where[:2] == (0, 0) for _, where in regions)
    cmyk_box = (4, 5, 20, 30)
    assert decode_cpu(cmyk, 3, cmyk_box)[1] == cmyk_box  # left to the full decoders (Pillow)
    monkeypatch.setenv("TIMM_POPUP_NATIVE", "0")
    region_decoder.cache_clear()
    try:
        assert region_decoder() == (None, "TIMM_POPUP_NATIVE=0")
        for (image, box, scale), (pixels, (_, _, h, w)) in zip(cases, regions, strict=True):
            # whole, by torchvision's decoder (scale 1) or Pillow's draft mode (reduced): the box is where it said
            full, (top, left, height, width) = decode_cpu(image, 3, box, scale)
            assert (height, width) == (h, w) and torch.equal(pixels, full[:, top:top + h, left:left + w]), (
                scale, box)
    finally:
        monkeypatch.delenv("TIMM_POPUP_NATIVE")
        region_decoder.cache_clear()


def test_without_a_compiler_whole_jpegs_are_decoded_and_the_line_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # answers --version with an error: no compiler
    monkeypatch.setenv("TIMM_POPUP_CACHE", str(tmp_path / "cache"))
    region_decoder.cache_clear()
    try:
        train = build_transforms(CFG, is_training=True, cifar_style=False, augmentation=AUG)
        pipe, line = choose_decode("cpu", train, device="cpu")
        assert pipe is not None and line.startswith("cpu (workers decode whole JPEGs with torchvision's decoder (the "
                                                     "region decoder is unavailable: false --version failed)")
        jpeg = _encoded(_jpeg(np.random.default_rng(6), 64, 48))
        assert decode_cpu(jpeg, 3, (2, 3, 20, 30))[1] == (2, 3, 20, 30)  # the whole image, the box inside it
        assert not any((tmp_path / "cache").glob("*.tmp"))
    finally:
        region_decoder.cache_clear()


def test_reduced_dct_decoding_for_crops_twice_the_output(tmp_path):
    assert reduction((0, 0, 200, 200), (48, 48)) == 2 and reduction((0, 0, 200, 190), (48, 48)) == 1
    assert reduction((0, 0, 800, 800), (48, 48)) == 8 and reduction(None, (48, 48)) == 1
    # content well below the output's resolution: the reduced decode places the crop to half a reduced pixel (s / 2
    # source pixels), which on detail near the output's Nyquist limit alone moves values by several levels
    big = _dataset([_jpeg(np.random.default_rng(1), 480, 400, period=40) for _ in range(4)])
    scale = Augmentation(scale=(0.8, 1.0), hflip=0.5)  # crops of 360-480 px for a 48 px output
    for (ref, _), (cpu, _), (dev, _) in zip(*_loaders(big, scale), strict=True):
        assert {reduction(d.box, (48, 48)) for d in cpu.draws} <= {2, 4} and any(
            reduction(d.box, (48, 48)) == 4 for d in cpu.draws)
        # decoded at 1/2 or 1/4 then resized, against decoded in full (the device path) and Pillow's reference
        assert _levels(finish_images(cpu, "cpu"), finish_images(dev, "cpu")).mean() <= 2.0
        assert _levels(finish_images(cpu, "cpu"), ref).mean() <= 2.0


def test_png_cmyk_and_grey_fall_back_and_a_corrupt_file_is_named(tmp_path):
    rng = np.random.default_rng(2)
    odd = [_jpeg(rng, 64, 48, fmt="PNG"), _jpeg(rng, 64, 48, mode="CMYK"), _jpeg(rng, 64, 48, mode="L"),
           _jpeg(rng, 64, 48)]
    for ref, cpu, dev in zip(*_loaders(_dataset(odd), NO_JITTER), strict=True):
        assert _levels(finish_images(cpu[0], "cpu"), ref[0]).max() <= GEOMETRY_MAX
        assert torch.equal(finish_images(cpu[0], "cpu"), finish_images(dev[0], "cpu"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(odd[3][:200])
    files = [tmp_path / f"{i}.jpg" for i in range(3)]
    for f, data in zip(files, odd[:3], strict=True):
        f.write_bytes(data)
    ds = _dataset([b""] * 4, [str(p) for p in [*files, broken]])
    for loader in _loaders(ds, NO_JITTER)[1:]:
        with pytest.raises(UnreadableImageError, match=r"^cannot read image .*broken\.jpg \(.*\): remove or replace "
                                                        r"it$"):
            for images, _ in loader:
                finish_images(images, "cpu")
    assert read_encoded({"bytes": None, "path": "hf://datasets/x/y.jpg"}) is None  # remote: the reference reads it


def test_which_pipeline_runs_is_said_and_checked():
    train = build_transforms(CFG, is_training=True, cifar_style=False, augmentation=AUG)
    pipe, line = choose_decode("auto", train, device="cpu")
    assert not pipe.on_device and line.startswith("cpu (") and line.endswith("chosen by auto")
    assert pipe.means_in_workers and not choose_decode("cpu", train, device="cuda")[0].means_in_workers
    with pytest.raises(ValueError, match="--decode gpu decodes with nvJPEG on the training GPU"):
        choose_decode("gpu", train, device="cpu")
    small = build_transforms(dict(CFG, input_size=(3, 32, 32)), is_training=True, cifar_style=True,
                             augmentation=Augmentation(pad_crop=4))
    assert choose_decode("cpu", small, device="cpu") == (None, "pil (Pillow in the workers, the reference "
                                                               "transforms: the small-image transforms (inputs of at "
                                                               "most 32 px, fed as they are), cheap in Pillow)")
    erasing = build_transforms(CFG, is_training=True, cifar_style=False, augmentation=Augmentation(
        scale=(0.08, 1.0), reprob=0.25))
    assert choose_decode("cpu", erasing, device="cpu")[0] is None
    assert choose_decode("cpu", train, device="cpu", streaming=True)[1].startswith("pil (")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the nvJPEG path needs a CUDA GPU; its code runs on the "
                                                          "CPU device in the tests above")
def test_nvjpeg_on_the_gpu_matches_the_cpu_placement(jpegs):
    _, cpu, dev = _loaders(jpegs, AUG)
    for (a, _), (b, _) in zip(cpu, dev, strict=True):
        assert a.draws == b.draws
        assert _levels(finish_images(b, "cuda").cpu(), finish_images(a, "cpu")).mean() <= 1.0
