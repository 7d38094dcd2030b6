"""Test helpers on the public Keras API, for every backend."""

import doctest
import inspect
import os
import subprocess
import sys

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def train_call(layer, x, dy, mask=None, training=True):
    """Calls `layer(x, training=training, mask=mask)` once, with gradients.

    Returns `(y, dx, grads)` for the loss `sum(dy * y)`, `grads` a dict from
    trainable weight name to gradient; the layer's state updates are applied
    as in a training step.
    """
    x = ops.convert_to_tensor(np.asarray(x))
    dy = ops.convert_to_tensor(np.asarray(dy, dtype="float32"))
    m = None if mask is None else ops.convert_to_tensor(np.asarray(mask))
    # Layers whose `call` takes no mask (e.g. a convolution) get none.
    masks = {} if mask is None else {"mask": m}
    if not layer.built:
        layer.build(tuple(x.shape))
    names = [w.name for w in layer.trainable_weights]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, **masks)
            loss = tf.reduce_sum(tf.cast(y, "float32") * dy)
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
    elif BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        # `stateless_call` passes its keywords to `call` as they are.
        takes = inspect.signature(layer.call).parameters
        if "training" in takes:
            masks["training"] = training

        def loss_fn(x, trainable):
            y, new_state = layer.stateless_call(
                trainable, non_trainable, x, **masks
            )
            return (y.astype("float32") * dy).sum(), (y, new_state)

        (_, (y, new_state)), grads = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(x, trainable)
        grads = [grads[0]] + list(grads[1])
        for v, value in zip(layer.non_trainable_variables, new_state):
            v.assign(value)
    else:
        import torch

        x = x.detach().clone().requires_grad_(True)
        y = layer(x, training=training, **masks)
        loss = (y.float() * dy).sum()
        params = [v.value for v in layer.trainable_variables]
        grads = torch.autograd.grad(loss, [x] + params)
    out = [to_numpy(g) for g in grads]
    return to_numpy(y), out[0], dict(zip(names, out[1:]))


def sgd_update(layer, grads, learning_rate=0.1):
    """Applies `w -= learning_rate * grad` to the layer's trainable weights."""
    for w in layer.trainable_weights:
        w.assign(to_numpy(w) - learning_rate * grads[w.name])


def weights_by_name(layer):
    return {w.name: to_numpy(w) for w in layer.weights}


def assert_config_round_trip(layer):
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is type(layer)
    assert revived.get_config() == config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(path, *args):
    """Runs `python path args...` (path relative to the repository) in a new
    process on the current backend; asserts that it succeeds."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, path), *args],
        env=dict(os.environ, KERAS_BACKEND=BACKEND),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_python(code, cwd):
    """Runs `code` in a new Python process on the current backend."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def assert_close_to_reference(actual, expected, what, rtol=1e-5):
    """float32 results against a float64 reference.

    Elementwise `rtol`, plus an absolute slack of `rtol` times the largest
    magnitude in `expected` for entries that are differences of large terms
    (input gradients), where float32 cancellation loses relative precision.
    """
    expected = np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-3), err_msg=what
    )


def assert_close(actual, expected, what, rtol=1e-5, atol=1e-6):
    """float32 results against float32 results (e.g. Keras's layers)."""
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=atol, err_msg=what
    )


# Half a unit in the last place, relative: the most that rounding a value
# once to the type moves it.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def assert_rounded_once(actual, expected, half, what="output"):
    """A half-precision result computed in float32 and rounded once to
    `half`: each element within half a unit in the last place of the
    float32 result `expected` (2**-11 relative for float16, 2**-8 for
    bfloat16), plus 1e-5 for float32's own error. Arithmetic in `half`
    before the final rounding (e.g. the normalization's affine: 7e-3 to
    7e-2 relative for float16, 4e-2 and more for bfloat16) fails it."""
    np.testing.assert_allclose(
        to_numpy(ops.cast(actual, "float32")),
        expected,
        rtol=UNIT_ROUNDOFF[half],
        atol=1e-5,
        err_msg=what,
    )


def random_mask(shape, feature_axes, seed=1, keep=0.6):
    """A random boolean mask over the non-feature axes of `shape`, in
    Keras's convention: `shape` without its last axis when the features are
    last, else of `shape`'s rank with 1 at the feature axes. Each batch row
    keeps at least one position."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    if tuple(feature_axes) == (ndim - 1,):
        mshape = list(shape[:-1])
    else:
        mshape = [1 if a in feature_axes else d for a, d in enumerate(shape)]
    mask = rng.random(mshape) < keep
    mask.reshape(mshape[0], -1)[:, 0] = True
    return mask


def assert_trains_alike(ours, theirs, batches, mask, statistics):
    """Trains two layers side by side on `(x, dy)` batches with SGD and
    asserts equal outputs, gradients and `statistics` at every step."""
    for step, (x, dy) in enumerate(batches):
        y1, dx1, g1 = train_call(ours, x, dy, mask)
        y2, dx2, g2 = train_call(theirs, x, dy, mask)
        # Keras computes `(x - mean) * inv * gamma + beta`, keras_norms
        # `x * scale + shift`: outputs near zero are differences of terms as
        # large as the largest output and agree to 1e-5 of that (seen on
        # JAX, renorm without clipping: 4.8e-6 on 0.305 beside 16.0).
        assert_close_to_reference(y1, y2, f"outputs, step {step}")
        # Input gradients are differences of terms up to |dy| / sigma: float32
        # cancellation makes entries near zero lose relative precision, so
        # they get an absolute slack of 1e-5 of the largest entry. So do the
        # gamma gradients, sums of dy * x_hat over the batch (without oneDNN
        # TensorFlow's kernel sums them in another order: -0.1043678 against
        # -0.1043700 beside entries of -9.3).
        assert_close_to_reference(dx1, dx2, f"input gradient, step {step}")
        assert sorted(g1) == sorted(g2)
        for name in g1:
            assert_close_to_reference(
                g1[name], g2[name], f"{name} gradient, step {step}"
            )
        for name in statistics:
            assert_close(
                to_numpy(getattr(ours, name)),
                to_numpy(getattr(theirs, name)),
                f"{name}, step {step}",
            )
        sgd_update(ours, g1)
        sgd_update(theirs, g2)


def all_layers(model):
    """The layers of `model` and of the models nested in it."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


# Statistics that must stay positive. BRN's moving_stddev is drawn apart
# from its moving_variance: inference (and folding) must use the variance.
POSITIVE = ("moving_variance", "moving_stddev", "renorm_stddev")


def randomize(model, seed=0):
    """Non-trivial statistics, gamma, beta and biases for every layer."""
    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
        for w in layer.weights:
            if keras.backend.standardize_dtype(w.dtype) != "float32":
                continue  # step counters
            shape = tuple(w.shape)
            if w.name in POSITIVE:
                value = rng.uniform(0.3, 3.0, shape)
            elif w.name == "gamma":
                sign = rng.choice([-1.0, 1.0], shape)  # negative too
                value = rng.uniform(0.5, 2.0, shape) * sign
            elif w.name in ("beta", "moving_mean", "renorm_mean", "bias"):
                value = rng.normal(0.0, 1.0, shape)
            else:
                continue  # kernels keep their initializer's scale
            w.assign(value.astype("float32"))


def assert_same_predictions(actual, expected):
    """Normwise: max |difference| <= 1e-5 * max |expected|."""
    error = np.max(np.abs(actual - expected))
    assert error <= 1e-5 * np.max(np.abs(expected)), error


def assert_docstring_examples_pass(obj):
    """Runs the examples of `obj`'s docstring; they must exist and pass."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(obj, globs={})
    assert tests and tests[0].examples
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def scenario_normalization(kind, synchronized):
    """The layer the multi-device and multi-worker scenarios train: `kind`
    is "bn", "brn", "cbn" (of a Dense), "cbn_conv" (Conv1D) or
    "cbn_conv2d" (Conv2D); a CBN kind ending in "_authors" takes the
    authors' gradient convention (`compensation_gradient=False`)."""
    import keras_norms

    common = dict(momentum=0.5, synchronized=synchronized)
    if kind == "bn":
        return keras_norms.BatchNormalization(**common)
    if kind == "brn":
        return keras_norms.BatchRenormalization(rmax=1.5, dmax=0.5, **common)
    if kind.startswith("cbn_conv2d"):
        linear = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)
    elif kind.startswith("cbn_conv"):
        linear = keras.layers.Conv1D(6, 3, padding="same", use_bias=False)
    else:
        linear = keras.layers.Dense(6, use_bias=False)
    return keras_norms.CrossIterationBatchNormalization(
        linear,
        window_size=3,
        burnin_steps=0,
        compensation_gradient=not kind.endswith("_authors"),
        **common,
    )


def skip_unless_channels_first_conv_runs():
    """Skips the calling test where Keras's own channels-first Conv2D cannot
    run: TensorFlow's CPU convolution takes NCHW only with oneDNN, which
    TensorFlow turns on by default on some x86 processors and not on
    others (e.g. off on an AMD EPYC without AVX-512)."""
    import pytest

    conv = keras.layers.Conv2D(1, 1, data_format="channels_first")
    try:
        conv(np.zeros((1, 1, 2, 2), "float32"))
    except Exception:  # TensorFlow's UnimplementedError
        pytest.skip(
            "Keras's own channels-first Conv2D does not run on this CPU "
            "(TensorFlow without oneDNN)"
        )
