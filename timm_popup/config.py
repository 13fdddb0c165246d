"""The one typed record of how a model was made popup: what convert, the builder, loading and methods share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .init import DEFAULT_WEIGHT_INIT

__all__ = ["PopupConfig", "POPUP_ARGS"]

#: the model arguments that choose the random network (``timm.create_model`` keyword arguments)
POPUP_ARGS = ("k", "weight_init", "seed", "dense", "structure")


@dataclass
class PopupConfig:
    """How a model's popup version was made; ``model.popup_config``.

    ``method`` is the training method (``timm_popup.methods``) whose mask the model holds; ``slots``,
    ``redraw_every`` and ``redraw_rate`` are the options of the methods that have them. ``frozen`` maps the
    qualified name of every other parameter of the original model to the policy that froze it
    (``timm_popup.convert.PARAMETER_POLICY``); ``explicit`` names the arguments the caller chose
    (a loaded mask supplies the others).
    """

    k: float = 0.5
    weight_init: str = DEFAULT_WEIGHT_INIT
    seed: int = 0
    dense: tuple[str, ...] = ()
    method: str = "edge-popup"
    explicit: tuple[str, ...] = ()
    frozen: dict[str, str] = field(default_factory=dict)
    slots: int = 0  # slot-machine: candidate values per weight
    redraw_every: int = 0  # iterand: optimizer updates between re-draws
    redraw_rate: float = 0.0  # iterand: probability that a pruned weight is re-drawn
    structure: str | None = None  # N:M structured masks ("2:4"), None: one top-k per tensor

    def popup_args(self) -> dict[str, Any]:
        """k, weight_init, seed, dense (and an N:M structure, where there is one) as ``timm.create_model`` takes
        them."""
        args = dict(k=self.k, weight_init=self.weight_init, seed=self.seed, dense=list(self.dense))
        if self.structure is not None:
            args["structure"] = self.structure
        return args

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
