"""The per-example draws of the augmentation: seeded by (seed, epoch, the example's place) alone, so which worker
or process transforms an example, and whether the epoch was resumed, changes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["example_seed", "seed_draws", "restored_draws"]

def example_seed(seed: int, epoch: int, *key: int) -> int:
    """The seed of one example's augmentation: a function of (seed, epoch, where the example is), nothing else."""
    digest = hashlib.blake2b(repr((seed, epoch, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_draws(value: int) -> None:
    # the three generators timm's and torchvision's transforms draw from; CUDA's is left alone
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value)


@contextlib.contextmanager
def restored_draws(restore: bool) -> Iterator[None]:
    """Put the process's generators back afterwards (in the training process itself, where dropout and mixup draw
    from them too); a loader worker has no other use for them."""
    if not restore:
        yield
        return
    state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.default_generator.set_state(state[2])
