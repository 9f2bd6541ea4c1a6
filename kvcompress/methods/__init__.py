"""Methods: each module registers its attention variant and/or its LightningModule."""
