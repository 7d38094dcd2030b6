"""What synchronized statistics cost across 2 worker processes.

Starts 2 workers on 127.0.0.1 with the recipe of `examples/multi_worker.py`
(TensorFlow: `MultiWorkerMirroredStrategy`; JAX: `keras.distribution`
across processes; PyTorch: gloo + `DistributedDataParallel`). Each worker
trains the network of `multi_device.py` (2 x Conv2D + normalization) on its
half of a global batch; the candidates' train steps are timed alternately
after warm-up, in `--repeats` blocks of `--rounds` steps (median per block),
and worker 0 reports the ratios measured in this run (median over blocks,
with their range).

    python benchmarks/multi_process.py                  # TensorFlow
    KERAS_BACKEND=jax python benchmarks/multi_process.py
    python benchmarks/multi_process.py --tiny --json out.json   # smoke

TensorFlow's gRPC server listens on every interface while it runs; to keep
the workers private, run it inside a loopback-only network namespace:
`python tests/netns.py python benchmarks/multi_process.py`.
"""

import argparse
import json
import os
import platform
import sys
import tempfile

import keras
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import multi_device  # noqa: E402
import multi_worker  # noqa: E402
from run import time_alternating  # noqa: E402

BACKEND = keras.backend.backend()


def candidates():
    """name -> (normalization, synchronized). Keras's BN synchronizes only
    with TensorFlow; on JAX every statistic is global anyway."""
    plain, cbn = multi_device.norms()
    norms = {**plain, **cbn}
    chosen = {"keras_bn": (norms["keras_bn"], False)}
    if BACKEND == "tensorflow":
        chosen["keras_bn_sync"] = (norms["keras_bn"], True)
    chosen["kn_bn"] = (norms["kn_bn"], False)
    for name in ("kn_bn", "kn_brn", "kn_cbn"):
        chosen[name + "_sync"] = (norms[name], True)
    return chosen


def pairs():
    keras_sync = "keras_bn_sync" if BACKEND == "tensorflow" else "keras_bn"
    return [
        ("kn_bn_sync", keras_sync),
        ("kn_bn_sync", "kn_bn"),
        ("kn_brn_sync", keras_sync),
        ("kn_cbn_sync", keras_sync),
    ] + ([("keras_bn_sync", "keras_bn")] if keras_sync != "keras_bn" else [])


def worker(args, addresses, index):
    strategy = multi_worker.connect(addresses, index)
    shape, channels = ((8, 6, 6, 3), 4) if args.tiny else ((32, 32, 32, 16), 32)
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=shape).astype("float32")
    y = rng.integers(0, 10, size=shape[0]).astype("int32")
    x = multi_worker.local_share(x, shape[0], len(addresses), index)
    y = multi_worker.local_share(y, shape[0], len(addresses), index)
    steps = {}
    for name, (norm, sync) in candidates().items():
        with multi_worker.scope(strategy):
            model = multi_device.build(norm, sync, shape, channels)
        step = multi_worker.make_train_step(model, strategy)
        steps[name] = lambda step=step: step(x, y)
    rounds, warmup = (1, 1) if args.tiny else (args.rounds, 3)
    blocks = [
        time_alternating(steps, rounds, warmup if block == 0 else 0)
        for block in range(args.repeats)
    ]
    if index == 0:
        results = {"shape": shape, "channels": channels, "blocks": blocks}
        with open(os.path.join(args.out, "worker0.json"), "w") as f:
            json.dump(results, f)
    multi_worker.disconnect()


def report(results, workers, args):
    blocks = results["blocks"]
    shape = results["shape"]
    print(
        f"{BACKEND}, {workers} worker processes, global batch {shape[0]} "
        f"({shape[0] // workers} per worker), input {tuple(shape[1:])}, "
        f"{results['channels']} channels, {args.repeats} blocks"
    )
    for name in blocks[0]:
        median = np.median([b[name] for b in blocks])
        print(f"  {name:15s} {1e3 * median:8.2f} ms/step")
    ratios = {}
    for a, b in pairs():
        per_block = [block[a] / block[b] for block in blocks]
        ratios[f"{a} / {b}"] = {
            "ratio": float(np.median(per_block)),
            "block_ratios": per_block,
        }
        print(
            f"  {a + ' / ' + b:30s} {np.median(per_block):.2f}x "
            f"[{min(per_block):.2f}-{max(per_block):.2f}]"
        )
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--workers", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers:
        worker(args, args.workers.split(","), args.index)
        return
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.abspath(__file__), "--out", out]
        command += ["--rounds", str(args.rounds)]
        command += ["--repeats", str(args.repeats)]
        command += ["--tiny"] if args.tiny else []
        multi_worker.launch_local_workers(command, 2, 1800)
        with open(os.path.join(out, "worker0.json")) as f:
            results = json.load(f)
    ratios = report(results, 2, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "backend": BACKEND,
                    "keras": keras.__version__,
                    "machine": platform.platform(),
                    "processor": platform.processor(),
                    **results,
                    "ratios": ratios,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
