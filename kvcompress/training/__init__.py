"""Lightning side: the LM module, callbacks and the phase runner."""

from kvcompress.training.callbacks import PositionwisePPL
from kvcompress.training.module import LMModule, NonFiniteLossError
from kvcompress.training.phases import PhaseRunner, Stage, set_trainable

__all__ = ["LMModule", "NonFiniteLossError", "PhaseRunner", "PositionwisePPL", "Stage", "set_trainable"]
