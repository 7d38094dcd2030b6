"""Small-batch training on scikit-learn's digits: BN vs. Batch Renormalization.

Trains the same small CNN twice at a small batch size, once with
`keras_norms.BatchNormalization` and once with
`keras_norms.BatchRenormalization` warmed up by `RenormWarmup`, prints both
test accuracies, then saves the renormalized model to `.keras`, loads it
back and checks that it evaluates identically.

    python examples/digits_renorm.py --batch-size 4 --epochs 8
"""

import argparse
import os
import tempfile

import keras
import numpy as np
from digits_common import load_data
from digits_common import scaled_warmup
from digits_common import steps_of
from digits_common import train

import keras_norms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_data(args.seed)
    steps = steps_of(data, args)
    print(
        f"digits: {len(data[0])} train / {len(data[1])} test images, "
        f"batch size {args.batch_size}, {steps} steps, backend "
        f"{keras.backend.backend()}"
    )

    _, bn_accuracy, bn_seconds, _ = train(
        lambda linear: [linear, keras_norms.BatchNormalization()], data, args
    )
    warmup = scaled_warmup(steps)
    model, brn_accuracy, brn_seconds, history = train(
        lambda linear: [linear, keras_norms.BatchRenormalization()],
        data,
        args,
        callbacks=[warmup],
    )
    print(
        f"BatchNormalization    test accuracy {bn_accuracy:.4f}  "
        f"({bn_seconds:.1f} s)"
    )
    print(
        f"BatchRenormalization  test accuracy {brn_accuracy:.4f}  "
        f"({brn_seconds:.1f} s, final rmax {history.history['rmax'][-1]:.2f}"
        f", dmax {history.history['dmax'][-1]:.2f})"
    )

    x_test, y_test = data[1], data[3]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits_brn.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
    _, reloaded_accuracy = reloaded.evaluate(x_test, y_test, verbose=0)
    same = np.array_equal(
        model.predict(x_test, verbose=0), reloaded.predict(x_test, verbose=0)
    )
    print(
        f"reloaded from .keras: test accuracy {reloaded_accuracy:.4f}, "
        f"identical predictions: {same}"
    )
    if not same or reloaded_accuracy != brn_accuracy:
        raise SystemExit("the reloaded model does not match the trained one")


if __name__ == "__main__":
    main()
