"""After small-batch training: population statistics, folding, export.

Trains the digits CNN of the study at batch size 2 with BN, BRN (warmed
up) and CBN, then for each model:

1. test accuracy with the moving averages the training left;
2. `keras_norms.utils.recompute_statistics` over the training images, and
   the test accuracy with these population statistics;
3. `keras_norms.utils.fold_normalization`: the largest difference between
   the folded model's and the original's predictions, relative to the
   largest logit, and the layers left;
4. the folded model saved to `.keras` and, on TensorFlow, exported as a
   SavedModel with `model.export()`; both are reloaded and must predict
   the same.

    python examples/digits_inference.py                 # 3 seeds, 4 epochs
    python examples/digits_inference.py --seeds 1 --epochs 1 --layers bn
"""

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import keras
import numpy as np
from digits_common import load_data
from digits_common import scaled_warmup
from digits_common import steps_of
from digits_common import train

import keras_norms
from keras_norms.utils import fold_normalization
from keras_norms.utils import recompute_statistics

LAYERS = {
    "bn": lambda linear: [linear, keras_norms.BatchNormalization()],
    "brn": lambda linear: [linear, keras_norms.BatchRenormalization()],
    "cbn": lambda linear: [keras_norms.CBN(linear, window_size=4)],
}


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def round_trips(folded, x, tmp):
    """Largest |difference| between the folded model's predictions and
    those of its `.keras` file and (TensorFlow) its exported SavedModel."""
    expected = folded.predict(x, verbose=0)
    path = os.path.join(tmp, "folded.keras")
    folded.save(path)
    loaded = keras.saving.load_model(path)
    out = {".keras": np.max(np.abs(loaded.predict(x, verbose=0) - expected))}
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        export_dir = os.path.join(tmp, "exported")
        folded.export(export_dir, verbose=False)
        artifact = tf.saved_model.load(export_dir)
        served = artifact.serve(tf.constant(x)).numpy()
        out["SavedModel"] = np.max(np.abs(served - expected))
    return out


def run(name, seed, args):
    data = load_data(seed)
    x_train, x_test, y_train, y_test = data
    config = SimpleNamespace(
        seed=seed,
        batch_size=args.batch_size,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
    )
    callbacks = [scaled_warmup(steps_of(data, config))] if name == "brn" else []
    model, _, seconds, _ = train(LAYERS[name], data, config, callbacks)
    before = accuracy(model, x_test, y_test)
    recompute_statistics(model, x_train, batch_size=64, verbose=0)
    after = accuracy(model, x_test, y_test)
    folded, report = fold_normalization(model, return_report=True)
    logits = model.predict(x_test, verbose=0)
    difference = np.max(np.abs(folded.predict(x_test, verbose=0) - logits))
    with tempfile.TemporaryDirectory() as tmp:
        trips = round_trips(folded, x_test, tmp)
    return {
        "before": before,
        "after": after,
        "fold": difference / np.max(np.abs(logits)),
        "layers": (len(model.layers), len(folded.layers)),
        "kept": report,
        "trips": trips,
        "seconds": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", default="bn,brn,cbn")
    args = parser.parse_args()
    start = time.perf_counter()
    print(
        f"digits CNN, batch size {args.batch_size}, {args.epochs} epochs, "
        f"backend {keras.backend.backend()}"
    )
    print(
        "layer  seed  test acc (moving avg)  test acc (recomputed)  "
        "fold rel. diff  layers  kept  round trips (max |diff|)"
    )
    gains = {}
    for name in args.layers.split(","):
        for seed in range(args.seeds):
            r = run(name, seed, args)
            gains.setdefault(name, []).append(r["after"] - r["before"])
            trips = ", ".join(f"{k} {v:.1e}" for k, v in r["trips"].items())
            print(
                f"{name:5s}  {seed:4d}  {r['before']:21.4f}  "
                f"{r['after']:21.4f}  {r['fold']:14.1e}  "
                f"{r['layers'][0]:2d}->{r['layers'][1]:2d}  "
                f"{len(r['kept']):4d}  {trips}",
                flush=True,
            )
    for name, g in gains.items():
        print(
            f"{name}: recomputing changed test accuracy by "
            f"{100 * np.mean(g):+.2f} points on average "
            f"(min {100 * min(g):+.2f}, max {100 * max(g):+.2f})"
        )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
