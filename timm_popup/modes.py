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
from .layers import DEFAULT_SCORE_INIT, MAX_SLOTS, PopupMask, popup_masks, use_method

__all__ = ["MethodOptions", "make_mask_method", "global_density", "set_global_density", "freeze_lowest"]


@dataclass(frozen=True)
class MethodOptions:
    """The hyperparameters of the methods that have them (``train_accelerate.py``'s flags of the same names)."""

    slots: int = 8  # slot-machine: candidate values per weight (the paper's K; 8 is among its best)
    redraw_every: int = 300  # iterand: optimizer updates between re-draws (the paper's K_per)
    redraw_rate: float = 0.1  # iterand: probability that a pruned weight is re-drawn (the paper's lambda)
    freeze_every: int = 5  # gem-miner: epochs between freezing events (its code's iter_period; 5 in its configs)
    score_l2: float = 1e-4  # gem-miner: lambda of its regulariser lambda * ||scores||^2 (its configs' lmbda)
    density_epochs: int = 0  # global-topk: epochs over which the density reaches k (biprop's prune_rate_epoch)

    def __post_init__(self) -> None:
        if not 2 <= self.slots <= MAX_SLOTS:  # a file holds at most MAX_SLOTS: a larger run could not be loaded
            raise ValueError(f"--slots {self.slots}: a slot machine chooses among 2 to {MAX_SLOTS} values per weight")
        if self.redraw_every < 1:
            raise ValueError(f"--redraw-every {self.redraw_every}: re-draw every N >= 1 optimizer updates")
        if not 0.0 < self.redraw_rate <= 1.0:
            raise ValueError(f"--redraw-rate {self.redraw_rate} is outside (0, 1]: the probability that a pruned "
                             "weight is re-drawn")
        if self.freeze_every < 1:
            raise ValueError(f"--freeze-every {self.freeze_every}: freeze every N >= 1 epochs")
        if not (self.score_l2 >= 0.0 and math.isfinite(self.score_l2)):
            raise ValueError(f"--score-l2 {self.score_l2}: the regulariser's weight is a number >= 0")
        if self.density_epochs < 0:
            raise ValueError(f"--density-epochs {self.density_epochs}: a number of epochs >= 0 (0: k from the start)")


def make_mask_method(model: nn.Module, method: str, options: MethodOptions | None = None) -> nn.Module:
    """Put a popup ``model`` in place into a mask-learning ``method`` (``global-topk``, ``biprop``, ``iterand``,
    ``signed-supermask``, ``slot-machine``, ``gem-miner``; module docstring): its masks switch mode, its config
    records it."""
    options = options or MethodOptions()
    cfg = model.popup_config
    masks = list(popup_masks(model).values())
    if method == "global-topk" and cfg.score_init == DEFAULT_SCORE_INIT:
        _common_score_scale(masks)
    if method == "gem-miner" and cfg.score_init == DEFAULT_SCORE_INIT:
        # its scores are probabilities, rounded at 0.5: they start U(0, 1) (its code's "unif") unless chosen
        cfg.score_init = "uniform"
        for mask in masks:
            mask.score_init = cfg.score_init
            mask.reset_scores()
    use_method(masks, method, k=cfg.k, slots=options.slots, score_l2=options.score_l2)
    cfg.method = method
    if method == "slot-machine":
        cfg.slots = options.slots
    if method == "iterand":
        cfg.redraw_every, cfg.redraw_rate = options.redraw_every, options.redraw_rate
    if method == "gem-miner":
        cfg.freeze_every, cfg.score_l2 = options.freeze_every, options.score_l2
    if method == "global-topk" and options.density_epochs:
        cfg.density_epochs = options.density_epochs
        set_global_density(model, global_density(cfg.k, 0, cfg.density_epochs))
    return model


def global_density(k: float, epoch: int, density_epochs: int) -> float:
    """The density global top-k keeps in ``epoch`` (0-based) when it reaches ``k`` over ``density_epochs`` epochs,
    as biprop's code (main.py, ``--prune_rate_epoch``) schedules it: from 0.5 down to k along (1 - epoch/E)^3, and
    only for k <= 0.5 (a larger k is kept from the start)."""
    if k > 0.5 or epoch >= density_epochs:
        return k
    return k + (0.5 - k) * (1 - epoch / density_epochs) ** 3


def set_global_density(model: nn.Module, density: float) -> None:
    """Make a global top-k ``model`` keep ``density`` of its weights (its group's k; the artifact records k)."""
    groups = {id(mask.group): mask.group for mask in popup_masks(model).values() if mask.group is not None}
    for group in groups.values():
        if group.k != density:
            group.set_k(density)


def freeze_lowest(masks: list[PopupMask], rate: float) -> int:
    """Gem-Miner's freezing event: of the weights still alive in all ``masks``, freeze out (``alive`` False, for
    good) ``ceil(rate * alive)`` of lowest score, ties to the lowest index in model order; returns how many."""
    with torch.no_grad():
        alive = torch.cat([mask.alive.reshape(-1) for mask in masks])
        scores = torch.cat([mask.scores.detach().reshape(-1).to(alive.device) for mask in masks])
        count = math.ceil(rate * int(alive.sum()))
        order = torch.argsort(scores.masked_fill(~alive, math.inf), stable=True)
        alive[order[:count]] = False
        for mask, part in zip(masks, alive.split([mask.alive.numel() for mask in masks]), strict=True):
            mask.alive.copy_(part.view(mask.alive.shape))
    return count


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
