"""keras_norms against Keras's own layers: train-step and inference cost.

For each case (input shape, mask or not, jit_compile off/on) it builds one
small model per candidate (input -> layer, MSE loss against zeros, SGD);
for each comparison it warms the two models up, then times them
alternately (A B A B ...), so that both see the same machine state, and
reports the median time of a compiled train step (forward, backward, state
updates, SGD update) or of an inference step, as the ratio candidate /
baseline. Each comparison is timed in `--repeats` blocks of `--rounds`
alternations; the ratio printed is the median of the blocks' ratios, with
their range, which shows the run-to-run noise. Inputs are backend tensors
made once. On JAX it also reports each train step's scratch memory (XLA's
memory analysis of the compiled step); no backend exposes a peak of native
allocations on CPU.

    python benchmarks/run.py                      # TensorFlow, full sizes
    KERAS_BACKEND=jax python benchmarks/run.py --json results.json
    python benchmarks/run.py --backends tensorflow,jax,torch   # one table
    python benchmarks/run.py --tiny               # seconds; used by tests
    python benchmarks/run.py --shape 4d_nhwc=64x56x56x64   # another size

`--jit` defaults to Keras's default per backend on a CPU: XLA on JAX,
none on PyTorch; TensorFlow runs both. Comparisons (ratio = candidate /
baseline) and their targets (see `target`):

- keras_norms BN vs keras BN (<= 0.8 on 4-D with TensorFlow, <= 1.0 else)
- keras_norms BRN vs keras BN(renorm=True) (<= 1.0) and vs keras_norms BN
  (<= 1.1)
- Conv2D + CBN(window_size=4) vs Conv2D + keras BN (<= 1.3 on TensorFlow
  without XLA, <= 1.5 else)
- inference of keras_norms BN vs keras BN, BRN vs keras renorm, CBN vs
  keras BN (<= 1.0), and BRN vs keras BN (within 5%)
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


# Keras's renormalization clipped as BatchRenormalization's defaults.
KERAS_RENORM_CLIPPING = {"rmin": 1 / 3.0, "rmax": 3.0, "dmax": 5.0}


def candidates(case):
    """name -> function building the layers between input and output."""
    clipping = KERAS_RENORM_CLIPPING
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


def build(make, shape, masked, jit_compile, input_gradient=False, loss="mse"):
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
        loss=mean_output if loss == "mean" else "mse",
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
    case,
    shape,
    masked,
    jit_compile,
    rounds,
    warmup,
    repeats,
    input_gradient,
    loss="mse",
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
            loss,
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
    for label, kind, cand, base in RATIOS:
        if cand in models:
            pair = {name: steps[kind][name] for name in (cand, base)}
            blocks[label] = [
                time_alternating(pair, rounds, warmup if i == 0 else 0)
                for i in range(repeats)
            ]
    memory = None
    if keras.backend.backend() == "jax" and jit_compile:
        memory = {
            name: compiled_temp_bytes(model, inputs, targets[name])
            for name, model in models.items()
        }
    return blocks, memory


RATIOS = [
    # (label, kind, candidate, baseline)
    ("train kn_bn / keras_bn", "train", "kn_bn", "keras_bn"),
    ("train kn_brn / keras_renorm", "train", "kn_brn", "keras_renorm"),
    ("train kn_brn / kn_bn", "train", "kn_brn", "kn_bn"),
    ("train conv+cbn / conv+bn", "train", "conv_kn_cbn", "conv_keras_bn"),
    ("infer kn_bn / keras_bn", "infer", "kn_bn", "keras_bn"),
    ("infer kn_brn / keras_renorm", "infer", "kn_brn", "keras_renorm"),
    ("infer kn_brn / keras_bn", "infer", "kn_brn", "keras_bn"),
    ("infer conv+cbn / conv+bn", "infer", "conv_kn_cbn", "conv_keras_bn"),
]

# Keras's defaults on a CPU: XLA on JAX, none on PyTorch and TensorFlow
# (the README's TensorFlow table shows both).
DEFAULT_JIT = {"tensorflow": "off,on", "jax": "on", "torch": "off"}
# Blocks per comparison: JAX's step-to-step spread on a CPU is wide (block
# ratios of one comparison spread over 0.76-1.36 for 0.3 ms inference
# steps), so it gets more.
DEFAULT_REPEATS = {"tensorflow": 5, "jax": 9, "torch": 5}


def target(label, case, jit_compile, backend):
    """The target of a ratio (the issues'): BN <= 0.8x Keras's on 4-D with
    TensorFlow and <= 1.0x elsewhere, BRN <= 1.0x Keras's renorm and <=
    1.1x BN, Conv2D+CBN <= 1.3x Conv2D+BN on TensorFlow without XLA and
    <= 1.5x elsewhere, inference <= 1.0x (BRN against Keras's BN: within
    5%)."""
    if label == "train kn_bn / keras_bn":
        return 0.8 if backend == "tensorflow" and case == "4d_nhwc" else 1.0
    if label == "train kn_brn / kn_bn":
        return 1.1
    if label == "train conv+cbn / conv+bn":
        return 1.3 if backend == "tensorflow" and not jit_compile else 1.5
    if label == "infer kn_brn / keras_bn":
        return 1.05
    return 1.0


def verdict(ratio, block_ratios, target):
    """ "ok" at or under the target, "noise" when the median misses it but
    a block meets it (the blocks' range is the run-to-run noise), else
    "MISSED"."""
    if ratio <= target:
        return "ok"
    return "noise" if min(block_ratios) <= target else "MISSED"


def compiled_temp_bytes(model, inputs, target_values):
    """The scratch memory of `model`'s compiled train step, in bytes, beyond
    its arguments and outputs (XLA's memory analysis; JAX only). No backend
    exposes a CPU allocation peak: TensorFlow's memory info reports 0 on
    CPU, PyTorch's is CUDA-only, and `tracemalloc` sees Python's
    allocations, not the frameworks' native ones."""
    import jax

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    x = tuple(inputs) if len(inputs) > 1 else inputs[0]
    lowered = jax.jit(model.train_step).lower(state, (x, target_values))
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="blocks per comparison (default: 5; 9 on JAX, whose step "
        "times spread widely on a CPU)",
    )
    parser.add_argument("--cases", default=",".join(FULL))
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="CASE=DIMS",
        help="another input shape for a case, e.g. 4d_nhwc=64x56x56x64 "
        "(repeatable; the case keeps its mask)",
    )
    parser.add_argument(
        "--jit",
        default=None,
        help="off, on or both (default: Keras's default per backend on a "
        "CPU; TensorFlow both)",
    )
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument(
        "--input-gradient",
        action="store_true",
        help="a trainable scalar multiply before each normalization layer, "
        "so that train steps also compute its input gradient",
    )
    parser.add_argument(
        "--loss",
        choices=("mse", "mean"),
        default="mse",
        help="mse (against zeros; the default) or mean(y), whose constant "
        "gradient lets a compiler skip the normalized output in the train "
        "step",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends, each run in its own process, then "
        "one table for all (e.g. tensorflow,jax,torch)",
    )
    args = parser.parse_args(argv)
    if args.backends:
        return run_backends(args, argv)
    sizes = with_shapes(TINY if args.tiny else FULL, args.shape, parser)
    rounds = args.rounds or (3 if args.tiny else 40)
    backend = keras.backend.backend()
    repeats = args.repeats or (1 if args.tiny else DEFAULT_REPEATS[backend])
    warmup = 2 if args.tiny else 5
    results = {
        **run_header(rounds, repeats),
        "loss": args.loss,
        "input_gradient": args.input_gradient,
        "cases": [],
    }
    print(
        f"backend {backend} {results['framework']}, keras "
        f"{results['keras']}, {results['machine']}, loss {args.loss}, "
        f"{repeats} blocks of {rounds} alternating steps: median of the "
        "blocks' ratios [range]"
        + (", with input gradients" if args.input_gradient else "")
    )
    print(
        f"{'case':10s} {'jit':4s} {'comparison':30s} {'ratio':>6s} "
        f"{'[range]':13s} target"
    )
    for case in args.cases.split(","):
        shape, masked = sizes[case]
        for jit in (args.jit or DEFAULT_JIT[backend]).split(","):
            jit_compile = jit == "on"
            blocks, memory = run_case(
                case,
                shape,
                masked,
                jit_compile,
                rounds,
                warmup,
                repeats,
                args.input_gradient,
                args.loss,
            )
            entry = {
                "case": case,
                "shape": list(shape),
                "mask": masked,
                "jit_compile": jit_compile,
                "ratios": {},
                "temp_bytes": memory,
            }
            for label, _, cand, base in RATIOS:
                if label not in blocks:
                    continue
                goal = target(label, case, jit_compile, backend)
                ratios = [b[cand] / b[base] for b in blocks[label]]
                ratio = float(np.median(ratios))
                mark = verdict(ratio, ratios, goal)
                entry["ratios"][label] = {
                    "ratio": ratio,
                    "block_ratios": ratios,
                    "target": goal,
                    "verdict": mark,
                    "seconds": {
                        name: float(np.median([b[name] for b in blocks[label]]))
                        for name in (cand, base)
                    },
                }
                spread = f"[{min(ratios):.2f}, {max(ratios):.2f}]"
                print(
                    f"{case:10s} {jit:4s} {label:30s} {ratio:6.2f} "
                    f"{spread:13s} <= {goal:.2f} {mark}"
                )
            if memory:
                sizes_mb = ", ".join(
                    f"{name} {size / 2**20:.1f}"
                    for name, size in memory.items()
                )
                print(f"{case:10s} {jit:4s} train step scratch MB: {sizes_mb}")
            results["cases"].append(entry)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def with_shapes(sizes, overrides, parser):
    """`sizes` with the `--shape CASE=DIMS` overrides applied."""
    sizes = dict(sizes)
    for override in overrides:
        case, _, dims = override.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            shape = ()
        if case not in sizes or len(shape) != len(sizes[case][0]):
            parser.error(
                f"--shape {override}: expected CASE=DIMS with CASE one of "
                f"{sorted(sizes)} and as many dims as its shape, e.g. "
                "4d_nhwc=64x56x56x64"
            )
        sizes[case] = (shape, sizes[case][1])
    return sizes


def run_header(rounds, repeats):
    """What a benchmark's JSON starts with: the backend and versions, the
    machine, the date, and the blocks timed."""
    backend = keras.backend.backend()
    return {
        "backend": backend,
        "keras": keras.__version__,
        "framework": framework_version(backend),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": rounds,
        "repeats": repeats,
    }


def framework_version(backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    return __import__(module[backend]).__version__


def machine():
    """The CPU model and core count (the ratios differ between CPUs)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


COLUMNS = [
    ("BN train / Keras BN", ["train kn_bn / keras_bn"]),
    ("BRN train / Keras renorm", ["train kn_brn / keras_renorm"]),
    ("BRN / BN train", ["train kn_brn / kn_bn"]),
    ("Conv2D+CBN / Conv2D+BN train", ["train conv+cbn / conv+bn"]),
    (
        "inference BN, BRN / Keras BN, renorm",
        ["infer kn_bn / keras_bn", "infer kn_brn / keras_renorm"],
    ),
]


def run_backends(args, argv):
    """Runs this script once per backend (a process each: Keras picks its
    backend at import) and prints one Markdown table of all the runs."""
    import subprocess
    import sys
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    i = argv.index("--backends") if "--backends" in argv else None
    if i is None:  # --backends=...
        argv = [a for a in argv if not a.startswith("--backends=")]
    else:
        del argv[i : i + 2]
    if "--json" in argv:
        j = argv.index("--json")
        del argv[j : j + 2]
    argv = [a for a in argv if not a.startswith("--json=")]
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            out = os.path.join(tmp, f"{backend}.json")
            env = {**os.environ, "KERAS_BACKEND": backend}
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv]
                + ["--json", out],
                env=env,
                check=True,
            )
            with open(out) as f:
                reports.append(json.load(f))
    print()
    print(markdown_table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    return reports


def markdown_table(reports):
    """One row per backend, case and jit setting: median [block range]."""
    header = ["backend", "case", "jit"] + [name for name, _ in COLUMNS]
    header.append("train step scratch memory BN, BRN, CBN / Keras's")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for report in reports:
        for entry in report["cases"]:
            cells = [
                f"{report['backend']} {report['framework']}",
                entry["case"],
                "on" if entry["jit_compile"] else "off",
            ]
            for _, labels in COLUMNS:
                parts = []
                for label in labels:
                    r = entry["ratios"].get(label)
                    if r is not None:
                        low, high = (
                            min(r["block_ratios"]),
                            max(r["block_ratios"]),
                        )
                        parts.append(f"{r['ratio']:.2f} [{low:.2f}-{high:.2f}]")
                cells.append(", ".join(parts))
            memory = entry.get("temp_bytes") or {}
            pairs = [
                ("kn_bn", "keras_bn"),
                ("kn_brn", "keras_renorm"),
                ("conv_kn_cbn", "conv_keras_bn"),
            ]
            cells.append(
                ", ".join(
                    f"{memory[a] / memory[b]:.2f}"
                    for a, b in pairs
                    if memory.get(a) and memory.get(b)
                )
                or "not exposed on CPU"
            )
            lines.append("| " + " | ".join(cells) + " |")
    machines = sorted({r["machine"] for r in reports})
    dates = sorted({r["date"] for r in reports})
    lines.append("")
    lines.append(
        f"{', '.join(dates)}; {'; '.join(machines)}; Keras "
        f"{reports[0]['keras']}; loss {reports[0]['loss']}; "
        + ", ".join(
            f"{r['backend']} {r['repeats']} blocks of {r['rounds']}"
            for r in reports
        )
        + " alternating steps."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
