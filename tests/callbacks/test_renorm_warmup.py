import csv

import keras
import numpy as np
import pytest
from keras import ops

import keras_norms
from keras_norms.callbacks import LinearRamp
from keras_norms.callbacks import RenormWarmup
from tests import references
from tests.helpers import BACKEND
from tests.helpers import to_numpy

STEPS, BATCH, CHANNELS, EPS = 12, 8, 2, 1e-3
RMAX, DMAX = 3.0, 2.0
RMAX_STEPS, DMAX_STEPS = (2, 8), (3, 6)


@keras.saving.register_keras_serializable(package="keras_norms_tests")
class StepRecorder(keras.layers.Layer):
    """Identity that records, per training step, its input's batch mean and
    standard deviation per feature: after a BatchRenormalization with
    gamma=1, beta=0 these are d and r * sqrt(var_B / (var_B + eps))."""

    def __init__(self, steps, **kwargs):
        super().__init__(**kwargs)
        self.steps = steps

    def build(self, input_shape):
        self.history = self.add_weight(
            shape=(self.steps, 2 * input_shape[-1]),
            initializer="zeros",
            trainable=False,
            name="history",
        )
        self.count = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False
        )

    def call(self, inputs, training=None):
        if training:
            row = ops.concatenate(
                [ops.mean(inputs, axis=0), ops.std(inputs, axis=0)]
            )
            onehot = ops.one_hot(self.count, self.steps, dtype=inputs.dtype)
            self.history.assign(self.history + onehot[:, None] * row[None])
            self.count.assign_add(ops.cast(1, "int32"))
        return inputs

    def get_config(self):
        return {**super().get_config(), "steps": self.steps}


def _data():
    """Feature 0 has a batch spread alternating between far above and far
    below its running average, so r is clipped; feature 1 a batch mean
    alternating far on either side of its running mean, so d is clipped."""
    rng = np.random.default_rng(0)
    batches = []
    for s in range(STEPS // 2):
        spread = rng.normal(0.0, 1000.0 if s % 2 else 0.001, size=BATCH)
        shift = rng.normal(100.0 * (-1) ** s, 1.0, size=BATCH)
        batches.append(np.stack([spread, shift], axis=1))
    return np.concatenate(batches).astype("float32")


def _schedule(step):
    rmax = np.interp(step, RMAX_STEPS, [1.0, RMAX])
    dmax = np.interp(step, DMAX_STEPS, [0.0, DMAX])
    return rmax, dmax


def _expected(x):
    """Per-step (d, r * sqrt(var / (var + eps))) from the paper's algorithm,
    for two epochs over `x`."""
    x = np.concatenate([x, x])
    ref = references.RenormReference(CHANNELS, EPS, 0.99, 0.99)
    rows = []
    for s in range(STEPS):
        xb = x[s * BATCH : (s + 1) * BATCH]
        rmax, dmax = _schedule(s)
        var = references.batch_moments(xb, None, (1,))[1]
        _, _, _, _, r, d = ref.train(
            xb, np.zeros_like(xb), None, (1,), rmax, dmax
        )
        rows.append(np.concatenate([d, r * np.sqrt(var / (var + EPS))]))
        # The clipping is active at every step, so each step's value shows.
        assert np.isclose(abs(np.log(r[0])), np.log(rmax)), (s, r)
        assert np.isclose(abs(d[1]), dmax), (s, d)
    return np.array(rows)


def _model(jit_compile, steps_per_execution):
    model = keras.Sequential(
        [
            keras.Input((CHANNELS,)),
            keras_norms.BatchRenormalization(epsilon=EPS, name="brn"),
            StepRecorder(STEPS, name="recorder"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss="mse",
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def _warmup():
    return RenormWarmup(
        rmax=RMAX, dmax=DMAX, rmax_steps=RMAX_STEPS, dmax_steps=DMAX_STEPS
    )


def _recorded(model):
    return to_numpy(model.get_layer("recorder").history)


def _spe_cases():
    # Keras's torch trainer accepts only steps_per_execution=1.
    return [1] if BACKEND == "torch" else [1, 4]


def _jit_cases():
    # torch.compile of a whole train step takes minutes on CPU; Keras's
    # "auto" never picks it for torch.
    return [False] if BACKEND == "torch" else [False, True]


@pytest.mark.parametrize("jit_compile", _jit_cases(), ids=lambda v: f"jit{v}")
@pytest.mark.parametrize(
    "steps_per_execution", _spe_cases(), ids=lambda v: f"spe{v}"
)
def test_each_step_uses_its_own_schedule_value(
    jit_compile, steps_per_execution
):
    x = _data()
    model = _model(jit_compile, steps_per_execution)
    history = model.fit(
        x,
        np.zeros_like(x),
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[_warmup()],
    )
    expected = _expected(x)
    np.testing.assert_allclose(_recorded(model), expected, rtol=1e-4, atol=1e-4)
    # The logs carry the values used at the last step of each epoch.
    half = STEPS // 2
    for epoch, last in enumerate([half - 1, STEPS - 1]):
        rmax, dmax = _schedule(last)
        assert history.history["rmax"][epoch] == pytest.approx(rmax)
        assert history.history["dmax"][epoch] == pytest.approx(dmax)
    assert int(to_numpy(model.optimizer.iterations)) == STEPS
    assert int(to_numpy(model.get_layer("brn").step)) == STEPS


def test_schedule_resumes_after_reload(tmp_path):
    x = _data()
    y = np.zeros_like(x)
    half = STEPS // 2
    model = _model(False, 1)
    model.fit(
        x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[_warmup()]
    )
    path = tmp_path / "mid_warmup.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert int(to_numpy(restored.optimizer.iterations)) == half
    restored.fit(
        x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[_warmup()]
    )
    np.testing.assert_allclose(
        _recorded(restored), _expected(x), rtol=1e-4, atol=1e-4
    )


def test_learning_rate_schedule_as_rmax(tmp_path):
    rmax = keras.optimizers.schedules.PolynomialDecay(
        1.0, decay_steps=10, end_learning_rate=3.0
    )
    warmup = RenormWarmup(rmax=rmax, dmax=lambda step: 0.25 * step)
    x = _data()
    model = _model(False, _spe_cases()[-1])
    log = tmp_path / "log.csv"
    model.fit(
        x,
        np.zeros_like(x),
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[warmup, keras.callbacks.CSVLogger(log)],
    )
    last = STEPS - 1
    brn = model.get_layer("brn")
    assert float(to_numpy(brn.rmax_value)) == pytest.approx(3.0)
    assert float(to_numpy(brn.dmax_value)) == pytest.approx(0.25 * last)
    with open(log) as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["rmax"]) == pytest.approx(3.0)
    assert float(row["dmax"]) == pytest.approx(0.25 * last)


def test_values_stay_constant_after_training():
    x = _data()
    model = _model(False, 1)
    model.fit(
        x[: 4 * BATCH],
        np.zeros_like(x[: 4 * BATCH]),
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[_warmup()],
    )
    brn = model.get_layer("brn")
    rmax = float(to_numpy(brn.rmax_value))
    assert rmax == pytest.approx(_schedule(3)[0])
    model.fit(
        x[: 4 * BATCH],
        np.zeros_like(x[: 4 * BATCH]),
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
    )
    assert float(to_numpy(brn.rmax_value)) == rmax
    assert int(to_numpy(brn.step)) == 8


@pytest.mark.parametrize("step", [0, 1, 2, 3, 5, 8, 9, 100])
def test_linear_ramp_matches_interpolation(step):
    ramp = LinearRamp(1.0, 3.0, 2, 8)
    expected = np.interp(step, [2, 8], [1.0, 3.0])
    assert float(to_numpy(ramp(step))) == pytest.approx(expected)
    jump = LinearRamp(0.0, 5.0, 4, 4)
    assert float(to_numpy(jump(step))) == (5.0 if step >= 4 else 0.0)


def _nested_model():
    inner = keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.Dense(3),
            keras_norms.BatchRenormalization(name="inner_brn"),
        ],
        name="inner",
    )
    return keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.Bidirectional(
                keras.layers.LSTM(2, return_sequences=True)
            ),
            keras.layers.TimeDistributed(
                keras_norms.BatchRenormalization(name="td_brn")
            ),
            keras.layers.Dense(3),
            inner,
            keras_norms.BatchNormalization(name="bn"),
        ]
    )


@pytest.mark.parametrize(
    "layers,expected",
    [(None, {"inner_brn", "td_brn"}), (["td_brn"], {"td_brn"})],
)
def test_finds_layers_in_nested_models_and_wrappers(layers, expected):
    model = _nested_model()
    model.compile("sgd", "mse")
    # A jump at step 0: the chosen layers train with rmax=2, dmax=1.
    warmup = RenormWarmup(
        rmax=2.0,
        dmax=1.0,
        rmax_steps=(0, 0),
        dmax_steps=(0, 0),
        layers=layers,
    )
    x = np.random.default_rng(0).normal(size=(8, 4, 3)).astype("float32")
    model.fit(x, x, batch_size=4, epochs=1, verbose=0, callbacks=[warmup])
    td = model.layers[1].layer
    inner = model.layers[3].get_layer("inner_brn")
    for layer in (td, inner):
        clipping = (
            float(to_numpy(layer.rmax_value)),
            float(to_numpy(layer.dmax_value)),
        )
        assert clipping == ((2.0, 1.0) if layer.name in expected else (3, 5))
    # One training call per step: the layer's step follows the optimizer.
    assert int(to_numpy(inner.step)) == 2


def test_refuses_bad_arguments_and_models():
    with pytest.raises(ValueError, match="rmax"):
        RenormWarmup(rmax=0.9)
    with pytest.raises(ValueError, match="dmax"):
        RenormWarmup(dmax=-1)
    with pytest.raises(ValueError, match="rmax_steps"):
        RenormWarmup(rmax_steps=(10, 5))
    with pytest.raises(TypeError, match="dmax_steps"):
        RenormWarmup(dmax_steps=5)
    with pytest.raises(TypeError, match="rmax_steps"):
        RenormWarmup(rmax_steps=(1.5, 5))  # not silently (1, 5)
    with pytest.raises(TypeError, match="layers"):
        RenormWarmup(layers=[keras.layers.Dense(2)])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no BatchRenormalization"):
        model.fit(
            np.ones((4, 2)),
            np.ones((4, 1)),
            verbose=0,
            callbacks=[RenormWarmup()],
        )
    model = _model(False, 1)
    with pytest.raises(ValueError, match="nope"):
        model.fit(
            np.ones((8, 2)),
            np.ones((8, 2)),
            verbose=0,
            callbacks=[RenormWarmup(layers=["nope"])],
        )


def test_config_round_trip():
    rmax = keras.optimizers.schedules.PolynomialDecay(1.0, 10, 2.0)
    warmup = RenormWarmup(
        rmax=rmax, dmax=4.0, rmax_steps=(1, 2), dmax_steps=(3, 4), layers=["a"]
    )
    config = keras.saving.serialize_keras_object(warmup)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, RenormWarmup)
    assert clone.get_config() == warmup.get_config()
    assert float(to_numpy(clone.rmax(10))) == pytest.approx(2.0)
