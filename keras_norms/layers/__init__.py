"""Layers of keras_norms."""

from keras_norms.layers.batch_normalization import BatchNormalization
from keras_norms.layers.batch_renormalization import BatchRenormalization

__all__ = ["BatchNormalization", "BatchRenormalization"]
