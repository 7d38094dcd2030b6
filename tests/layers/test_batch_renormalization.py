import keras
import numpy as np
import pytest

import keras_norms
from tests import references
from tests.helpers import assert_close_to_reference
from tests.helpers import assert_config_round_trip
from tests.helpers import assert_trains_alike
from tests.helpers import random_mask
from tests.helpers import sgd_update
from tests.helpers import to_numpy
from tests.helpers import train_call

STATS = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)


def _batches(shape, steps, seed=0):
    """Batches whose statistics jump around, so that r and d get clipped.

    |mean| stays within 3 standard deviations: Keras's torch backend
    computes the variance as E[x^2] - E[x]^2, which is only accurate to
    1e-5 for such data.
    """
    rng = np.random.default_rng(seed)
    for step in range(steps):
        loc = 1.5 * (step % 3 - 1)
        scale = 0.5 if step % 2 == 0 else 2.0
        x = rng.normal(loc, scale, size=shape).astype("float32")
        yield x, rng.normal(size=shape).astype("float32")


@pytest.mark.parametrize(
    "shape,masked",
    [((16, 5), False), ((4, 6, 3), False), ((4, 6, 3), True)],
    ids=["2d", "3d", "3d_mask"],
)
@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.5), (3.0, 5.0)])
def test_trains_like_keras_renorm(shape, masked, rmax, dmax, kernel_path):
    common = dict(momentum=0.9, epsilon=1e-3, renorm_momentum=0.7)
    ours = keras_norms.BatchRenormalization(rmax=rmax, dmax=dmax, **common)
    clipping = {"rmin": 1.0 / rmax, "rmax": rmax, "dmax": dmax}
    theirs = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping=clipping, **common
    )
    mask = random_mask(shape, (len(shape) - 1,)) if masked else None
    assert_trains_alike(ours, theirs, _batches(shape, steps=5), mask, STATS)
    x, _ = next(_batches(shape, 1, seed=3))
    # Keras computes `(x - mean) * inv * gamma + beta`, keras_norms
    # `x * scale + shift`: outputs near zero are differences of terms as
    # large as the largest output, so they agree to 1e-5 of that (seen on
    # PyTorch: 1.4e-6 on 0.0297 where the largest output is 7.5).
    assert_close_to_reference(
        to_numpy(ours(x)), to_numpy(theirs(x)), "inference"
    )


@pytest.mark.parametrize(
    "shape,masked",
    [((16, 5), False), ((4, 3, 3, 5), False), ((4, 6, 5), True)],
    ids=["2d", "4d", "3d_mask"],
)
@pytest.mark.parametrize(
    "clipping",
    [
        {"rmax": 1.5, "rmin": 0.8, "dmax": 0.5},
        {"rmax": 1.2},
        {"rmin": 0.9, "dmax": 0.2},
        {},
    ],
    ids=["all_keys", "rmax_only", "rmin_dmax", "none"],
)
def test_keras_renorm_config_and_weights_train_alike(
    shape, masked, clipping, kernel_path
):
    """A Keras renorm layer, trained a few steps, moves into
    `BatchRenormalization` by its config and weights: missing clipping keys
    are no clip, an `rmin` other than 1/rmax is kept, and the two layers
    then train and infer alike (outputs, gradients, five statistics)."""
    theirs = keras.layers.BatchNormalization(
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=0.7,
        momentum=0.9,
    )
    mask = random_mask(shape, (len(shape) - 1,)) if masked else None
    for x, dy in _batches(shape, steps=2, seed=5):
        sgd_update(theirs, train_call(theirs, x, dy, mask)[2])
    ours = keras_norms.BatchRenormalization.from_config(theirs.get_config())
    unbounded = {"rmax": np.inf, "rmin": 0.0, "dmax": np.inf}
    for key, value in unbounded.items():
        assert getattr(ours, key) == clipping.get(key, value)
    ours.build(shape)
    ours.set_weights(theirs.get_weights())
    assert to_numpy(ours.rmax_value) == np.float32(ours.rmax)
    assert_trains_alike(ours, theirs, _batches(shape, steps=4), mask, STATS)
    x, _ = next(_batches(shape, 1, seed=3))
    assert_close_to_reference(
        to_numpy(ours(x)), to_numpy(theirs(x)), "inference"
    )


def test_keras_renorm_config_error_and_plain_config():
    config = keras.layers.BatchNormalization(renorm=True).get_config()
    config["renorm_clipping"] = {"rmax": 2.0, "r_max": 3.0}
    with pytest.raises(ValueError, match="r_max"):
        keras_norms.BatchRenormalization.from_config(config)
    # Keras's `Layer.from_config` reraises the constructor's ValueError as
    # a TypeError that quotes it.
    config["renorm_clipping"] = {"rmax": 0.5, "rmin": 0.7}
    with pytest.raises((TypeError, ValueError), match="rmin <= rmax"):
        keras_norms.BatchRenormalization.from_config(config)
    config["renorm_clipping"] = {"dmax": -1.0}
    with pytest.raises((TypeError, ValueError), match="dmax"):
        keras_norms.BatchRenormalization.from_config(config)
    # A plain BN's config (renorm=False) gets the default clipping.
    plain = keras.layers.BatchNormalization(momentum=0.9, axis=1)
    layer = keras_norms.BatchRenormalization.from_config(plain.get_config())
    assert (layer.rmax, layer.rmin, layer.dmax) == (3.0, None, 5.0)
    assert (layer.momentum, layer.axis) == (0.9, 1)


def test_keras_renorm_model_converts():
    """A trained Keras model with a renorm layer becomes one with
    BatchRenormalization by `clone_model`, the layer's `from_config` and
    `set_weights`: same statistics, same predictions."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(
                renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}
            ),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(32, 4)).astype("float32")
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(32, 3)), batch_size=8, verbose=0)

    def convert(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            config = layer.get_config()
            return keras_norms.BatchRenormalization.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    ours = keras.models.clone_model(model, clone_function=convert)
    for new, old in zip(ours.layers, model.layers):
        new.set_weights(old.get_weights())
    layer = ours.layers[-1]
    assert isinstance(layer, keras_norms.BatchRenormalization)
    assert (layer.rmax, layer.rmin, layer.dmax) == (2.0, 0.0, 1.0)
    for name in STATS:
        assert_close_to_reference(
            to_numpy(getattr(layer, name)),
            to_numpy(getattr(model.layers[-1], name)),
            name,
        )
    assert_close_to_reference(
        ours.predict(x, verbose=0), model.predict(x, verbose=0), "predict"
    )


@pytest.mark.parametrize("rmin", [None, 0.2], ids=["1_over_rmax", "fixed"])
def test_rmin_follows_rmax_unless_given(rmin, kernel_path):
    """With `rmin=None` the lower clip of r is 1/rmax at each step of a
    schedule; an explicit `rmin` stays put. r is read from the outputs of
    batches much narrower than the renorm statistics (r = 0.1 unclipped)."""
    eps = 1e-3
    layer = keras_norms.BatchRenormalization(
        rmin=rmin, dmax=0.0, renorm_momentum=0.99, epsilon=eps
    )
    schedule = {0: 1.0, 1: 2.0, 2: 4.0, 3: 20.0}
    layer.set_clipping_schedule(rmax=lambda step: 2.0**step)
    rng = np.random.default_rng(0)
    for step, rmax in schedule.items():
        if step == 3:
            rmax = 8.0
        renorm_stddev = to_numpy(layer.renorm_stddev) if layer.built else 1.0
        x = rng.normal(0.0, 0.1, size=(64, 3)).astype("float32")
        y = to_numpy(layer(x, training=True))
        x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + eps)
        r = np.sqrt(x.var(0) + eps) / np.maximum(renorm_stddev, eps**0.5)
        low = 1.0 / rmax if rmin is None else rmin
        expected = x_hat * np.clip(r, low, rmax)
        assert_close_to_reference(y, expected, f"step {step}", rtol=1e-4)
    assert float(to_numpy(layer.rmax_value)) == 8.0


def test_unbounded_clipping_saves_and_loads(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras_norms.BatchRenormalization(
                rmax=np.inf, rmin=0.0, dmax=np.inf, name="brn"
            ),
        ]
    )
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = loaded.get_layer("brn")
    assert (layer.rmax, layer.rmin, layer.dmax) == (np.inf, 0.0, np.inf)
    assert float(to_numpy(layer.rmax_value)) == np.inf


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_paper_algorithm(masked, kernel_path):
    shape, eps = (6, 5, 4), 1e-3
    layer = keras_norms.BatchRenormalization(
        rmax=2.0, dmax=1.0, momentum=0.8, renorm_momentum=0.6, epsilon=eps
    )
    ref = references.RenormReference(4, eps, 0.8, 0.6)
    mask = random_mask(shape, (2,)) if masked else None
    clipped_r = clipped_d = 0
    for step, (x, dy) in enumerate(_batches(shape, steps=6)):
        y, dx, grads = train_call(layer, x, dy, mask)
        ry, rdx, rdg, rdb, r, d = ref.train(x, dy, mask, (2,), 2.0, 1.0)
        clipped_r += int(np.sum((r == 2.0) | (r == 0.5)))
        clipped_d += int(np.sum(np.abs(d) == 1.0))
        assert_close_to_reference(y, ry, f"outputs, step {step}")
        assert_close_to_reference(dx, rdx, f"input gradient, step {step}")
        assert_close_to_reference(
            grads["gamma"], rdg, f"gamma gradient, step {step}"
        )
        assert_close_to_reference(
            grads["beta"], rdb, f"beta gradient, step {step}"
        )
        for name in STATS:
            assert_close_to_reference(
                to_numpy(getattr(layer, name)), getattr(ref, name), name
            )
        sgd_update(layer, grads)
        ref.gamma = ref.gamma - 0.1 * rdg
        ref.beta = ref.beta - 0.1 * rdb
    # The data must exercise the clipping, or the test proves little.
    assert clipped_r > 0 and clipped_d > 0
    assert int(to_numpy(layer.step)) == 6


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_unit_clipping_trains_like_batch_normalization(masked, kernel_path):
    shape = (4, 6, 3)
    brn = keras_norms.BatchRenormalization(rmax=1.0, dmax=0.0, momentum=0.9)
    bn = keras_norms.BatchNormalization(momentum=0.9)
    mask = random_mask(shape, (2,)) if masked else None
    batches = _batches(shape, steps=4)
    assert_trains_alike(brn, bn, batches, mask, ("moving_mean",))


def test_inference_uses_moving_statistics():
    layer = keras_norms.BatchRenormalization(momentum=0.5)
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(32, 4)).astype("float32")
    layer(x, training=True)
    step = int(to_numpy(layer.step))
    expected = references.normalize_inference(
        x,
        (1,),
        to_numpy(layer.moving_mean),
        to_numpy(layer.moving_variance),
        to_numpy(layer.gamma),
        to_numpy(layer.beta),
        1e-3,
    )
    assert_close_to_reference(
        to_numpy(layer(x, training=False)), expected, "inference"
    )
    layer.trainable = False
    assert_close_to_reference(
        to_numpy(layer(x, training=True)), expected, "frozen"
    )
    assert int(to_numpy(layer.step)) == step


def test_schedule_sets_clipping_per_step():
    layer = keras_norms.BatchRenormalization(renorm_momentum=0.0)
    layer.set_clipping_schedule(
        rmax=lambda step: 1.0 + step, dmax=lambda step: 0.5 * step - 1.0
    )
    rng = np.random.default_rng(0)
    for step in range(4):
        x = rng.normal(size=(8, 2)).astype("float32")
        layer(x, training=True)
        assert float(to_numpy(layer.rmax_value)) == 1.0 + step
        # Values below the valid range are clamped to it.
        assert float(to_numpy(layer.dmax_value)) == max(0.5 * step - 1, 0)
    layer.set_clipping_schedule(None, None)
    layer(x, training=True)
    assert float(to_numpy(layer.rmax_value)) == 4.0
    with pytest.raises(TypeError, match="rmax"):
        layer.set_clipping_schedule(rmax=2.0)


def test_config_round_trip_and_weights():
    layer = keras_norms.BatchRenormalization(
        rmax=2.5, dmax=1.5, renorm_momentum=0.9, momentum=0.95, name="brn"
    )
    assert_config_round_trip(layer)
    config = layer.get_config()
    assert (config["rmax"], config["dmax"]) == (2.5, 1.5)
    assert config["renorm_momentum"] == 0.9
    layer.build((None, 3))
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    assert [w.name for w in layer.non_trainable_weights] == [
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
        "rmax",
        "dmax",
        "step",
    ]
    assert float(to_numpy(layer.rmax_value)) == 2.5
    assert float(to_numpy(layer.dmax_value)) == 1.5


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(rmax=0.5), "rmax"),
        (dict(rmax=2.0, rmin=3.0), "rmin"),
        (dict(rmax=2.0, rmin=-0.1), "rmin"),
        (dict(rmin=float("nan")), "rmin"),
        (dict(dmax=-1.0), "dmax"),
        (dict(renorm_momentum=1.0), "renorm_momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(epsilon=-1e-3), "epsilon"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        keras_norms.BatchRenormalization(**kwargs)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(rmax=None), "rmax"),
        (dict(dmax="5"), "dmax"),
        (dict(rmin="0.5"), "rmin"),
        (dict(rmax=lambda step: 2.0), "RenormWarmup"),
        (dict(center="no"), "center"),
    ],
)
def test_bad_argument_types(kwargs, needle):
    with pytest.raises(TypeError, match=needle):
        keras_norms.BatchRenormalization(**kwargs)


def test_bad_axis_and_mask():
    with pytest.raises(ValueError, match="axis"):
        keras_norms.BatchRenormalization(axis=2).build((4, 2))
    layer = keras_norms.BatchRenormalization()
    with pytest.raises(ValueError, match="mask"):
        layer(np.ones((2, 3, 4), "float32"), mask=np.ones((2, 4), bool))


@pytest.mark.parametrize("shape", [(64, 5), (8, 6, 6, 5)], ids=["2d", "4d"])
def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread(
    shape, kernel_path
):
    """|mean| = 100 std. A one-pass variance `E[x^2] - E[x]^2` in float32 is
    off by ~1e-3 relative here; the layer (TensorFlow's fused kernel for the
    moments, two passes on the general path) matches the float64 paper
    reference to 1e-5 in all five statistics, with r and d clipped. The
    outputs agree to 1e-4: the general path applies one multiply-add per
    element, `x * scale + shift` (as Keras's BN does), whose two terms are
    |mean| / std = 100 times larger than their difference."""
    eps = 1e-3
    layer = keras_norms.BatchRenormalization(
        rmax=2.0, dmax=1.0, momentum=0.5, renorm_momentum=0.5, epsilon=eps
    )
    ref = references.RenormReference(5, eps, 0.5, 0.5)
    rng = np.random.default_rng(0)
    for step in range(3):
        x = rng.normal(100.0, 1.0 + step, size=shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        y, _, grads = train_call(layer, x, dy)
        ry, _, rdg, rdb, r, d = ref.train(
            x, dy, None, (len(shape) - 1,), 2.0, 1.0
        )
        assert np.any(np.abs(d) == 1.0), "d must clip for this test"
        assert_close_to_reference(y, ry, f"outputs, step {step}", rtol=1e-4)
        for name in STATS:
            assert_close_to_reference(
                to_numpy(getattr(layer, name)),
                getattr(ref, name),
                f"{name}, step {step}",
            )
        sgd_update(layer, grads)
        ref.gamma = ref.gamma - 0.1 * rdg
        ref.beta = ref.beta - 0.1 * rdb
