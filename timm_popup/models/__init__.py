"""popup_* entries of timm's registry (importing this package registers them)."""

from . import popup_convnets, popup_resnet, popup_vit_convnext  # noqa: F401

# isort: split
# Last: from here on timm answers popup_<name> for every timm model not registered by hand above.
from . import popup_any  # noqa: F401
from .popup_convnets import MLP, ConvNet

__all__ = ["ConvNet", "MLP"]
