"""Layers of keras_norms."""

from keras_norms.layers.batch_normalization import BatchNormalization
from keras_norms.layers.batch_renormalization import BatchRenormalization
from keras_norms.layers.cross_iteration_batch_normalization import (
    CrossIterationBatchNormalization,
)
from keras_norms.layers.weight_standardization import WeightStandardization

CBN = CrossIterationBatchNormalization

__all__ = [
    "BatchNormalization",
    "BatchRenormalization",
    "CBN",
    "CrossIterationBatchNormalization",
    "WeightStandardization",
]
