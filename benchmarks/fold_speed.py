"""Inference cost of a CNN before and after `fold_normalization`.

For each normalization (Keras's BN as the reference, keras_norms BN, BRN
and CBN), builds `Input(32, 32, 3) -> 3 x [Conv2D(32, 3x3, 'same', no
bias) -> normalization -> ReLU] -> GlobalAveragePooling2D -> Dense(10)`,
trains it one epoch so that the statistics are not their initial values,
folds it, checks that the predictions agree, and times `predict_on_batch`
of the model and of its folded copy alternately (A B A B, after warm-up),
in `--repeats` blocks of `--rounds` alternations. Prints the median of the
blocks' ratios folded / unfolded and their range.

    python benchmarks/fold_speed.py [--batch 32] [--json out.json]
    KERAS_BACKEND=jax python benchmarks/fold_speed.py
"""

import argparse
import json
import os
import sys

import keras
import numpy as np

import keras_norms
from keras_norms.utils import fold_normalization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import time_alternating  # noqa: E402

NORMS = {
    "keras_bn": lambda conv: [conv, keras.layers.BatchNormalization()],
    "bn": lambda conv: [conv, keras_norms.BatchNormalization()],
    "brn": lambda conv: [conv, keras_norms.BatchRenormalization()],
    "cbn": lambda conv: [keras_norms.CBN(conv, window_size=4)],
}


def make_model(kind, size, channels):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((size, size, 3))]
    for _ in range(3):
        conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
        layers += NORMS[kind](conv) + [keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    model.compile("adam", "mse")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    size, channels = (8, 4) if args.tiny else (32, 32)
    rounds = args.rounds or (3 if args.tiny else 40)
    repeats = args.repeats or (1 if args.tiny else 5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, size, size, 3)).astype("float32")
    y = rng.normal(size=(args.batch, 10)).astype("float32")
    batch = keras.ops.convert_to_tensor(x)
    print(
        f"backend {keras.backend.backend()}, {os.cpu_count()} cores, batch "
        f"{args.batch} of {size}x{size}x3, 3 Conv2D({channels}) + norm + ReLU;"
        f" {repeats} blocks of {rounds}: folded / unfolded, median [range]"
    )
    results = {"backend": keras.backend.backend(), "batch": args.batch}
    for kind in NORMS:
        model = make_model(kind, size, channels)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        folded = fold_normalization(model)
        error = np.max(
            np.abs(folded.predict(x, verbose=0) - model.predict(x, verbose=0))
        )
        steps = {
            "unfolded": lambda: model.predict_on_batch(batch),
            "folded": lambda: folded.predict_on_batch(batch),
        }
        blocks = [
            time_alternating(steps, rounds, 5 if i == 0 else 0)
            for i in range(repeats)
        ]
        ratios = [b["folded"] / b["unfolded"] for b in blocks]
        ms = {
            name: 1e3 * float(np.median([b[name] for b in blocks]))
            for name in steps
        }
        results[kind] = {
            "ratio": float(np.median(ratios)),
            "range": [min(ratios), max(ratios)],
            "ms": ms,
            "layers": [len(model.layers), len(folded.layers)],
            "max_abs_difference": float(error),
        }
        print(
            f"{kind:9s} {np.median(ratios):.2f} [{min(ratios):.2f}-"
            f"{max(ratios):.2f}]  {ms['unfolded']:.2f} -> "
            f"{ms['folded']:.2f} ms  {len(model.layers)} -> "
            f"{len(folded.layers)} layers, max |diff| {error:.1e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
