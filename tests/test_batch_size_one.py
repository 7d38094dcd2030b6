"""One value per feature (a Dense output at batch size 1): BN and BRN warn,
once per layer; such a batch leaves BN's moving statistics as they were,
and BRN normalizes it with its running statistics, which follow the stream
(NumPy reference); a batch with more values per feature moves every
layer's statistics as before.
"""

import warnings

import keras
import numpy as np
import pytest

import keras_norms
from tests import references
from tests.helpers import BACKEND
from tests.helpers import to_numpy
from tests.helpers import train_call

MESSAGE = "one value per feature"


def _norm(kind):
    if kind == "bn":
        return keras_norms.BatchNormalization(momentum=0.5)
    if kind == "brn":
        return keras_norms.BatchRenormalization(momentum=0.5)
    # CBN with a window of one step is batch normalization.
    return keras_norms.CrossIterationBatchNormalization(
        keras.layers.Dense(3, use_bias=False), window_size=1, momentum=0.5
    )


def _model(kind, features=4, timesteps=None):
    shape = (features,) if timesteps is None else (timesteps, features)

    def block():
        if kind == "cbn_k1":  # the layer wraps the Dense
            return [_norm(kind), keras.layers.ReLU()]
        dense = keras.layers.Dense(3, use_bias=False)
        return [dense, _norm(kind), keras.layers.ReLU()]

    return keras.Sequential(
        [keras.Input(shape), *block(), *block(), keras.layers.Dense(1)]
    )


def _norms(model):
    kinds = (
        keras_norms.BatchNormalization,
        keras_norms.CrossIterationBatchNormalization,
    )
    return [layer for layer in model.layers if isinstance(layer, kinds)]


def _statistics(model):
    names = ("moving_mean", "moving_variance", "renorm_mean", "renorm_stddev")
    return [
        to_numpy(getattr(layer, name))
        for layer in _norms(model)
        for name in names
        if hasattr(layer, name)
    ]


def _warnings(record):
    return [w for w in record if MESSAGE in str(w.message)]


KINDS = ["bn", "brn", "cbn_k1"]
# The layers whose statistics a batch of one value per feature leaves.
HOLDING = ["bn", "cbn_k1"]


@pytest.mark.parametrize("kind", KINDS)
def test_eager_calls_warn_once(kind):
    model = _model(kind)
    before = _statistics(model)
    x = np.random.default_rng(0).normal(size=(1, 4)).astype("float32")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model(x, training=True)
    found = _warnings(record)
    assert len(found) == len(_norms(model)), [str(w.message) for w in found]
    text = str(found[0].message)
    for advice in ("CrossIterationBatchNormalization", "LayerNormalization"):
        assert advice in text, text
    if kind in HOLDING:
        for old, new in zip(before, _statistics(model)):
            np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", ["batch_1", "last_batch_1"])
def test_fit_warns_once_per_layer_and_skips_single_values(kind, stream):
    """`fit(batch_size=1)` (traced with the batch size known) and a fit
    whose last batch has 1 example (traced with the batch size unknown on
    TensorFlow: the warning comes from the running step)."""
    rng = np.random.default_rng(1)
    model = _model(kind)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    size = 6 if stream == "batch_1" else 5
    x = rng.normal(size=(size, 4)).astype("float32")
    y = rng.normal(size=(size, 1)).astype("float32")
    batch = 1 if stream == "batch_1" else 2
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
    assert len(_warnings(record)) == len(_norms(model))
    if stream == "batch_1" and kind in HOLDING:
        # Nothing ever moved the moving statistics (initial values).
        for layer in _norms(model):
            np.testing.assert_array_equal(to_numpy(layer.moving_mean), 0.0)
            np.testing.assert_array_equal(to_numpy(layer.moving_variance), 1.0)
    for value in _statistics(model):
        assert np.all(np.isfinite(value))


@pytest.mark.parametrize("kind", KINDS)
def test_more_values_per_feature_update_and_do_not_warn(kind):
    """Batch size 1 of a sequence (5 positions per feature) and batch size
    2: the moving statistics move as the NumPy reference says; no
    warning."""
    rng = np.random.default_rng(2)
    for shape in ((1, 5, 4), (2, 4)):
        model = _model(kind, timesteps=shape[1] if len(shape) == 3 else None)
        layer = _norms(model)[0]
        x = rng.normal(size=shape).astype("float32")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model(x, training=True)
        assert not _warnings(record), shape
        # The first normalization's input, in float64.
        first = model.layers[0]
        linear = first.layer if kind == "cbn_k1" else first
        y = x.astype(np.float64) @ to_numpy(linear.kernel).astype(np.float64)
        mean, var, count = references.batch_moments(y, None, (y.ndim - 1,))
        expected = references.ema(np.zeros(3), mean, 0.5, count)
        np.testing.assert_allclose(
            to_numpy(layer.moving_mean), expected, rtol=1e-5, atol=1e-6
        )
        if kind != "brn":  # BRN keeps the moving stddev, not the variance
            expected = references.ema(np.ones(3), var, 0.5, count)
            np.testing.assert_allclose(
                to_numpy(layer.moving_variance), expected, rtol=1e-5
            )


def test_no_warning_in_inference_or_with_a_window():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 4)).astype("float32")
    model = _model("bn")
    cbn = keras_norms.CrossIterationBatchNormalization(
        keras.layers.Dense(3, use_bias=False), window_size=4
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(x, training=False)
        for layer in _norms(model):
            layer.trainable = False
        model(x, training=True)
        for _ in range(3):
            cbn(x, training=True)
    assert not _warnings(record)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's graphs")
def test_warning_from_a_graph_of_unknown_batch_size_runs_once():
    """In a `tf.function` traced for any batch size, the check runs with
    the step: no warning at batch 2, one at batch 1, none after."""
    import tensorflow as tf

    layer = keras_norms.BatchNormalization()
    layer.build((None, 4))
    step = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, 4), tf.float32)],
    )
    rng = np.random.default_rng(4)
    counts = []
    for size in (2, 1, 1, 3):
        x = rng.normal(size=(size, 4)).astype("float32")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            step(x)
        counts.append(len(_warnings(record)))
    assert counts == [0, 1, 0, 0]
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's graphs")
@pytest.mark.parametrize("kind", KINDS)
def test_graph_checks_in_python_only_until_it_warned(kind):
    """The `tf.py_function` that warns runs at the first batch of one value
    per feature only, not at every one after it (it costs a batch-1 step
    about 0.1 ms): with the layer's Python record of the warning cleared,
    the step does not warn again. The check is first traced in a retrace
    (`reduce_retracing` relaxing the batch size), where a `tf.function`
    may not make variables."""
    import tensorflow as tf

    model = _model(kind)
    step = tf.function(lambda x: model(x, training=True), reduce_retracing=True)
    rng = np.random.default_rng(5)
    counts = []
    for size in (2, 3, 1, 1, 4, 1):
        if size == 1 and counts == [0, 0, 2]:
            for layer in _norms(model):
                layer._warned_one_value = False
        x = rng.normal(size=(size, 4)).astype("float32")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            step(x)
        counts.append(len(_warnings(record)))
    assert counts == [0, 0, 2, 0, 0, 0]
    assert step.experimental_get_tracing_count() == 2


def _streamed(mean, stddev, x, momentum, eps):
    """The running mean and stddev after one more value `x` per feature
    (exponential weights), written out."""
    delta = x - mean
    var = np.maximum(stddev**2 - eps, 0.0)
    var = momentum * (var + (1 - momentum) * delta**2)
    return mean + (1 - momentum) * delta, np.sqrt(var + eps)


@pytest.mark.parametrize("masked", [False, True])
def test_renormalization_of_one_value_against_numpy(masked):
    """BRN at one value per feature, 4 steps: output `gamma * clip((x -
    mean_r) / std_r, +-dmax) + beta`, its input gradient `gamma / std_r`
    inside the clip and 0 outside, the running statistics moved by the
    value's deviation. With a mask, a batch of 3 rows with one kept."""
    eps, m, rm, dmax = 1e-3, 0.6, 0.5, 1.5
    layer = keras_norms.BatchRenormalization(
        momentum=m, renorm_momentum=rm, epsilon=eps, rmax=2.0, dmax=dmax
    )
    rows = 3 if masked else 1
    layer.build((rows, 4))
    rng = np.random.default_rng(5)
    gamma = rng.uniform(0.5, 1.5, 4)
    beta = rng.normal(size=4)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    r_mean, r_std = np.zeros(4), np.ones(4)
    m_mean, m_std = np.zeros(4), np.ones(4)
    mask = np.array([False, True, False]) if masked else None
    clipped = 0
    for step in range(4):
        x = rng.normal(1.0, 2.0, size=(rows, 4)).astype("float32")
        dy = rng.normal(size=(rows, 4)).astype("float32")
        if masked:  # a masked loss: the padding's outputs count for nothing
            dy[[0, 2]] = 0.0
        y, dx, _ = train_call(layer, x, dy, mask)
        value = x[1] if masked else x[0]
        value = value.astype(np.float64)
        pre = (value - r_mean) / np.maximum(r_std, np.sqrt(eps))
        inside = np.abs(pre) < dmax
        clipped += int(np.sum(~inside))
        expected_y = gamma * np.clip(pre, -dmax, dmax) + beta
        expected_dx = dy[1 if masked else 0] * gamma * inside / r_std
        kept = 1 if masked else 0
        np.testing.assert_allclose(y[kept], expected_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx[kept], expected_dx, rtol=1e-5, atol=1e-6)
        if masked:
            np.testing.assert_array_equal(dx[[0, 2]], 0.0)
        r_mean, r_std = _streamed(r_mean, r_std, value, rm, eps)
        m_mean, m_std = _streamed(m_mean, m_std, value, m, eps)
        for name, expected in (
            ("renorm_mean", r_mean),
            ("renorm_stddev", r_std),
            ("moving_mean", m_mean),
            ("moving_stddev", m_std),
            ("moving_variance", np.maximum(m_std**2 - eps, 0.0)),
        ):
            np.testing.assert_allclose(
                to_numpy(getattr(layer, name)),
                expected,
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{name}, step {step}",
            )
    assert 0 < clipped < 16  # both sides of the clip were seen


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's graphs")
def test_renormalization_of_one_value_in_a_graph_of_unknown_batch_size():
    """In a `tf.function` traced for any batch size, BRN at batch 1 still
    passes the gradient through the running statistics (the fused kernel,
    whose r and d are constants, is not taken when the batch may hold one
    value per feature)."""
    import tensorflow as tf

    layer = keras_norms.BatchRenormalization(epsilon=1e-3)
    layer.build((None, 4))

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, x)

    x = np.full((1, 4), 0.5, "float32")  # inside the clip (|d| < 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dx = to_numpy(gradient(x))
    np.testing.assert_allclose(dx, 1.0, rtol=1e-5)  # gamma / std_r = 1
