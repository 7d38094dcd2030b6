"""Tiny batches on scikit-learn's digits: BN vs. Cross-Iteration BN.

Trains the same small CNN at batch size 2 (by default) with
`keras_norms.BatchNormalization` after each bias-free Conv2D/Dense, and with
`keras_norms.CrossIterationBatchNormalization` wrapping them (statistics
averaged over the last `--window` steps with the paper's Taylor
compensation, after an optional burn-in of plain BN), and prints both test
accuracies.

    python examples/digits_cbn.py --batch-size 2 --window 4 --epochs 4
"""

import argparse

import keras
from digits_common import load_data
from digits_common import steps_of
from digits_common import train

import keras_norms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--burnin-fraction", type=float, default=0.0)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.window <= 8:
        parser.error("--window must be in [1, 8]")

    data = load_data(args.seed)
    steps = steps_of(data, args)
    burnin = int(args.burnin_fraction * steps)
    print(
        f"digits: {len(data[0])} train / {len(data[1])} test images, "
        f"batch size {args.batch_size}, {steps} steps, backend "
        f"{keras.backend.backend()}"
    )
    results = {}
    for name, normalized in (
        (
            "BatchNormalization",
            lambda linear: [linear, keras_norms.BatchNormalization()],
        ),
        (
            f"CBN(window_size={args.window}, burnin_steps={burnin})",
            lambda linear: [
                keras_norms.CrossIterationBatchNormalization(
                    linear, window_size=args.window, burnin_steps=burnin
                )
            ],
        ),
    ):
        _, accuracy, seconds, _ = train(normalized, data, args)
        results[name] = accuracy
        print(f"{name:40s} test accuracy {accuracy:.4f}  ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
