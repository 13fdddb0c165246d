"""``python -m timm_popup.data fashion-mnist OUT_DIR`` / ``python -m timm_popup.data inspect NAME_OR_PATH``."""

from .sources import main

raise SystemExit(main())
