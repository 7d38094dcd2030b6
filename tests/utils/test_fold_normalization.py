"""fold_normalization: equal predictions, kept layers, saving and export."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers

import keras_norms
from keras_norms.utils import fold_normalization
from tests.helpers import BACKEND
from tests.helpers import all_layers
from tests.helpers import assert_docstring_examples_pass
from tests.helpers import assert_same_predictions
from tests.helpers import randomize
from tests.helpers import run_python
from tests.helpers import skip_unless_channels_first_conv_runs
from tests.helpers import to_numpy

NORMALIZATIONS = (
    keras_norms.BatchNormalization,
    keras_norms.CrossIterationBatchNormalization,
    keras_norms.WeightStandardization,
    layers.BatchNormalization,
)
WS = keras_norms.WeightStandardization


def _input_data(model, seed=1):
    """A batch of 4 for each input (a list for several inputs)."""
    rng = np.random.default_rng(seed)
    x = [
        rng.normal(size=(4,) + tuple(t.shape[1:])).astype("float32")
        for t in model.inputs
    ]
    return x[0] if len(x) == 1 else x


def _predict(model, x):
    return to_numpy(model(x, training=False))


def _snapshot(model):
    return [
        (layer.name, type(layer), [w.copy() for w in layer.get_weights()])
        for layer in all_layers(model)
    ]


def _assert_unchanged(model, snapshot):
    now = _snapshot(model)
    assert [(n, t) for n, t, _ in now] == [(n, t) for n, t, _ in snapshot]
    for (name, _, before), (_, _, after) in zip(snapshot, now):
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b, err_msg=name)


def _fold(model):
    """Folds `model`; returns `(folded, report, warning messages)`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = fold_normalization(model, return_report=True)
    ours = [w for w in caught if str(w.message).startswith("fold_normal")]
    assert all(w.category is UserWarning for w in ours)
    return folded, report, [str(w.message) for w in ours]


def _sequential(input_shape, *stack):
    return keras.Sequential([keras.Input(input_shape), *stack])


def _dense_bn():
    return _sequential(
        (6,),
        layers.Dense(5, name="linear"),
        keras_norms.BatchNormalization(),
        layers.ReLU(),
        layers.Dense(3),
    )


def _dense_without_bias_brn():
    return _sequential(
        (3, 6),  # a rank-3 input: Dense works on the last axis
        layers.Dense(5, use_bias=False, name="linear"),
        keras_norms.BatchRenormalization(rmax=2.0, dmax=1.0),
    )


def _conv2d_keras_bn():
    return _sequential(
        (6, 6, 3),
        layers.Conv2D(4, 3, padding="same", use_bias=False, name="linear"),
        layers.BatchNormalization(),
        layers.ReLU(),
    )


def _conv2d_channels_first():
    # Output width 6, not 4: on TensorFlow, Keras 3.15's `ops.add` adds a
    # (1, C, 1, 1) bias on the last axis when that axis also has size C.
    return _sequential(
        (3, 7, 8),
        layers.Conv2D(4, 3, data_format="channels_first", name="linear"),
        keras_norms.BatchNormalization(axis=1),
    )


def _conv1d_bn():
    return _sequential(
        (7, 3),
        layers.Conv1D(4, 3, strides=2, name="linear"),
        keras_norms.BatchNormalization(axis=[-1], center=False),
    )


def _conv3d_bn():
    return _sequential(
        (4, 4, 4, 2),
        layers.Conv3D(3, 2, use_bias=False, name="linear"),
        keras_norms.BatchNormalization(scale=False),
    )


def _conv2d_transpose_bn():
    return _sequential(
        (4, 4, 3),
        layers.Conv2DTranspose(5, 3, strides=2, name="linear"),
        keras_norms.BatchNormalization(),
    )


def _depthwise_bn():
    return _sequential(
        (6, 6, 3),
        layers.DepthwiseConv2D(3, depth_multiplier=2, name="linear"),
        keras_norms.BatchNormalization(),
    )


def _separable_bn():
    return _sequential(
        (8, 3),
        layers.SeparableConv1D(4, 3, depth_multiplier=2, name="linear"),
        layers.BatchNormalization(),
    )


def _cbn_dense():
    return _sequential(
        (6,),
        keras_norms.CBN(layers.Dense(5, use_bias=False, name="linear")),
        layers.ReLU(),
    )


def _cbn_conv2d():
    return _sequential(
        (6, 6, 3),
        keras_norms.CBN(
            layers.Conv2D(4, 3, padding="same", use_bias=False, name="linear"),
            window_size=2,
        ),
    )


def _cbn_causal_conv1d():
    inputs = keras.Input((7, 3))
    conv = layers.Conv1D(
        4, 3, padding="causal", dilation_rate=2, use_bias=False, name="linear"
    )
    outputs = keras_norms.CBN(conv)(inputs)
    return keras.Model(inputs, layers.ReLU()(outputs))


def _functional_residual():
    inputs = keras.Input((6, 6, 3))
    h = layers.Conv2D(4, 3, padding="same", name="linear")(inputs)
    h = layers.BatchNormalization()(h)
    skip = layers.ReLU()(h)
    h = layers.Conv2D(4, 3, padding="same", use_bias=False)(skip)
    h = keras_norms.BatchRenormalization()(h)
    h = layers.Add()([h, skip])
    h = keras_norms.CBN(layers.Conv2D(2, 1, use_bias=False))(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(3)(h)
    outputs = keras_norms.BatchNormalization()(h)  # a model output
    return keras.Model(inputs, outputs)


def _nested_sequential():
    inner = _sequential(
        (6,),
        layers.Dense(5, use_bias=False, name="linear"),
        keras_norms.BatchNormalization(),
    )
    inputs = keras.Input((6,))
    h = layers.ReLU()(inner(inputs))
    return keras.Model(inputs, layers.Dense(2)(h))


def _masked_sequence():
    """The mask of Embedding(mask_zero=True) must still reach the LSTM."""
    inputs = keras.Input((5,), dtype="int32")
    h = layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = layers.Dense(6, use_bias=False, name="linear")(h)
    h = keras_norms.BatchNormalization()(h)
    return keras.Model(inputs, layers.LSTM(3)(h))


def _masked_sequential():
    return _sequential(
        (5,),
        layers.Embedding(10, 4, mask_zero=True),
        layers.Dense(6, name="linear"),
        layers.BatchNormalization(),
        layers.LSTM(3),
    )


def _shared_cbn():
    """One CBN called twice becomes one Dense called twice."""
    a, b = keras.Input((6,)), keras.Input((6,))
    cbn = keras_norms.CBN(layers.Dense(5, use_bias=False, name="linear"))
    return keras.Model([a, b], layers.Add()([cbn(a), cbn(b)]))


def _cbn_name_clash():
    """The wrapped Dense's name is taken: the folded Dense takes CBN's."""
    inputs = keras.Input((6,))
    h = layers.Dense(6, name="d")(inputs)
    h = keras_norms.CBN(layers.Dense(5, use_bias=False, name="d"))(h)
    return keras.Model(inputs, h)


def _with_gain(model):
    """Gives each scaled weight standardization a gain other than ones."""
    for layer in model.layers:
        if isinstance(layer, WS) and layer.scaled:
            gain = np.linspace(0.5, 2.0, layer.gain.shape[-1])
            layer.gain.assign(np.broadcast_to(gain, layer.gain.shape))
    return model


def _ws_conv2d_scaled_bn():
    return _with_gain(
        _sequential(
            (6, 6, 3),
            WS(layers.Conv2D(4, 3, use_bias=False, name="linear"), scaled=True),
            keras_norms.BatchNormalization(),
            layers.ReLU(),
        )
    )


def _ws_depthwise_keras_bn():
    return _sequential(
        (6, 6, 3),
        WS(layers.DepthwiseConv2D(3, depth_multiplier=2, name="linear")),
        layers.BatchNormalization(),
    )


def _ws_alone():
    """Each kind alone, followed by group normalization (which stays)."""
    return _with_gain(
        _sequential(
            (5, 5, 2),
            WS(layers.Conv2DTranspose(4, 3, strides=2), scaled=True),
            layers.GroupNormalization(2),
            WS(layers.Conv2D(3, 2)),
            layers.Reshape((-1, 3)),
            WS(layers.Dense(4, activation="tanh")),
            WS(layers.EinsumDense("abc,cd->abd", (None, 2), bias_axes="d")),
        )
    )


def _shared_ws():
    """One WS called twice becomes one Dense called twice."""
    a, b = keras.Input((6,)), keras.Input((6,))
    ws = WS(layers.Dense(5, name="linear"))
    return keras.Model([a, b], layers.Add()([ws(a), ws(b)]))


FOLDABLE = {
    "ws_conv2d_scaled_bn": _ws_conv2d_scaled_bn,
    "ws_depthwise_keras_bn": _ws_depthwise_keras_bn,
    "ws_alone": _ws_alone,
    "shared_ws": _shared_ws,
    "dense_bn": _dense_bn,
    "dense_no_bias_brn": _dense_without_bias_brn,
    "conv2d_keras_bn": _conv2d_keras_bn,
    "conv2d_channels_first_bn_axis1": _conv2d_channels_first,
    "conv1d_bn_without_beta": _conv1d_bn,
    "conv3d_bn_without_gamma": _conv3d_bn,
    "conv2d_transpose_bn": _conv2d_transpose_bn,
    "depthwise_conv2d_bn": _depthwise_bn,
    "separable_conv1d_keras_bn": _separable_bn,
    "cbn_dense": _cbn_dense,
    "cbn_conv2d": _cbn_conv2d,
    "cbn_causal_conv1d": _cbn_causal_conv1d,
    "functional_residual": _functional_residual,
    "nested_sequential": _nested_sequential,
    "masked_sequence": _masked_sequence,
    "masked_sequential": _masked_sequential,
    "shared_cbn": _shared_cbn,
    "cbn_wrapped_name_taken": _cbn_name_clash,
}
SEQUENCES = (_masked_sequence, _masked_sequential)


def _frozen_bn_called_in_training_mode():
    """A frozen BN normalizes with its moving statistics even then."""
    inputs = keras.Input((6,))
    h = layers.Dense(5)(inputs)
    norm = layers.BatchNormalization(trainable=False)
    return keras.Model(inputs, norm(h, training=True))


FOLDABLE["frozen_bn_training_true"] = _frozen_bn_called_in_training_mode


@pytest.mark.parametrize("build", FOLDABLE.values(), ids=FOLDABLE.keys())
def test_folds_and_predicts_the_same(build):
    if build is _conv2d_channels_first:
        skip_unless_channels_first_conv_runs()
    model = build()
    randomize(model)
    if build in SEQUENCES:  # the LSTM sees the mask of the padding
        x = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 7, 8, 9, 1]])
    else:
        x = _input_data(model)
    expected = _predict(model, x)
    snapshot = _snapshot(model)

    folded, report, messages = _fold(model)

    assert report == {} and messages == []
    assert not any(isinstance(x, NORMALIZATIONS) for x in all_layers(folded))
    assert_same_predictions(_predict(folded, x), expected)
    _assert_unchanged(model, snapshot)
    np.testing.assert_array_equal(_predict(model, x), expected)
    linear = [x for x in all_layers(folded) if x.name == "linear"]
    if linear:  # the folded layer keeps its name and has a bias
        assert len(linear) == 1 and linear[0].use_bias
    if build is _cbn_name_clash:
        assert [x.name for x in folded.layers[1:]] == [
            "d",
            model.layers[-1].name,
        ]


def _trained_model():
    inputs = keras.Input((5, 3))
    h = keras_norms.CBN(layers.Conv1D(6, 3, use_bias=False), window_size=3)(
        inputs
    )
    h = layers.ReLU()(h)
    h = layers.Dense(6, use_bias=False)(h)
    h = keras_norms.BatchRenormalization(rmax=2.0, dmax=1.0)(h)
    h = layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, layers.Dense(1)(h))


def test_after_training_steps():
    model = _trained_model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(32, 5, 3)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    folded, report, _ = _fold(model)

    assert report == {}
    assert len(folded.layers) == len(model.layers) - 1  # BRN removed
    assert_same_predictions(_predict(folded, x), _predict(model, x))
    assert folded.compiled  # like keras.models.clone_model


def _bn_first():
    return _sequential(
        (6,), keras_norms.BatchNormalization(name="norm"), layers.Dense(3)
    )


def _dense_relu_bn():
    return _sequential(
        (6,),
        layers.Dense(5, activation="relu"),
        keras_norms.BatchNormalization(name="norm"),
    )


def _two_branches():
    inputs = keras.Input((6,))
    h = layers.Dense(5)(inputs)
    a = keras_norms.BatchRenormalization(name="norm")(h)
    b = layers.ReLU()(h)  # the Dense output is also used here
    return keras.Model(inputs, layers.Concatenate()([a, b]))


def _shared_dense():
    inputs = keras.Input((6,))
    dense = layers.Dense(6)
    h = keras_norms.BatchNormalization(name="norm")(dense(inputs))
    return keras.Model(inputs, dense(h))


def _shared_bn():
    inputs = keras.Input((6,))
    norm = layers.BatchNormalization(name="norm")
    a = norm(layers.Dense(6)(inputs))
    return keras.Model(inputs, norm(layers.Dense(6)(a)))


def _axis_mismatch():
    return _sequential(
        (4, 6),
        layers.Dense(5),
        keras_norms.BatchNormalization(axis=1, name="norm"),
    )


def _called_in_training_mode():
    inputs = keras.Input((6,))
    h = layers.Dense(5)(inputs)
    h = keras_norms.BatchNormalization(name="norm")(h, training=True)
    return keras.Model(inputs, h)


def _after_a_nested_model():
    inner = _sequential((6,), layers.Dense(5))
    inputs = keras.Input((6,))
    h = keras_norms.BatchNormalization(name="norm")(inner(inputs))
    return keras.Model(inputs, h)


def _foreign_mask():
    inputs = keras.Input((4, 6))
    h = layers.Dense(5)(inputs)
    mask = keras.ops.greater(inputs[..., 0], 0.0)
    h = keras_norms.BatchNormalization(name="norm")(h, mask=mask)
    return keras.Model(inputs, layers.LSTM(3)(h))


def _ws_relu_bn():
    return _sequential(
        (6,),
        WS(layers.Dense(5, activation="relu")),
        keras_norms.BatchNormalization(name="norm"),
    )


def _ws_einsum_bn():
    return _sequential(
        (6,),
        WS(layers.EinsumDense("ab,bc->ac", 5)),
        keras_norms.BatchNormalization(name="norm"),
    )


# Builder, then a word the reason must contain.
KEPT = {
    "ws_dense_relu_bn": (_ws_relu_bn, "activation 'relu'"),
    "ws_einsum_bn": (_ws_einsum_bn, "not a Dense or convolution"),
    "bn_first_layer": (_bn_first, "first layer"),
    "dense_relu_bn": (_dense_relu_bn, "activation 'relu'"),
    "dense_output_in_two_branches": (_two_branches, "also used"),
    "shared_dense": (_shared_dense, "called 2 times"),
    "shared_bn": (_shared_bn, "shared"),
    "axis_mismatch": (_axis_mismatch, "channel axis"),
    "training_true": (_called_in_training_mode, "training=True"),
    "after_nested_model": (_after_a_nested_model, "not a Dense"),
    "mask_other_than_inputs": (_foreign_mask, "mask other than"),
}


@pytest.mark.parametrize("build, reason", KEPT.values(), ids=KEPT.keys())
def test_keeps_and_reports_what_cannot_be_folded(build, reason):
    model = build()
    randomize(model)
    x = _input_data(model)
    expected = _predict(model, x)

    with pytest.warns(UserWarning, match="kept layer 'norm'"):
        folded = fold_normalization(model)
    folded, report, messages = _fold(model)

    assert list(report) == ["norm"] and reason in report["norm"]
    assert len(messages) == 1 and report["norm"] in messages[0]
    norm = folded.get_layer("norm")
    assert type(norm) is type(model.get_layer("norm"))
    for a, b in zip(norm.get_weights(), model.get_layer("norm").get_weights()):
        np.testing.assert_array_equal(a, b)
    assert_same_predictions(_predict(folded, x), expected)


def test_keeps_a_subclass_of_weight_standardization():
    class Custom(WS):
        pass

    model = _sequential(
        (6,),
        Custom(layers.Dense(5), name="ws"),
        keras_norms.BatchNormalization(name="norm"),
    )
    randomize(model)
    x = _input_data(model)
    folded, report, _ = _fold(model)
    assert sorted(report) == ["norm", "ws"]
    assert "subclass of WeightStandardization" in report["ws"]
    assert type(folded.get_layer("ws")) is Custom
    assert_same_predictions(_predict(folded, x), _predict(model, x))


def test_report_names_layers_inside_nested_models():
    inner = _sequential(
        (6,), keras_norms.BatchNormalization(name="norm"), layers.Dense(4)
    )
    inputs = keras.Input((6,))
    h = layers.Dense(6, use_bias=False)(inputs)
    h = keras_norms.BatchNormalization()(h)  # folded
    model = keras.Model(inputs, inner(h), name="outer")
    randomize(model)
    x = _input_data(model)

    folded, report, messages = _fold(model)

    assert list(report) == [f"{inner.name}/norm"]
    assert len(messages) == 1
    assert len(folded.layers) == len(model.layers) - 1
    assert_same_predictions(_predict(folded, x), _predict(model, x))


def test_reports_layers_inside_a_nested_subclassed_model():
    inputs = keras.Input((6,))
    inner = _Subclassed(name="sub")
    model = keras.Model(inputs, inner(inputs))
    randomize(model)
    x = _input_data(model)

    folded, report, _ = _fold(model)

    assert list(report) == [f"sub/{inner.norm.name}"]
    assert "subclassed model 'sub'" in report[f"sub/{inner.norm.name}"]
    assert_same_predictions(_predict(folded, x), _predict(model, x))


def test_a_model_without_normalization_is_copied_silently():
    model = _sequential((6,), layers.Dense(5), layers.Dense(2))
    x = _input_data(model)

    folded, report, messages = _fold(model)

    assert report == {} and messages == []
    assert folded is not model
    assert folded.layers[0] is not model.layers[0]
    np.testing.assert_array_equal(_predict(folded, x), _predict(model, x))


def test_without_return_report_returns_the_model_only():
    folded = fold_normalization(_dense_bn())
    assert isinstance(folded, keras.Sequential)


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(3)
        self.norm = keras_norms.BatchNormalization()

    def call(self, inputs):
        return self.norm(self.dense(inputs))


@pytest.mark.parametrize(
    "model, match",
    [
        (_Subclassed, "Argument `model` must be a Sequential or functional"),
        (lambda: layers.Dense(3), "Argument `model` must be a keras.Model"),
        (
            lambda: keras.Sequential([layers.Dense(3)]),
            "Argument `model` must be built",
        ),
    ],
    ids=["subclassed", "not_a_model", "unbuilt_sequential"],
)
def test_refuses_what_has_no_graph(model, match):
    model = model()
    if isinstance(model, _Subclassed):
        model(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match=match):
        fold_normalization(model)


def _partly_foldable():
    inputs = keras.Input((6, 6, 3), name="image")
    h = layers.Conv2D(4, 3, use_bias=False)(inputs)
    h = keras_norms.BatchNormalization()(h)
    h = layers.Conv2D(4, 3, activation="relu")(h)
    h = keras_norms.BatchRenormalization(name="norm")(h)  # kept
    h = keras_norms.CBN(layers.Conv2D(2, 1, use_bias=False))(h)
    return keras.Model(inputs, layers.Flatten()(h))


def test_saves_and_loads_with_only_keras_norms(tmp_path):
    model = _partly_foldable()
    randomize(model)
    x = _input_data(model)
    folded, report, _ = _fold(model)
    assert list(report) == ["norm"]
    folded.save(tmp_path / "folded.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", _predict(model, x))

    out = run_python(
        "import keras, numpy as np\n"
        "import keras_norms\n"
        "m = keras.saving.load_model('folded.keras')\n"
        "np.save('got.npy', m.predict(np.load('x.npy'), verbose=0))\n"
        "print([type(layer).__name__ for layer in m.layers])\n",
        cwd=tmp_path,
    )

    assert out.strip().splitlines()[-1] == (
        "['InputLayer', 'Conv2D', 'Conv2D', 'BatchRenormalization', "
        "'Conv2D', 'Flatten']"
    )
    assert_same_predictions(
        np.load(tmp_path / "got.npy"), np.load(tmp_path / "expected.npy")
    )


@pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="Model.export (TF SavedModel) needs the TensorFlow or JAX backend",
)
def test_exported_saved_model_serves_the_same(tmp_path):
    import tensorflow as tf

    model = _partly_foldable()
    randomize(model)
    x = _input_data(model)
    folded, _, _ = _fold(model)

    folded.export(str(tmp_path / "exported"), verbose=False)
    # Keep the loaded object: `serve` refers to its variables.
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    served = loaded.serve(x)

    assert_same_predictions(np.asarray(served), _predict(model, x))


def test_docstring_example_runs():
    assert_docstring_examples_pass(fold_normalization)
