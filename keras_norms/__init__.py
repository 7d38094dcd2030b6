"""Keras 3 normalization layers for small, non-i.i.d. and recurrent batches.

Importing this package registers every layer and callback with Keras, so
`keras.saving.load_model` reads `.keras` files that use them.
"""

from keras_norms import callbacks
from keras_norms import utils
from keras_norms.layers import CBN
from keras_norms.layers import BatchNormalization
from keras_norms.layers import BatchRenormalization
from keras_norms.layers import CrossIterationBatchNormalization
from keras_norms.layers import WeightStandardization

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "BatchRenormalization",
    "CBN",
    "CrossIterationBatchNormalization",
    "WeightStandardization",
    "callbacks",
    "utils",
]
