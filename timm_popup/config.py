"""The one typed record of how a model was made popup: what convert, the builder, loading and methods share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .init import DEFAULT_WEIGHT_INIT
from .layers import DEFAULT_SCORE_INIT

__all__ = ["PopupConfig", "POPUP_ARGS", "DEFAULT_SCORE_INIT"]

#: the model arguments that choose the random network and what trains on it (``timm.create_model`` keyword
#: arguments); ``init_mode``, ``nonlinearity`` and ``scale_fan`` complete ``weight_init`` (its full name)
POPUP_ARGS = ("k", "weight_init", "seed", "dense", "structure", "learn_norm", "learn_bias", "score_init",
              "init_mode", "nonlinearity", "scale_fan")


@dataclass
class PopupConfig:
    """How a model's popup version was made; ``model.popup_config``.

    ``method`` is the training method (``timm_popup.methods``) whose mask the model holds; ``slots``,
    ``redraw_every``, ``redraw_rate``, ``freeze_every``, ``score_l2`` and ``density_epochs`` are the options of the
    methods that have them. ``frozen`` maps the
    qualified name of every other parameter of the original model to the policy that froze it
    (``timm_popup.convert.PARAMETER_POLICY``); ``explicit`` names the arguments the caller chose
    (a loaded mask supplies the others). ``weight_init`` is the distribution's full name
    (``timm_popup.init.weight_distribution``: with its fan mode, nonlinearity and scale_fan where not the defaults).

    ``learn_norm`` / ``learn_bias`` (the paper code's ``--bn-type LearnedBatchNorm``, and learned biases): the norm
    layers' scale and shift / the biases train with the scores from the policy's values; ``learned`` maps each such
    tensor to that policy, and an artifact holds their values. ``score_init``: how scores start
    (``timm_popup.layers.SCORE_INITS``).
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
    freeze_every: int = 0  # gem-miner: epochs between freezing events
    score_l2: float = 0.0  # gem-miner: weight of the regulariser l2 * ||scores||^2
    density_epochs: int = 0  # global-topk: epochs over which the density reaches k (0: at once)
    learn_norm: bool = False
    learn_bias: bool = False
    learned: dict[str, str] = field(default_factory=dict)
    score_init: str = DEFAULT_SCORE_INIT

    def popup_args(self) -> dict[str, Any]:
        """k, weight_init, seed and dense as ``timm.create_model`` takes them, and the N:M structure, what else
        trains or how scores start where not the defaults."""
        args: dict[str, Any] = dict(k=self.k, weight_init=self.weight_init, seed=self.seed, dense=list(self.dense))
        if self.structure is not None:
            args["structure"] = self.structure
        args.update({key: True for key in ("learn_norm", "learn_bias") if getattr(self, key)})
        if self.score_init != DEFAULT_SCORE_INIT:
            args["score_init"] = self.score_init
        return args

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
