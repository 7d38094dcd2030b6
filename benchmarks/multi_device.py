"""What synchronized statistics cost on 2 devices of this machine.

Trains a small convolutional network (2 x Conv2D + normalization) on 2
devices: 2 logical CPUs under `tf.distribute.MirroredStrategy`
(TensorFlow) or 2 host devices under `keras.distribution.DataParallel`
(JAX). Candidates are timed alternately after warm-up (median of a
compiled `train_on_batch`); the table gives ratios measured in this run.

    python benchmarks/multi_device.py                  # TensorFlow
    KERAS_BACKEND=jax python benchmarks/multi_device.py
    python benchmarks/multi_device.py --tiny --json out.json   # smoke

On JAX one program runs over the global batch, so the statistics are global
with or without `synchronized` and only the implementations differ.
"""

import argparse
import json
import os
import platform
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import time_alternating  # noqa: E402

import keras_norms  # noqa: E402

BACKEND = keras.backend.backend()


def configure_devices():
    """2 devices in this process: logical CPUs (TensorFlow) or host devices
    (JAX). Called before the backend first runs anything (importing Keras
    does not)."""
    if BACKEND == "jax":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_force_host_platform_device_count=2"
        )
        return
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )


def norms():
    """name -> function(synchronized) building the normalization of a
    bias-free Conv2D (CBN wraps it)."""

    def keras_bn(conv, sync):
        return [conv, keras.layers.BatchNormalization(synchronized=sync)]

    def kn_bn(conv, sync):
        return [conv, keras_norms.BatchNormalization(synchronized=sync)]

    def kn_brn(conv, sync):
        return [conv, keras_norms.BatchRenormalization(synchronized=sync)]

    def kn_cbn(conv, sync):
        return [keras_norms.CBN(conv, window_size=4, synchronized=sync)]

    return {"keras_bn": keras_bn, "kn_bn": kn_bn, "kn_brn": kn_brn}, {
        "kn_cbn": kn_cbn
    }


def build(norm, synchronized, shape, channels):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape[1:])
    h = inputs
    for _ in range(2):
        conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
        for layer in norm(conv, synchronized):
            h = layer(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def scope():
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope()
    devices = keras.distribution.list_devices()
    return keras.distribution.DataParallel(devices=devices).scope()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    if BACKEND not in ("tensorflow", "jax"):
        parser.error(
            f"2 devices in one process need TensorFlow or JAX, not {BACKEND}"
            "; PyTorch runs a process per device: benchmarks/multi_process.py"
        )
    configure_devices()
    shape, channels = ((4, 6, 6, 3), 4) if args.tiny else ((32, 32, 32, 16), 32)
    rounds, warmup = (1, 1) if args.tiny else (args.rounds, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=shape).astype("float32")
    y = rng.integers(0, 10, size=shape[0])
    plain, cbn = norms()
    settings = [(False, True)] if BACKEND == "tensorflow" else [(False,)]
    with scope():
        models = {}
        for name, norm in {**plain, **cbn}.items():
            for sync in settings[0]:
                if name == "keras_bn" and sync and BACKEND != "tensorflow":
                    continue
                models[name + ("_sync" if sync else "")] = build(
                    norm, sync, shape, channels
                )
        seconds = time_alternating(
            {
                name: (lambda m=m: m.train_on_batch(x, y))
                for name, m in models.items()
            },
            rounds,
            warmup,
        )
    ratios = {}
    if BACKEND == "tensorflow":
        pairs = [
            ("keras_bn_sync", "keras_bn"),
            ("kn_bn_sync", "kn_bn"),
            ("kn_bn_sync", "keras_bn_sync"),
            ("kn_brn_sync", "kn_bn_sync"),
            ("kn_cbn_sync", "kn_cbn"),
        ]
    else:
        pairs = [("kn_bn", "keras_bn"), ("kn_brn", "kn_bn")]
        pairs.append(("kn_cbn", "kn_bn"))
    print(
        f"{BACKEND}, 2 devices, global batch {shape[0]}, input {shape[1:]},"
        f" {channels} channels"
    )
    for name, t in seconds.items():
        print(f"  {name:15s} {1e3 * t:8.2f} ms/step")
    for a, b in pairs:
        ratios[f"{a} / {b}"] = seconds[a] / seconds[b]
        print(f"  {a + ' / ' + b:32s} {seconds[a] / seconds[b]:.2f}x")
    if args.json:
        report = {
            "backend": BACKEND,
            "keras": keras.__version__,
            "machine": platform.platform(),
            "shape": shape,
            "seconds": seconds,
            "ratios": ratios,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
