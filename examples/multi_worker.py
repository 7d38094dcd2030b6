"""Synchronized batch statistics across processes: the recipe per backend.

One process per machine (worker), each feeding its share of every global
batch; `synchronized=True` makes each keras_norms layer normalize with the
statistics of the global batch (one all-reduce per layer and step):

- TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy` (`TF_CONFIG`).
  Keras 3.15's `fit()` fails under it (keras-team/keras#20585), so the
  step is the model's own `train_step` under `strategy.run`, as in
  TensorFlow's guide to custom loops with this strategy.
- JAX: `keras.distribution.initialize` + `DataParallel`, then `fit()`.
- PyTorch: a `torch.distributed` process group (gloo on CPU, NCCL on GPU)
  and the `DistributedDataParallel` loop of Keras's guide to distributed
  training with PyTorch; the model's compiled loss and optimizer are used.

On real machines, run the same command on each, with its own index:

    python examples/multi_worker.py --workers host0:12345,host1:12345 --index 0
    python examples/multi_worker.py --workers host0:12345,host1:12345 --index 1

(TensorFlow: every address is a worker's server, or set `TF_CONFIG` and
omit the flags; JAX and PyTorch: the first address is the coordinator, and
torchrun's `MASTER_ADDR`/`MASTER_PORT`/`RANK`/`WORLD_SIZE` also work.)
On one machine, `--local-workers 2` starts 2 workers on 127.0.0.1 and
compares their moving statistics:

    python examples/multi_worker.py --local-workers 2

Each worker trains the digits CNN of the other examples (global batch 32)
and prints its step time and a fingerprint of its moving statistics.
"""

import argparse
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np

import keras_norms

BACKEND = keras.backend.backend()


def addresses_from_environment():
    """`(addresses, index)` from `TF_CONFIG` or torchrun's variables, else
    `(None, None)`."""
    if "TF_CONFIG" in os.environ:
        config = json.loads(os.environ["TF_CONFIG"])
        return config["cluster"]["worker"], config["task"]["index"]
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        first = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        count = int(os.environ["WORLD_SIZE"])
        return [first] * count, int(os.environ["RANK"])
    return None, None


def connect(addresses, index):
    """Joins the cluster; returns the TensorFlow strategy (else None).

    `addresses` are `host:port` strings, one per worker; `index` is this
    worker's position in them (0 coordinates)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        os.environ["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": list(addresses)},
                "task": {"type": "worker", "index": index},
            }
        )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if BACKEND == "jax":
        keras.distribution.initialize(
            ",".join(addresses), len(addresses), index
        )
        parallel = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices()
        )
        # Each process passes its own share (see `local_share`).
        parallel.auto_shard_dataset = False
        keras.distribution.set_distribution(parallel)
        return None
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        init_method=f"tcp://{addresses[0]}",
        rank=index,
        world_size=len(addresses),
    )
    return None


def disconnect():
    """Leaves the cluster once every worker is done. PyTorch: a barrier,
    then the process group is destroyed (a gloo worker that exits while its
    peer still holds the connection can abort at exit)."""
    if BACKEND != "torch":
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def scope(strategy):
    """Where to build and compile the model."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def local_share(array, global_batch_size, count, index):
    """This worker's rows of every global batch: worker `index` of `count`
    takes the `index`-th slice of each `global_batch_size` rows, so that the
    workers' shares together are the batches one process would train on.
    Rows after the last whole global batch are left out: every worker needs
    its share of each batch."""
    if global_batch_size % count:
        raise ValueError(
            f"The global batch size ({global_batch_size}) must be a multiple "
            f"of the number of workers ({count})."
        )
    per_worker = global_batch_size // count
    steps = len(array) // global_batch_size
    shaped = array[: steps * global_batch_size]
    shaped = shaped.reshape((steps, count, per_worker) + array.shape[1:])
    return shaped[:, index].reshape((-1,) + array.shape[1:])


def make_train_step(model, strategy):
    """`step(x, y)` trains `model` (built and compiled) on this worker's
    share of one global batch and returns its loss (a float)."""
    if BACKEND == "jax":  # Keras assembles the global batch
        return lambda x, y: float(model.train_on_batch(x, y))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

        @tf.function
        def step(x, y):
            logs = strategy.run(model.train_step, args=((x, y),))
            return strategy.experimental_local_results(logs["loss"])[0]

        return lambda x, y: float(step(x, y))
    import torch

    ddp = torch.nn.parallel.DistributedDataParallel(model)

    def step(x, y):
        x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
        model.zero_grad()
        loss = model.compute_loss(x=x, y=y, y_pred=ddp(x, training=True))
        loss.backward()
        variables = model.trainable_variables
        with torch.no_grad():
            model.optimizer.apply([v.value.grad for v in variables], variables)
        return float(loss)

    return step


class StepTimer(keras.callbacks.Callback):
    def __init__(self, times):
        super().__init__()
        self.times = times

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def train(model, strategy, x, y, global_batch_size, count, index, epochs=1):
    """Trains on this worker's share of `(x, y)` (the whole dataset, in the
    order a single process would see it) in global batches of
    `global_batch_size`; returns the step times in seconds."""
    x = local_share(x, global_batch_size, count, index)
    y = local_share(y, global_batch_size, count, index)
    per_worker = global_batch_size // count
    times = []
    if BACKEND == "jax":
        model.fit(
            x,
            y,
            batch_size=per_worker,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[StepTimer(times)],
        )
        return times
    step = make_train_step(model, strategy)
    for _ in range(epochs):
        for start in range(0, len(x), per_worker):
            begin = time.perf_counter()
            step(x[start : start + per_worker], y[start : start + per_worker])
            times.append(time.perf_counter() - begin)
    return times


def statistics(model):
    """name -> value of every moving statistic of `model`."""
    return {
        v.path: keras.ops.convert_to_numpy(v)
        for v in model.non_trainable_variables
        if "moving_" in v.path
    }


NORMALIZATIONS = {
    "bn": keras_norms.BatchNormalization,
    "brn": keras_norms.BatchRenormalization,
    "keras": keras.layers.BatchNormalization,
}


def make_model(layer):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from digits_common import make_model as digits_model

    if layer == "cbn":
        return digits_model(
            lambda linear: [
                keras_norms.CrossIterationBatchNormalization(
                    linear, window_size=4, synchronized=True
                )
            ]
        )
    return digits_model(
        lambda linear: [linear, NORMALIZATIONS[layer](synchronized=True)]
    )


def worker(args, addresses, index):
    from sklearn.datasets import load_digits

    strategy = connect(addresses, index)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    order = np.random.default_rng(args.seed).permutation(len(x))
    keras.utils.set_random_seed(args.seed)
    with scope(strategy):
        model = make_model(args.layer)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    times = train(
        model,
        strategy,
        x[order],
        y[order],
        args.global_batch_size,
        len(addresses),
        index,
        args.epochs,
    )
    stats = statistics(model)
    digest = hashlib.sha1(b"".join(a.tobytes() for a in stats.values()))
    print(
        f"worker {index}/{len(addresses)} ({BACKEND}): {len(times)} steps, "
        f"median step {1000 * np.median(times[1:]):.1f} ms, "
        f"moving statistics sha1 {digest.hexdigest()[:12]}",
        flush=True,
    )
    if args.out:
        np.savez(os.path.join(args.out, f"worker{index}.npz"), **stats)
    disconnect()


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch_local_workers(command, count, timeout):
    """Runs `command + ["--workers", ..., "--index", i]` for `count` workers
    on 127.0.0.1 (free ports). As soon as one fails, or when `timeout`
    (seconds) passes, every worker still running is killed by its pid and
    a RuntimeError shows the failure. Returns the workers' outputs."""
    addresses = ",".join(f"127.0.0.1:{p}" for p in free_ports(count))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    # The workers share this machine's cores: as torchrun does, one OpenMP
    # pool per worker of cores / workers threads (PyTorch steps were 3x
    # slower with every worker using every core).
    env.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // count)))
    with contextlib.ExitStack() as stack:
        logs = [
            [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe"]
            for _ in range(count)
        ]
        processes = [
            subprocess.Popen(
                command + ["--workers", addresses, "--index", str(i)],
                env=env,
                stdout=logs[i][0],
                stderr=logs[i][1],
                text=True,
            )
            for i in range(count)
        ]
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in processes):
                failed = [p for p in processes if p.poll()]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            killed = [p.poll() is None for p in processes]
            for process, kill in zip(processes, killed):
                if kill:
                    process.kill()
                process.wait()
        for out, err in logs:
            out.seek(0), err.seek(0)
        codes = [p.returncode for p in processes]
        if any(codes):  # the first that failed by itself, else the first
            own = [i for i, c in enumerate(codes) if c and not killed[i]]
            i = own[0] if own else 0
            stopped = [j for j, k in enumerate(killed) if k]
            raise RuntimeError(
                f"worker {i} of {count} failed (exit codes {codes}, negative: "
                f"a signal; stopped by the launcher: {stopped or 'none'}; "
                f"timeout {timeout} s):\n" + logs[i][1].read()[-3000:]
            )
        return [out.read() for out, _ in logs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", help="host:port,host:port,...")
    parser.add_argument("--index", type=int, help="this worker's index")
    parser.add_argument("--local-workers", type=int, default=0)
    parser.add_argument("--layer", choices=["bn", "brn", "cbn", "keras"])
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory for workerN.npz")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    args.layer = args.layer or "bn"
    if args.local_workers:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, os.path.abspath(__file__)]
            command += ["--layer", args.layer, "--out", out]
            command += ["--epochs", str(args.epochs), "--seed", str(args.seed)]
            command += ["--global-batch-size", str(args.global_batch_size)]
            outputs = launch_local_workers(
                command, args.local_workers, args.timeout
            )
            print("".join(outputs), end="")
            first = np.load(os.path.join(out, "worker0.npz"))
            for i in range(1, args.local_workers):
                other = np.load(os.path.join(out, f"worker{i}.npz"))
                worst = max(
                    float(np.max(np.abs(other[k] - first[k])))
                    for k in first.files
                )
                print(
                    f"worker {i} vs worker 0: {len(first.files)} moving "
                    f"statistics, largest difference {worst:.2e}"
                )
        return
    if args.workers:
        addresses, index = args.workers.split(","), args.index
    else:
        addresses, index = addresses_from_environment()
    if addresses is None or index is None:
        parser.error("give --workers and --index, TF_CONFIG, or torchrun's")
    worker(args, addresses, index)


if __name__ == "__main__":
    main()
