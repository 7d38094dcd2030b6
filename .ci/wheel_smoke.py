"""Smoke test of an installed keras_norms wheel, run by .ci/release_check.sh.

Runs inside a fresh virtualenv, from a directory outside the repository, on
the TensorFlow backend: checks that keras_norms comes from the venv's
site-packages with the wheel's version, then builds a tiny model around each
layer, fits one step, saves and reloads it, and compares predictions.

Usage: python wheel_smoke.py EXPECTED_VERSION WORK_DIR
"""

import os
import sys
import sysconfig

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_norms  # noqa: E402

expected_version, work_dir = sys.argv[1], sys.argv[2]
site = os.path.realpath(sysconfig.get_paths()["purelib"])
where = os.path.realpath(keras_norms.__file__)
if not where.startswith(site + os.sep):
    sys.exit(f"keras_norms imported from {where}, not from {site}")
if keras_norms.__version__ != expected_version:
    sys.exit(f"__version__ {keras_norms.__version__} != {expected_version}")
if keras.backend.backend() != "tensorflow":
    sys.exit(f"backend is {keras.backend.backend()}, not tensorflow")


def models():
    yield (
        "BatchNormalization",
        keras.Sequential(
            [
                keras.Input((6,)),
                keras_norms.BatchNormalization(),
                keras.layers.Dense(1),
            ]
        ),
    )
    yield (
        "BatchRenormalization",
        keras.Sequential(
            [
                keras.Input((4, 4, 2)),
                keras_norms.BatchRenormalization(),
                keras.layers.Flatten(),
                keras.layers.Dense(1),
            ]
        ),
    )
    yield (
        "CBN(Conv2D)",
        keras.Sequential(
            [
                keras.Input((4, 4, 2)),
                keras_norms.CBN(keras.layers.Conv2D(3, 3, use_bias=False)),
                keras.layers.Flatten(),
                keras.layers.Dense(1),
            ]
        ),
    )


rng = np.random.default_rng(0)
for name, model in models():
    x = rng.normal(size=(8, *model.input_shape[1:])).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model.compile("sgd", "mse")
    warmup = keras_norms.callbacks.RenormWarmup(
        rmax=3.0, dmax=5.0, rmax_steps=(0, 4), dmax_steps=(0, 4)
    )
    callbacks = [warmup] if name == "BatchRenormalization" else []
    model.fit(
        x, y, batch_size=4, steps_per_epoch=1, callbacks=callbacks, verbose=0
    )
    path = os.path.join(work_dir, f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        atol=1e-6,
    )
    print(f"{name}: fit, save, load_model, predict OK")

print(f"keras_norms {keras_norms.__version__} from {where}")
