r"""Online learning, evaluated prequentially: an MLP with each normalization.

The data is scikit-learn's bundled 8x8 digits (64 features in [0, 1]),
split by the seed (stratified) into a stream of `--stream` (1,400)
examples and a held-out set (the other 397). The stream drifts: its first
third holds digits 0-4 only; then digits 5-9 appear, and the rest of the
stream is a shuffle of everything left (all ten digits, 5-9 about three
times as often as 0-4, whose examples the first phase has mostly used).
With `--drift-scale S` the inputs are also multiplied by S from the phase
change on, and in the held-out set (default 1: no change of scale).

The model is the same MLP for every variant:

    Dense(64) -> norm -> ReLU -> Dense(64) -> norm -> ReLU -> Dense(10)

(logits), with Adam(1e-3) and sparse categorical cross-entropy. The
variants (`VARIANTS`): `none` (Dense with a bias, no normalization),
`keras_bn` (Keras's BatchNormalization), `bn` and `brn` (keras_norms'
BatchNormalization and BatchRenormalization with their defaults), `cbn`
(CrossIterationBatchNormalization wrapping the bias-free Dense, window 8),
`cbn_no_compensation` (the same without the Taylor compensation) and
`layer_norm` (Keras's LayerNormalization); the normalized variants
have `Dense(64, use_bias=False)`.

Prequential (test-then-train) evaluation: the stream arrives in batches
of `b` examples (`--batch-sizes`, 1 and 4); each batch is first predicted
in inference mode (moving statistics; `predict_on_batch`) and each
prediction scored, then trained on with one step (`train_on_batch`). One
pass over the stream, then the held-out accuracy in inference mode. The
seed (`--seeds`, 0, 1 and 2) fixes the split, the stream's order and the
initial weights (`keras.utils.set_random_seed`).

Outputs: a table of held-out accuracy (mean and min-max over the seeds)
and prequential accuracy (over the whole stream, and over its last
`--window` examples) per variant and batch size; a PNG (`--out`) of the
prequential accuracy over the last `--window` (100) examples against the
examples seen, one panel per batch size, mean over the seeds; with
`--json PATH`, one record per run (its per-example scores a string of 0s
and 1s). `--plot-from PATH` prints the table and draws the plot again from
such records, without training. `--quick` (for CI): a stream of 120
examples, one seed, a window of 30.

    python examples/online_learning.py --json online.json  # 3 minutes
    python examples/online_learning.py --quick  # under a minute
    python examples/online_learning.py --plot-from online.json

Durations (2026-12-07, AMD EPYC, 2 cores shared with other work, load
average about 3): the default run took 3 min 9 s on JAX, the fastest
backend here (180 s for the 36 runs, the rest imports): about 3.5 ms per
example at batch 1, each run's tracing about 1 s. Per step on JAX,
`train_on_batch` took 1.4 ms, most of it Keras's Python around the
compiled step (moving each batch to the device, syncing every variable
back), and `predict_on_batch` 0.35 ms (a jitted `stateless_call` 0.11 ms,
too little gain for backend-specific code; an eager `model(x)` 3.5 ms).
TensorFlow is about 1.5x slower per step in isolation (2.0 ms and 0.6
ms), yet in a run of the batch-1 runs of `cbn`, `cbn_no_compensation`,
`layer_norm` and `brn` (3 seeds, the same day, beside a PyTorch run) it
trained for 83 s against JAX's 78 s for the same runs: the whole default
run takes about as long. PyTorch runs eagerly: 202 s for those same 12
runs (CBN 30 s a run, the others 8 to 15 s), about 7 minutes for the
default run (with one thread: see `train_all`).
"""

import argparse
import json
import os
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from small_batch_study import write_records

import keras_norms

UNITS = 64
FIRST_CLASSES = 5  # the stream's first phase holds digits 0-4 only


def _after(norm):
    """A bias-free Dense followed by `norm()`."""
    return lambda: [keras.layers.Dense(UNITS, use_bias=False), norm()]


# name: (legend label, the layers before each ReLU). Add a variant here.
VARIANTS = {
    "none": ("no normalization", lambda: [keras.layers.Dense(UNITS)]),
    "keras_bn": (
        "Keras BatchNormalization",
        _after(keras.layers.BatchNormalization),
    ),
    "bn": ("BatchNormalization", _after(keras_norms.BatchNormalization)),
    "brn": ("BatchRenormalization", _after(keras_norms.BatchRenormalization)),
    "cbn": (
        "CBN (window 8)",
        lambda: [
            keras_norms.CrossIterationBatchNormalization(
                keras.layers.Dense(UNITS, use_bias=False), window_size=8
            )
        ],
    ),
    "cbn_no_compensation": (
        "CBN (window 8, compensation=False)",
        lambda: [
            keras_norms.CrossIterationBatchNormalization(
                keras.layers.Dense(UNITS, use_bias=False),
                window_size=8,
                compensation=False,
            )
        ],
    ),
    "layer_norm": (
        "LayerNormalization",
        _after(keras.layers.LayerNormalization),
    ),
}


def load(args, seed):
    """The stream (in its order, drift applied) and the held-out set."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_stream, x_test, y_stream, y_test = train_test_split(
        x, y, train_size=args.stream, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    change = phase_change(args.stream)
    first = rng.choice(
        np.flatnonzero(y_stream < FIRST_CLASSES), change, replace=False
    )
    rest = rng.permutation(np.setdiff1d(np.arange(args.stream), first))
    order = np.concatenate([first, rest])
    x_stream, y_stream = x_stream[order], y_stream[order]
    x_stream[change:] *= args.drift_scale
    x_test = x_test * args.drift_scale
    return x_stream, y_stream, x_test, y_test


def phase_change(stream):
    """The number of examples before digits 5-9 appear."""
    return stream // 3


def make_model(variant):
    block = VARIANTS[variant][1]
    return keras.Sequential(
        [
            keras.Input((64,)),
            *block(),
            keras.layers.ReLU(),
            *block(),
            keras.layers.ReLU(),
            keras.layers.Dense(10),
        ]
    )


def run(variant, batch_size, seed, args):
    """One prequential pass; returns the per-example scores (bool), the
    held-out accuracy and the seconds of the pass."""
    x, y, x_test, y_test = load(args, seed)
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = make_model(variant)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    correct = np.zeros(len(y), bool)
    start = time.perf_counter()
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        logits = model.predict_on_batch(xb)
        correct[i : i + batch_size] = np.argmax(logits, -1) == yb
        model.train_on_batch(xb, yb)
    seconds = time.perf_counter() - start
    held_out = np.mean(np.argmax(model.predict_on_batch(x_test), -1) == y_test)
    return correct, float(held_out), seconds


def scores(record):
    return np.array([c == "1" for c in record["correct"]])


def sliding(correct, window):
    """Accuracy over the last `window` examples (fewer at the start)."""
    total = np.cumsum(correct, dtype=float)
    ahead = np.concatenate([np.zeros(window), total[:-window]])[: len(total)]
    return (total - ahead) / np.minimum(np.arange(1, len(total) + 1), window)


def group(records):
    """`{(variant, batch_size): [records over the seeds]}`, in the
    records' order."""
    cells = {}
    for r in records:
        cells.setdefault((r["variant"], r["batch_size"]), []).append(r)
    return cells


def print_table(records, window):
    cells = group(records)
    sizes = list(dict.fromkeys(b for _, b in cells))
    variants = list(dict.fromkeys(v for v, _ in cells))
    seeds = len({r["seed"] for r in records})
    print(
        f"\n| variant | batch | held-out accuracy (mean, min-max over "
        f"{seeds} seeds) | prequential, whole stream | prequential, last "
        f"{window} |"
    )
    print("| --- | --- | --- | --- | --- |")
    for b in sizes:
        for v in variants:
            runs = cells.get((v, b))
            if not runs:
                continue
            held = [r["held_out_accuracy"] for r in runs]
            whole = np.mean([r["prequential_accuracy"] for r in runs])
            last = np.mean([scores(r)[-window:].mean() for r in runs])
            print(
                f"| {v} | {b} | {np.mean(held):.3f} ({min(held):.3f}-"
                f"{max(held):.3f}) | {whole:.3f} | {last:.3f} |"
            )


def plot(records, recipe, path):
    """Prequential accuracy over the last `window` examples, mean over the
    seeds; one panel per batch size, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = group(records)
    sizes = list(dict.fromkeys(b for _, b in cells))
    variants = list(dict.fromkeys(v for v, _ in cells))
    window, change = recipe["window"], phase_change(recipe["stream"])
    fig, panels = plt.subplots(
        1,
        len(sizes),
        figsize=(5.5 * len(sizes), 4.6),
        sharey=True,
        squeeze=False,
    )
    handles = {}
    for panel, b in zip(panels[0], sizes):
        for i, v in enumerate(variants):
            runs = cells.get((v, b))
            if not runs:
                continue
            curve = np.mean([sliding(scores(r), window) for r in runs], 0)
            label = VARIANTS[v][0] if v in VARIANTS else v
            # From the 10th example on: the first few are noise.
            seen = np.arange(1, len(curve) + 1)[9:]
            (handles[label],) = panel.plot(
                seen, curve[9:], color=f"C{i}", lw=1.3
            )
        panel.axvline(change, color="0.4", ls="--", lw=1)
        panel.text(
            change,
            0.02,
            " digits 5-9 appear",
            color="0.3",
            fontsize=8,
            transform=panel.get_xaxis_transform(),
        )
        panel.set_title(f"batch size {b}")
        panel.set_xlabel("examples seen")
        panel.grid(alpha=0.3)
    panels[0][0].set_ylabel(f"accuracy over the last {window} examples")
    panels[0][0].set_ylim(0, 1)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=-(-len(handles) // 2),
        frameon=False,
    )
    scale = recipe["drift_scale"]
    drift = "" if scale == 1 else f", inputs x{scale:g} from then on"
    fig.suptitle(
        f"Digits, prequential (test, then train): {recipe['stream']} "
        f"examples, the first {change} of digits 0-4{drift}; Adam 1e-3; "
        f"mean over seeds {', '.join(map(str, recipe['seeds']))} "
        f"({recipe['backend']})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_all(args):
    total = len(args.batch_sizes) * len(args.variants) * len(args.seeds)
    print(
        f"{total} runs on backend {keras.backend.backend()}: variants "
        f"{', '.join(args.variants)}; batch sizes {args.batch_sizes}; "
        f"stream of {args.stream}; seeds {args.seeds}",
        flush=True,
    )
    if (
        keras.backend.backend() == "torch"
        and "OMP_NUM_THREADS" not in os.environ
    ):
        import torch

        # Steps this small gain nothing from several threads, and lose
        # much when the cores are shared: a training step at batch 4 took
        # 151 ms with PyTorch's default 2 threads on 2 busy cores, 17 ms
        # with 1.
        torch.set_num_threads(1)
    records = []
    for b in args.batch_sizes:
        for variant in args.variants:
            for seed in args.seeds:
                correct, held_out, seconds = run(variant, b, seed, args)
                records.append(
                    {
                        "variant": variant,
                        "batch_size": b,
                        "seed": seed,
                        "held_out_accuracy": held_out,
                        "prequential_accuracy": float(correct.mean()),
                        "seconds": round(seconds, 2),
                        "correct": "".join("01"[int(c)] for c in correct),
                    }
                )
                print(
                    f"[{len(records):3d}/{total}] {variant:19s} batch {b:2d} "
                    f"seed {seed}: held-out {held_out:.3f}, prequential "
                    f"{correct.mean():.3f}, {seconds:.1f} s",
                    flush=True,
                )
    return records


# The arguments a run's records keep, to plot them again.
RECIPE = ("stream", "batch_sizes", "seeds", "window", "drift_scale")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a stream of 120, 1 seed"
    )
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--stream", type=int, default=1400)
    parser.add_argument("--drift-scale", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--out", default="online_learning.png")
    parser.add_argument(
        "--json", default=None, help="write one record per run to this file"
    )
    parser.add_argument(
        "--plot-from",
        metavar="JSON",
        default=None,
        help="train nothing: print the table and write the plot from the "
        "records of an earlier --json run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.stream, args.seeds, args.window = 120, "0", 30
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: {list(VARIANTS)}")

    if args.plot_from:
        with open(args.plot_from) as f:
            data = json.load(f)
        records, recipe = data["results"], data["recipe"]
    else:
        start = time.perf_counter()
        records = train_all(args)
        print(f"\n{len(records)} runs in {time.perf_counter() - start:.0f} s")
        recipe = {key: getattr(args, key) for key in RECIPE}
        recipe["backend"] = keras.backend.backend()

    print_table(records, recipe["window"])
    plot(records, recipe, args.out)
    print(f"\nplot written to {os.path.abspath(args.out)}")
    if args.json and not args.plot_from:
        write_records(args.json, records, recipe)


if __name__ == "__main__":
    main()
