"""Callbacks of keras_norms."""

from keras_norms.callbacks.renorm_warmup import LinearRamp
from keras_norms.callbacks.renorm_warmup import RenormWarmup

__all__ = ["LinearRamp", "RenormWarmup"]
