import contextlib

import keras
import numpy as np
import pytest

import keras_norms
from tests import references
from tests.helpers import BACKEND
from tests.helpers import assert_close
from tests.helpers import assert_close_to_reference
from tests.helpers import assert_config_round_trip
from tests.helpers import assert_rounded_once
from tests.helpers import assert_trains_alike
from tests.helpers import random_mask
from tests.helpers import sgd_update
from tests.helpers import skip_unless_channels_first_conv_runs
from tests.helpers import to_numpy
from tests.helpers import train_call

STEPS = 7
EPS = 1e-3


def _dense(units):
    return lambda: keras.layers.Dense(units, use_bias=False)


def _conv(rank, filters, kernel_size, **kwargs):
    conv = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    return lambda: conv[rank - 1](
        filters, kernel_size, use_bias=False, **kwargs
    )


# name: (wrapped layer, input shape, masked)
CASES = {
    "dense": (_dense(4), (10, 5), False),
    "dense_mask": (_dense(4), (10, 5), True),
    "dense_seq": (_dense(3), (3, 5, 4), False),
    "dense_seq_mask": (_dense(3), (3, 5, 4), True),
    # Batch size 1: one value per feature (online learning), a sequence,
    # and an image.
    "dense_b1": (_dense(4), (1, 5), False),
    "dense_seq_b1": (_dense(3), (1, 4, 4), False),
    "conv2d_b1": (_conv(2, 3, 3, padding="same"), (1, 5, 5, 2), False),
    "conv1d_causal_d2": (
        _conv(1, 3, 3, padding="causal", dilation_rate=2),
        (2, 9, 2),
        False,
    ),
    "conv1d_valid_s2": (
        _conv(1, 3, 3, strides=2, padding="valid"),
        (2, 11, 2),
        False,
    ),
    "conv2d_same_s1": (_conv(2, 3, 3, padding="same"), (2, 5, 5, 2), False),
    "conv2d_same_s2": (
        _conv(2, 3, 3, strides=2, padding="same"),
        (2, 6, 6, 2),
        False,
    ),
    "conv2d_valid_s1": (_conv(2, 3, 3, padding="valid"), (2, 5, 5, 2), False),
    "conv2d_valid_s2": (
        _conv(2, 3, (3, 2), strides=2, padding="valid"),
        (2, 7, 6, 2),
        False,
    ),
    "conv2d_same_d2": (
        _conv(2, 3, 3, padding="same", dilation_rate=2),
        (2, 6, 6, 2),
        False,
    ),
    "conv3d_same_s2": (
        _conv(3, 2, 2, strides=2, padding="same"),
        (2, 3, 4, 4, 2),
        False,
    ),
    "conv3d_valid_s1": (
        _conv(3, 2, 2, padding="valid"),
        (2, 3, 3, 3, 2),
        False,
    ),
}


def _to_patches(layer):
    if isinstance(layer, keras.layers.Dense):
        return lambda x: x.reshape(-1, x.shape[-1])
    return lambda x: references.patches(
        x, layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate
    ).reshape(-1, np.prod(layer.kernel_size) * x.shape[-1])


# (case, window_size, burnin_steps, kernel jump per step, negative_variance)
REFERENCE_RUNS = [
    ("dense", 4, 2, 0.2, "clamp"),
    ("dense_mask", 2, 0, 0.2, "clamp"),
    ("dense_seq", 3, 0, 0.2, "clamp"),
    ("dense_seq_mask", 3, 1, 0.2, "clamp"),
    ("conv1d_causal_d2", 3, 0, 0.2, "clamp"),
    ("conv1d_valid_s2", 4, 1, 0.2, "clamp"),
    ("conv2d_same_s1", 4, 2, 0.2, "clamp"),
    ("conv2d_same_s2", 4, 0, 0.2, "clamp"),
    ("conv2d_valid_s1", 3, 1, 0.2, "clamp"),
    ("conv2d_valid_s2", 2, 2, 0.2, "clamp"),
    ("conv2d_same_d2", 3, 0, 0.2, "clamp"),
    ("conv3d_same_s2", 3, 0, 0.2, "clamp"),
    ("conv3d_valid_s1", 2, 1, 0.2, "clamp"),
    # Weight jumps large enough that compensated variances turn negative:
    # clamped to 0 (the paper's eq. 9), or the step left out of that
    # channel's average (the authors' code).
    ("dense", 4, 0, 3.0, "clamp"),
    ("dense", 4, 0, 3.0, "exclude"),
    ("conv2d_same_s1", 4, 0, 3.0, "clamp"),
    ("conv2d_same_s1", 4, 0, 3.0, "exclude"),
    # Batch size 1. A Dense output has one value per channel: every
    # compensated variance is negative (-(x . dW)^2), so the clamp keeps
    # each step's mean and the exclusion drops every step.
    ("dense_b1", 4, 0, 0.2, "clamp"),
    ("dense_b1", 4, 1, 0.2, "exclude"),
    ("dense_seq_b1", 3, 0, 0.2, "clamp"),
    ("conv2d_b1", 3, 0, 0.2, "clamp"),
]


def _run_id(run):
    case, window, burnin, jump, negative = run
    name = f"{case}-k{window}-burnin{burnin}" + ("-jump" if jump > 1 else "")
    return name + ("" if negative == "clamp" else "-exclude")


def _reference_params(run):
    """A run's parameters; one input position (a Dense at batch size 1)
    gives each channel one value."""
    _, shape, masked = CASES[run[0]]
    one_value = int(np.prod(shape[:-1])) == 1
    marks = [pytest.mark.one_value_per_channel] if one_value else []
    return pytest.param(*run, masked, marks=marks, id=_run_id(run))


@pytest.mark.parametrize(
    "gradient", [True, False], ids=["exact_gradient", "authors_gradient"]
)
@pytest.mark.parametrize(
    "case,window_size,burnin,jump,negative_variance,masked",
    [_reference_params(run) for run in REFERENCE_RUNS],
)
def test_matches_paper_reference(
    case,
    window_size,
    burnin,
    jump,
    negative_variance,
    masked,
    gradient,
    kernel_path,
):
    """7 training steps with moving weights against the float64 reference of
    the same gradient convention. The other convention's reference kernel
    gradient is computed alongside and must differ: this test cannot pass
    for both. On TensorFlow and PyTorch, unmasked inputs take both training
    paths (fused kernels and general)."""
    make, shape, _ = CASES[case]
    inner = make()
    layer = keras_norms.CrossIterationBatchNormalization(
        inner,
        window_size=window_size,
        burnin_steps=burnin,
        compensation_gradient=gradient,
        negative_variance=negative_variance,
        momentum=0.8,
        epsilon=EPS,
    )
    layer.build(shape)
    rng = np.random.default_rng(0)
    kernel = to_numpy(inner.kernel).astype(np.float64)
    channels = kernel.shape[-1]
    ref, other = (
        references.CBNReference(
            channels, window_size, burnin, True, EPS, 0.8, g, negative_variance
        )
        for g in (gradient, not gradient)
    )
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    mask = random_mask(shape, (len(shape) - 1,)) if masked else None
    used = available = 0
    apart = 0.0  # the other convention's kernel gradient, relative
    for step in range(STEPS):
        # The weights move every step, as in training.
        kernel = kernel + jump * rng.normal(size=kernel.shape)
        inner.kernel.assign(kernel)
        x = rng.normal(0.5 * step, 1.0 + 0.2 * step, size=shape)
        x = x.astype("float32")
        dy = rng.normal(size=layer.compute_output_shape(shape))
        y, dx, grads = train_call(layer, x, dy, mask)
        args = (
            x.astype(np.float64),
            _to_patches(inner),
            kernel.reshape(-1, channels),
            gamma,
            beta,
            dy.reshape(-1, channels),
            None if mask is None else mask.reshape(-1),
        )
        ry, rdx, rdw, rdg, rdb, uses = ref.train(*args)
        odw = other.train(*args)[2]
        apart = max(apart, np.max(np.abs(odw - rdw)) / np.max(np.abs(rdw)))
        used += int(np.sum(uses))
        if step >= burnin:
            available += min(step - burnin, window_size - 1) * channels
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
    # Earlier steps entered the statistics; clamped, all of them; left
    # out, some with large jumps and all at one value per channel.
    if negative_variance == "clamp":
        assert 0 < used == available
    elif case == "dense_b1":
        assert used == 0 < available
    else:
        assert 0 < used < available
    # The two conventions' kernel gradients differ by far more than the
    # tolerance above (where earlier steps were used).
    assert apart > 1e-2 or used == 0, apart


# (case, window_size): wrapped layers given a bias.
BIAS_RUNS = [("dense", 3), ("dense_seq_mask", 2), ("conv2d_same_s2", 4)]


@pytest.mark.parametrize(
    "gradient", [True, False], ids=["exact_gradient", "authors_gradient"]
)
@pytest.mark.parametrize(
    "case,window_size,masked",
    [pytest.param(c, k, CASES[c][2], id=f"{c}-k{k}") for c, k in BIAS_RUNS],
)
def test_bias_cancels_in_training_and_shifts_the_moving_mean(
    case, window_size, masked, gradient, kernel_path
):
    """A wrapped layer with a bias (which moves every step, as under weight
    decay) against the float64 reference of the same layer without it:
    training outputs and every gradient are the reference's, the bias's
    gradient is 0 (not none), the moving mean is the reference's plus the
    same moving average of the biases (the mean of `P @ W + b`) and the
    moving variance the reference's; inference is batch normalization of
    `P @ W + b` with the moving statistics."""
    make, shape, _ = CASES[case]
    inner = make()
    config = inner.get_config() | {"use_bias": True}
    inner = type(inner).from_config(config)
    layer = keras_norms.CrossIterationBatchNormalization(
        inner,
        window_size=window_size,
        compensation_gradient=gradient,
        momentum=0.8,
        epsilon=EPS,
    )
    layer.build(shape)
    rng = np.random.default_rng(1)
    kernel = to_numpy(inner.kernel).astype(np.float64)
    channels = kernel.shape[-1]
    ref = references.CBNReference(
        channels, window_size, 0, True, EPS, 0.8, gradient, "clamp"
    )
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    mask = random_mask(shape, (len(shape) - 1,)) if masked else None
    patches = _to_patches(inner)
    moving_bias = np.zeros(channels)  # every step updates (2+ values)
    for step in range(STEPS):
        kernel = kernel + 0.2 * rng.normal(size=kernel.shape)
        bias = rng.normal(3.0, 2.0, size=channels).astype("float32")
        inner.kernel.assign(kernel)
        inner.bias.assign(bias)
        x = rng.normal(0.5 * step, 1.0, size=shape).astype("float32")
        dy = rng.normal(size=layer.compute_output_shape(shape))
        y, dx, grads = train_call(layer, x, dy, mask)
        ry, rdx, rdw, rdg, rdb, _ = ref.train(
            x.astype(np.float64),
            patches,
            kernel.reshape(-1, channels),
            gamma,
            beta,
            dy.reshape(-1, channels),
            None if mask is None else mask.reshape(-1),
        )
        moving_bias = 0.8 * moving_bias + 0.2 * bias
        what = f"step {step}"
        assert_close_to_reference(y.reshape(-1, channels), ry, f"out {what}")
        assert_close_to_reference(dx, rdx, f"input gradient, {what}")
        assert_close_to_reference(
            grads["kernel"].reshape(-1, channels), rdw, f"kernel grad, {what}"
        )
        assert_close_to_reference(grads["gamma"], rdg, f"gamma grad, {what}")
        assert_close_to_reference(grads["beta"], rdb, f"beta grad, {what}")
        np.testing.assert_array_equal(grads["bias"], np.zeros(channels))
        assert_close_to_reference(
            to_numpy(layer.moving_mean),
            ref.moving_mean + moving_bias,
            f"mean, {what}",
        )
        assert_close_to_reference(
            to_numpy(layer.moving_variance),
            ref.moving_variance,
            f"variance, {what}",
        )
    x = rng.normal(size=shape).astype("float32")
    out = to_numpy(layer(x, training=False)).reshape(-1, channels)
    biased = patches(x.astype(np.float64)) @ kernel.reshape(-1, channels)
    expected = (biased + bias - to_numpy(layer.moving_mean)) / np.sqrt(
        to_numpy(layer.moving_variance) + EPS
    ) * gamma + beta
    assert_close_to_reference(out, expected, "inference")


def test_uncompensated_averaging_ignores_compensation_gradient(monkeypatch):
    """`compensation=False`: nothing depends on the earlier kernels, so
    the gradient convention makes no difference (reference: the naive
    average of the paper's baseline), and the kernel derivatives that only
    the compensation reads are never computed."""
    from keras_norms import _linear

    derivative_calls = []
    real = _linear.statistic_gradients

    def spy(*args):
        derivative_calls.append(args)
        return real(*args)

    monkeypatch.setattr(_linear, "statistic_gradients", spy)
    make, shape, _ = CASES["conv2d_same_s1"]
    rng = np.random.default_rng(3)
    layers = []
    for gradient in (True, False):
        keras.utils.set_random_seed(5)
        layer = keras_norms.CBN(
            make(),
            window_size=4,
            compensation=False,
            compensation_gradient=gradient,
            epsilon=EPS,
        )
        layer.build(shape)
        layers.append(layer)
    kernel = to_numpy(layers[0].layer.kernel).astype(np.float64)
    channels = kernel.shape[-1]
    ref = references.CBNReference(channels, 4, 0, False, EPS, 0.99)
    for step in range(6):
        kernel = kernel + 0.2 * rng.normal(size=kernel.shape)
        x = rng.normal(0.3 * step, 1.0, size=shape).astype("float32")
        dy = rng.normal(size=layers[0].compute_output_shape(shape))
        _, _, rdw, _, _, uses = ref.train(
            x.astype(np.float64),
            _to_patches(layers[0].layer),
            kernel.reshape(-1, channels),
            np.ones(channels),
            np.zeros(channels),
            dy.reshape(-1, channels),
        )
        for layer in layers:
            layer.layer.kernel.assign(kernel)
            _, _, grads = train_call(layer, x, dy)
            assert_close_to_reference(
                grads["kernel"].reshape(-1, channels), rdw, f"step {step}"
            )
    assert np.all(uses == 3)
    assert not derivative_calls
    compensated = keras_norms.CBN(make(), window_size=4)
    train_call(compensated, x, dy)
    assert len(derivative_calls) == 1  # (the spy is in place)


@contextlib.contextmanager
def _floatx(name):
    """Keras's floatx set to `name`, then back to float32."""
    keras.backend.set_floatx(name)
    try:
        yield
    finally:
        keras.backend.set_floatx("float32")


@pytest.mark.parametrize("case", ["dense", "conv2d_same_s2"])
def test_float64_floatx_trains_like_a_float64_layer(case):
    """Under `keras.backend.set_floatx("float64")` (where Keras's integer
    ranges are int64) a CBN with a window trains as a float64 CBN under
    the default floatx: outputs, gradients and statistics at every step."""
    make, shape, _ = CASES[case]
    rng = np.random.default_rng(3)
    with _floatx("float64"):
        ours = keras_norms.CBN(make(), window_size=3, dtype="float64")
        ours.build(shape)
    theirs = keras_norms.CBN(make(), window_size=3, dtype="float64")
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    for step in range(4):
        x = rng.normal(size=shape)
        dy = rng.normal(size=ours.compute_output_shape(shape))
        with _floatx("float64"):
            y1, dx1, g1 = train_call(ours, x, dy)
        y2, dx2, g2 = train_call(theirs, x, dy)
        np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx1, dx2, rtol=1e-12, atol=1e-12)
        for name in g1:
            np.testing.assert_allclose(g1[name], g2[name], atol=1e-12)
        for a, b in zip(
            ours.non_trainable_weights, theirs.non_trainable_weights
        ):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-12)
        sgd_update(ours, g1)
        sgd_update(theirs, g2)


def test_channels_first_equals_channels_last():
    skip_unless_channels_first_conv_runs()
    rng = np.random.default_rng(0)
    last = keras_norms.CBN(
        keras.layers.Conv2D(3, 3, strides=2, padding="same", use_bias=False),
        window_size=3,
    )
    first = keras_norms.CBN(
        keras.layers.Conv2D(
            3,
            3,
            strides=2,
            padding="same",
            use_bias=False,
            data_format="channels_first",
        ),
        window_size=3,
    )
    last.build((2, 6, 6, 2))
    first.build((2, 2, 6, 6))
    for step in range(4):
        kernel = rng.normal(size=(3, 3, 2, 3))
        last.layer.kernel.assign(kernel)
        first.layer.kernel.assign(kernel)
        x = rng.normal(size=(2, 6, 6, 2)).astype("float32")
        dy = rng.normal(size=(2, 3, 3, 3)).astype("float32")
        y1, dx1, g1 = train_call(last, x, dy)
        y2, dx2, g2 = train_call(
            first, x.transpose(0, 3, 1, 2), dy.transpose(0, 3, 1, 2)
        )
        assert_close_to_reference(y2.transpose(0, 2, 3, 1), y1, "outputs")
        assert_close_to_reference(dx2.transpose(0, 2, 3, 1), dx1, "dx")
        for name in g1:
            assert_close_to_reference(g2[name], g1[name], name)
        np.testing.assert_allclose(
            to_numpy(first.moving_variance),
            to_numpy(last.moving_variance),
            rtol=1e-5,
        )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_window_size_one_trains_like_batch_normalization(masked):
    shape = (4, 6, 5)
    cbn = keras_norms.CBN(keras.layers.Dense(3, use_bias=False), window_size=1)
    dense = keras.layers.Dense(3, use_bias=False)
    bn = keras_norms.BatchNormalization()
    cbn.build(shape)
    dense.build(shape)
    dense.kernel.assign(to_numpy(cbn.layer.kernel))

    bn.build(shape[:-1] + (3,))

    class DenseThenBN(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.dense, self.bn = dense, bn
            self.supports_masking = True

        def build(self, input_shape):
            pass  # both parts are built above

        def call(self, x, training=None, mask=None):
            return self.bn(self.dense(x), training=training, mask=mask)

    pair = DenseThenBN()
    rng = np.random.default_rng(0)
    mask = random_mask(shape, (2,)) if masked else None
    batches = [
        (
            rng.normal(step, 1.0 + step, size=shape).astype("float32"),
            rng.normal(size=shape[:-1] + (3,)).astype("float32"),
        )
        for step in range(4)
    ]
    assert_trains_alike(cbn, pair, batches, mask, ())
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            to_numpy(getattr(cbn, name)), to_numpy(getattr(bn, name)), 1e-5
        )
    # Only the step counter: no buffer for a window of one.
    assert [w.name for w in cbn.non_trainable_weights] == [
        "moving_mean",
        "moving_variance",
        "step",
    ]


def test_inference_is_batch_normalization_with_moving_statistics():
    rng = np.random.default_rng(0)
    layer = keras_norms.CBN(keras.layers.Dense(3, use_bias=False), momentum=0.5)
    x = rng.normal(2.0, 3.0, size=(16, 4)).astype("float32")
    for _ in range(3):
        layer(x, training=True)
    y = to_numpy(layer.layer(x))
    expected = references.normalize_inference(
        y,
        (1,),
        to_numpy(layer.moving_mean),
        to_numpy(layer.moving_variance),
        to_numpy(layer.gamma),
        to_numpy(layer.beta),
        1e-3,
    )
    assert_close_to_reference(to_numpy(layer(x)), expected, "inference")
    step = int(to_numpy(layer.step))
    layer.trainable = False
    assert_close_to_reference(
        to_numpy(layer(x, training=True)), expected, "frozen"
    )
    assert int(to_numpy(layer.step)) == step


def test_all_masked_batch_changes_no_statistic():
    shape = (2, 5, 3)
    rng = np.random.default_rng(0)
    layer = keras_norms.CBN(keras.layers.Dense(2, use_bias=False))
    x = rng.normal(size=shape).astype("float32")
    train_call(layer, x, np.ones((2, 5, 2)))
    before = {w.name: to_numpy(w) for w in layer.non_trainable_weights}
    y, dx, grads = train_call(
        layer, x, np.ones((2, 5, 2)), np.zeros(shape[:2], bool)
    )
    for w in layer.non_trainable_weights:
        if w.name != "step":
            np.testing.assert_array_equal(to_numpy(w), before[w.name], w.name)
    for value in [y, dx, *grads.values()]:
        assert np.all(np.isfinite(value))


def test_buffer_memory_bound():
    window = 4
    layer = keras_norms.CBN(
        keras.layers.Conv2D(64, 3, use_bias=False), window_size=window
    )
    layer.build((None, 32, 32, 64))
    kernel = int(np.prod(layer.layer.kernel.shape))
    buffer = sum(
        int(np.prod(w.shape))
        for w in layer.non_trainable_weights
        if w.name.startswith("past_")
    )
    assert buffer <= window * (3 * kernel + 2 * 64)


def test_config_round_trip():
    layer = keras_norms.CBN(
        keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
        window_size=5,
        burnin_steps=100,
        compensation=False,
        compensation_gradient=False,
        momentum=0.9,
        gamma_regularizer="l2",
        name="cbn",
    )
    assert_config_round_trip(layer)
    assert keras_norms.CBN is keras_norms.CrossIterationBatchNormalization


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: keras.layers.LSTM(3), "Dense, Conv1D, Conv2D or Conv3D"),
        (lambda: keras.layers.DepthwiseConv2D(3), "Conv3D"),
        (lambda: keras.layers.Conv2DTranspose(3, 3), "Conv3D"),
        (
            lambda: keras.layers.Dense(3, use_bias=False, activation="relu"),
            "activation",
        ),
        (lambda: keras.layers.Conv2D(4, 3, groups=2, use_bias=False), "groups"),
        (
            lambda: keras.layers.Dense(
                3, use_bias=False, activity_regularizer="l2"
            ),
            "activity_regularizer",
        ),
    ],
)
def test_refuses_unsupported_layers(make, needle):
    with pytest.raises(ValueError, match=needle):
        keras_norms.CBN(make())


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(window_size=0), ValueError, "window_size"),
        (dict(window_size=2.5), ValueError, "window_size"),
        (dict(burnin_steps=-1), ValueError, "burnin_steps"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(synchronized=1), TypeError, "synchronized"),
        (dict(window_size=None), TypeError, "window_size"),
        (dict(compensation="yes"), TypeError, "compensation"),
        (dict(compensation_gradient=None), TypeError, "compensation_gradient"),
    ],
)
def test_bad_arguments(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        keras_norms.CBN(keras.layers.Dense(2, use_bias=False), **kwargs)
    with pytest.raises(TypeError, match="layer"):
        keras_norms.CBN("dense")


def _train_with_unknown_length(model, x, y):
    """One SGD step, traced with an unknown length where the backend has
    such a thing (TensorFlow: a dataset of `(None, None, channels)`);
    JAX and torch always see the batch's concrete shape."""
    if BACKEND != "tensorflow":
        return model.train_on_batch(x, y)
    import tensorflow as tf

    data = tf.data.Dataset.from_generator(
        lambda: iter([(x, y)]),
        output_signature=(
            tf.TensorSpec((None, None, x.shape[-1])),
            tf.TensorSpec((None, None, y.shape[-1])),
        ),
    )
    model.fit(data.repeat(), steps_per_epoch=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", ["same", "valid", "causal"])
def test_conv_on_inputs_of_unknown_length(padding, dilation):
    """A CBN(Conv1D) built on `Input((None, 3))` and fed sequences of
    several lengths takes, at each step, the step that a CBN built for that
    length takes from the same state."""
    rng = np.random.default_rng(0)

    def make(length):
        conv = keras.layers.Conv1D(
            4, 3, padding=padding, dilation_rate=dilation, use_bias=False
        )
        model = keras.Sequential(
            [keras.Input((length, 3)), keras_norms.CBN(conv, window_size=3)]
        )
        model.compile(keras.optimizers.SGD(0.1), "mse")
        return model

    free = make(None)
    for step, length in enumerate((12, 9, 12)):
        x = rng.normal(size=(8, length, 3)).astype("float32")
        out = length - 2 * dilation if padding == "valid" else length
        y = rng.normal(size=(8, out, 4)).astype("float32")
        fixed = make(length)
        fixed.set_weights(free.get_weights())
        fixed.train_on_batch(x, y)
        if BACKEND == "tensorflow" and dilation > 1:
            with pytest.raises(ValueError, match="dilated convolution"):
                _train_with_unknown_length(free, x, y)
            return
        _train_with_unknown_length(free, x, y)
        for weight, a, b in zip(
            free.weights, free.get_weights(), fixed.get_weights()
        ):
            assert_close(a, b, f"{weight.name} after step {step}")


@pytest.mark.parametrize(
    "make,shape,wrong",
    [
        (lambda: keras.layers.Dense(3, use_bias=False), (2, 4), (2, 5)),
        (
            lambda: keras.layers.Conv2D(3, 3, use_bias=False),
            (1, 6, 6, 2),
            (1, 6, 6, 3),
        ),
    ],
    ids=["dense", "conv2d"],
)
def test_input_that_does_not_fit_the_wrapped_layer(make, shape, wrong):
    layer = keras_norms.CBN(make())
    layer(np.ones(shape, "float32"))
    with pytest.raises(ValueError, match="incompatible"):
        layer(np.ones(wrong, "float32"))


def test_activity_regularizer_applies_to_the_normalized_output():
    layer = keras_norms.CBN(
        keras.layers.Dense(3, use_bias=False),
        activity_regularizer=keras.regularizers.L2(0.5),
        center=False,
    )
    x = np.random.default_rng(0).normal(size=(4, 2)).astype("float32")
    y = to_numpy(layer(x))
    (loss,) = layer.losses
    # Keras divides any layer's activity loss by the batch size.
    expected = 0.5 * np.sum(y.astype("float64") ** 2) / len(x)
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=1e-5)
    config = layer.get_config()
    restored = keras_norms.CBN.from_config(config)
    assert restored.get_config() == config


def test_mask_of_wrong_shape():
    layer = keras_norms.CBN(keras.layers.Dense(2, use_bias=False))
    with pytest.raises(ValueError, match="mask"):
        layer(np.ones((2, 3, 4), "float32"), mask=np.ones((2, 4), bool))
    # A mask that differs between the output channels: one window position
    # holds one step for every channel.
    with pytest.raises(ValueError, match="the same for every channel"):
        layer(np.ones((2, 3, 4), "float32"), mask=np.ones((2, 3, 2), bool))


def test_mask_of_the_output_rank_equals_keras_convention():
    """A `(batch, time, 1)` mask trains exactly as the `(batch, time)` one."""
    rng = np.random.default_rng(0)
    mask = random_mask((3, 5, 4), (2,))
    layers = [
        keras_norms.CBN(keras.layers.Dense(3, use_bias=False), window_size=3)
        for _ in range(2)
    ]
    for layer in layers:
        layer.build((3, 5, 4))
    layers[1].set_weights(layers[0].get_weights())
    for step in range(3):
        x = rng.normal(size=(3, 5, 4)).astype("float32")
        dy = rng.normal(size=(3, 5, 3)).astype("float32")
        a = train_call(layers[0], x, dy, mask)
        b = train_call(layers[1], x, dy, mask[..., None])
        for u, v in zip(a[:2], b[:2]):
            np.testing.assert_array_equal(u, v)
        for name in a[2]:
            np.testing.assert_array_equal(a[2][name], b[2][name])
    for u, v in zip(layers[0].weights, layers[1].weights):
        np.testing.assert_array_equal(to_numpy(u), to_numpy(v))


@pytest.mark.parametrize(
    "gradient", [True, False], ids=["exact_gradient", "authors_gradient"]
)
@pytest.mark.parametrize("case", ["dense_seq_mask", "conv2d_same_s2"])
def test_kernel_gradient_is_the_derivative_of_the_loss(case, gradient):
    """Central differences of the layer's own float64 training forward
    (state restored after each evaluation), along random directions of
    the kernel: the default's autodiff kernel gradient is the derivative
    of the loss; the authors' convention's is not."""
    with _float64():
        _check_kernel_gradient(case, gradient)


def _float64():
    """JAX computes in float32 unless 64-bit types are switched on."""
    if BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _check_kernel_gradient(case, gradient):
    make, shape, masked = CASES[case]
    keras.utils.set_random_seed(2)
    inner = make()
    inner.dtype_policy = "float64"
    layer = keras_norms.CBN(
        inner, window_size=3, compensation_gradient=gradient, dtype="float64"
    )
    layer.build(shape)
    rng = np.random.default_rng(4)
    mask = random_mask(shape, (len(shape) - 1,)) if masked else None
    # Keras's `ops.mean` accumulates float64 in float32 on JAX and torch:
    # a larger step and a looser bound there (the authors' convention is
    # off by 0.3-1.0).
    h, tolerance = (1e-5, 1e-6) if BACKEND == "tensorflow" else (1e-3, 1e-3)
    worst = 0.0
    for step in range(5):
        kernel = to_numpy(inner.kernel) + 0.2 * rng.normal(
            size=inner.kernel.shape
        )
        inner.kernel.assign(kernel)
        x = rng.normal(0.3 * step, 1.0, size=shape)
        dy = rng.normal(size=layer.compute_output_shape(shape))
        state = [to_numpy(v) for v in layer.non_trainable_variables]

        def loss(k):
            inner.kernel.assign(k)
            y = to_numpy(layer(x, training=True, mask=mask))
            for v, value in zip(layer.non_trainable_variables, state):
                v.assign(value)
            return float(np.sum(dy * y))

        directions = rng.normal(size=(3,) + kernel.shape)
        numeric = [
            (loss(kernel + h * v) - loss(kernel - h * v)) / (2 * h)
            for v in directions
        ]
        inner.kernel.assign(kernel)
        _, _, grads = train_call(layer, x, dy, mask)
        analytic = [np.sum(grads["kernel"] * v) for v in directions]
        error = np.max(np.abs(np.subtract(analytic, numeric)))
        error /= np.max(np.abs(numeric))
        if gradient:
            assert error < tolerance, (step, analytic, numeric)
        worst = max(worst, error)
    print(f"largest relative error: {worst:.2e}")
    if not gradient:  # its earlier steps' terms are held constant
        assert worst > 1e-2, worst


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("case", ["dense_seq", "conv2d_same_s2"])
def test_half_precision_computes_in_float32(case, policy):
    """Under a mixed policy the wrapped layer's map, the moments and the
    kernel derivatives are float32 (on each backend's fast path), with the
    kernel as Keras's autocasting reads it inside a layer (rounded to the
    half type, as the wrapped layer itself would use it): 3 steps with a
    moving kernel leave every statistic and buffer as a float32 layer fed
    the same half-rounded inputs and kernel leaves them, to 1e-5, and the
    outputs are the float32 layer's rounded once to the half type (the
    final affine too runs in float32)."""
    make, shape, _ = CASES[case]
    rng = np.random.default_rng(0)
    half = policy.split("_")[1]
    xs = [
        to_numpy(
            keras.ops.cast(
                keras.ops.cast(rng.normal(3.0, 2.0, size=shape), half),
                "float32",
            )
        )
        for _ in range(3)
    ]
    layers = {}
    for name in (policy, "float32"):
        keras.config.set_dtype_policy(name)
        layers[name] = keras_norms.CBN(make(), window_size=2)
        layers[name].build(shape)
    keras.config.set_dtype_policy("float32")
    mixed, single = layers[policy], layers["float32"]
    kernel = to_numpy(single.layer.kernel)
    for step, x in enumerate(xs):
        moved = kernel * (1.0 + 0.1 * step)
        rounded = keras.ops.cast(keras.ops.cast(moved, half), "float32")
        mixed.layer.kernel.assign(moved)
        single.layer.kernel.assign(rounded)
        y = mixed(keras.ops.cast(x, half), training=True)
        expected = single(x, training=True)
        assert keras.backend.standardize_dtype(y.dtype) == half
        assert_rounded_once(y, to_numpy(expected), half, f"step {step}")
    assert keras.backend.standardize_dtype(mixed.layer.kernel.dtype) == (
        "float32"
    )
    for w_mixed, w_single in zip(mixed.weights, single.weights):
        assert keras.backend.standardize_dtype(w_mixed.dtype) != half
        if w_mixed is not mixed.layer.kernel:  # (not rounded)
            assert_close(to_numpy(w_mixed), to_numpy(w_single), w_mixed.name)
