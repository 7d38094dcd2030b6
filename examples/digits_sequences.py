"""Stacked LSTMs on digits read row by row, with padded variable lengths.

Each 8x8 digit becomes a sequence of 8 time steps of 8 features (its rows).
Every sequence is cropped to a random length of 4-8 rows (the top rows
kept) and zero-padded back to 8 steps; `Masking` tells the layers which
steps are real. Four stacks are trained with the same seed:

    Masking -> LSTM -> [norm] -> LSTM -> [norm] -> LSTM -> Dense

with no normalization, `BatchNormalization`, `BatchRenormalization` (+
`RenormWarmup`) and `CrossIterationBatchNormalization` around a bias-free
`Dense` projection. Normalization is vertical only: between the recurrent
layers, over (batch, real time steps), never inside the recurrence. The
script prints test accuracy and training time per variant.

    python examples/digits_sequences.py --batch-size 16 --epochs 10
"""

import argparse
import time

import keras
import numpy as np
from digits_common import scaled_warmup
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_norms


def load_sequences(seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")  # (n, 8 rows, 8 columns)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 9, size=len(x))
    x[np.arange(8)[None, :] >= lengths[:, None]] = 0.0
    return train_test_split(
        x,
        digits.target,
        test_size=0.25,
        random_state=seed,
        stratify=digits.target,
    )


def norm_layer(kind, units):
    if kind == "bn":
        return keras_norms.BatchNormalization()
    if kind == "brn":
        return keras_norms.BatchRenormalization()
    if kind == "cbn":
        return keras_norms.CBN(keras.layers.Dense(units, use_bias=False))
    return None


def make_model(kind, units):
    layers = [keras.Input((8, 8)), keras.layers.Masking(0.0)]
    for _ in range(2):
        layers.append(keras.layers.LSTM(units, return_sequences=True))
        norm = norm_layer(kind, units)
        if norm is not None:
            layers.append(norm)
    layers += [keras.layers.LSTM(units), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants",
        default="none,bn,brn,cbn",
        help="comma-separated subset of none,bn,brn,cbn",
    )
    args = parser.parse_args()
    x_train, x_test, y_train, y_test = load_sequences(args.seed)
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    print(
        f"digits as sequences: {len(x_train)} train / {len(x_test)} test, "
        f"lengths 4-8 of 8, batch size {args.batch_size}, {steps} steps, "
        f"backend {keras.backend.backend()}"
    )
    names = {
        "none": "no normalization",
        "bn": "BatchNormalization",
        "brn": "BatchRenormalization",
        "cbn": "CBN(Dense, k=4)",
    }
    for kind in args.variants.split(","):
        keras.utils.set_random_seed(args.seed)
        model = make_model(kind, args.units)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        callbacks = []
        if kind == "brn":
            callbacks.append(scaled_warmup(steps))
        start = time.perf_counter()
        model.fit(
            x_train,
            y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            verbose=0,
            callbacks=callbacks,
        )
        seconds = time.perf_counter() - start
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        print(
            f"{names[kind]:22s} test accuracy {accuracy:.4f}  "
            f"train time {seconds:6.1f} s"
        )


if __name__ == "__main__":
    main()
