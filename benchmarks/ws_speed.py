"""Cost of WeightStandardization: Conv2D + WS against Conv2D alone.

In one process, alternating the candidates after warm-up (A B C A B C ...),
in `--repeats` blocks of `--rounds` rounds (each block starting with
another candidate), times on a 32x32x32x64 batch

- a compiled train step (forward, backward, SGD) of Conv2D(64 -> 64, 3x3,
  'same') alone, and of the same Conv2D wrapped in
  `keras_norms.WeightStandardization` (plain and `scaled=True`);
- inference (`predict_on_batch`) of Conv2D alone, of the WS model, and of
  the WS model after `fold_normalization` (a plain Conv2D with the
  standardized kernel), whose predictions are compared with the WS
  model's (the largest difference over the largest magnitude);

and prints the median of the blocks' ratios to Conv2D alone and their
range, against the targets: train step <= 1.05x, folded inference = 1x
(the same layer, so within the timing noise).

    python benchmarks/ws_speed.py [--batch 32] [--json out.json]
    KERAS_BACKEND=jax python benchmarks/ws_speed.py
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

TARGET = 1.05  # train step, Conv2D + WS / Conv2D alone


def make_model(kind, shape, channels):
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(channels, 3, padding="same")
    if kind == "ws":
        conv = keras_norms.WeightStandardization(conv)
    elif kind == "ws_scaled":
        conv = keras_norms.WeightStandardization(conv, scaled=True)
    model = keras.Sequential([keras.Input(shape[1:]), conv])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def blocks_of(fns, rounds, repeats, warmup):
    """`repeats` blocks of `rounds` alternations; each block starts the
    alternation at another candidate, since a candidate's place in it
    moves its time by a few percent here (an identical layer timed second
    measured 0.93x on PyTorch)."""
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    blocks = []
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        times = time_alternating({n: fns[n] for n in order}, rounds, 0)
        blocks.append({n: times[n] for n in names})
    return blocks


def summarize(blocks, base):
    out = {}
    for kind in blocks[0]:
        ratios = [b[kind] / b[base] for b in blocks]
        out[kind] = {
            "seconds": float(np.median([b[kind] for b in blocks])),
            "ratio": float(np.median(ratios)),
            "range": [min(ratios), max(ratios)],
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.channels = 2, 6, 4
        args.rounds, args.repeats = 2, 2

    shape = (args.batch, args.size, args.size, args.channels)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    kinds = ["conv", "ws", "ws_scaled"]
    models = {k: make_model(k, shape, args.channels) for k in kinds}
    train = blocks_of(
        {k: (lambda m=m: m.train_on_batch(x, y)) for k, m in models.items()},
        args.rounds,
        args.repeats,
        warmup=3,
    )
    folded = fold_normalization(models["ws"])
    expected = models["ws"].predict_on_batch(x)
    difference = float(
        np.max(np.abs(folded.predict_on_batch(x) - expected))
        / np.max(np.abs(expected))
    )
    inference_models = {
        "conv": models["conv"],
        "ws": models["ws"],
        "ws_folded": folded,
    }
    inference = blocks_of(
        {
            k: (lambda m=m: m.predict_on_batch(x))
            for k, m in inference_models.items()
        },
        args.rounds,
        args.repeats,
        warmup=3,
    )
    results = {
        "backend": keras.backend.backend(),
        "shape": shape,
        "train": summarize(train, "conv"),
        "inference": summarize(inference, "conv"),
        "folded_relative_difference": difference,
    }
    print(
        f"backend {keras.backend.backend()}, input {shape}; median [range] "
        f"of {args.repeats} blocks of {args.rounds} alternating calls"
    )
    names = {
        "conv": "Conv2D alone",
        "ws": "Conv2D + WS",
        "ws_scaled": "Conv2D + WS(scaled=True)",
        "ws_folded": "Conv2D + WS, folded",
    }
    for part in ("train", "inference"):
        print(f"  {part}:")
        for kind, entry in results[part].items():
            low, high = entry["range"]
            print(
                f"    {names[kind]:26s} {1e3 * entry['seconds']:8.2f} ms  "
                f"{entry['ratio']:5.2f}x [{low:.2f}-{high:.2f}]"
            )
    ratio = results["train"]["ws"]["ratio"]
    print(
        f"  target train step Conv2D + WS <= {TARGET}x Conv2D alone: "
        f"{'met' if ratio <= TARGET else 'missed'}; folded predictions "
        f"differ by {difference:.1e} of their largest magnitude"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
