import json

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
from tests.helpers import run_python
from tests.helpers import sgd_update
from tests.helpers import to_numpy
from tests.helpers import train_call

CASES = {
    "2d": ((8, 6), -1),
    "3d": ((4, 7, 3), -1),
    "4d_nhwc": ((2, 4, 5, 3), -1),
    "4d_nchw": ((2, 3, 4, 5), 1),
    "5d": ((2, 3, 2, 3, 4), -1),
}


def _batches(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    for step in range(steps):
        x = rng.normal(1.5 * step - 1.0, 1.0 + step, size=shape)
        dy = rng.normal(size=shape)
        yield x.astype("float32"), dy.astype("float32")


@pytest.mark.parametrize(
    "case,masked",
    [
        ("2d", False),
        ("3d", False),
        ("3d", True),
        ("4d_nhwc", False),
        ("4d_nhwc", True),
        ("5d", True),
    ],
)
def test_trains_like_keras_batch_normalization(case, masked, kernel_path):
    shape, axis = CASES[case]
    kwargs = dict(axis=axis, momentum=0.8, epsilon=1e-3)
    ours = keras_norms.BatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    mask = random_mask(shape, (len(shape) - 1,)) if masked else None
    assert_trains_alike(
        ours,
        theirs,
        _batches(shape, steps=4),
        mask,
        ("moving_mean", "moving_variance"),
    )
    x, _ = next(_batches(shape, 1, seed=5))
    assert_close(
        to_numpy(ours(x, training=False)),
        to_numpy(theirs(x, training=False)),
        "inference",
    )


# Masks in Keras's convention: one axis less than the input, repeated along
# the input's last axis, whatever `axis` is (what Keras's own BN tests use).
KERAS_MASKS = {
    # Masking() before BatchNormalization(axis=1) on (batch, 2, 3): the mask
    # differs between the features, so each has its own count.
    "masking_axis1": ((5, 2, 3), 1, (5, 2)),
    "nchw_axis1": ((3, 4, 5, 6), 1, (3, 4, 5)),
    "rank4_broadcast": ((2, 3, 4, 5), -1, (2, 3, 1)),
    "features_last": ((4, 7, 3), -1, (4, 7)),
}


@pytest.mark.parametrize("case", sorted(KERAS_MASKS))
@pytest.mark.parametrize(
    "make_ours,make_theirs",
    [
        (keras_norms.BatchNormalization, keras.layers.BatchNormalization),
        (
            lambda **kw: keras_norms.BatchRenormalization(
                rmax=1.5, dmax=0.5, renorm_momentum=0.7, **kw
            ),
            lambda **kw: keras.layers.BatchNormalization(
                renorm=True,
                renorm_clipping={"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5},
                renorm_momentum=0.7,
                **kw,
            ),
        ),
    ],
    ids=["bn", "brn"],
)
def test_masks_read_as_keras_reads_them(case, make_ours, make_theirs):
    """Outputs, gradients and moving statistics equal Keras's layer for
    the same mask, over 4 steps."""
    shape, axis, mask_shape = KERAS_MASKS[case]
    ours = make_ours(axis=axis, momentum=0.8)
    theirs = make_theirs(axis=axis, momentum=0.8)
    mask = np.random.default_rng(3).random(mask_shape) < 0.6
    mask.reshape(mask_shape[0], -1)[:, 0] = True
    theirs.build(shape)
    names = [w.name for w in theirs.non_trainable_weights]
    batches = _batches(shape, steps=4)
    assert_trains_alike(ours, theirs, batches, mask, names)
    x, _ = next(_batches(shape, 1, seed=5))
    m = keras.ops.convert_to_tensor(mask)
    assert_close(
        to_numpy(ours(x, mask=m)), to_numpy(theirs(x, mask=m)), "inference"
    )


def test_masking_then_axis1_in_a_model_fits_like_keras():
    """The case Keras's own BN tests check: `Masking()` then
    `BatchNormalization(axis=1)` on `(batch, 2, 3)` inputs, in `fit()`."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(40, 2, 3)).astype("float32")
    x[rng.random((40, 2)) < 0.3] = 0.0  # masked-out rows
    y = rng.normal(size=(40, 2, 3)).astype("float32")
    weights = {}
    for name, norm in (
        ("ours", keras_norms.BatchNormalization(axis=1, momentum=0.8)),
        ("keras", keras.layers.BatchNormalization(axis=1, momentum=0.8)),
    ):
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [keras.Input((2, 3)), keras.layers.Masking(0.0), norm]
        )
        model.compile("sgd", "mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights[name] = [to_numpy(w) for w in norm.weights]
        weights[name].append(model.predict(x, verbose=0))
    for ours, theirs in zip(weights["ours"], weights["keras"]):
        assert_close(ours, theirs, "weights and predictions")


@pytest.mark.parametrize(
    "shape,axis,mask_shape",
    [
        ((2, 3, 4), 1, (2, 1, 4)),  # channels-first sequences
        ((3, 4, 5), -1, (3, 4, 5)),  # a mask of the input's shape
        ((2, 3, 4, 5), [1, 3], (2, 1, 4, 1)),
    ],
    ids=["channels_first", "full", "two_axes"],
)
def test_masks_that_broadcast(shape, axis, mask_shape):
    """Masks of the input's rank (which Keras's BN refuses) against the
    NumPy reference, which reads them the same way."""
    ndim = len(shape)
    axes = [axis] if isinstance(axis, int) else axis
    feature_axes = tuple(sorted(a % ndim for a in axes))
    mask = np.random.default_rng(3).random(mask_shape) < 0.6
    mask.reshape(mask_shape[0], -1)[:, 0] = True
    layer = keras_norms.BatchNormalization(axis=axis, momentum=0.7)
    pshape = tuple(shape[a] for a in feature_axes)
    moving_mean, moving_var = np.zeros(pshape), np.ones(pshape)
    for step, (x, dy) in enumerate(_batches(shape, steps=2)):
        y, dx, _ = train_call(layer, x, dy, mask)
        ry, rdx, _, _, mean, var, count = references.normalize_train(
            x, dy, mask, feature_axes, 1.0, 0.0, 1e-3
        )
        assert_close_to_reference(y, ry, f"outputs, step {step}")
        assert_close_to_reference(dx, rdx, f"input gradient, step {step}")
        moving_mean = references.ema(moving_mean, mean, 0.7, count)
        moving_var = references.ema(moving_var, var, 0.7, count)
        for name, value in (
            ("moving_mean", moving_mean),
            ("moving_variance", moving_var),
        ):
            assert_close_to_reference(
                to_numpy(getattr(layer, name)), value, f"{name} {step}"
            )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize(
    "case,axis",
    [
        ("3d", -1),
        ("4d_nchw", 1),
        ("4d_nhwc", [1, 3]),
        ("5d", (-1, 1)),
    ],
)
@pytest.mark.parametrize(
    "center,scale", [(True, True), (False, False)], ids=["affine", "plain"]
)
def test_matches_numpy_reference(case, axis, masked, center, scale):
    shape, _ = CASES[case]
    ndim = len(shape)
    axes = [axis] if isinstance(axis, int) else list(axis)
    feature_axes = tuple(sorted(a % ndim for a in axes))
    pshape = tuple(shape[a] for a in feature_axes)
    mask = random_mask(shape, feature_axes) if masked else None
    momentum, eps = 0.7, 1e-3
    layer = keras_norms.BatchNormalization(
        axis=axis, momentum=momentum, epsilon=eps, center=center, scale=scale
    )
    gamma, beta = np.ones(pshape), np.zeros(pshape)
    moving_mean, moving_var = np.zeros(pshape), np.ones(pshape)
    for step, (x, dy) in enumerate(_batches(shape, steps=3)):
        y, dx, grads = train_call(layer, x, dy, mask)
        ry, rdx, rdg, rdb, mean, var, count = references.normalize_train(
            x, dy, mask, feature_axes, gamma, beta, eps
        )
        assert_close_to_reference(y, ry, f"outputs, step {step}")
        assert_close_to_reference(dx, rdx, f"input gradient, step {step}")
        if scale:
            assert_close_to_reference(
                grads["gamma"], rdg, f"gamma gradient, step {step}"
            )
            gamma = gamma - 0.1 * rdg
        if center:
            assert_close_to_reference(
                grads["beta"], rdb.reshape(pshape), f"beta grad {step}"
            )
            beta = beta - 0.1 * rdb.reshape(pshape)
        moving_mean = references.ema(moving_mean, mean, momentum, count)
        moving_var = references.ema(moving_var, var, momentum, count)
        assert_close_to_reference(
            to_numpy(layer.moving_mean), moving_mean, "moving_mean"
        )
        assert_close_to_reference(
            to_numpy(layer.moving_variance), moving_var, "moving_var"
        )
        sgd_update(layer, grads)
    x, _ = next(_batches(shape, 1, seed=9))
    expected = references.normalize_inference(
        x, feature_axes, moving_mean, moving_var, gamma, beta, eps
    )
    assert_close_to_reference(to_numpy(layer(x)), expected, "inference")


def test_masked_positions_change_nothing():
    shape = (3, 6, 4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.random(shape[:2]) < 0.5
    mask[:, 0] = True
    noisy = np.where(mask[..., None], x, 1e6).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    a = keras_norms.BatchNormalization()
    b = keras_norms.BatchNormalization()
    ya, dxa, ga = train_call(a, x, dy * mask[..., None], mask)
    yb, dxb, gb = train_call(b, noisy, dy * mask[..., None], mask)
    keep = np.broadcast_to(mask[..., None], shape)
    assert_close(ya[keep], yb[keep], "outputs at real positions")
    assert_close(dxa, dxb, "input gradients")
    for name in ("gamma", "beta"):
        assert_close(ga[name], gb[name], name)
    for w in ("moving_mean", "moving_variance"):
        assert_close(to_numpy(getattr(a, w)), to_numpy(getattr(b, w)), w)


@pytest.mark.parametrize(
    "cls", [keras_norms.BatchNormalization, keras_norms.BatchRenormalization]
)
def test_all_masked_batch_changes_no_statistic(cls):
    shape = (2, 5, 3)
    rng = np.random.default_rng(0)
    layer = cls(momentum=0.5)
    x = rng.normal(2.0, 3.0, size=shape).astype("float32")
    train_call(layer, x, np.ones(shape))
    before = {w.name: to_numpy(w) for w in layer.non_trainable_weights}
    mask = np.zeros(shape[:2], dtype=bool)
    y, dx, grads = train_call(layer, x, np.ones(shape), mask)
    for name, value in before.items():
        if name in ("step", "rmax", "dmax"):
            continue
        after = to_numpy(getattr(layer, name))
        np.testing.assert_array_equal(after, value, err_msg=name)
    for value in [y, dx, *grads.values()]:
        assert np.all(np.isfinite(value))


def test_trainable_false_means_inference():
    shape = (16, 4)
    rng = np.random.default_rng(0)
    layer = keras_norms.BatchNormalization(
        moving_mean_initializer="ones", moving_variance_initializer="ones"
    )
    layer.build(shape)
    layer.trainable = False
    x = rng.normal(5.0, 2.0, size=shape).astype("float32")
    y = to_numpy(layer(x, training=True))
    expected = references.normalize_inference(
        x, (1,), np.ones(4), np.ones(4), np.ones(4), np.zeros(4), 1e-3
    )
    assert_close_to_reference(y, expected, "frozen layer output")
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), np.ones(4))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "make",
    [
        keras_norms.BatchNormalization,
        # rmax=1, dmax=0: batch renormalization reduces to BN.
        lambda: keras_norms.BatchRenormalization(rmax=1.0, dmax=0.0),
    ],
    ids=["bn", "brn"],
)
def test_half_precision_computes_in_float32(make, policy):
    keras.config.set_dtype_policy(policy)
    shape = (8, 5, 4)
    rng = np.random.default_rng(0)
    x = rng.normal(300.0, 50.0, size=shape)
    layer = make()
    half = policy.split("_")[1]
    y = layer(keras.ops.cast(x, half), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == half
    for w in layer.weights:
        assert keras.backend.standardize_dtype(w.dtype) != half
    # Batch statistics of float16 inputs this far from zero overflow in
    # float16 (sum of squares); in float32 they are exact.
    x_half = to_numpy(keras.ops.cast(keras.ops.cast(x, half), "float32"))
    expected = references.normalize_train(
        x_half, np.ones(shape), None, (2,), np.ones(4), np.zeros(4), 1e-3
    )[0]
    # The affine too runs in float32: only the output is rounded to half.
    assert_rounded_once(y, expected, half)
    mean = references.batch_moments(x_half, None, (2,))[0]
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), 0.01 * mean, rtol=1e-5
    )


def test_config_round_trip():
    layer = keras_norms.BatchNormalization(
        axis=[1, 3],
        momentum=0.9,
        epsilon=1e-4,
        center=False,
        gamma_regularizer="l2",
        beta_constraint="non_neg",
        moving_variance_initializer="zeros",
        name="bn",
    )
    assert_config_round_trip(layer)
    config = layer.get_config()
    layer.build((2, 3, 4, 5))
    assert layer.get_config() == config
    assert [w.name for w in layer.weights] == [
        "gamma",
        "moving_mean",
        "moving_variance",
    ]
    assert tuple(layer.gamma.shape) == (3, 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(axis=1, momentum=0.8, epsilon=1e-4, center=False),
        dict(scale=False, renorm_momentum=0.9, renorm_clipping={"rmax": 2.0}),
    ],
    ids=["defaults", "axis1_no_center", "no_scale_renorm_ignored"],
)
def test_loads_a_keras_config_and_computes_like_keras(kwargs):
    """Every argument of Keras's BN is accepted (`renorm=False` and the
    renorm arguments it ignores too): a Keras BN's config loads, and the
    layer trains and infers like that Keras BN."""
    keras_bn = keras.layers.BatchNormalization(**kwargs)
    config = keras_bn.get_config()
    assert config["renorm"] is False and "renorm_momentum" in config
    ours = keras_norms.BatchNormalization.from_config(config)
    shape = (6, 3, 4)
    keras_bn.build(shape)
    ours.build(shape)
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.normal(step, 1.0 + step, size=shape).astype("float32"),
            rng.normal(size=shape).astype("float32"),
        )
        for step in range(3)
    ]
    assert_trains_alike(
        ours, keras_bn, batches, None, ("moving_mean", "moving_variance")
    )
    x = batches[0][0]
    assert_close(to_numpy(ours(x)), to_numpy(keras_bn(x)), "inference")


def test_renorm_true_points_to_batch_renormalization():
    with pytest.raises(ValueError, match="keras_norms.BatchRenormalization"):
        keras_norms.BatchNormalization(renorm=True)
    config = keras.layers.BatchNormalization(renorm=True).get_config()
    # Keras's `Layer.from_config` reraises the ValueError as a TypeError.
    with pytest.raises(Exception, match="keras_norms.BatchRenormalization"):
        keras_norms.BatchNormalization.from_config(config)
    with pytest.raises(TypeError, match="renorm"):
        keras_norms.BatchRenormalization(renorm=True)


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(renorm="yes"), TypeError, "renorm"),
        (dict(renorm_clipping=[3.0]), TypeError, "renorm_clipping"),
        (dict(renorm_momentum=1.5), ValueError, "renorm_momentum"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(axis="last"), TypeError, "axis"),
        (dict(axis=[]), TypeError, "axis"),
        (dict(axis=1.5), TypeError, "axis"),
        (dict(momentum=None), TypeError, "momentum"),
        (dict(momentum="0.9"), TypeError, "momentum"),
        (dict(epsilon=float("inf")), ValueError, "epsilon"),
        (dict(epsilon=None), TypeError, "epsilon"),
        (dict(center="no"), TypeError, "center"),
        (dict(scale=1), TypeError, "scale"),
    ],
)
def test_bad_arguments(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        keras_norms.BatchNormalization(**kwargs)


@pytest.mark.parametrize("axis", [np.int64(1), [np.int32(1)]])
def test_numpy_integer_axis(axis):
    # Keras's BN takes NumPy integers; the config holds Python ints (JSON).
    layer = keras_norms.BatchNormalization(axis=axis)
    layer.build((2, 3, 4))
    assert tuple(layer.gamma.shape) == (3,)
    saved = layer.get_config()["axis"]
    assert saved in (1, [1]) and type(np.ravel(saved).tolist()[0]) is int
    assert json.loads(json.dumps(layer.get_config()))["axis"] == saved


@pytest.mark.parametrize(
    "axis,shape", [(3, (2, 3, 4)), (-4, (2, 3, 4)), ([1, -2], (2, 3, 4))]
)
def test_bad_axis_for_input(axis, shape):
    layer = keras_norms.BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match="axis"):
        layer.build(shape)


def test_rank_one_input_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        keras_norms.BatchNormalization().build((5,))


@pytest.mark.parametrize("mask_shape", [(2, 3, 5), (2,), (2, 4)])
def test_mask_of_wrong_shape(mask_shape):
    layer = keras_norms.BatchNormalization()
    x = np.ones((2, 3, 4), "float32")
    with pytest.raises(ValueError, match="mask"):
        layer(x, training=True, mask=np.ones(mask_shape, bool))


def test_mask_flows_to_next_layer():
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = keras_norms.BatchNormalization()(h)
    outputs = keras.layers.LSTM(3)(h)
    model = keras.Model(inputs, outputs)
    tokens = np.array([[1, 2, 0, 0], [3, 0, 0, 0]])
    full = to_numpy(model(tokens))
    cropped = to_numpy(model(tokens[:, :2]))
    assert_close(full, cropped, "padding changed an LSTM output")


SYNC_CODE = """
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
import keras_norms

rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, size=(8, 5, 3)).astype("float32")
mask = rng.random((8, 5)) < 0.6
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for masked in (False, True):
    with strategy.scope():
        layer = keras_norms.BatchNormalization(momentum=0.0, synchronized=True)
        layer.build((4, 5, 3))

    def step(inputs, m):
        return layer(inputs, training=True, mask=m if masked else None)

    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            x[ctx.replica_id_in_sync_group * 4:][:4],
            mask[ctx.replica_id_in_sync_group * 4:][:4],
        )
    )
    strategy.run(step, args=dist)
    np.save(f"mean_{masked}.npy", layer.moving_mean.numpy())
    np.save(f"var_{masked}.npy", layer.moving_variance.numpy())
"""


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="synchronized=True is TensorFlow's"
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_synchronized_statistics_are_global(masked, tmp_path):
    run_python(SYNC_CODE, tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(8, 5, 3))
    mask = rng.random((8, 5)) < 0.6
    mean, var, _ = references.batch_moments(x, mask if masked else None, (2,))
    assert_close_to_reference(
        np.load(tmp_path / f"mean_{masked}.npy"), mean, "global mean"
    )
    assert_close_to_reference(
        np.load(tmp_path / f"var_{masked}.npy"), var, "global variance"
    )
