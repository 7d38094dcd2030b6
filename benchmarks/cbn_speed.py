"""Train-step cost of Conv2D + CBN against Conv2D + Keras's BatchNormalization.

Measures, in one process and alternating the candidates after warm-up, the
time of a compiled train step (forward, backward, state updates, SGD) of
Conv2D(64 -> 64, 3x3, 'same', no bias) followed by

- keras.layers.BatchNormalization (the baseline),
- keras_norms.BatchNormalization,
- keras_norms.CrossIterationBatchNormalization(window_size=4), the default
  (gradient through the compensated statistics),
- the same with `compensation_gradient=False` (the authors' convention),

on a 32x32x32x64 batch, in `--repeats` blocks of `--rounds` alternating
steps, and prints the median of the blocks' ratios to the baseline and
their range, against the target CBN <= 1.3x on TensorFlow. Also prints
CBN's buffer size against its bound k * (3 |W| + 2 C) floats.

    python benchmarks/cbn_speed.py [--batch 32] [--size 32] [--channels 64]

With `--profile` it also times where CBN's extra cost goes: Conv2D alone,
CBN with `window_size=1` (BN computed by CBN) and CBN with its kernel
derivatives `d mu / dW`, `d nu / dW` replaced by zeros.
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_norms
from keras_norms import _linear

TARGET = 1.3  # Conv2D + CBN / Conv2D + Keras's BN, TensorFlow


class CBNWithoutDerivatives(keras_norms.CBN):
    """CBN whose kernel derivatives are zeros (`--profile` only): the same
    step without the extra kernel gradient."""

    def _batch_statistics(self, *args, **kwargs):
        real = _linear.statistic_gradients

        def zeros(layer, inputs, outputs, weights, count):
            shape = tuple(layer.kernel.shape)
            return (
                keras.ops.zeros(shape[:-1] + (1,), outputs.dtype),
                keras.ops.zeros(shape, outputs.dtype),
            )

        _linear.statistic_gradients = zeros
        try:
            return super()._batch_statistics(*args, **kwargs)
        finally:
            _linear.statistic_gradients = real


def make_model(kind, shape, channels, window):
    conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
    if kind == "conv":
        layers = [conv]
    elif kind == "cbn_k1":
        layers = [keras_norms.CBN(conv, window_size=1)]
    elif kind == "cbn_zero_derivatives":
        layers = [CBNWithoutDerivatives(conv, window_size=window)]
    elif kind == "cbn":
        layers = [keras_norms.CBN(conv, window_size=window)]
    elif kind == "cbn_authors":
        layers = [
            keras_norms.CBN(
                conv, window_size=window, compensation_gradient=False
            )
        ]
    elif kind == "keras_bn":
        layers = [conv, keras.layers.BatchNormalization()]
    else:
        layers = [conv, keras_norms.BatchNormalization()]
    model = keras.Sequential([keras.Input(shape[1:]), *layers])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also Conv2D alone, CBN(window_size=1) and CBN without its "
        "kernel derivatives",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.channels = 2, 6, 4
        args.rounds, args.repeats = 2, 2

    shape = (args.batch, args.size, args.size, args.channels)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    kinds = ["keras_bn", "keras_norms_bn", "cbn", "cbn_authors"]
    if args.profile:
        kinds += ["conv", "cbn_k1", "cbn_zero_derivatives"]
    models = {
        k: make_model(k, shape, args.channels, args.window) for k in kinds
    }
    for model in models.values():  # warm-up: trace, compile, fill buffers
        for _ in range(args.window + 2):
            model.train_on_batch(x, y)
    blocks = []
    for _ in range(args.repeats):
        times = {k: [] for k in kinds}
        for _ in range(args.rounds):  # A B C D A B C D ...
            for kind in kinds:
                start = time.perf_counter()
                models[kind].train_on_batch(x, y)
                times[kind].append(time.perf_counter() - start)
        blocks.append({k: float(np.median(t)) for k, t in times.items()})
    results = {"backend": keras.backend.backend(), "shape": shape}
    print(
        f"backend {keras.backend.backend()}, input {shape}; median [range] "
        f"of {args.repeats} blocks of {args.rounds} alternating train steps"
    )

    def ratio(kind, base):
        ratios = [b[kind] / b[base] for b in blocks]
        return float(np.median(ratios)), min(ratios), max(ratios)

    for kind in kinds:
        median = float(np.median([b[kind] for b in blocks]))
        r, low, high = ratio(kind, "keras_bn")
        results[kind] = {"seconds": median, "ratio": r, "range": [low, high]}
        print(
            f"  {'Conv2D alone' if kind == 'conv' else 'Conv2D + ' + kind:29s}"
            f" {1e3 * median:8.2f} ms  "
            f"{r:5.2f}x [{low:.2f}-{high:.2f}]"
        )
    r, low, high = ratio("cbn", "cbn_authors")
    results["cbn / cbn_authors"] = {"ratio": r, "range": [low, high]}
    print(
        f"  gradient through the compensation: {r:.2f}x "
        f"[{low:.2f}-{high:.2f}] the authors' convention's step"
    )
    cbn_ratio = results["cbn"]["ratio"]
    print(
        f"  target Conv2D + CBN <= {TARGET}x Conv2D + Keras BN (TensorFlow):"
        f" {'met' if cbn_ratio <= TARGET else 'missed'} on "
        f"{keras.backend.backend()} (<= 1.5x on JAX and PyTorch: "
        f"{'met' if cbn_ratio <= 1.5 else 'missed'})"
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
