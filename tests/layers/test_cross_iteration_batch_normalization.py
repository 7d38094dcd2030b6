import keras
import numpy as np
import pytest

import keras_norms
from tests import references
from tests.helpers import assert_close_to_reference
from tests.helpers import random_mask
from tests.helpers import to_numpy
from tests.helpers import train_call

STEPS = 7
EPS = 1e-3

CASES = {
    "dense": (lambda: keras.layers.Dense(4, use_bias=False), (10, 5)),
    "dense_seq_mask": (
        lambda: keras.layers.Dense(3, use_bias=False),
        (3, 5, 4),
    ),
    "conv_same_s1": (
        lambda: keras.layers.Conv2D(3, 3, padding="same", use_bias=False),
        (2, 5, 5, 2),
    ),
    "conv_same_s2": (
        lambda: keras.layers.Conv2D(
            3, 3, strides=2, padding="same", use_bias=False
        ),
        (2, 6, 6, 2),
    ),
    "conv_valid_s1": (
        lambda: keras.layers.Conv2D(3, 3, padding="valid", use_bias=False),
        (2, 5, 5, 2),
    ),
    "conv_valid_s2": (
        lambda: keras.layers.Conv2D(
            3, (3, 2), strides=2, padding="valid", use_bias=False
        ),
        (2, 7, 6, 2),
    ),
}


def _to_patches(layer):
    if isinstance(layer, keras.layers.Dense):
        return lambda x: x.reshape(-1, x.shape[-1])
    return lambda x: references.patches(
        x, layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate
    ).reshape(-1, np.prod(layer.kernel_size) * x.shape[-1])


@pytest.mark.parametrize(
    "case,window_size,burnin,compensation",
    [
        ("dense", 4, 2, True),
        ("dense_seq_mask", 3, 1, True),
        ("conv_same_s1", 4, 2, True),
        ("conv_same_s2", 4, 0, True),
        ("conv_valid_s1", 3, 1, True),
        ("conv_valid_s2", 4, 2, True),
        ("conv_same_s1", 4, 0, False),
    ],
)
def test_matches_paper_reference(case, window_size, burnin, compensation):
    make, shape = CASES[case]
    inner = make()
    layer = keras_norms.CrossIterationBatchNormalization(
        inner,
        window_size=window_size,
        burnin_steps=burnin,
        compensation=compensation,
        momentum=0.8,
        epsilon=EPS,
    )
    layer.build(shape)
    rng = np.random.default_rng(0)
    kernel = to_numpy(inner.kernel).astype(np.float64)
    channels = kernel.shape[-1]
    ref = references.CBNReference(
        channels, window_size, burnin, compensation, EPS, 0.8
    )
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    mask = random_mask(shape, (len(shape) - 1,)) if "mask" in case else None
    used = 0
    for step in range(STEPS):
        # The weights move every step, as in training.
        kernel = kernel + 0.2 * rng.normal(size=kernel.shape)
        inner.kernel.assign(kernel)
        x = rng.normal(0.5 * step, 1.0 + 0.2 * step, size=shape)
        x = x.astype("float32")
        dy = rng.normal(size=layer.compute_output_shape(shape))
        y, dx, grads = train_call(layer, x, dy, mask)
        ry, rdx, rdw, rdg, rdb, uses = ref.train(
            x.astype(np.float64),
            _to_patches(inner),
            kernel.reshape(-1, channels),
            gamma,
            beta,
            dy.reshape(-1, channels),
            None if mask is None else mask.reshape(-1),
        )
        used += int(np.sum(uses))
        what = f"step {step}"
        assert_close_to_reference(y.reshape(-1, channels), ry, f"out {what}")
        assert_close_to_reference(dx, rdx, f"input gradient, {what}")
        assert_close_to_reference(
            grads["kernel"].reshape(-1, channels), rdw, f"kernel grad, {what}"
        )
        assert_close_to_reference(grads["gamma"], rdg, f"gamma grad, {what}")
        assert_close_to_reference(grads["beta"], rdb, f"beta grad, {what}")
        assert_close_to_reference(
            to_numpy(layer.moving_mean), ref.moving_mean, f"mean, {what}"
        )
        assert_close_to_reference(
            to_numpy(layer.moving_variance),
            ref.moving_variance,
            f"variance, {what}",
        )
    # Earlier steps did enter the statistics.
    assert used > 0
