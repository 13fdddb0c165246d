r"""Seeded ``DataLoader``\ s over one split of an :class:`~timm_popup.data.sources.ImageDataset`: map-style and
streamed, sharded by process, resumable mid-epoch, their workers leaving signals to the trainer."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from .decode import to_pil, undecoded
from .draws import example_seed, restored_draws, seed_draws
from .pipeline import TensorBatch, TensorPipeline
from .sources import ImageDataset, check_split

__all__ = ["create_loader"]

class _BatchTransform:
    """``with_transform`` hook: decode + transform only the two used columns, lazily, per fetched batch."""

    def __init__(self, image_column: str, label_column: str, transform: Callable,
                 label_map: Sequence[int] | None = None, decoder: datasets.Image | None = None) -> None:
        self.image_column, self.label_column, self.transform = image_column, label_column, transform
        self.label_map, self.decoder = label_map, decoder

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"image": [self.transform(to_pil(v, self.decoder)) for v in batch[self.image_column]],
                "label": [_map_label(int(v), self.label_map) for v in batch[self.label_column]]}


class _PilExample:
    """The reference path's half of one example: the PIL image through the reference transform."""

    def __init__(self, transform: Callable, decoder: datasets.Image | None) -> None:
        self.transform, self.decoder = transform, decoder

    def __call__(self, value: Any) -> dict[str, Any]:
        return {"image": self.transform(to_pil(value, self.decoder))}


class _TensorExample:
    def __init__(self, pipeline: TensorPipeline, decoder: datasets.Image | None) -> None:
        self.pipeline, self.decoder = pipeline, decoder

    def __call__(self, value: Any) -> dict[str, Any]:
        return self.pipeline.example(value, self.decoder)


def _example(transform: Callable | TensorPipeline, decoder: datasets.Image | None) -> Callable[[Any], dict]:
    return _TensorExample(transform, decoder) if isinstance(transform, TensorPipeline) else _PilExample(
        transform, decoder)


def _map_label(label: int, label_map: Sequence[int] | None) -> int:
    return label if label_map is None or label < 0 else label_map[label]


class _SeededImages(torch.utils.data.Dataset):
    """A map-style split whose example ``i`` in epoch ``e`` is augmented with draws seeded by (seed, e, i).

    So an example's augmentation does not depend on which worker transforms it, how many came before it or whether
    the first batches of the epoch were skipped: a run resumed mid-epoch (``skip_first_batches``) draws what the
    uninterrupted run drew, with any number of workers, and no worker's generator state needs saving.
    """

    def __init__(self, rows: datasets.Dataset, image_column: str, label_column: str,
                 transform: Callable | TensorPipeline, label_map: Sequence[int] | None, decoder: datasets.Image,
                 seed: int | None) -> None:
        self.rows, self.example, self.label_map, self.seed = rows, _example(transform, decoder), label_map, seed
        self.image_column, self.label_column, self.epoch = image_column, label_column, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        batch = self.rows[list(indices)]
        out = []
        with restored_draws(torch.utils.data.get_worker_info() is None):
            for index, value, label in zip(indices, batch[self.image_column], batch[self.label_column], strict=True):
                if self.seed is not None:
                    seed_draws(example_seed(self.seed, self.epoch, int(index)))
                out.append({**self.example(value), "label": _map_label(int(label), self.label_map)})
        return out


_SKIPPED = {"image": None, "label": -1}


class _StreamingImages(torch.utils.data.IterableDataset):
    """Transforms a streamed ``datasets.IterableDataset`` example by example.

    Iterating the wrapped dataset inside each DataLoader worker lets ``datasets`` give every worker its own shards;
    ``set_epoch`` is forwarded so Accelerate's per-epoch call reshuffles the stream (seed + epoch). With ``seed``,
    example ``j`` of worker ``w`` of shard ``shard`` is augmented with draws seeded by (seed, epoch, shard, w, j).
    ``resume_at(batches, batch_size)`` makes the next pass start after the first ``batches`` batches this process
    read: every worker reads its part of them again (the stream, and its shuffle buffer, have no other way to reach
    that position exactly) but decodes nothing, and yields an empty batch in place of each (``_collate``), so the
    workers take turns exactly as before. Exact when the workers' parts of the stream last at least that far.
    """

    def __init__(self, stream: datasets.IterableDataset, image_column: str, label_column: str,
                 transform: Callable | TensorPipeline, label_map: Sequence[int] | None = None,
                 decoder: datasets.Image | None = None, seed: int | None = None, shard: int = 0) -> None:
        super().__init__()
        self.stream, self.example, self.label_map = stream, _example(transform, decoder), label_map
        self.image_column, self.label_column = image_column, label_column
        self.seed, self.shard, self.epoch, self.skip, self.batch_size = seed, shard, 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)
        self.epoch, self.skip = epoch, 0

    def resume_at(self, batches: int, batch_size: int) -> None:
        self.skip, self.batch_size = batches, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # datasets gives worker w the shards w, w + workers, ...: with fewer shards than workers some get none, and
        # the DataLoader takes batches in turn from the others
        active = max(1, min(workers, self.stream.num_shards))
        skipped = len(range(worker, self.skip, active)) * self.batch_size
        for j, example in enumerate(self.stream):
            if j < skipped:
                yield _SKIPPED
                continue
            with restored_draws(info is None):
                if self.seed is not None:
                    seed_draws(example_seed(self.seed, self.epoch, self.shard, worker, j))
                row = self.example(example[self.image_column])
            yield {**row, "label": _map_label(int(example[self.label_column]), self.label_map)}


def _leave_stopping_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM, SIGUSR1 and SIGINT: schedulers and launchers signal a whole process tree,
    and the training process, which stops on them after a checkpoint, ends its workers itself (they also end when
    it dies). The disposition is the process's, so no thread of the worker is left to die of it (torch starts
    threads before ``worker_init_fn`` runs, so a signal mask set here would not cover them)."""
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _end_workers_at_exit() -> None:
    """Kill this process's DataLoader workers that are still alive. multiprocessing ends daemonic children at exit
    with SIGTERM and then waits for them: workers that ignore SIGTERM (a loader nobody closed, e.g. after an error)
    would hang the exit. Registered after multiprocessing's own exit function, so it runs before it."""
    for child in multiprocessing.active_children():
        try:
            worker = Path(f"/proc/{child.pid}/comm").read_text().strip() == "pt_data_worker"
        except OSError:
            worker = child.daemon  # no /proc: every daemonic child (the workers are)
        if worker:
            child.kill()
            child.join(timeout=5)


class _Collate:
    """Rows -> (images, labels): float images of the reference path, or a :class:`TensorBatch`."""

    def __init__(self, pipeline: TensorPipeline | None) -> None:
        self.pipeline = pipeline

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor | TensorBatch, torch.Tensor]:
        if rows[0]["image"] is None:  # a batch skipped on resume: nothing to train on, only its place in the turn
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        if self.pipeline is not None:
            return self.pipeline.collate(rows), labels
        return torch.stack([r["image"] for r in rows]).float(), labels


def create_loader(ds: ImageDataset, split: str, transform: Callable | TensorPipeline, *, batch_size: int,
                  shuffle: bool,
                  num_workers: int = 0, seed: int = 0, drop_last: bool = False, shuffle_buffer: int = 10_000,
                  pin_memory: bool = False, num_shards: int = 1, shard_index: int = 0,
                  label_map: Sequence[int] | None = None, seeded_draws: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over one split yielding ``(images, labels int64 [B])``: images float32 [B, C, H, W] from a reference
    ``transform`` (PIL), or a :class:`~timm_popup.data.pipeline.TensorBatch` from a ``TensorPipeline``
    (:func:`~timm_popup.data.pipeline.choose_decode`), which :func:`~timm_popup.data.pipeline.finish_images` turns
    into the same float images on the training device.

    Map-style splits decode and transform lazily via ``with_transform`` and shuffle with a ``torch.Generator`` seeded
    with ``seed``; streaming splits shuffle with a ``shuffle_buffer``-example buffer seeded with ``seed`` (call
    ``set_epoch`` on the dataset, or Accelerate's ``loader.set_epoch``, to vary the order per epoch). Worker seeds
    also derive from the generator, so with ``num_workers > 0`` the augmentation is reproducible too; with 0 workers
    it uses the global torch RNG (seed it, e.g. ``accelerate.utils.set_seed``).

    ``num_shards`` / ``shard_index`` keep one process's part of the split (contiguous rows of a map-style split; for a
    stream, whole shards when they divide evenly, else every ``num_shards``-th example), so that each of several
    processes reads and decodes only its own images. ``label_map[i]`` replaces label ``i`` (see :func:`label_mapping`).

    ``seeded_draws`` (training): each example's augmentation draws from generators seeded by (``seed``, the epoch
    ``set_epoch`` gave, the example's index or place in the stream), whichever worker or process transforms it, so a
    run resumed mid-epoch draws exactly what the uninterrupted one drew.
    """
    split_ds, decoder = undecoded(ds.splits[check_split(ds, split)], ds.image_column)
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")
    generator = torch.Generator().manual_seed(seed)
    if num_workers:
        atexit.unregister(_end_workers_at_exit)  # once per process, whatever the number of loaders
        atexit.register(_end_workers_at_exit)
    pipeline = transform if isinstance(transform, TensorPipeline) else None
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=_Collate(pipeline), drop_last=drop_last,
                  generator=generator, pin_memory=pin_memory,
                  worker_init_fn=_leave_stopping_to_the_trainer if num_workers else None)
    if isinstance(split_ds, datasets.IterableDataset):
        if num_shards > 1:
            from datasets.distributed import split_dataset_by_node

            split_ds = split_dataset_by_node(split_ds, rank=shard_index, world_size=num_shards)
        stream = split_ds.select_columns([ds.image_column, ds.label_column])
        if shuffle:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        return torch.utils.data.DataLoader(
            _StreamingImages(stream, ds.image_column, ds.label_column, transform, label_map, decoder,
                             seed=seed if seeded_draws else None, shard=shard_index), **common)
    if num_shards > 1:
        split_ds = split_ds.shard(num_shards=num_shards, index=shard_index, contiguous=True)
    if seeded_draws or isinstance(transform, TensorPipeline):
        rows = split_ds.select_columns([ds.image_column, ds.label_column])
        return torch.utils.data.DataLoader(
            _SeededImages(rows, ds.image_column, ds.label_column, transform, label_map, decoder,
                          seed if seeded_draws else None), shuffle=shuffle, **common)
    mapped = split_ds.with_transform(_BatchTransform(ds.image_column, ds.label_column, transform, label_map,
                                                     decoder), columns=[ds.image_column, ds.label_column])
    return torch.utils.data.DataLoader(mapped, shuffle=shuffle, **common)
