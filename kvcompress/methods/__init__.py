"""Methods: each module registers its attention variant, its caches and/or its LightningModule."""

from kvcompress.methods import ka, ka_adapter, lego, mka, quant, vdproj  # noqa: F401
