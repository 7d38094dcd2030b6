"""keras_norms against Keras's own layers: train-step and inference cost.

For each case (input shape, mask or not, jit_compile off/on) it builds one
small model per candidate; for each comparison it warms the two models up,
then times them alternately (A B A B ...), so that both see the same
machine state, and reports the median time of a compiled train step
(forward, backward, state updates, SGD update) or of an inference step, as
the ratio candidate / baseline. Each comparison is timed in `--repeats`
blocks of `--rounds` alternations; the ratio printed is the median of the
blocks' ratios, with their range, which shows the run-to-run noise. Inputs
are backend tensors made once. Peak memory is reported where the backend
exposes it (not on CPU).

    python benchmarks/run.py                      # TensorFlow, full sizes
    KERAS_BACKEND=jax python benchmarks/run.py --json results.json
    python benchmarks/run.py --tiny               # seconds; used by tests

Comparisons (ratio = candidate / baseline):

- keras_norms BN vs keras BN (targets: <= 0.8 on 4-D NHWC, <= 1.0 else)
- keras_norms BRN vs keras BN(renorm=True) (<= 1.0) and vs keras_norms BN
  (<= 1.1)
- Conv2D + CBN(window_size=4) vs Conv2D + keras BN (<= 1.5)
- inference of keras_norms BN, BRN and CBN vs keras BN (within 5%)
"""

import argparse
import json
import os
import platform
import time

import keras
import numpy as np

import keras_norms

FULL = {
    "2d": ((256, 1024), False),
    "3d": ((32, 100, 256), False),
    "3d_mask": ((32, 100, 256), True),
    "4d_nhwc": ((32, 32, 32, 64), False),
}
TINY = {
    "2d": ((8, 16), False),
    "3d": ((4, 5, 8), False),
    "3d_mask": ((4, 5, 8), True),
    "4d_nhwc": ((2, 6, 6, 8), False),
}


def candidates(case):
    """name -> function building the layers between input and output."""
    clipping = {"rmin": 1 / 3.0, "rmax": 3.0, "dmax": 5.0}
    out = {
        "keras_bn": lambda: [keras.layers.BatchNormalization()],
        "kn_bn": lambda: [keras_norms.BatchNormalization()],
        "keras_renorm": lambda: [
            keras.layers.BatchNormalization(
                renorm=True, renorm_clipping=clipping
            )
        ],
        "kn_brn": lambda: [keras_norms.BatchRenormalization()],
    }
    if case == "4d_nhwc":

        def conv():
            return keras.layers.Conv2D(64, 3, padding="same", use_bias=False)

        out["conv_keras_bn"] = lambda: [
            conv(),
            keras.layers.BatchNormalization(),
        ]
        out["conv_kn_cbn"] = lambda: [keras_norms.CBN(conv(), window_size=4)]
    return out


def mean_output(y_true, y_pred):
    """The cheapest loss that reaches every output: it keeps the step's
    time on the normalization rather than on the loss."""
    del y_true
    return keras.ops.mean(y_pred)


class InputScale(keras.layers.Layer):
    """`inputs * w` with one trainable scalar `w` (1 at the start): placed
    before a normalization layer, it makes the train step compute that
    layer's input gradient too, as in a network where a trainable layer
    feeds the normalization (`--input-gradient`)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(), initializer="ones", name="w")

    def call(self, inputs):
        return inputs * self.w


def build(make, shape, masked, jit_compile, input_gradient=False):
    x = keras.Input(shape[1:])
    inputs = [x]
    mask = None
    if masked:
        mask = keras.Input(shape[1:-1], dtype="bool")
        inputs.append(mask)
    layers = make()
    h = x
    if input_gradient:
        h = InputScale()(h)
    for layer in layers:
        h = layer(h, mask=mask) if mask is not None else layer(h)
    model = keras.Model(inputs, h)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=mean_output,
        jit_compile=jit_compile,
    )
    return model


def time_alternating(fns, rounds, warmup):
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def run_case(
    case, shape, masked, jit_compile, rounds, warmup, repeats, input_gradient
):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=shape).astype("float32")
    inputs = [x]
    if masked:
        lengths = rng.integers(1, shape[1] + 1, size=shape[0])
        inputs.append(np.arange(shape[1])[None, :] < lengths[:, None])
    models = {
        # (a Conv2D before the normalization already needs its gradient)
        name: build(
            make,
            shape,
            masked,
            jit_compile,
            input_gradient and not name.startswith("conv_"),
        )
        for name, make in candidates(case).items()
    }
    targets = {}
    for name, model in models.items():
        out_shape = model.output.shape
        targets[name] = np.zeros((shape[0],) + tuple(out_shape[1:]), "float32")
    # Backend tensors, converted once: a step should not time the copy of
    # NumPy data into the framework (a tf.data or DataLoader pipeline
    # overlaps it with the previous step).
    inputs = [keras.ops.convert_to_tensor(a) for a in inputs]
    targets = {k: keras.ops.convert_to_tensor(t) for k, t in targets.items()}
    steps = {
        "train": {
            name: (lambda m=m, t=targets[name]: m.train_on_batch(inputs, t))
            for name, m in models.items()
        },
        "infer": {
            name: (lambda m=m: m.predict_on_batch(inputs))
            for name, m in models.items()
        },
    }
    # Each comparison alternates its own two models (A B A B ...): with
    # more models in the rotation, each step would also pay for the cache
    # and allocator state the others leave behind.
    blocks = {}
    for label, kind, cand, base, _ in RATIOS:
        if cand in models:
            pair = {name: steps[kind][name] for name in (cand, base)}
            blocks[label] = [
                time_alternating(pair, rounds, warmup if i == 0 else 0)
                for i in range(repeats)
            ]
    return blocks


RATIOS = [
    # (label, candidate, baseline, target)
    ("train kn_bn / keras_bn", "train", "kn_bn", "keras_bn", None),
    ("train kn_brn / keras_renorm", "train", "kn_brn", "keras_renorm", 1.0),
    ("train kn_brn / kn_bn", "train", "kn_brn", "kn_bn", 1.1),
    ("train conv+cbn / conv+bn", "train", "conv_kn_cbn", "conv_keras_bn", 1.3),
    ("infer kn_bn / keras_bn", "infer", "kn_bn", "keras_bn", 1.05),
    ("infer kn_brn / keras_bn", "infer", "kn_brn", "keras_bn", 1.05),
    ("infer conv+cbn / conv+bn", "infer", "conv_kn_cbn", "conv_keras_bn", 1.05),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=None, help="blocks per comparison"
    )
    parser.add_argument("--cases", default=",".join(FULL))
    parser.add_argument("--jit", default="off,on", help="off, on or both")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument(
        "--input-gradient",
        action="store_true",
        help="a trainable scalar multiply before each normalization layer, "
        "so that train steps also compute its input gradient",
    )
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    rounds = args.rounds or (3 if args.tiny else 40)
    repeats = args.repeats or (1 if args.tiny else 3)
    warmup = 2 if args.tiny else 5
    results = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "peak_memory": "not exposed by the backend on CPU",
        "rounds": rounds,
        "repeats": repeats,
        "input_gradient": args.input_gradient,
        "cases": [],
    }
    print(
        f"backend {results['backend']}, keras {results['keras']}, "
        f"{results['machine']}, {repeats} blocks of {rounds} alternating "
        "steps: median of the blocks' ratios [range]"
        + (", with input gradients" if args.input_gradient else "")
    )
    header = (
        f"{'case':10s} {'jit':4s} {'comparison':30s} {'ratio':>6s} "
        f"{'[range]':13s} target"
    )
    print(header)
    for case in args.cases.split(","):
        shape, masked = sizes[case]
        for jit in args.jit.split(","):
            blocks = run_case(
                case,
                shape,
                masked,
                jit == "on",
                rounds,
                warmup,
                repeats,
                args.input_gradient,
            )
            entry = {
                "case": case,
                "shape": list(shape),
                "mask": masked,
                "jit_compile": jit == "on",
                "ratios": {},
            }
            for label, kind, cand, base, target in RATIOS:
                if label not in blocks:
                    continue
                if label == "train kn_bn / keras_bn":
                    target = 0.8 if case == "4d_nhwc" else 1.0
                ratios = [b[cand] / b[base] for b in blocks[label]]
                ratio = float(np.median(ratios))
                entry["ratios"][label] = {
                    "ratio": ratio,
                    "block_ratios": ratios,
                    "target": target,
                    "seconds": {
                        name: float(np.median([b[name] for b in blocks[label]]))
                        for name in (cand, base)
                    },
                }
                mark = "ok" if ratio <= target else "MISSED"
                spread = f"[{min(ratios):.2f}, {max(ratios):.2f}]"
                print(
                    f"{case:10s} {jit:4s} {label:30s} {ratio:6.2f} "
                    f"{spread:13s} <= {target:.2f} {mark}"
                )
            results["cases"].append(entry)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
