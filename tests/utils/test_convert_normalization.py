"""convert_normalization: same predictions, weights carried, report, saving."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers

import keras_norms
from keras_norms.utils import convert_normalization
from tests.helpers import assert_docstring_examples_pass
from tests.helpers import assert_same_predictions
from tests.helpers import randomize
from tests.helpers import run_python
from tests.helpers import to_numpy

BN = keras_norms.BatchNormalization
BRN = keras_norms.BatchRenormalization
CBN = keras_norms.CrossIterationBatchNormalization
SOURCES = (layers.BatchNormalization, BN, BRN)


def _data(model, seed=1):
    rng = np.random.default_rng(seed)
    shape = (4,) + tuple(model.inputs[0].shape[1:])
    return rng.normal(size=shape).astype("float32")


def _predict(model, x):
    return np.asarray(model.predict(x, verbose=0, batch_size=len(x)))


def _sequential_dense():
    """Wrappable: bias-free Dense -> Keras BN; then a Dense with a bias."""
    return keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(5, use_bias=False, name="d1"),
            layers.BatchNormalization(name="bn1"),
            layers.ReLU(),
            layers.Dense(4, name="d2"),
            layers.BatchNormalization(name="bn2"),
        ],
        name="seq",
    )


def _conv_graph():
    """Every reason CBN cannot wrap, beside one layer it can."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn_conv")(x)
    y = layers.DepthwiseConv2D(3, use_bias=False, name="dw")(x)
    y = layers.BatchNormalization(name="bn_depthwise", momentum=0.9)(y)
    z = layers.Conv2D(4, 3, name="biased")(x)
    z = layers.BatchNormalization(name="bn_bias", epsilon=1e-2)(z)
    h = layers.Add(name="add")([y, z])
    h = layers.BatchNormalization(name="bn_add", center=False)(h)
    shared = layers.Conv2D(4, 1, use_bias=False, name="shared")
    a = layers.BatchNormalization(name="bn_shared")(shared(h))
    b = shared(a)
    relu = layers.Conv2D(4, 1, use_bias=False, activation="relu", name="act")
    c = BN(name="bn_activation", scale=False)(relu(b))
    return keras.Model(inputs, c, name="graph")


def _nested_backbone():
    """A functional backbone (frozen BN inside) used by an outer model."""
    inputs = keras.Input((6, 6, 2))
    h = layers.Conv2D(3, 3, use_bias=False, name="stem")(inputs)
    h = layers.BatchNormalization(name="stem_bn", trainable=False)(h)
    backbone = keras.Model(inputs, layers.ReLU()(h), name="backbone")
    outer_in = keras.Input((6, 6, 2))
    h = backbone(outer_in)
    h = layers.Flatten()(h)
    h = layers.Dense(3, use_bias=False, name="head")(h)
    h = BRN(name="head_brn", rmax=2.0, dmax=1.0)(h)
    return keras.Model(outer_in, h, name="outer")


def _keras_renorm():
    return keras.Sequential(
        [
            keras.Input((5,)),
            layers.Dense(4, use_bias=False, name="d"),
            layers.BatchNormalization(
                name="renorm",
                renorm=True,
                renorm_clipping={"rmax": 2.0, "dmax": 0.5},
                renorm_momentum=0.9,
            ),
        ]
    )


def _masked_sequence():
    inputs = keras.Input((5,), dtype="int32")
    h = layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = layers.LSTM(6, return_sequences=True)(h)
    h = layers.Dense(3, use_bias=False, name="proj")(h)
    h = layers.BatchNormalization(name="bn_seq")(h)
    return keras.Model(inputs, layers.LSTM(2)(h))


def _weight_standardized():
    """BN after weight-standardized layers (the WS layers carry over)."""
    WS = keras_norms.WeightStandardization
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            WS(layers.Conv2D(3, 3, use_bias=False), scaled=True),
            BN(name="bn_ws"),
            layers.ReLU(),
            layers.Flatten(),
            WS(layers.Dense(4)),
            layers.BatchNormalization(name="bn_ws_dense"),
        ]
    )


def _mobilenet():
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5
    )


BUILDS = {
    "sequential_dense": _sequential_dense,
    "conv_graph": _conv_graph,
    "nested_backbone": _nested_backbone,
    "keras_renorm": _keras_renorm,
    "masked_sequence": _masked_sequence,
    "weight_standardized": _weight_standardized,
    "mobilenet_v2": _mobilenet,
}
TARGETS = {"bn": BN, "brn": BRN, "cbn": CBN}
# What CBN conversion does with each layer of the models above.
CBN_EXPECTED = {
    "bn1": ("CrossIterationBatchNormalization", "wraps the Dense 'd1'"),
    "bn2": ("CrossIterationBatchNormalization", "wraps the Dense 'd2'"),
    "bn_conv": ("CrossIterationBatchNormalization", "wraps the Conv2D"),
    "bn_depthwise": ("BatchNormalization", "DepthwiseConv2D 'dw', not a"),
    "bn_bias": ("CrossIterationBatchNormalization", "wraps the Conv2D"),
    "bn_add": ("BatchNormalization", "its input comes from Add 'add'"),
    "bn_shared": ("BatchNormalization", "is shared (called 2 times)"),
    "bn_activation": ("BatchNormalization", "has activation 'relu'"),
    "backbone/stem_bn": ("CrossIterationBatchNormalization", "wraps"),
    "head_brn": ("CrossIterationBatchNormalization", "wraps the Dense"),
    "bn_seq": ("CrossIterationBatchNormalization", "wraps the Dense"),
    "bn_ws": ("BatchNormalization", "of a plain kernel, not"),
    "bn_ws_dense": ("BatchNormalization", "of a plain kernel, not"),
}


def _inputs(model, build):
    if build is _masked_sequence:  # padded: the mask reaches the BN
        return np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 7, 8, 9, 1]])
    return _data(model)


@pytest.mark.parametrize("to", TARGETS.values(), ids=TARGETS.keys())
@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_converts_and_predicts_the_same(build, to):
    model = build()
    randomize(model)
    x = _inputs(model, build)
    expected = _predict(model, x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, report = convert_normalization(model, to, return_report=True)

    assert_same_predictions(_predict(new, x), expected)
    np.testing.assert_array_equal(_predict(model, x), expected)  # untouched
    assert sorted(report) == sorted(_source_names(model))
    others = [n for n, e in report.items() if e["to"] != to.__name__]
    caught = [w for w in caught if "convert_normalization" in str(w.message)]
    assert len(caught) == (1 if others else 0)
    if others:
        assert f"{len(others)} of {len(report)} layers" in str(caught[0])
    for name, entry in report.items():
        old, layer = _find(model, name), _find(new, name)
        assert type(layer).__name__ == entry["to"]
        _assert_weights_carried(old, layer)
        if to is not CBN:
            assert entry["to"] == to.__name__
        elif name in CBN_EXPECTED and build is not _mobilenet:
            became, why = CBN_EXPECTED[name]
            assert entry["to"] == became and why in entry["reason"]
        if isinstance(layer, CBN):  # the linear layer's kernel, inside
            prefix = name[: name.rfind("/") + 1]
            linear = _find(model, prefix + layer.layer.name)
            np.testing.assert_array_equal(
                to_numpy(layer.layer.kernel), to_numpy(linear.kernel)
            )
    wrapped = {x.layer.name for x in new.layers if isinstance(x, CBN)}
    assert [x.name for x in new.layers] == [
        x.name for x in model.layers if x.name not in wrapped
    ]


def _source_names(model, prefix=""):
    for layer in model.layers:
        if isinstance(layer, SOURCES):
            yield prefix + layer.name
        if isinstance(layer, keras.Model):
            yield from _source_names(layer, f"{prefix}{layer.name}/")


def _find(model, name):
    *path, last = name.split("/")
    for part in path:
        model = model.get_layer(part)
    return model.get_layer(last)


def _assert_weights_carried(old, new):
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        if getattr(old, name, None) is not None:
            np.testing.assert_allclose(
                to_numpy(getattr(new, name)),
                to_numpy(getattr(old, name)),
                rtol=1e-6,
                err_msg=name,
            )
    assert new.trainable == old.trainable
    assert new.epsilon == old.epsilon and new.momentum == old.momentum
    if isinstance(new, BRN):
        stddev = np.sqrt(to_numpy(old.moving_variance) + old.epsilon)
        if getattr(old, "renorm_stddev", None) is None:  # from moving ones
            expected = to_numpy(old.moving_mean), stddev, stddev
        else:  # a renorm layer's own
            expected = [
                to_numpy(getattr(old, name))
                for name in ("renorm_mean", "renorm_stddev", "moving_stddev")
            ]
        got = [
            to_numpy(getattr(new, name))
            for name in ("renorm_mean", "renorm_stddev", "moving_stddev")
        ]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-6)


def test_cbn_carries_the_kernel_and_trains_like_a_hand_built_one():
    model = _sequential_dense()
    randomize(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = convert_normalization(model, CBN, window_size=3)
    # Every layer converts: no warning counts fallbacks.
    assert not [w for w in caught if "convert_normalization" in str(w.message)]
    for name, linear in (("bn1", "d1"), ("bn2", "d2")):
        cbn = new.get_layer(name)
        old = model.get_layer(linear)
        assert cbn.window_size == 3 and cbn.layer.name == linear
        for weight in ("kernel", "bias") if old.use_bias else ("kernel",):
            np.testing.assert_array_equal(
                to_numpy(getattr(cbn.layer, weight)),
                to_numpy(getattr(old, weight)),
            )
    assert new.get_layer("bn2").layer.use_bias

    hand = keras.Sequential(
        [
            keras.Input((6,)),
            CBN(layers.Dense(5, use_bias=False), window_size=3),
            layers.ReLU(),
            CBN(layers.Dense(4), window_size=3),
        ]
    )
    hand.set_weights(new.get_weights())
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 4)).astype("float32")
    for m in (new, hand):
        m.compile(keras.optimizers.SGD(0.05), "mse")
        m.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(new.get_weights(), hand.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(new.get_weights()[0], model.get_weights()[0])


def test_keras_renorm_keeps_its_clipping_and_layer_kwargs_override():
    model = _keras_renorm()
    randomize(model)
    new = convert_normalization(model, BRN)
    brn = new.get_layer("renorm")
    assert (brn.rmax, brn.dmax, brn.renorm_momentum) == (2.0, 0.5, 0.9)
    assert brn.rmin == 0.0  # Keras: no lower clip when rmin is not given
    new = convert_normalization(model, BRN, rmax=3.0, momentum=0.5)
    brn = new.get_layer("renorm")
    assert (brn.rmax, brn.dmax, brn.momentum) == (3.0, 0.5, 0.5)


def test_frozen_flags_and_names_carry_over():
    model = _nested_backbone()
    model.trainable = False
    new = convert_normalization(model, BRN, rmax=2.5)
    assert not new.trainable and new.name == "outer"
    stem = new.get_layer("backbone").get_layer("stem_bn")
    assert type(stem) is BRN and not stem.trainable and stem.rmax == 2.5


def test_keeps_subclasses_and_what_a_subclassed_model_hides():
    class MyBN(layers.BatchNormalization):
        pass

    class Block(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn = layers.BatchNormalization(name="hidden")

        def call(self, x):
            return self.bn(x)

    inputs = keras.Input((4,))
    h = MyBN(name="mine")(layers.Dense(4)(inputs))
    h = Block(name="block")(h)
    model = keras.Model(inputs, h)
    with pytest.warns(UserWarning, match="2 of 2 layers"):
        new, report = convert_normalization(model, BN, return_report=True)
    assert report["mine"] == {
        "to": "MyBN",
        "reason": "kept: it is a MyBN, a subclass whose call may differ",
    }
    assert report["block/hidden"]["to"] == "BatchNormalization"
    assert "subclassed model 'block'" in report["block/hidden"]["reason"]
    with pytest.raises(ValueError, match=r"cannot reach the layers \['hid"):
        convert_normalization(Block(), BRN)


@pytest.mark.parametrize(
    "to, kwargs, error, match",
    [
        ("brn", {}, TypeError, "Argument `to` must be"),
        (layers.BatchNormalization, {}, TypeError, "Argument `to` must be"),
        (BRN, {"rmax": 0.5}, ValueError, "rmax"),
        (CBN, {"window_size": 0}, ValueError, "window_size"),
        (BN, {"window_size": 2}, ValueError, "window_size"),
    ],
)
def test_refuses_bad_arguments(to, kwargs, error, match):
    with pytest.raises(error, match=match):
        convert_normalization(_sequential_dense(), to, **kwargs)


def test_saves_loads_in_a_new_process_and_trains(tmp_path):
    model = _conv_graph()
    randomize(model)
    x = _data(model)
    with pytest.warns(UserWarning):
        new = convert_normalization(model, CBN, window_size=2)
    new.save(tmp_path / "converted.keras")
    np.save(tmp_path / "x.npy", x)
    out = run_python(
        "import keras, numpy as np\n"
        "import keras_norms\n"
        "m = keras.saving.load_model('converted.keras')\n"
        "x = np.load('x.npy')\n"
        "np.save('got.npy', m.predict(x, verbose=0))\n"
        "m.compile('sgd', 'mse')\n"
        "h = m.fit(x, m.predict(x, verbose=0) + 1, epochs=3, verbose=0)\n"
        "print(h.history['loss'][0] > h.history['loss'][-1])\n",
        cwd=tmp_path,
    )
    assert out.strip().splitlines()[-1] == "True"
    assert_same_predictions(np.load(tmp_path / "got.npy"), _predict(model, x))


def test_docstring_example_runs():
    assert_docstring_examples_pass(convert_normalization)


def _application(name):
    """A Keras application (weights=None, 32x32, 4 classes, logits)."""
    build, kwargs = {
        "resnet50": (keras.applications.ResNet50, {}),
        "resnet50_v2": (keras.applications.ResNet50V2, {}),
        "mobilenet_v2": (keras.applications.MobileNetV2, {"alpha": 0.35}),
    }[name]
    return build(
        weights=None,
        input_shape=(32, 32, 3),
        classes=4,
        classifier_activation=None,
        **kwargs,
    )


# CBN layers after conversion, of the model's batch norms, and why the
# others stay batch normalization.
APPLICATIONS = {
    "resnet50": (53, 53, {}),
    "resnet50_v2": (32, 49, {"Add": 16, "MaxPooling2D": 1}),
    "mobilenet_v2": (35, 52, {"DepthwiseConv2D": 17}),
}


@pytest.mark.parametrize("name", APPLICATIONS)
def test_converts_keras_applications(name):
    """Every batch norm after a Dense or Conv (ResNet50's with a bias)
    becomes a CBN, and the converted model predicts the same."""
    model = _application(name)
    randomize(model)
    x = _data(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new, report = convert_normalization(model, CBN, return_report=True)
    cbns, total, others = APPLICATIONS[name]
    became = [e["to"] for e in report.values()]
    assert (became.count(CBN.__name__), len(became)) == (cbns, total)
    sources = {}
    for entry in report.values():
        if entry["to"] != CBN.__name__:
            source = entry["reason"].split("comes from ")[-1].split(" ")[0]
            sources[source] = sources.get(source, 0) + 1
    assert sources == others
    assert_same_predictions(_predict(new, x), _predict(model, x))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="one backend suffices for the model-sized round trip",
)
def test_converted_resnet_trains_saves_and_folds(tmp_path):
    """ResNet50 (a bias before every batch norm) converted to CBN: its
    loss falls, it saves to `.keras` and loads predicting the same, and
    folding its CBNs back into the convolutions predicts the same."""
    from keras_norms.utils import fold_normalization

    keras.utils.set_random_seed(0)
    model = _application("resnet50")  # as initialized: a fresh start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = convert_normalization(model, CBN, window_size=2)
    x = _data(new, seed=2)
    y = np.arange(len(x)) % 4
    new.compile(
        keras.optimizers.SGD(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # One batch, five steps: the loss of the last below the first's.
    losses = [new.train_on_batch(x, y) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    new.save(tmp_path / "resnet.keras")
    loaded = keras.saving.load_model(tmp_path / "resnet.keras")
    expected = _predict(new, x)
    np.testing.assert_array_equal(_predict(loaded, x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = fold_normalization(new)
    assert not any(isinstance(layer, CBN) for layer in folded.layers)
    assert_same_predictions(_predict(folded, x), expected)
