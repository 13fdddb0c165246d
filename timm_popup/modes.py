"""What a mask-learning method *is*: its options and how it is set on a popup model (its masks' mode, its config).

Below ``convert`` (which makes a model popup, in any method) and ``methods`` (which adds what each method trains and
writes): the layer a newcomer extends with a method's mode (``layers.METHOD_MODES``) and options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .init import fans
from .layers import DEFAULT_SCORE_INIT, PopupMask, popup_masks, use_method

__all__ = ["MethodOptions", "make_mask_method"]


@dataclass(frozen=True)
class MethodOptions:
    """The hyperparameters of the methods that have them (``train_accelerate.py``'s flags of the same names)."""

    slots: int = 8  # slot-machine: candidate values per weight (the paper's K; 8 is among its best)
    redraw_every: int = 300  # iterand: optimizer updates between re-draws (the paper's K_per)
    redraw_rate: float = 0.1  # iterand: probability that a pruned weight is re-drawn (the paper's lambda)

    def __post_init__(self) -> None:
        if self.slots < 2:
            raise ValueError(f"--slots {self.slots}: a slot machine chooses among at least 2 values per weight")
        if self.redraw_every < 1:
            raise ValueError(f"--redraw-every {self.redraw_every}: re-draw every N >= 1 optimizer updates")
        if not 0.0 < self.redraw_rate <= 1.0:
            raise ValueError(f"--redraw-rate {self.redraw_rate} is outside (0, 1]: the probability that a pruned "
                             "weight is re-drawn")


def make_mask_method(model: nn.Module, method: str, options: MethodOptions | None = None) -> nn.Module:
    """Put a popup ``model`` in place into a mask-learning ``method`` (``global-topk``, ``biprop``, ``iterand``,
    ``signed-supermask``, ``slot-machine``; module docstring): its masks switch mode, its config records it."""
    options = options or MethodOptions()
    cfg = model.popup_config
    masks = list(popup_masks(model).values())
    if method == "global-topk" and cfg.score_init == DEFAULT_SCORE_INIT:
        _common_score_scale(masks)
    use_method(masks, method, k=cfg.k, slots=options.slots)
    cfg.method = method
    if method == "slot-machine":
        cfg.slots = options.slots
    if method == "iterand":
        cfg.redraw_every, cfg.redraw_rate = options.redraw_every, options.redraw_rate
    return model


def _common_score_scale(masks: list[PopupMask]) -> None:
    """Rescale every tensor's initial scores (Kaiming-uniform, bound 1/sqrt(fan_in)) to one bound, the largest
    (the narrowest fan-in's), so that the first global threshold keeps about k of every tensor, as edge-popup's
    per-layer one does. Measured on Conv4 (width 0.5, k = 0.05, Fashion-MNIST): with per-tensor bounds it starts
    by cutting fc1 (401k weights) out whole and stays at chance (a layer cut out gets no gradient to come back);
    with the smallest bound for all, the first updates move whole layers in and out and one seed of two diverged
    (9.7%); with the largest, both seeds train (64.0%, 64.8%)."""
    bounds = [1.0 / math.sqrt(fans(mask.fan_shape)[0]) for mask in masks]
    with torch.no_grad():
        for mask, bound in zip(masks, bounds, strict=True):
            mask.scores.mul_(max(bounds) / bound)
