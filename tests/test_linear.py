"""The kernel gradients of `keras_norms._linear` (TensorFlow's, PyTorch's
and JAX's fast paths, the general path of strided windows on every backend)
against the im2col reference."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_norms import _linear
from keras_norms._backend import jax as jax_backend
from keras_norms._backend import tensorflow as tf_backend
from keras_norms._backend import torch as torch_backend
from tests import references
from tests.helpers import BACKEND
from tests.helpers import to_numpy

CONVS = {
    "conv1d_causal": (
        lambda: keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2),
        (2, 9, 2),
    ),
    "conv1d_same_s2": (
        lambda: keras.layers.Conv1D(3, 4, strides=2, padding="same"),
        (2, 9, 2),
    ),
    "conv2d_same_s2": (
        lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same"),
        (2, 7, 6, 3),
    ),
    "conv2d_valid_dilated": (
        lambda: keras.layers.Conv2D(4, 3, dilation_rate=2),
        (2, 7, 7, 3),
    ),
    "conv3d_same": (
        lambda: keras.layers.Conv3D(2, 2, padding="same"),
        (1, 3, 4, 5, 2),
    ),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_statistic_gradients_match_im2col(case):
    make, shape = CONVS[case]
    layer = make()
    layer.build(shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    y = to_numpy(_linear.apply(layer, ops.convert_to_tensor(x), layer.kernel))
    count = float(np.prod(y.shape[:-1]))
    grad_y = ops.convert_to_tensor(2.0 * y / count)
    patches = references.patches(
        x, layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate
    ).reshape(-1, np.prod(layer.kernel_size) * shape[-1])
    y2 = y.reshape(-1, y.shape[-1])
    kshape = tuple(layer.kernel.shape)
    expected_dmu = patches.mean(0).reshape(kshape[:-1] + (1,))
    expected_dnu = (2 * patches.T @ y2 / count).reshape(kshape)
    paths = [
        _linear._conv_statistic_gradients,
        _linear._generic_conv_statistic_gradients,
    ]
    # TensorFlow's kernel-gradient ops, which the layers use for undilated
    # convolutions (dilated ones raise there without oneDNN).
    if BACKEND == "tensorflow" and set(layer.dilation_rate) == {1}:
        paths.append(tf_backend.conv_statistic_gradients)
    if BACKEND == "torch":
        paths.append(torch_backend.conv_statistic_gradients)
    if BACKEND == "jax":
        paths.append(jax_backend.conv_statistic_gradients)
    for path in paths:
        dmu, dnu = path(layer, ops.convert_to_tensor(x), grad_y, count)
        np.testing.assert_allclose(
            to_numpy(dmu), expected_dmu, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            to_numpy(dnu), expected_dnu, rtol=1e-4, atol=1e-5
        )
