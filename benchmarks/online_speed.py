"""Online learning: the cost of a batch-1 train step against Keras's BN.

Target (issue 31): a batch-1 train step of each layer costs at most 1.1x
that of Keras's BatchNormalization on the same model, where the per-step
overhead dominates. For each normalization it builds the MLP

    Input(64) -> [Dense(64, no bias) -> norm -> ReLU] x 2 -> Dense(10)

(Adam, sparse categorical crossentropy; CBN wraps each Dense, window 8),
with norm = Keras's BatchNormalization (the baseline), keras_norms
BatchNormalization, BatchRenormalization and
CrossIterationBatchNormalization, and times its train step at batch size 1
(and 4, `--batches`) against the baseline's, alternating the two models
(A B A B ..., run.py's `time_alternating`) after warm-up, in `--repeats`
blocks of `--rounds` alternations; it prints the median of the blocks'
ratios candidate / Keras BN and their range, the run-to-run noise. Two
reference pairs carry no target: Keras's own renormalization
(`BatchNormalization(renorm=True)`, BRN's clipping) against Keras's BN,
what renormalization itself costs there, and BRN against it.

The step timed is the compiled train step as `fit()` runs it (`--via
train_function`, the default): Keras's own `model.train_function`, made by
`make_train_function`, called with one batch of backend tensors made once,
as `fit()`'s loop calls it, without the data adapter, callbacks or
`train_on_batch`'s extras. Per backend:

- TensorFlow: `train_function(iter([(x, y)]))`, which calls the
  `tf.function` `one_step_on_data` once; warmed up at two batch sizes, so
  that `reduce_retracing` has relaxed its batch dimension to `None`, as in
  `fit()`'s trace (a `tf.data` batch of unknown size).
- JAX: `logs, state = train_function(state, iter([(x, y)]))`, the jitted
  step on the state `fit()` threads through its steps, waiting for the
  logs (JAX dispatches asynchronously).
- PyTorch: `train_function([(x, y)])` (eager unless `--jit on`).

`--via train_on_batch` times `model.train_on_batch(x, y)` instead, which
adds the same per-call Python work to both models (resetting the metrics,
converting the logs; on JAX collecting and reattaching the model's state)
and so draws the ratios towards 1.

    python benchmarks/online_speed.py                 # TensorFlow
    KERAS_BACKEND=jax python benchmarks/online_speed.py --json out.json
    python benchmarks/online_speed.py --tiny          # seconds; used by tests

`--jit` defaults to Keras's default on a CPU (`jit_compile="auto"`: XLA on
JAX, none on TensorFlow and PyTorch). On a machine busy with other work,
PyTorch's intra-op threads wait for each other: a batch-1 step took 20 to
24 ms for every model on 2 shared cores, against 4.5 to 8 ms with
`OMP_NUM_THREADS=1`, whose ratios show the layers' own cost.
"""

import argparse
import json
import os
import sys

import keras
import numpy as np

import keras_norms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import DEFAULT_REPEATS  # noqa: E402
from run import KERAS_RENORM_CLIPPING  # noqa: E402
from run import run_header  # noqa: E402
from run import time_alternating  # noqa: E402
from run import verdict  # noqa: E402

TARGET = 1.1  # each candidate's batch-1 train step / Keras BN's
BASELINE = "keras_bn"
CANDIDATES = ("kn_bn", "kn_brn", "kn_cbn")
# (candidate, baseline) pairs measured for reference, without a target.
REFERENCES = (("keras_renorm", BASELINE), ("kn_brn", "keras_renorm"))


def block(kind, units):
    """The layers of one `Dense -> norm` block (before its ReLU)."""
    dense = keras.layers.Dense(units, use_bias=False)
    if kind == "keras_bn":
        return [dense, keras.layers.BatchNormalization()]
    if kind == "kn_bn":
        return [dense, keras_norms.BatchNormalization()]
    if kind == "kn_brn":
        return [dense, keras_norms.BatchRenormalization()]
    if kind == "keras_renorm":
        return [
            dense,
            keras.layers.BatchNormalization(
                renorm=True, renorm_clipping=KERAS_RENORM_CLIPPING
            ),
        ]
    if kind == "kn_cbn":
        return [
            keras_norms.CrossIterationBatchNormalization(dense, window_size=8)
        ]
    raise ValueError(kind)


def make_model(kind, features, units, classes, jit_compile):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((features,))]
    for _ in range(2):
        layers += block(kind, units) + [keras.layers.ReLU()]
    layers.append(keras.layers.Dense(classes))
    model = keras.Sequential(layers)
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )
    return model


def batch(size, features, classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, features)).astype("float32")
    y = rng.integers(0, classes, size).astype("int32")
    return x, y


def train_step(model, x, y, via, other):
    """A zero-argument function running one train step of `model` on the
    backend tensors `x`, `y`, after warm-up; `other` is a batch of another
    size (TensorFlow's warm-up, see the module docstring)."""
    backend = keras.backend.backend()
    # Builds the model's and the optimizer's variables and the train
    # function (on JAX, one compilation per batch shape: `other` only on
    # TensorFlow).
    if backend == "tensorflow":
        model.train_on_batch(*other)
    if via == "train_on_batch" or backend != "tensorflow":
        model.train_on_batch(x, y)
    if via == "train_on_batch":
        return lambda: model.train_on_batch(x, y)
    model.make_train_function()
    function = model.train_function
    if backend == "tensorflow":
        # `fit()`'s batches are `(x, y)` pairs (`train_on_batch` passes
        # `(x, y, None)`, another trace): a second batch size makes
        # `reduce_retracing` trace them with a `None` batch dimension. As
        # in `fit()`, that trace comes before any batch of one value per
        # feature, so the layers' check for one (and their warning) is in
        # the step timed.
        function(iter([other]))
        function(iter([(x, y)]))
    if backend == "jax":
        import jax

        state = [
            (
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                [v.value for v in model.optimizer.variables],
                [v.value for v in model.metrics_variables],
            )
        ]

        def step():
            logs, state[0] = function(state[0], iter([(x, y)]))
            jax.block_until_ready(logs)

        return step
    if backend == "torch":
        return lambda: function([(x, y)])
    return lambda: function(iter([(x, y)]))


def run_batch(size, args, sizes, jit_compile, rounds, repeats, warmup):
    features, units, classes = sizes
    x, y = batch(size, features, classes, seed=size)
    other = batch(size + 1, features, classes, seed=size + 1)
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    other = tuple(keras.ops.convert_to_tensor(a) for a in other)
    steps = {}
    for kind in (BASELINE, "keras_renorm") + CANDIDATES:
        model = make_model(kind, features, units, classes, jit_compile)
        steps[kind] = train_step(model, x, y, args.via, other)
    out = {}
    pairs = [(cand, BASELINE) for cand in CANDIDATES] + list(REFERENCES)
    for cand, base in pairs:
        pair = {cand: steps[cand], base: steps[base]}
        blocks = [
            time_alternating(pair, rounds, warmup if i == 0 else 0)
            for i in range(repeats)
        ]
        ratios = [b[cand] / b[base] for b in blocks]
        ratio = float(np.median(ratios))
        # The target is for batch 1 and the candidates against Keras's BN;
        # other sizes and the reference pairs are for comparison.
        measured = cand in CANDIDATES and base == BASELINE
        target = TARGET if size == 1 and measured else None
        mark = "-" if target is None else verdict(ratio, ratios, target)
        out[f"{cand} / {base}"] = {
            "ratio": ratio,
            "block_ratios": ratios,
            "target": target,
            "verdict": mark,
            "seconds": {
                name: float(np.median([b[name] for b in blocks]))
                for name in (cand, base)
            },
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="blocks per comparison (default: 5; 9 on JAX)",
    )
    parser.add_argument(
        "--via",
        choices=("train_function", "train_on_batch"),
        default="train_function",
        help="what a step calls (see the module docstring)",
    )
    parser.add_argument(
        "--jit",
        choices=("auto", "on", "off"),
        default="auto",
        help="jit_compile (default: Keras's default, 'auto')",
    )
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    backend = keras.backend.backend()
    sizes = (8, 8, 3) if args.tiny else (64, 64, 10)
    rounds = args.rounds or (3 if args.tiny else 200)
    repeats = args.repeats or (1 if args.tiny else DEFAULT_REPEATS[backend])
    warmup = 2 if args.tiny else 20
    jit_compile = {"auto": "auto", "on": True, "off": False}[args.jit]
    results = {
        **run_header(rounds, repeats),
        "via": args.via,
        "jit": args.jit,
        "model": "Input({0}) -> [Dense({1}, no bias) -> norm -> ReLU] x 2 "
        "-> Dense({2})".format(*sizes),
        "batches": {},
    }
    print(
        f"backend {backend} {results['framework']}, keras "
        f"{results['keras']}, {results['machine']}, jit_compile "
        f"{args.jit}, step via {args.via}; {repeats} blocks of {rounds} "
        "alternating steps: median of the blocks' ratios [range]"
    )
    print(
        f"{'batch':5s} {'comparison':20s} {'ratio':>6s} {'[range]':13s} "
        f"{'ms cand':>8s} {'ms base':>8s} target"
    )
    for size in (int(b) for b in args.batches.split(",")):
        out = run_batch(size, args, sizes, jit_compile, rounds, repeats, warmup)
        results["batches"][str(size)] = out
        for label, r in out.items():
            low, high = min(r["block_ratios"]), max(r["block_ratios"])
            cand, base = label.split(" / ")
            print(
                f"{size:<5d} {label:20s} {r['ratio']:6.2f} "
                f"{f'[{low:.2f}, {high:.2f}]':13s} "
                f"{1e3 * r['seconds'][cand]:8.3f} "
                f"{1e3 * r['seconds'][base]:8.3f} "
                + (f"<= {r['target']:.2f} " if r["target"] else "")
                + r["verdict"]
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
