import csv
import warnings

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


# Two groups of layers on two schedules (issue 20, part 4: the logs).
GROUPS = {
    "a": dict(
        rmax=3.0,
        dmax=2.0,
        rmax_steps=(1, 7),
        dmax_steps=(0, 5),
        layers=["a1", "a2"],
    ),
    "b": dict(
        rmax=2.0,
        dmax=1.0,
        rmax_steps=(2, 4),
        dmax_steps=(3, 8),
        layers=["b1"],
    ),
}
GROUP_STEPS, GROUP_EPOCHS = 3, 3  # steps per epoch; last steps 2, 5, 8


def _two_group_model():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras_norms.BatchRenormalization(name="a1"),
            keras.layers.Dense(3),
            keras_norms.BatchRenormalization(name="a2"),
            keras.layers.Dense(3),
            keras_norms.BatchRenormalization(name="b1"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _group_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GROUP_STEPS * BATCH, 3)).astype("float32")
    return x, np.zeros_like(x)


def _ramp(step, steps, start, end):
    """The linear warm-up's value at `step`: `start` up to `steps[0]`, then
    linear to `end` at `steps[1]`, constant after."""
    begin, finish = steps
    if step < begin:
        return start
    if step >= finish:
        return end
    return start + (end - start) * (step - begin) / (finish - begin)


def _expected_logs(names):
    """Per key, the value at the last step of each epoch."""
    expected = {}
    for group, name in zip(("a", "b"), names):
        g = GROUPS[group]
        prefix = "" if name is None else f"{name}_"
        last = [GROUP_STEPS * (e + 1) - 1 for e in range(GROUP_EPOCHS)]
        expected[f"{prefix}rmax"] = [
            _ramp(s, g["rmax_steps"], 1.0, g["rmax"]) for s in last
        ]
        expected[f"{prefix}dmax"] = [
            _ramp(s, g["dmax_steps"], 0.0, g["dmax"]) for s in last
        ]
    return expected


def _tensorboard_scalars(log_dir):
    """`{tag: [value per epoch]}` of the epoch scalars in TensorBoard's
    training event files."""
    import tensorflow as tf

    scalars = {}
    for path in sorted((log_dir / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if not value.tag.startswith("epoch_"):
                    continue  # e.g. the model's config, as text
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = value.simple_value
                scalars.setdefault(value.tag, []).append((event.step, number))
    return {
        tag: [v for _, v in sorted(pairs)] for tag, pairs in scalars.items()
    }


def _fit_two_warmups(names, loggers, position):
    """Fits the two-group model with `loggers` listed `position` the two
    warm-ups (and validation data); returns the model."""
    model = _two_group_model()
    warmups = [
        RenormWarmup(**GROUPS["a"], name=names[0]),
        RenormWarmup(**GROUPS["b"], name=names[1]),
    ]
    callbacks = loggers + warmups if position == "before" else warmups + loggers
    x, y = _group_data()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=GROUP_EPOCHS,
        shuffle=False,
        verbose=0,
        validation_data=(x, y),
        callbacks=callbacks,
    )
    return model


NAMES = pytest.mark.parametrize(
    "names", [("body", "head"), (None, "head")], ids=["named", "default"]
)
POSITIONS = pytest.mark.parametrize("position", ["before", "after"])


@NAMES
@POSITIONS
def test_two_warmups_log_their_own_schedules_to_history_and_csv(
    names, position, tmp_path
):
    history = keras.callbacks.History()
    csv_path = tmp_path / "log.csv"
    loggers = [history, keras.callbacks.CSVLogger(str(csv_path))]
    model = _fit_two_warmups(names, loggers, position)
    assert model.history is history
    expected = _expected_logs(names)
    assert len(expected) == 4
    for key, values in expected.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-6)
        assert f"val_{key}" not in history.history
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    for key, values in expected.items():
        np.testing.assert_allclose(
            [float(row[key]) for row in rows], values, rtol=1e-6
        )
    # The reports end with the fit: metrics and evaluate() are as before.
    assert [m.name for m in model.metrics] == ["loss"]
    x, y = _group_data()
    assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss"}


@POSITIONS
def test_two_warmups_log_their_own_schedules_to_tensorboard(position, tmp_path):
    # Keras's TensorBoard writes through tf.summary on every backend.
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorboard")
    board = keras.callbacks.TensorBoard(str(tmp_path / "board"))
    names = ("body", "head")
    _fit_two_warmups(names, [board], position)
    scalars = _tensorboard_scalars(tmp_path / "board")
    for key, values in _expected_logs(names).items():
        np.testing.assert_allclose(scalars[f"epoch_{key}"], values, rtol=1e-6)
        assert f"epoch_val_{key}" not in scalars


def test_default_keys_reach_loggers_listed_first(tmp_path):
    x, y = _group_data()
    model = _two_group_model()
    csv_path = tmp_path / "log.csv"
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[
            keras.callbacks.CSVLogger(str(csv_path)),
            RenormWarmup(**GROUPS["a"]),
        ],
    )
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    expected = _expected_logs((None, "unused"))
    for key in ("rmax", "dmax"):
        np.testing.assert_allclose(
            [float(row[key]) for row in rows], expected[key][:2], rtol=1e-6
        )


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append((float(logs["head_rmax"]), float(logs["head_dmax"])))


def test_step_logs_carry_each_steps_values_or_nan_on_jax():
    x, y = _group_data()
    model = _two_group_model()
    recorder = _BatchLogs()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=GROUP_EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[recorder, RenormWarmup(**GROUPS["b"], name="head")],
    )
    g = GROUPS["b"]
    steps = range(GROUP_STEPS * GROUP_EPOCHS)
    expected = [
        (
            _ramp(s, g["rmax_steps"], 1.0, g["rmax"]),
            _ramp(s, g["dmax_steps"], 0.0, g["dmax"]),
        )
        for s in steps
    ]
    if BACKEND == "jax":  # a JAX train step's metrics see metric variables
        expected = [(np.nan, np.nan)] * len(expected)
    np.testing.assert_allclose(recorder.rows, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "first,second,match",
    [
        (dict(layers=["a1"]), dict(layers=["b1"]), "distinct `name`"),
        (
            dict(layers=["a1"], name="x"),
            dict(layers=["b1"], name="x"),
            "distinct `name`",
        ),
        (
            dict(layers=["a1", "a2"], name="x"),
            dict(layers=["a2"], name="y"),
            r"Layers \['a2'\] are warmed up by two",
        ),
        (dict(name="x"), dict(name="y"), "two RenormWarmup"),
    ],
    ids=["default_twice", "same_name", "shared_layer", "all_layers_twice"],
)
def test_colliding_warmups_raise_when_training_begins(first, second, match):
    x, y = _group_data()
    model = _two_group_model()
    callbacks = [RenormWarmup(**first), RenormWarmup(**second)]
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=callbacks)


class _Interrupted(Exception):
    pass


class _Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        raise _Interrupted  # as a KeyboardInterrupt would


@pytest.mark.filterwarnings("ignore:RenormWarmup. this fit.. ends")
def test_interrupted_fit_leaves_no_stale_keys():
    x, y = _group_data()
    model = _two_group_model()
    with pytest.raises(_Interrupted):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            verbose=0,
            callbacks=[RenormWarmup(), _Interrupt()],
        )
    # No on_train_end: a new callback with the same keys takes over.
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        verbose=0,
        callbacks=[RenormWarmup(**GROUPS["a"])],
    )
    assert set(history.history) == {"loss", "rmax", "dmax"}
    assert [m.name for m in model.metrics] == ["loss"]


@pytest.mark.parametrize("name", [3, b"head", ["head"]])
def test_name_must_be_a_string(name):
    with pytest.raises(TypeError, match="`name` must be None or a non-empty"):
        RenormWarmup(name=name)


@pytest.mark.parametrize("name", ["", "   "])
def test_name_must_not_be_empty(name):
    with pytest.raises(ValueError, match="`name` must be None or a non-empty"):
        RenormWarmup(name=name)


@pytest.mark.parametrize("name", [None, "head"])
def test_config_round_trip_keeps_the_name(name):
    warmup = RenormWarmup(layers=["b1"], name=name)
    assert warmup.get_config()["name"] == name
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(warmup)
    )
    assert isinstance(clone, RenormWarmup)
    assert clone.name == name
    assert clone.get_config() == warmup.get_config()
    assert clone.log_keys == (
        ("rmax", "dmax") if name is None else ("head_rmax", "head_dmax")
    )


# A fit() that ends before the warm-up begins trains as plain BN: warned.
def _warmup_warnings(fit, *args, **kwargs):
    """Runs `fit(*args, **kwargs)`; returns the messages of RenormWarmup's
    warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(*args, **kwargs)
    return [
        str(w.message)
        for w in caught
        if str(w.message).startswith("RenormWarmup")
        and issubclass(w.category, UserWarning)
    ]


def test_warns_when_fit_ends_before_the_default_warm_up_begins():
    x, y = _group_data()  # 3 steps per epoch
    model = _two_group_model()
    fit = dict(batch_size=BATCH, epochs=2, verbose=0)
    messages = _warmup_warnings(
        model.fit, x, y, **fit, callbacks=[RenormWarmup()]
    )
    assert len(messages) == 1, messages  # once per fit(), not per epoch
    (message,) = messages
    assert "this fit() ends at step 6, before the warm-up begins at " in message
    assert "begins at step 5000 " in message
    assert "rmax_steps=(5000, 40000), dmax_steps=(5000, 25000)" in message
    assert "plain batch normalization (rmax=1, dmax=0)" in message
    # The suggestion is a schedule within the run's 6 steps.
    assert "e.g. rmax_steps=(0, 3), dmax_steps=(0, 1)" in message
    # Every step trained with rmax=1, dmax=0, as the warning says.
    assert float(to_numpy(model.get_layer("a1").rmax_value)) == 1.0
    assert float(to_numpy(model.get_layer("a1").dmax_value)) == 0.0
    # Once per fit(): a second fit() warns again, with its own end.
    messages = _warmup_warnings(
        model.fit, x, y, **fit, callbacks=[RenormWarmup()]
    )
    assert len(messages) == 1, messages
    assert "ends at step 12 (it resumes at step 6)" in messages[0]


def test_warning_is_a_user_warning():
    x, y = _group_data()
    model = _two_group_model()
    with pytest.warns(UserWarning, match=r"ends at step 3, before the warm"):
        model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[RenormWarmup()])


@pytest.mark.parametrize(
    "kwargs",
    [
        # Steps 0 to 5: the ramps begin at step 4, move at step 5.
        dict(rmax_steps=(4, 40), dmax_steps=(4, 25)),
        dict(rmax_steps=(2, 4)),  # dmax's ramp later, rmax's within
        dict(rmax=1.0, dmax_steps=(5, 5)),  # a jump at the last step
        dict(rmax=1.0, dmax=0.0),  # nothing to warm up
        dict(rmax=lambda step: 1.0 + step / 1e4),  # a callable: unknown
    ],
    ids=["ramps_within", "rmax_only", "jump", "constant", "callable"],
)
def test_no_warning_when_the_warm_up_begins_within_the_run(kwargs):
    x, y = _group_data()
    model = _two_group_model()
    messages = _warmup_warnings(
        model.fit,
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        callbacks=[RenormWarmup(**kwargs)],
    )
    assert messages == []


def test_warns_when_the_warm_up_begins_just_after_the_run():
    x, y = _group_data()
    model = _two_group_model()
    # 6 steps (0 to 5); a jump at step 6 is never reached.
    messages = _warmup_warnings(
        model.fit,
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        callbacks=[RenormWarmup(rmax_steps=(6, 6), dmax_steps=(6, 9))],
    )
    assert len(messages) == 1, messages
    message = messages[0]
    assert "ends at step 6, before the warm-up begins at step 6 " in message


def test_no_warning_when_the_steps_per_epoch_are_unknown():
    x, y = _group_data()

    def batches():  # a generator: Keras does not know its length
        for i in range(0, len(x), BATCH):
            yield x[i : i + BATCH], y[i : i + BATCH]

    class Plan(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.steps = self.params["steps"]

    model, plan = _two_group_model(), Plan()
    messages = _warmup_warnings(
        model.fit, batches(), verbose=0, callbacks=[plan, RenormWarmup()]
    )
    assert messages == []
    assert plan.steps is None


@pytest.mark.parametrize(
    "iterations,initial_epoch,end",
    [
        (4990, 0, 4996),  # 2 epochs of 3 steps from step 4990
        (4995, 1, 4998),  # 1 epoch (the second) from 4995
        (4995, 0, None),  # ends at 5001: the ramp begins at 5000
        (4999, 1, None),  # ends at 5002
        (5000, 1, None),  # already in the ramp
    ],
)
def test_warns_when_resumed_near_the_warm_up(iterations, initial_epoch, end):
    x, y = _group_data()
    model = _two_group_model()
    model.optimizer.iterations.assign(iterations)  # as a reloaded model's
    messages = _warmup_warnings(
        model.fit,
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        initial_epoch=initial_epoch,
        verbose=0,
        callbacks=[RenormWarmup()],
    )
    if end is None:
        assert messages == []
    else:
        assert len(messages) == 1, messages
        assert (
            f"this fit() ends at step {end} (it resumes at step "
            f"{iterations}), before the warm-up begins at step 5000 "
        ) in messages[0]
    brn = model.get_layer("a1")
    assert int(to_numpy(brn.step)) == int(to_numpy(model.optimizer.iterations))
