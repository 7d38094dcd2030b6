r"""Small-batch and non-i.i.d. study: BN, BRN, CBN, GN and GN+WS on digits.

Trains the same small CNN (examples/digits_common.py) with
keras_norms.BatchNormalization, BatchRenormalization + RenormWarmup,
CrossIterationBatchNormalization, Keras's GroupNormalization, and
GroupNormalization after keras_norms.WeightStandardization of each linear
layer (GN+WS, the pairing the WS paper recommends for micro-batches), at
several batch sizes and in a non-i.i.d. setting, over several seeds, then
prints a
table (test accuracy mean ± std, training time per epoch) and writes a PNG
plot (`--out`) and, with `--json`, one record per training run.

Every layer gets the same recipe: Adam, the same learning rate and epochs,
`momentum=0.9` for the moving statistics (`renorm_momentum=0.9` for BRN's
too); CBN runs with its defaults otherwise (window 4, no burn-in).

The data is scikit-learn's bundled 8x8 digits. Full digits are too easy for
batch size to matter much, so the task is made harder: only
`--train-samples` (600) training images, and Gaussian pixel noise
(`--noise`, 0.25 of the pixel range) on train and test images. Non-i.i.d.:
every minibatch of `--noniid-batch` (16) images holds only
`--noniid-classes` (2) classes, as in section 4.2 of the Batch Renorm paper
(there: 32 images from 16 classes of ImageNet).

    python examples/small_batch_study.py            # about 10 minutes
    python examples/small_batch_study.py --quick    # under 1 minute

The plot shows test accuracy, mean ± std over the seeds, each panel's y
range fitted to its error bars. Without training, from the records of an
earlier `--json` run: `--plot-from PATH` prints the table and writes the
plot again; `--differences` adds the paired differences behind the claims
(per seed, one layer minus another; mean ± std over the seeds, in points),
`--ablation-from PATH` those of examples/cbn_ablation.py's records:

    python examples/small_batch_study.py --plot-from \
        docs/small_batch_study.json --out docs/small_batch_study.png \
        --differences --ablation-from docs/cbn_ablation.json
"""

import argparse
import json
import os
import time

import keras
import numpy as np
from digits_common import make_model
from digits_common import scaled_warmup
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_norms

LAYERS = ("BN", "BRN", "CBN", "GN", "GN+WS")
# Runs here are a few hundred to 2,400 steps: with Keras's 0.99 the moving
# statistics would stay half-way from their initial values after 76 steps
# (0.99 ** 76 = 0.47), so every layer averages with 0.9.
MOMENTUM = 0.9
GROUPS = 8  # GroupNormalization: 8 groups of the 16, 32 and 64 channels


def load(args, seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=args.train_samples, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    x_train = x_train + rng.normal(0, args.noise, x_train.shape)
    x_test = x_test + rng.normal(0, args.noise, x_test.shape)
    return (
        x_train.astype("float32"),
        x_test.astype("float32"),
        y_train,
        y_test,
    )


def epoch_order(y, batch_size, classes_per_batch, rng):
    """Indices of one epoch. `classes_per_batch=None`: a random shuffle;
    otherwise every batch is filled from that many classes only."""
    if classes_per_batch is None:
        return rng.permutation(len(y))
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in set(y)}
    per_class = batch_size // classes_per_batch
    order = []
    while True:
        alive = [c for c, pool in pools.items() if len(pool) >= per_class]
        if len(alive) < classes_per_batch:
            break
        for c in rng.choice(alive, classes_per_batch, replace=False):
            order += [pools[c].pop() for _ in range(per_class)]
    return np.array(order)


def normalized(kind, cbn_kwargs=None):
    """The layers that replace each bias-free linear layer of the CNN."""

    def layers(linear):
        if kind == "BN":
            return [linear, keras_norms.BatchNormalization(momentum=MOMENTUM)]
        if kind == "BRN":
            return [
                linear,
                keras_norms.BatchRenormalization(
                    momentum=MOMENTUM, renorm_momentum=MOMENTUM
                ),
            ]
        if kind == "GN":
            return [linear, keras.layers.GroupNormalization(groups=GROUPS)]
        if kind == "GN+WS":
            return [
                keras_norms.WeightStandardization(linear),
                keras.layers.GroupNormalization(groups=GROUPS),
            ]
        if kind == "CBN":
            kwargs = dict(momentum=MOMENTUM, **(cbn_kwargs or {}))
            return [
                keras_norms.CrossIterationBatchNormalization(linear, **kwargs)
            ]
        raise ValueError(f"Unknown layer {kind!r}; expected one of {LAYERS}")

    return layers


def run(kind, batch_size, classes_per_batch, seed, args, cbn_kwargs=None):
    """Trains one model; returns its test accuracy and the seconds of fit().

    `cbn_kwargs` may hold `burnin_fraction` (of the run's steps) besides
    CrossIterationBatchNormalization's own arguments."""
    x_train, x_test, y_train, y_test = load(args, seed)
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [
            epoch_order(y_train, batch_size, classes_per_batch, rng)
            for _ in range(args.epochs)
        ]
    )
    steps = -(-len(order) // batch_size)
    cbn_kwargs = dict(cbn_kwargs or {})
    fraction = cbn_kwargs.pop("burnin_fraction", 0.0)
    if fraction:
        cbn_kwargs["burnin_steps"] = int(fraction * steps)
    keras.utils.set_random_seed(seed)
    model = make_model(normalized(kind, cbn_kwargs))
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = []
    if kind == "BRN":
        callbacks.append(scaled_warmup(steps))
    start = time.perf_counter()
    model.fit(
        x_train[order],
        y_train[order],
        batch_size=batch_size,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return accuracy, seconds


# Each layer's colour, marker and legend label, the same in both panels.
STYLES = {
    "BN": ("C0", "o", "BN"),
    "BRN": ("C1", "s", "BRN + warm-up"),
    "CBN": ("C2", "^", "CBN (k=4)"),
    "GN": ("C3", "D", f"GN ({GROUPS} groups)"),
    "GN+WS": ("C4", "v", "GN + WS"),
}


def _fitted_ylim(axes, lows, highs):
    """A y range around the error bars, 10% of their span to spare."""
    low, high = min(lows), max(highs)
    pad = 0.1 * max(high - low, 0.01)
    axes.set_ylim(low - pad, high + pad)


def plot(results, args, path):
    """Test accuracy, mean ± std over the seeds: against the batch size
    (left) and with i.i.d. vs non-i.i.d. minibatches (right).

    `results[layer, batch_size, classes_per_batch]` lists the accuracies
    (one per seed); `args` gives `batch_sizes`, `noniid_batch`,
    `noniid_classes`, `seeds` and the recipe for the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]}
    )
    seeds = len(args.seeds)
    ylabel = f"test accuracy (mean ± std, {seeds} seeds)"
    # Layers side by side around each x, so their error bars stay apart.
    middle = (len(LAYERS) - 1) / 2
    shifts = {kind: (i - middle) for i, kind in enumerate(LAYERS)}
    handles = []

    lows, highs = [], []
    for kind in LAYERS:
        color, marker, label = STYLES[kind]
        sizes = [b for b in args.batch_sizes if (kind, b, None) in results]
        means = np.array([np.mean(results[kind, b, None]) for b in sizes])
        stds = np.array([np.std(results[kind, b, None]) for b in sizes])
        xs = [b * 2 ** (0.06 * shifts[kind]) for b in sizes]
        handle = left.errorbar(
            xs,
            means,
            yerr=stds,
            color=color,
            marker=marker,
            markersize=6,
            capsize=3,
            label=label,
        )
        handles.append(handle)
        lows += list(means - stds)
        highs += list(means + stds)
    left.set_xscale("log", base=2)
    left.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
    left.minorticks_off()
    left.set_xlabel("batch size (i.i.d. minibatches; log scale)")
    left.set_ylabel(ylabel)
    left.set_title("Accuracy vs. batch size")
    left.grid(alpha=0.3)
    _fitted_ylim(left, lows, highs)

    b, k = args.noniid_batch, args.noniid_classes
    settings = ((None, "i.i.d."), (k, f"{k} classes per batch"))
    lows, highs = [], []
    for kind in LAYERS:
        color, marker, label = STYLES[kind]
        cells = [
            (j, results[kind, b, classes])
            for j, (classes, _) in enumerate(settings)
            if (kind, b, classes) in results
        ]
        means = np.array([np.mean(values) for _, values in cells])
        stds = np.array([np.std(values) for _, values in cells])
        right.errorbar(
            [j + 0.08 * shifts[kind] for j, _ in cells],
            means,
            yerr=stds,
            color=color,
            marker=marker,
            markersize=6,
            capsize=3,
            label=label,
        )
        lows += list(means - stds)
        highs += list(means + stds)
    right.set_xticks(range(len(settings)), [name for _, name in settings])
    right.set_xlim(-0.5, len(settings) - 0.5)
    right.set_xlabel(f"composition of each minibatch of {b}")
    right.set_ylabel(ylabel)
    right.set_title(f"Non-i.i.d. minibatches (batch size {b})")
    right.grid(alpha=0.3, axis="y")
    _fitted_ylim(right, lows, highs)

    fig.legend(
        handles,
        [STYLES[kind][2] for kind in LAYERS],
        loc="lower center",
        ncol=len(LAYERS),
        frameon=False,
    )
    fig.suptitle(
        f"Digits, {args.train_samples} noisy training images, "
        f"{args.epochs} epochs, Adam {args.learning_rate}: test accuracy, "
        f"mean ± std over seeds {', '.join(map(str, args.seeds))}"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_records(path, records, recipe=None):
    """Writes `{"results": records}`, one record per training run, with
    `"recipe"` (the run's arguments, for `--plot-from`) when given."""
    data = {"results": records}
    if recipe is not None:
        data["recipe"] = recipe
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nresults written to {os.path.abspath(path)}")


# The arguments a study's records keep, to plot them again.
RECIPE = (
    "batch_sizes",
    "seeds",
    "epochs",
    "train_samples",
    "noise",
    "learning_rate",
    "noniid_batch",
    "noniid_classes",
)


def read_records(path, args):
    """The records of `--json PATH`; sets `args` to the recipe they were
    made with (records written before the recipe was saved: batch sizes,
    seeds and the non-i.i.d. setting from the records, the rest from the
    command line)."""
    with open(path) as f:
        data = json.load(f)
    records = data["results"]
    recipe = data.get("recipe")
    if recipe is None:
        print(
            f"{path} holds no recipe: the title takes --epochs, "
            "--train-samples and --learning-rate from the command line"
        )
        noniid = [r for r in records if r["classes_per_batch"] is not None]
        recipe = {
            "batch_sizes": sorted(
                {
                    r["batch_size"]
                    for r in records
                    if r["classes_per_batch"] is None
                }
            ),
            "seeds": sorted({r["seed"] for r in records}),
        }
        if noniid:
            recipe["noniid_batch"] = noniid[0]["batch_size"]
            recipe["noniid_classes"] = noniid[0]["classes_per_batch"]
    for key in RECIPE:
        if key in recipe:
            setattr(args, key, recipe[key])
    return records


def settings_of(records):
    """The `(batch_size, classes_per_batch)` settings, in the records'
    order."""
    settings = []
    for r in records:
        setting = (r["batch_size"], r["classes_per_batch"])
        if setting not in settings:
            settings.append(setting)
    return settings


def print_table(settings, records, epochs):
    """Test accuracy mean ± std over the seeds (and seconds per epoch), one
    row per setting, one column per layer."""
    results, times = {}, {}
    for r in records:
        key = (r["layer"], r["batch_size"], r["classes_per_batch"])
        results.setdefault(key, []).append(r["accuracy"])
        times.setdefault(key, []).append(r["seconds"] / epochs)
    print()
    print("| setting | " + " | ".join(LAYERS) + " |")
    print("| --- |" + " --- |" * len(LAYERS))
    for batch_size, classes in settings:
        name = f"batch {batch_size}" + (
            "" if classes is None else f", {classes} classes/batch"
        )
        cells = []
        for kind in LAYERS:
            acc = results[kind, batch_size, classes]
            sec = np.mean(times[kind, batch_size, classes])
            cells.append(
                f"{np.mean(acc):.3f} ± {np.std(acc):.3f} ({sec:.1f} s/ep)"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


def _paired(first, second):
    """Per seed, `first - second` in points (accuracy x 100), for the
    seeds both `{seed: accuracy}` hold; `None` when they share none."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    return seeds, [100.0 * (first[s] - second[s]) for s in seeds]


def _difference_row(pair, setting, paired):
    seeds, diffs = paired
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    above = sum(d > 0 for d in diffs)
    return (
        f"| {pair} | {setting} | {len(seeds)} | "
        f"{np.mean(diffs):+.1f} ± {np.std(diffs):.1f} | {per_seed} | "
        f"{above} of {len(seeds)} |"
    )


def print_differences(records, ablation=None):
    """The study's claims as paired differences: per seed (same data,
    split, noise and initialization), one layer's accuracy minus
    another's, then mean ± std over the seeds, in points. `ablation`: the
    records of examples/cbn_ablation.py --json, for its pairs."""
    acc = {}
    for r in records:
        key = (r["layer"], r["batch_size"], r["classes_per_batch"])
        acc.setdefault(key, {})[r["seed"]] = r["accuracy"]
    settings = settings_of(records)
    iid = [b for b, classes in settings if classes is None]
    noniid = [(b, k) for b, k in settings if k is not None]

    def name(batch_size, classes):
        if classes is None:
            return f"batch {batch_size}"
        return f"batch {batch_size}, {classes} classes each"

    header = (
        "| pair | minibatches | seeds | mean ± std (points) | per seed "
        "(points) | seeds where the first is higher |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    print("\nPaired differences (same seed), in points of test accuracy;")
    print("std over the seeds as in the table (NumPy's, ddof=0):\n")
    print(header)
    # (label, setting, first cell, second cell) of each paired difference.
    pairs = [
        (f"{a} - {b}", name(*setting), (a, *setting), (b, *setting))
        for a, b in (
            ("BRN", "BN"),
            ("CBN", "BN"),
            ("GN", "BN"),
            ("CBN", "GN"),
            ("GN+WS", "GN"),
            ("GN+WS", "BN"),
            ("CBN", "GN+WS"),
        )
        for setting in [(size, None) for size in iid] + noniid
    ]
    pairs += [
        (
            f"{kind}: {classes} classes - i.i.d.",
            f"batch {size}",
            (kind, size, classes),
            (kind, size, None),
        )
        for size, classes in noniid
        for kind in LAYERS
    ]
    if len(iid) > 1:
        small, large = min(iid), max(iid)
        pairs += [
            (
                f"{kind}: batch {small} - batch {large}",
                "i.i.d.",
                (kind, small, None),
                (kind, large, None),
            )
            for kind in LAYERS
        ]
        # The WS paper's claim: GN+WS at micro-batches matches or beats BN
        # at large batches.
        pairs += [
            (
                f"GN+WS batch {small} - BN batch {large}",
                "i.i.d.",
                ("GN+WS", small, None),
                ("BN", large, None),
            )
        ]
    for label, setting, first, second in pairs:
        paired = _paired(acc.get(first, {}), acc.get(second, {}))
        if paired:
            print(_difference_row(label, setting, paired))
    if not ablation:
        return
    cbn = {}
    for r in ablation:
        key = (r["variant"], r["burnin_fraction"], r["batch_size"])
        cbn.setdefault(key, {})[r["seed"]] = r["accuracy"]
    pairs = [
        ("default", 0.0, 'negative_variance="exclude"', 0.0),
        ("default", 0.0, "compensation=False", 0.0),
        ("default", 0.0, "compensation_gradient=False", 0.0),
        ("default", 0.0, "window_size=1 (BN)", 0.0),
        ("default", 0.1, "default", 0.0),
        (
            "compensation_gradient=False",
            0.1,
            "compensation_gradient=False",
            0.0,
        ),
    ]
    print("\nCBN ablation, paired the same way:\n")
    print(header)
    for size in sorted({r["batch_size"] for r in ablation}):
        for a, fa, b, fb in pairs:
            paired = _paired(
                cbn.get((a, fa, size), {}), cbn.get((b, fb, size), {})
            )
            if paired:
                pair = f"{a} (burn-in {fa:.0%}) - {b} (burn-in {fb:.0%})"
                print(_difference_row(pair, f"batch {size}", paired))


def add_recipe_arguments(parser):
    """The data and training recipe, shared with examples/cbn_ablation.py."""
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=600)
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument("--learning-rate", type=float, default=3e-3)


def train_all(settings, args):
    """Trains every layer in every setting with every seed; returns one
    record per run."""
    total = len(settings) * len(LAYERS) * len(args.seeds)
    print(
        f"{total} runs on backend {keras.backend.backend()}: layers "
        f"{', '.join(LAYERS)}; batch sizes {args.batch_sizes}; non-i.i.d. "
        f"batches of {args.noniid_batch} from {args.noniid_classes} "
        f"classes; seeds {args.seeds}",
        flush=True,
    )
    records = []
    for batch_size, classes in settings:
        for kind in LAYERS:
            for seed in args.seeds:
                accuracy, seconds = run(kind, batch_size, classes, seed, args)
                per_epoch = seconds / args.epochs
                records.append(
                    {
                        "layer": kind,
                        "batch_size": batch_size,
                        "classes_per_batch": classes,
                        "seed": seed,
                        "accuracy": float(accuracy),
                        "seconds": round(seconds, 2),
                    }
                )
                setting = "iid" if classes is None else f"{classes} cls"
                print(
                    f"[{len(records):3d}/{total}] {kind:5s} batch "
                    f"{batch_size:3d} {setting:6s} seed {seed}: accuracy "
                    f"{accuracy:.3f}, {per_epoch:.2f} s/epoch",
                    flush=True,
                )
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 batch sizes, 1 seed, fewer epochs",
    )
    parser.add_argument("--batch-sizes", default="2,4,8,16,32")
    add_recipe_arguments(parser)
    parser.add_argument("--noniid-batch", type=int, default=16)
    parser.add_argument("--noniid-classes", type=int, default=2)
    parser.add_argument("--out", default="small_batch_study.png")
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
    parser.add_argument(
        "--differences",
        action="store_true",
        help="also print the paired differences (same seed) behind the "
        "study's claims, mean ± std over the seeds, in points",
    )
    parser.add_argument(
        "--ablation-from",
        metavar="JSON",
        default=None,
        help="with --differences: also the CBN ablation's pairs, from the "
        "records of examples/cbn_ablation.py --json",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.seeds, args.epochs = "4,16", "0", 2
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]

    if args.plot_from:
        records = read_records(args.plot_from, args)
        settings = settings_of(records)
    else:
        if args.noniid_batch % args.noniid_classes:
            parser.error(
                "--noniid-batch must be a multiple of --noniid-classes"
            )
        settings = [(b, None) for b in args.batch_sizes]
        iid_batch = (args.noniid_batch, None)
        if iid_batch not in settings:
            settings.append(iid_batch)
        settings.append((args.noniid_batch, args.noniid_classes))
        records = train_all(settings, args)

    results = print_table(settings, records, args.epochs)
    plot(results, args, args.out)
    print(f"\nplot written to {os.path.abspath(args.out)}")
    if args.json and not args.plot_from:
        write_records(
            args.json, records, {key: getattr(args, key) for key in RECIPE}
        )
    if args.differences:
        ablation = None
        if args.ablation_from:
            with open(args.ablation_from) as f:
                ablation = json.load(f)["results"]
        print_differences(records, ablation)


if __name__ == "__main__":
    main()
