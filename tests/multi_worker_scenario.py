"""Trains the same models in 2 worker processes, with the example's recipe.

    python tests/netns.py python tests/multi_worker_scenario.py OUT_DIR

starts 2 workers on 127.0.0.1 (`examples/multi_worker.py`'s launcher) in a
private network namespace. Each joins the cluster the way
`examples/multi_worker.py` does on the current backend and, for every case,
trains a model for `STEPS` global batches of `GLOBAL_BATCH` (its half of
each), then saves every weight as `OUT_DIR/<case>-worker<i>.npz`. On
PyTorch, `OUT_DIR/collectives-worker<i>.json` holds the number of
`torch.distributed.all_reduce` calls one training call of each layer makes.
`reference(case)` trains the same model in one process, with `fit()`.
"""

import json
import os
import sys

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

import multi_worker  # noqa: E402

from tests.helpers import scenario_normalization  # noqa: E402

STEPS, GLOBAL_BATCH, WORKERS = 4, 8, 2

# name -> (layer kind, masked, synchronized)
CASES = {
    "bn": ("bn", False, True),
    "bn_mask": ("bn", True, True),
    "brn": ("brn", False, True),
    "brn_mask": ("brn", True, True),
    "cbn": ("cbn", False, True),
    "cbn_mask": ("cbn", True, True),
    "cbn_conv2d": ("cbn_conv2d", False, True),
    "bn_local": ("bn", False, False),
    "brn_local": ("brn", True, False),
    "cbn_local": ("cbn", False, False),
    "cbn_conv2d_local": ("cbn_conv2d", False, False),
}


def data(kind, masked):
    """`STEPS` global batches whose two halves (one per worker) differ
    strongly: the second is the first's distribution scaled by 3, shifted
    by 5."""
    rng = np.random.default_rng(0)
    shape = (6, 6, 3) if kind == "cbn_conv2d" else (5, 4)
    x = rng.normal(0.0, 1.0, size=(STEPS, 2, GLOBAL_BATCH // 2) + shape)
    x[:, 1] = 3.0 * x[:, 1] + 5.0
    x = x.reshape((STEPS * GLOBAL_BATCH,) + shape).astype("float32")
    if masked:  # zero padding after a random length, for `Masking`
        lengths = rng.integers(1, 6, size=len(x))
        x[np.arange(5)[None, :] >= lengths[:, None]] = 0.0
    y = rng.normal(size=(len(x), 1)).astype("float32")
    return x, y


def make_model(kind, masked, synchronized):
    keras.utils.set_random_seed(1)
    image = kind == "cbn_conv2d"
    inputs = keras.Input((6, 6, 3) if image else (5, 4))
    h = keras.layers.Masking(0.0)(inputs) if masked else inputs
    if kind in ("bn", "brn"):
        h = keras.layers.Dense(6, use_bias=False)(h)
    h = scenario_normalization(kind, synchronized)(h)
    h = keras.layers.ReLU()(h)
    pool = keras.layers.GlobalAveragePooling2D if image else None
    h = (pool or keras.layers.GlobalAveragePooling1D)()(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def weights(model):
    return {
        f"{i}:{v.name}": keras.ops.convert_to_numpy(v)
        for i, v in enumerate(model.weights)
    }


def reference(case):
    """Weights after `fit()` in one process on one device."""
    kind, masked, synchronized = CASES[case]
    x, y = data(kind, masked)
    model = make_model(kind, masked, synchronized)
    model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    return weights(model)


def alone(case, index):
    """Weights after `fit()` in one process on worker `index`'s halves
    only: what per-worker statistics would train like."""
    kind, masked, synchronized = CASES[case]
    x, y = data(kind, masked)
    x = multi_worker.local_share(x, GLOBAL_BATCH, WORKERS, index)
    y = multi_worker.local_share(y, GLOBAL_BATCH, WORKERS, index)
    model = make_model(kind, masked, synchronized)
    model.fit(x, y, batch_size=GLOBAL_BATCH // 2, shuffle=False, verbose=0)
    return weights(model)


def torch_collectives():
    """`torch.distributed.all_reduce` calls in one training call of each
    synchronized layer, masked and not."""
    import torch.distributed as dist

    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 5, 4)).astype("float32")
    mask = rng.random((4, 5)) < 0.6
    counts = {}
    dist.all_reduce = counting
    try:
        for kind in ("bn", "brn", "cbn"):
            for m in (None, mask):
                layer = scenario_normalization(kind, True)
                del calls[:]
                layer(x, training=True, mask=m)
                counts[kind + ("" if m is None else "_mask")] = len(calls)
    finally:
        dist.all_reduce = original
    return counts


def worker(out_dir, addresses, index):
    strategy = multi_worker.connect(addresses, index)
    for case, (kind, masked, synchronized) in CASES.items():
        x, y = data(kind, masked)
        with multi_worker.scope(strategy):
            model = make_model(kind, masked, synchronized)
        multi_worker.train(
            model, strategy, x, y, GLOBAL_BATCH, len(addresses), index
        )
        path = os.path.join(out_dir, f"{case}-worker{index}.npz")
        np.savez(path, **weights(model))
    if keras.backend.backend() == "torch":
        path = os.path.join(out_dir, f"collectives-worker{index}.json")
        with open(path, "w") as f:
            json.dump(torch_collectives(), f)
    multi_worker.disconnect()


def main(argv):
    out_dir = argv[0]
    if "--index" in argv:
        addresses = argv[argv.index("--workers") + 1].split(",")
        worker(out_dir, addresses, int(argv[argv.index("--index") + 1]))
        return
    command = [sys.executable, os.path.abspath(__file__), out_dir]
    for output in multi_worker.launch_local_workers(command, WORKERS, 600):
        print(output, end="")


if __name__ == "__main__":
    main(sys.argv[1:])
