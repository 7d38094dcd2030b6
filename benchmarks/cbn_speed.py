"""Train-step cost of Conv2D + CBN against Conv2D + Keras's BatchNormalization.

Measures, in one process and alternating the candidates after warm-up, the
median time of a compiled train step (forward, backward, state updates,
SGD) of Conv2D(64 -> 64, 3x3, 'same', no bias) followed by

- keras.layers.BatchNormalization (the baseline),
- keras_norms.BatchNormalization,
- keras_norms.CrossIterationBatchNormalization(window_size=4),

on a 32x32x32x64 batch, and prints each ratio to the baseline. The target of
issue 4 is CBN <= 1.5x. Also prints CBN's buffer size against its bound
k * (3 |W| + 2 C) floats.

    python benchmarks/cbn_speed.py [--batch 32] [--size 32] [--channels 64]
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_norms


def make_model(kind, shape, channels, window):
    conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
    if kind == "cbn":
        layers = [keras_norms.CBN(conv, window_size=window)]
    elif kind == "keras_bn":
        layers = [conv, keras.layers.BatchNormalization()]
    else:
        layers = [conv, keras_norms.BatchNormalization()]
    model = keras.Sequential([keras.Input(shape[1:]), *layers])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    shape = (args.batch, args.size, args.size, args.channels)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    kinds = ["keras_bn", "keras_norms_bn", "cbn"]
    models = {
        k: make_model(k, shape, args.channels, args.window) for k in kinds
    }
    for model in models.values():  # warm-up: trace, compile, fill buffers
        for _ in range(args.window + 2):
            model.train_on_batch(x, y)
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):  # A B C A B C ...
        for kind in kinds:
            start = time.perf_counter()
            models[kind].train_on_batch(x, y)
            times[kind].append(time.perf_counter() - start)
    base = float(np.median(times["keras_bn"]))
    results = {"backend": keras.backend.backend(), "shape": shape}
    print(
        f"backend {keras.backend.backend()}, input {shape}, "
        f"median of {args.rounds} train steps"
    )
    for kind in kinds:
        median = float(np.median(times[kind]))
        results[kind] = {"seconds": median, "ratio": median / base}
        print(
            f"  Conv2D + {kind:15s} {1e3 * median:8.1f} ms  "
            f"{median / base:5.2f}x"
        )
    cbn = models["cbn"].layers[0]
    kernel = int(np.prod(cbn.layer.kernel.shape))
    buffer = sum(
        int(np.prod(w.shape))
        for w in cbn.non_trainable_weights
        if w.name.startswith("past_")
    )
    bound = args.window * (3 * kernel + 2 * args.channels)
    results["cbn_buffer_floats"] = buffer
    results["cbn_buffer_bound"] = bound
    print(f"  CBN buffer: {buffer} floats (bound k(3|W|+2C) = {bound})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
