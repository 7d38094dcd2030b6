"""Synchronized statistics on 2 devices equal 1 device (1e-5).

The training runs happen in `tests/distributed_scenario.py`, in a process
of its own per backend (devices are configured before Keras starts).
TensorFlow: 2 logical CPUs under `tf.distribute.MirroredStrategy`; JAX: 2
host devices under `keras.distribution.DataParallel`.
"""

import json

import keras
import numpy as np
import pytest

import keras_norms
from tests.helpers import BACKEND
from tests.helpers import run_script

DISTRIBUTED = BACKEND in ("tensorflow", "jax")

# One worker runs them all: the `results` fixture runs once.
pytestmark = pytest.mark.xdist_group("distributed")

SYNCHRONIZED = ["bn", "bn_mask", "brn", "brn_mask", "cbn", "cbn_mask"]
SYNCHRONIZED += ["cbn_conv", "cbn_authors", "cbn_authors_mask"]
SYNCHRONIZED += ["cbn_conv_authors"]
LOCAL = ["bn_local", "brn_local", "cbn_local"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    run_script("tests/distributed_scenario.py", str(out))
    return out


def load(results, case):
    arrays = np.load(results / f"{case}.npz")
    n = len(arrays.files) // 2
    return [arrays[f"one/{i}"] for i in range(n)], [
        arrays[f"two/{i}"] for i in range(n)
    ]


def relative_difference(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-6))


@pytest.mark.skipif(not DISTRIBUTED, reason="no Keras distribution")
@pytest.mark.parametrize("case", SYNCHRONIZED)
def test_two_replicas_train_like_one(results, case):
    """Weights, moving statistics, CBN's buffers and predictions after
    3 steps of `fit()` with global batch 8: 2 replicas x 4 == 1 x 8."""
    one, two = load(results, case)
    for i, (a, b) in enumerate(zip(one, two)):
        assert relative_difference(a, b) <= 1e-5, (case, i)


@pytest.mark.skipif(not DISTRIBUTED, reason="no Keras distribution")
@pytest.mark.parametrize(
    "case,authors_case",
    [
        ("cbn", "cbn_authors"),
        ("cbn_mask", "cbn_authors_mask"),
        ("cbn_conv", "cbn_conv_authors"),
    ],
)
def test_cbn_gradient_conventions_train_apart(results, case, authors_case):
    """The runs above tell CBN's two gradient conventions apart: after 3
    steps (2 with earlier statistics) their weights differ."""
    exact, _ = load(results, case)
    authors, _ = load(results, authors_case)
    worst = max(relative_difference(a, b) for a, b in zip(exact, authors))
    assert worst > 1e-3, worst


@pytest.mark.skipif(not DISTRIBUTED, reason="no Keras distribution")
@pytest.mark.parametrize("case", LOCAL)
def test_local_statistics(results, case):
    """`synchronized=False`: with `tf.distribute`, each replica normalizes
    with its own half batch, so training differs from one device; under
    `keras.distribution` on JAX, XLA compiles one program over the global
    batch and the statistics are global anyway (as with Keras's own BN)."""
    one, two = load(results, case)
    worst = max(relative_difference(a, b) for a, b in zip(one, two))
    if BACKEND == "tensorflow":
        assert worst > 1e-3
    else:
        assert worst <= 1e-5


def load_named(results, case):
    arrays = np.load(results / f"{case}.npz")
    runs = {"one": {}, "two": {}}
    for key in arrays.files:
        where, name = key.split("/", 1)
        runs[where][name] = arrays[key]
    for where, run in runs.items():
        assert "error" not in run, (case, where, str(run["error"]))
    return runs["one"], runs["two"]


STATISTICS = ("moving_", "renorm_", "past_", "filled")


def assert_statistics_finite_and_equal(one, two):
    """The statistics (moving, renorm, CBN's window) of the 1- and the
    2-device run are finite and equal to 1e-5."""
    statistics = [n for n in one if any(s in n for s in STATISTICS)]
    assert len(statistics) >= 2, sorted(one)
    for name in statistics:
        assert np.all(np.isfinite(one[name])), name
        assert np.all(np.isfinite(two[name])), name
        assert relative_difference(one[name], two[name]) <= 1e-5, name


@pytest.mark.skipif(not DISTRIBUTED, reason="no Keras distribution")
@pytest.mark.parametrize(
    "case", ["bn_nan", "brn_nan_mask", "cbn_nan", "cbn_conv_nan"]
)
def test_non_finite_global_batch_keeps_the_statistics(results, case):
    """A NaN on one replica makes that step's global statistics non-finite
    on both: every replica keeps its statistics (CBN: its window too), as
    one device does; the weights, which the NaN loss reaches, may be NaN."""
    one, two = load_named(results, case)
    assert_statistics_finite_and_equal(one, two)
    # The NaN reached the step: the layer's trained weights are NaN.
    assert not all(np.all(np.isfinite(a)) for a in one.values())


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute only")
@pytest.mark.parametrize("case", ["bn_ragged", "brn_ragged_mask", "cbn_ragged"])
def test_a_replica_without_samples_keeps_global_statistics(results, case):
    """17 samples at global batch 8: in the last step one replica holds the
    only sample and the other none. The statistics (computed from the
    weights before that step) equal one device's. The weights do not:
    Keras's loss on a replica without samples differs from one device's
    even without a normalization layer (by up to 0.14 in a model of two
    Dense layers, measured)."""
    one, two = load_named(results, case)
    assert_statistics_finite_and_equal(one, two)


@pytest.mark.skipif(not DISTRIBUTED, reason="no Keras distribution")
def test_one_all_reduce_per_layer(results):
    """Per replica and training call: one all-reduce for keras_norms
    layers, masked or not; Keras's own BN makes 3 (TensorFlow) or 2 (JAX)
    and synchronizes nothing when masked on TensorFlow."""
    counts = json.loads((results / "collectives.json").read_text())
    for name in ("bn", "brn", "cbn"):
        assert counts[name] == 1, counts
        assert counts[name + "_mask"] == 1, counts
    assert counts["keras_bn"] > 1, counts


@pytest.mark.parametrize(
    "make",
    [
        lambda sync: keras_norms.BatchNormalization(synchronized=sync),
        lambda sync: keras_norms.BatchRenormalization(synchronized=sync),
        lambda sync: keras_norms.CrossIterationBatchNormalization(
            keras.layers.Dense(3, use_bias=False), synchronized=sync
        ),
    ],
    ids=["bn", "brn", "cbn"],
)
def test_synchronized_on_one_replica_trains_like_local(make):
    """On every backend, without several replicas (no strategy, no
    `keras.distribution`, no torch process group), `synchronized=True`
    gives the local statistics: 3 training calls, masked, agree with
    `synchronized=False` (1e-5)."""
    rng = np.random.default_rng(0)
    x = rng.normal(4.0, 2.0, size=(3, 6, 5, 4)).astype("float32")
    mask = rng.random((3, 6, 5)) < 0.7
    runs = []
    for sync in (True, False):
        keras.utils.set_random_seed(1)  # CBN's kernel
        layer = make(sync)
        assert layer.get_config()["synchronized"] is sync
        for step in range(3):
            y = layer(x[step], training=True, mask=mask[step])
        weights = [keras.ops.convert_to_numpy(w) for w in layer.weights]
        runs.append([keras.ops.convert_to_numpy(y)] + weights)
    for a, b in zip(*runs):
        assert relative_difference(a, b) <= 1e-5


def test_synchronized_must_be_bool():
    with pytest.raises(TypeError, match="synchronized"):
        keras_norms.BatchNormalization(synchronized="yes")
