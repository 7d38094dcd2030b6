"""Bad batches never poison the statistics (all three layers).

An empty batch, or a batch whose statistics are not finite for some
channels (a NaN or inf in it), leaves the moving statistics of those
channels (BRN's renorm statistics, CBN's window buffer) as they were; the
other channels update as from the same batch without the bad values, and
the next good batch trains as if the bad one had never come.
"""

import keras
import numpy as np
import pytest

import keras_norms
from tests.helpers import assert_close
from tests.helpers import to_numpy
from tests.helpers import train_call

SHAPES = {"dense": (6, 5, 4), "conv2d": (3, 5, 5, 2)}


def make(kind, linear):
    if kind == "bn":
        return keras_norms.BatchNormalization(momentum=0.5)
    if kind == "brn":
        return keras_norms.BatchRenormalization(
            momentum=0.5, renorm_momentum=0.5, rmax=1.5, dmax=0.5
        )
    inner = (
        keras.layers.Dense(3, use_bias=False)
        if linear == "dense"
        else keras.layers.Conv2D(3, 3, padding="same", use_bias=False)
    )
    return keras_norms.CBN(inner, window_size=3, momentum=0.5)


CASES = [
    ("bn", "dense"),
    ("brn", "dense"),
    ("cbn", "dense"),
    ("bn", "conv2d"),
    ("brn", "conv2d"),
    ("cbn", "conv2d"),
]


def twins(kind, linear):
    """Two layers with the same weights, built for the case's shape."""
    layers = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        layer = make(kind, linear)
        layer.build(SHAPES[linear])
        layers.append(layer)
    return layers


def state(layer):
    """Every statistic and buffer, without the step counters."""
    return {
        w.name: to_numpy(w)
        for w in layer.non_trainable_weights
        if w.name != "step"
    }


def mask_for(shape, masked):
    if not masked or len(shape) != 3:
        return None
    mask = np.ones(shape[:-1], bool)
    mask[:, -2:] = False  # padding at the end of every sequence
    return mask


def batches(shape, seed):
    rng = np.random.default_rng(seed)
    out_shape = shape[:-1] + (3 if len(shape) > 3 else shape[-1],)
    return [
        (
            rng.normal(1.0, 2.0, size=shape).astype("float32"),
            rng.normal(size=out_shape).astype("float32"),
        )
        for _ in range(4)
    ]


def dy_for(layer, x, seed=0):
    shape = layer.compute_output_shape(x.shape)
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# Masks on sequences (CBN takes them with a Dense only).
MASKED_CASES = [
    (kind, linear, masked)
    for kind, linear in CASES
    for masked in (False, True)
    if linear == "dense" or not masked
]


@pytest.mark.parametrize("bad", ["empty", "nan", "inf"])
@pytest.mark.parametrize(
    "kind,linear,masked",
    MASKED_CASES,
    ids=[
        f"{k}-{lin}-{'mask' if m else 'nomask'}" for k, lin, m in MASKED_CASES
    ],
)
def test_bad_batch_changes_no_statistic_and_training_goes_on(
    kind, linear, masked, bad, kernel_path
):
    shape = SHAPES[linear]
    mask = mask_for(shape, masked)
    ours, twin = twins(kind, linear)
    good = batches(shape, seed=1)
    for x, _ in good[:2]:  # fill CBN's window; move the statistics
        for layer in (ours, twin):
            train_call(layer, x, dy_for(layer, x), mask)
    before = state(ours)

    x = good[2][0].copy()
    bad_mask = mask
    if bad == "empty":
        x = x[:0]
        bad_mask = None if mask is None else mask[:0]
    else:
        # At a real (unmasked) position: the statistics see it.
        x[(0,) * (x.ndim - 1)] = np.nan if bad == "nan" else np.inf
    y, dx, grads = train_call(ours, x, dy_for(ours, x), bad_mask)
    if bad == "empty":  # an empty output, and gradients of 0
        assert y.shape[0] == 0 and dx.shape[0] == 0
        for name, grad in grads.items():
            np.testing.assert_array_equal(grad, 0.0, name)
    after = state(ours)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], name)

    # The next good batch trains as if the bad one had never come.
    x = good[3][0]
    dy = dy_for(ours, x, seed=5)
    y1, dx1, g1 = train_call(ours, x, dy, mask)
    y2, dx2, g2 = train_call(twin, x, dy, mask)
    assert np.all(np.isfinite(y1))
    assert_close(y1, y2, "outputs")
    assert_close(dx1, dx2, "input gradient")
    for name in g1:
        assert_close(g1[name], g2[name], name)
    for name, value in state(twin).items():
        assert_close(state(ours)[name], value, name)


@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_only_the_bad_channel_keeps_its_statistics(kind, kernel_path):
    """A NaN in one channel: that channel's statistics stay, the others
    update exactly as from the same batch with that value finite."""
    shape = SHAPES["dense"]
    ours, twin = twins(kind, "dense")
    x = batches(shape, seed=2)[0][0]
    for layer in (ours, twin):
        train_call(layer, x, dy_for(layer, x))
    before = state(ours)
    bad = x + 1.0
    finite = bad.copy()
    bad[1, 2, 3] = np.nan
    train_call(ours, bad, dy_for(ours, bad))
    train_call(twin, finite, dy_for(twin, finite))
    for name, value in state(ours).items():
        if name in ("rmax", "dmax"):
            continue
        np.testing.assert_array_equal(value[3], before[name][3], name)
        assert not np.allclose(state(twin)[name][3], before[name][3]), name
        np.testing.assert_allclose(
            value[:3], state(twin)[name][:3], rtol=1e-6, err_msg=name
        )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="Keras's JAX and torch trainers refuse an empty batch's loss",
)
@pytest.mark.parametrize("kind", ["bn", "brn", "cbn"])
def test_fit_on_data_whose_last_batch_is_empty(kind):
    """`fit()` on batches of 8, 8 and 0 (the last shard of a dataset) ends
    with the weights of `fit()` on the two real batches: the empty batch
    changes no statistic (Keras's own BN turns every weight to NaN)."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(16, 5, 4)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")

    def batches(with_empty):
        while True:
            yield x[:8], y[:8]
            yield x[8:], y[8:]
            if with_empty:
                yield x[:0], y[:0]

    def trained(with_empty):
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((5, 4)),
                keras.layers.Dense(3, use_bias=False),
                make(kind, "dense"),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(
            batches(with_empty),
            steps_per_epoch=3 if with_empty else 2,
            epochs=2,
            verbose=0,
        )
        return model

    ours, twin = trained(True), trained(False)
    assert np.all(np.isfinite(to_numpy(ours.predict(x, verbose=0))))
    for a, b in zip(ours.weights, twin.weights):
        if a.name != "step":
            assert_close(to_numpy(a), to_numpy(b), a.path)


@pytest.mark.parametrize("kind", ["bn", "brn", "cbn"])
def test_float16_overflow_leaves_the_statistics(kind):
    """Under `mixed_float16`, a batch that overflowed before the layer (an
    inf in float16) changes no statistic of the channels it reaches."""
    keras.config.set_dtype_policy("mixed_float16")
    shape = SHAPES["dense"]
    layer = make(kind, "dense")
    layer.build(shape)
    x = batches(shape, seed=3)[0][0].astype("float16")
    train_call(layer, x, dy_for(layer, x))
    before = state(layer)
    overflow = x.copy()
    overflow[0, 0] = np.float16(6e4) * np.float16(2.0)  # inf in float16
    assert np.all(np.isinf(overflow[0, 0]))
    train_call(layer, overflow, dy_for(layer, overflow))
    after = state(layer)
    # The inf reaches every channel (CBN's Dense mixes them all).
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, name)
    assert all(np.all(np.isfinite(v)) for v in after.values())
