"""Model utilities of keras_norms."""

from keras_norms.utils.convert_normalization import convert_normalization
from keras_norms.utils.fold_normalization import fold_normalization
from keras_norms.utils.recompute_statistics import recompute_statistics

__all__ = [
    "convert_normalization",
    "fold_normalization",
    "recompute_statistics",
]
