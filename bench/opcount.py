"""Device ops a popup training step dispatches beyond the dense step: the CPU proxy of a GPU's launch count.

On a GPU every device op is (at least) one kernel launch and tens of microseconds of host work, so a step that
dispatches many small ops per masked tensor is host-bound (measured: ~3,100 launches per WRN-50-2 step before the
keyed selection). torch.profiler records the ops of one training step on the CPU; leaf ops (those that call no
other op) are counted, views and allocations excluded, so an op that decomposes into others counts once per
piece of device work it does, and an op whose only children allocate counts itself.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from torch.profiler import profile

import timm_popup
from timm_popup import native

#: ops that move no data (views, metadata) or only allocate
NOT_COMPUTE = frozenset(f"aten::{name}" for name in (
    "view", "reshape", "_reshape_alias", "as_strided", "detach", "alias", "expand", "t", "permute", "unsqueeze",
    "squeeze", "flatten", "transpose", "empty", "empty_like", "empty_strided", "resize_", "slice", "select",
    "split", "split_with_sizes", "unbind", "chunk", "narrow", "_unsafe_view", "view_as", "lift_fresh", "set_",
    "result_type", "contiguous", "_to_copy", "to"))


@contextmanager
def keyed_path(enabled: bool = True) -> Iterator[None]:
    """The path a GPU runs, on the CPU: the C kernels off (as ``TIMM_POPUP_NATIVE=0``)."""
    lib = native._library
    if enabled:
        native._library = lambda: None
    try:
        yield
    finally:
        native._library = lib


def leaf_ops(name: str, *, image_size: int = 32, batch: int = 2) -> tuple[Counter, Counter, int]:
    """The leaf compute ops of one training step of ``name`` (after two warm-up steps), of its forward and
    backward alone, and the number of its masked tensors."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 10, (batch,))

    def step(optimizer: bool = True) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if optimizer:
            opt.step()

    step()
    step()
    counts = []
    for optimizer in (True, False):
        with profile() as prof:
            step(optimizer)
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        # an op whose only children allocate or view (arange, min, zeros) does its own device work: it counts
        parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None and e.name not in NOT_COMPUTE}
        counts.append(Counter(e.name for e in events if id(e) not in parents and e.name not in NOT_COMPUTE))
    return counts[0], counts[1], len(timm_popup.popup_masks(model))


def extra_ops_per_masked_tensor(dense: str, *, image_size: int = 32, keyed: bool = True) -> tuple[float, float]:
    """(whole step, forward + backward only): leaf ops of ``popup_<dense>`` beyond ``<dense>``'s, per masked tensor."""
    base_step, base_fwd_bwd, _ = leaf_ops(dense, image_size=image_size)
    with keyed_path(keyed):
        popup_step, popup_fwd_bwd, masked = leaf_ops(f"popup_{dense}", image_size=image_size)
    return ((popup_step.total() - base_step.total()) / masked, (popup_fwd_bwd.total() - base_fwd_bwd.total()) / masked)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for keyed in (True, False):
        step, fwd_bwd = extra_ops_per_masked_tensor("resnet50", keyed=keyed)
        print(f"popup_resnet50 vs resnet50, {'keyed (GPU) path' if keyed else 'C kernels'}: {step:+.2f} leaf ops "
              f"per masked tensor per step ({fwd_bwd:+.2f} in forward + backward alone)")
