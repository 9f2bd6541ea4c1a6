"""Methods: each module registers its attention variant and/or its LightningModule."""

from kvcompress.methods import (  # noqa: F401
    ka,  # noqa: F401
    ka_adapter,
    lego,
    mka,
    vdproj,  # noqa: F401
)
