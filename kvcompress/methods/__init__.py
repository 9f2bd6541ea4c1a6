"""Methods: each module registers its attention variant and/or its LightningModule."""
from kvcompress.methods import ka  # noqa: F401
from kvcompress.methods import vdproj  # noqa: F401
from kvcompress.methods import ka_adapter, mka  # noqa: F401
