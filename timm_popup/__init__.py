"""timm-popup: edge-popup (Ramanujan et al., CVPR 2020) for timm models.

``import timm_popup`` registers the ``popup_*`` models with timm; ``timm_popup.convert`` turns any model
into its edge-popup version. ``k`` is always the fraction of weights KEPT.
"""

from . import models  # noqa: F401  (registers popup_* with timm)
from .artifacts import explain_damaged_local_configs
from .config import PopupConfig
from .convert import convert, popup_masks
from .hub import push_artifact, push_to_hub, save_pretrained
from .init import DEFAULT_WEIGHT_INIT, WEIGHT_INITS, random_normal, random_weight
from .layers import PopupMask, topk_mask
from .masks import MaskError, load_masks, save_masks

__version__ = "0.1.0"

explain_damaged_local_configs()  # timm.create_model("local-dir:...") names a config.json it cannot parse

__all__ = [
    "convert", "popup_masks", "random_weight", "random_normal", "topk_mask", "PopupMask", "PopupConfig",
    "WEIGHT_INITS", "DEFAULT_WEIGHT_INIT", "save_pretrained", "push_to_hub", "push_artifact", "save_masks",
    "load_masks", "MaskError", "__version__",
]
