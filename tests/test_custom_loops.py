"""The layers in custom training loops, as Keras's guides "Writing a training
loop from scratch" write them for each backend: `tf.GradientTape` inside a
`tf.function` on TensorFlow, `stateless_call` inside `jax.jit` with the
non-trainable variables threaded through on JAX, and autograd on PyTorch.

After the same batches, every variable (weights, moving and renorm
statistics, BRN's step, `rmax` and `dmax`) equals what `fit()` leaves; the
warm-up is driven by the schedules of a `RenormWarmup`, handed to the
layers by hand; a call in inference mode between the steps moves nothing.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_norms
from tests.helpers import BACKEND
from tests.helpers import to_numpy

STEPS, BATCH = 6, 8
WARMUP = dict(rmax=2.0, dmax=1.0, rmax_steps=(1, 4), dmax_steps=(2, 5))


def _model(kind):
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(5, use_bias=False)
    if kind == "cbn":
        norm = [keras_norms.CBN(dense, window_size=3, momentum=0.8)]
    elif kind == "brn":
        norm = [
            dense,
            keras_norms.BatchRenormalization(momentum=0.8, renorm_momentum=0.8),
        ]
    else:
        norm = [dense, keras_norms.BatchNormalization(momentum=0.8)]
    return keras.Sequential(
        [keras.Input((4,)), *norm, keras.layers.ReLU(), keras.layers.Dense(1)]
    )


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(STEPS * BATCH, 4)).astype("float32")
    y = rng.normal(size=(STEPS * BATCH, 1)).astype("float32")
    return x, y


def _brn_layers(model):
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras_norms.BatchRenormalization)
    ]


def _fit(kind):
    model = _model(kind)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callbacks = []
    if kind == "brn":
        callbacks.append(keras_norms.callbacks.RenormWarmup(**WARMUP))
    x, y = _data()
    model.fit(
        x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks
    )
    return model


def _mse(y, prediction):
    return ops.mean(ops.square(y - prediction))


def _custom_loop(kind, check_inference):
    """Trains `_model(kind)` on `_data()` with this backend's loop;
    `check_inference(model)` runs after each step."""
    model = _model(kind)
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(model.trainable_variables)
    if kind == "brn":  # what RenormWarmup does when fit() begins
        schedules = keras_norms.callbacks.RenormWarmup(**WARMUP).schedules()
        for layer in _brn_layers(model):
            layer.set_clipping_schedule(*schedules)
    x, y = _data()
    batches = [
        (x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)
    ]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = _mse(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        for x_batch, y_batch in batches:
            train_step(x_batch, y_batch)
            check_inference(model)
    elif BACKEND == "jax":
        import jax

        def loss_and_state(trainable, non_trainable, x, y):
            prediction, non_trainable = model.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return _mse(y, prediction), non_trainable

        gradient = jax.value_and_grad(loss_and_state, has_aux=True)

        @jax.jit
        def train_step(state, x, y):
            trainable, non_trainable, optimizer_variables = state
            (_, non_trainable), grads = gradient(trainable, non_trainable, x, y)
            trainable, optimizer_variables = optimizer.stateless_apply(
                optimizer_variables, grads, trainable
            )
            return trainable, non_trainable, optimizer_variables

        variables = (
            model.trainable_variables,
            model.non_trainable_variables,
            optimizer.variables,
        )
        state = tuple([v.value for v in group] for group in variables)
        for x_batch, y_batch in batches:
            state = train_step(state, x_batch, y_batch)
            for group, values in zip(variables, state):
                for variable, value in zip(group, values):
                    variable.assign(value)
            check_inference(model)
    else:
        import torch

        for x_batch, y_batch in batches:
            x_batch, y_batch = torch.tensor(x_batch), torch.tensor(y_batch)
            loss = _mse(y_batch, model(x_batch, training=True))
            model.zero_grad()
            loss.backward()
            trainable = model.trainable_variables
            grads = [v.value.grad for v in trainable]
            with torch.no_grad():
                optimizer.apply(grads, trainable)
            check_inference(model)
    return model


def _values(model):
    return {v.path: to_numpy(v) for v in model.variables}


def _inference_moves_nothing(model):
    before = _values(model)
    model(_data()[0][:BATCH], training=False)
    after = _values(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


@pytest.mark.parametrize("kind", ["bn", "brn", "cbn"])
def test_custom_loop_trains_as_fit(kind):
    fitted = _values(_fit(kind))
    looped = _values(_custom_loop(kind, _inference_moves_nothing))
    # Paths differ in the layers' automatic names; the order is the same.
    assert len(fitted) == len(looped)
    for (path, expected), actual in zip(fitted.items(), looped.values()):
        np.testing.assert_allclose(
            actual, expected, rtol=1e-5, atol=1e-6, err_msg=path
        )
    if kind == "brn":
        (layer,) = [p for p in fitted if p.endswith("/step")]
        assert fitted[layer] == STEPS
        rmax = [v for p, v in fitted.items() if p.endswith("/rmax")]
        dmax = [v for p, v in fitted.items() if p.endswith("/dmax")]
        # The last step (5) evaluated the schedules: rmax reached 2 at step
        # 4, dmax is 0 -> 1 over steps 2..5: 1.0 at step 5.
        np.testing.assert_allclose(rmax, [2.0])
        np.testing.assert_allclose(dmax, [1.0])


def test_crossq_switch_as_a_schedule():
    """CrossQ's recipe: plain batch normalization until step N, then
    `rmax`/`dmax` at once, written as a schedule `step -> value`."""
    switch = 3
    rmax_seen, dmax_seen = [], []

    def record(model):
        (layer,) = _brn_layers(model)
        rmax_seen.append(float(to_numpy(layer.rmax_value)))
        dmax_seen.append(float(to_numpy(layer.dmax_value)))

    original = WARMUP.copy()
    WARMUP.clear()
    WARMUP.update(
        rmax=lambda step: ops.where(step < switch, 1.0, 3.0),
        dmax=lambda step: ops.where(step < switch, 0.0, 5.0),
    )
    try:
        _custom_loop("brn", record)
    finally:
        WARMUP.clear()
        WARMUP.update(original)
    # The value used at step s (0-based) is the schedule's at s.
    expected = [1.0 if s < switch else 3.0 for s in range(STEPS)]
    assert rmax_seen == expected
    assert dmax_seen == [0.0 if s < switch else 5.0 for s in range(STEPS)]


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit's trace cache")
def test_jitted_step_with_a_schedule_of_constants_is_traced_once():
    """`ops.where(step < n, 1.0, 3.0)` is weakly typed on JAX: the values
    the layer stores keep its variables' types, so the step is traced once
    (it was traced again at the second step)."""
    import jax

    model = _model("brn")
    (layer,) = _brn_layers(model)
    layer.set_clipping_schedule(
        rmax=lambda step: ops.where(step < 1, 1.0, 3.0),
        dmax=lambda step: ops.where(step < 1, 0.0, 5.0),
    )
    traces = []

    @jax.jit
    def step(trainable, non_trainable, x):
        traces.append(1)
        return model.stateless_call(trainable, non_trainable, x, training=True)

    x, _ = _data()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    for start in range(0, 3 * BATCH, BATCH):
        _, non_trainable = step(
            trainable, non_trainable, x[start : start + BATCH]
        )
    assert len(traces) == 1
    values = dict(
        zip([v.path for v in model.non_trainable_variables], non_trainable)
    )
    assert float(values[layer.rmax_value.path]) == 3.0
    assert float(values[layer.dmax_value.path]) == 5.0
