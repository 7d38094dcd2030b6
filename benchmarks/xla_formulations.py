"""Batch norm forward + backward alone, three ways, with and without XLA.

Why keras_norms BN is 0.7x Keras's BN without XLA but about 1.0x with
`jit_compile=True` on a CPU: XLA compiles every formulation to the same
loops. TensorFlow only (the fused kernel is TensorFlow's).

- `keras`: `tf.nn.moments` + `tf.nn.batch_normalization`, autodiff (what
  Keras 3's layer runs);
- `fused`: `tf.compat.v1.nn.fused_batch_norm` (keras_norms' fast path);
- `analytic`: one-pass moments with a hand-written gradient
  (`tf.custom_gradient`), the formulation a fused kernel implements.

    python benchmarks/xla_formulations.py            # 32x32x32x64 NHWC
    python benchmarks/xla_formulations.py --tiny     # smoke

Prints the median time of each (alternating A B C ..., after warm-up) and
its ratio to `keras` without XLA and to `keras` with XLA.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import time_alternating  # noqa: E402

EPSILON = 1e-3


def keras_path(x, scale, offset):
    axes = list(range(len(x.shape) - 1))
    mean, variance = tf.nn.moments(x, axes)
    return tf.nn.batch_normalization(x, mean, variance, offset, scale, EPSILON)


def fused(x, scale, offset):
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
        x, scale, offset, epsilon=EPSILON, is_training=True
    )
    return y


@tf.custom_gradient
def analytic(x, scale, offset):
    axes = list(range(len(x.shape) - 1))
    n = tf.cast(tf.size(x) // x.shape[-1], x.dtype)
    mean = tf.reduce_mean(x, axes)
    variance = tf.nn.relu(tf.reduce_mean(tf.square(x), axes) - mean**2)
    inv = tf.math.rsqrt(variance + EPSILON)
    y = x * (inv * scale) + (offset - mean * inv * scale)

    def grad(dy):
        centered = x - mean
        sum_dy = tf.reduce_sum(dy, axes)
        sum_dy_centered = tf.reduce_sum(dy * centered, axes)
        dx = (scale * inv) * (
            dy - sum_dy / n - centered * inv**2 * sum_dy_centered / n
        )
        return dx, sum_dy_centered * inv, sum_dy

    return y, grad


def step_function(formulation, jit_compile, scale, offset):
    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.square(formulation(x, scale, offset)))
        return tape.gradient(loss, [x, scale, offset])

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    shape = (2, 4, 4, 8) if args.tiny else (32, 32, 32, 64)
    rounds, warmup = (1, 1) if args.tiny else (args.rounds, 3)
    x = tf.constant(
        np.random.default_rng(0).normal(1.0, 2.0, shape).astype("float32")
    )
    scale = tf.Variable(tf.ones(shape[-1]))
    offset = tf.Variable(tf.zeros(shape[-1]))
    steps = {}
    for name, formulation in [
        ("keras", keras_path),
        ("fused", fused),
        ("analytic", analytic),
    ]:
        for jit in (False, True):
            label = f"{name} {'xla' if jit else 'no xla'}"
            step = step_function(formulation, jit, scale, offset)
            steps[label] = lambda step=step: step(x)[0].numpy()
    seconds = time_alternating(steps, rounds, warmup)
    print(f"batch norm alone, {shape} NHWC, TensorFlow {tf.__version__}")
    for label, t in seconds.items():
        print(
            f"  {label:16s} {1e3 * t:8.2f} ms"
            f"  {t / seconds['keras no xla']:.2f}x keras no xla"
            f"  {t / seconds['keras xla']:.2f}x keras xla"
        )


if __name__ == "__main__":
    main()
