"""Trains the same models on 1 and on 2 devices; saves what to compare.

Run as `python tests/distributed_scenario.py OUT_DIR` in a process of its
own (it configures the devices before Keras starts): with
`KERAS_BACKEND=tensorflow` the 2 devices are logical CPUs under
`tf.distribute.MirroredStrategy`, with `KERAS_BACKEND=jax` they are host
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`) under
`keras.distribution.DataParallel`. For each case, `OUT_DIR/<case>.npz` holds
every weight and the predictions after a few `fit()` steps with global
batch 8, as `one/<i>` and `two/<i>`; `OUT_DIR/collectives.json` holds the
number of all-reduces per replica that one training call of each layer
makes (TensorFlow: calls of `ReplicaContext.all_reduce`; JAX: `all-reduce`
instructions in the compiled program).
"""

import json
import os
import sys

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=2"
    )
else:
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import scenario_normalization  # noqa: E402

# (name, layer kind, masked, synchronized)
CASES = [
    ("bn", "bn", False, True),
    ("bn_mask", "bn", True, True),
    ("brn", "brn", False, True),
    ("brn_mask", "brn", True, True),
    ("cbn", "cbn", False, True),
    ("cbn_mask", "cbn", True, True),
    ("cbn_conv", "cbn_conv", False, True),
    # The authors' gradient convention (compensation_gradient=False).
    ("cbn_authors", "cbn_authors", False, True),
    ("cbn_authors_mask", "cbn_authors", True, True),
    ("cbn_conv_authors", "cbn_conv_authors", False, True),
    ("bn_local", "bn", False, False),
    ("brn_local", "brn", False, False),
    ("cbn_local", "cbn", False, False),
]
# Bad batches, synchronized: (name, layer kind, masked, what is bad).
# "nan": a NaN in the second replica's half of the last batch, so that the
# global statistics of that step are not finite; "ragged": 17 samples, so
# that the last global batch holds 1 and one replica gets none.
BAD_CASES = [
    ("bn_nan", "bn", False, "nan"),
    ("brn_nan_mask", "brn", True, "nan"),
    ("cbn_nan", "cbn", False, "nan"),
    ("cbn_conv_nan", "cbn_conv", False, "nan"),
    ("bn_ragged", "bn", False, "ragged"),
    ("brn_ragged_mask", "brn", True, "ragged"),
    ("cbn_ragged", "cbn", False, "ragged"),
]


def data(masked, bad=None):
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, size=(24, 5, 4)).astype("float32")
    if masked:  # zero padding after a random length, for `Masking`
        lengths = rng.integers(1, 6, size=24)
        x[np.arange(5)[None, :] >= lengths[:, None]] = 0.0
    y = rng.normal(size=(24, 1)).astype("float32")
    if bad == "nan":
        x[20, 0, 1] = np.nan
    if bad == "ragged":
        x, y = x[:17], y[:17]
    return x, y


def make_model(kind, masked, synchronized):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5, 4))
    h = keras.layers.Masking(0.0)(inputs) if masked else inputs
    if kind in ("bn", "brn"):
        h = keras.layers.Dense(6, use_bias=False)(h)
    h = scenario_normalization(kind, synchronized)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def train(kind, masked, synchronized, scope, bad=None):
    x, y = data(masked, bad)
    with scope():
        model = make_model(kind, masked, synchronized)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        arrays = [keras.ops.convert_to_numpy(w) for w in model.weights]
        if bad:  # by name, to compare the statistics
            return {
                f"{i}_{w.name}": a
                for i, (w, a) in enumerate(zip(model.weights, arrays))
            }
        return arrays + [model.predict(x, batch_size=8, verbose=0)]


_MIRRORED = []


def mirrored():
    """One strategy per process: strategies over the same devices would
    share collective instance keys."""
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _MIRRORED[0]


def scopes():
    """Scope factories for (1 device, 2 devices)."""
    import contextlib

    if BACKEND == "tensorflow":
        return contextlib.nullcontext, mirrored().scope
    devices = keras.distribution.list_devices()
    assert len(devices) == 2, devices
    parallel = keras.distribution.DataParallel(devices=devices)
    return contextlib.nullcontext, parallel.scope


def tensorflow_collectives(layer, x, mask):
    """All-reduce calls per replica during one training call of `layer`."""
    calls = []
    original = tf.distribute.ReplicaContext.all_reduce

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    strategy = mirrored()
    with strategy.scope():
        layer.build(x.shape[:0] + (4,) + x.shape[1:])
    arrays = (x,) if mask is None else (x, mask)
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tuple(
            a[4 * ctx.replica_id_in_sync_group :][:4] for a in arrays
        )
    )

    @tf.function
    def step(values):
        return strategy.run(
            lambda x, m=None: layer(x, training=True, mask=m), args=values
        )

    tf.distribute.ReplicaContext.all_reduce = counting
    try:
        step(values)
    finally:
        tf.distribute.ReplicaContext.all_reduce = original
    return len(calls) // 2


def jax_collectives(layer, x, mask):
    """`all-reduce` instructions in one compiled training call of `layer`
    on a batch split over 2 devices."""
    import jax
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    split = NamedSharding(mesh, PartitionSpec("batch"))
    x, mask = jax.device_put(x, split), jax.device_put(mask, split)
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    state = [v.value for v in layer.non_trainable_variables]

    def step(trainable, x, mask):
        return layer.stateless_call(
            trainable, state, x, training=True, mask=mask
        )

    hlo = jax.jit(step).lower(trainable, x, mask).compile().as_text()
    return hlo.count(" all-reduce(")


def collectives():
    count = (
        tensorflow_collectives if BACKEND == "tensorflow" else jax_collectives
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 5, 4)).astype("float32")
    mask = rng.random((8, 5)) < 0.6
    mask[:, 0] = True
    out = {}
    for masked in (False, True):
        m = mask if masked else None
        suffix = "_mask" if masked else ""
        layers = {
            "keras_bn": keras.layers.BatchNormalization(
                synchronized=BACKEND == "tensorflow"
            ),
            "bn": scenario_normalization("bn", True),
            "brn": scenario_normalization("brn", True),
            "cbn": scenario_normalization("cbn", True),
        }
        for name, layer in layers.items():
            out[name + suffix] = count(layer, x, m)
    return out


def main(out_dir):
    single, multi = scopes()
    for name, kind, masked, synchronized in CASES:
        one = train(kind, masked, synchronized, single)
        two = train(kind, masked, synchronized, multi)
        arrays = {f"one/{i}": a for i, a in enumerate(one)}
        arrays.update({f"two/{i}": a for i, a in enumerate(two)})
        np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
    for name, kind, masked, bad in BAD_CASES:
        runs = {}
        for where, scope in (("one", single), ("two", multi)):
            try:
                runs[where] = train(kind, masked, True, scope, bad)
            except Exception as error:  # noqa: BLE001 (reported, compared)
                runs[where] = {"error": np.array(repr(error)[:2000])}
        arrays = {}
        for where, run in runs.items():
            arrays.update({f"{where}/{k}": a for k, a in run.items()})
        np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
    with open(os.path.join(out_dir, "collectives.json"), "w") as f:
        json.dump(collectives(), f)


if __name__ == "__main__":
    main(sys.argv[1])
