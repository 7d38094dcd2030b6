"""Synchronized statistics across 2 worker processes equal one process.

The workers run `tests/multi_worker_scenario.py` with the recipe of
`examples/multi_worker.py` on the current backend (TensorFlow:
`MultiWorkerMirroredStrategy`; JAX: `keras.distribution` across processes;
PyTorch: a gloo process group and `DistributedDataParallel`), on 127.0.0.1
inside a private network namespace (`tests/netns.py`). The reference is
`fit()` in this process on the same global batches.
"""

import json
import os
import re
import sys

import numpy as np
import pytest

from tests import multi_worker_scenario as scenario
from tests import netns
from tests.helpers import BACKEND
from tests.helpers import ROOT
from tests.helpers import run_script

NO_NAMESPACE = netns.unavailable_reason()
pytestmark = [
    pytest.mark.skipif(
        NO_NAMESPACE is not None,
        reason=f"workers run in a private network namespace: {NO_NAMESPACE}",
    ),
    # One worker runs them all: the `workers` fixture runs once.
    pytest.mark.xdist_group("multi_worker"),
]

SYNCHRONIZED = [c for c, (_, _, sync) in scenario.CASES.items() if sync]
LOCAL = [c for c, (_, _, sync) in scenario.CASES.items() if not sync]


def run_private(script, *args):
    """`python script args...` (relative to the repository) in a private
    network namespace on the current backend; asserts that it succeeds and
    returns its output."""
    command = (sys.executable, os.path.join(ROOT, script), *args)
    return run_script("tests/netns.py", *command).stdout


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The directory of the 2 workers' results."""
    out = tmp_path_factory.mktemp("multi_worker")
    run_private("tests/multi_worker_scenario.py", str(out))
    return out


def load(workers, case):
    return [dict(np.load(workers / f"{case}-worker{i}.npz")) for i in range(2)]


def relative_difference(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-6))


def worst_difference(reference, weights):
    assert sorted(reference) == sorted(weights)
    return max(relative_difference(reference[k], weights[k]) for k in weights)


@pytest.mark.parametrize("case", SYNCHRONIZED)
def test_two_workers_train_like_one_process(workers, case):
    """After 4 steps at global batch 8 (4 per worker): worker 0's weights,
    moving statistics, BRN's renorm statistics and CBN's buffers equal
    one process's `fit()` (1e-5); both workers hold identical weights."""
    first, second = load(workers, case)
    reference = scenario.reference(case)
    assert len(reference) >= 7, sorted(reference)
    for name, value in reference.items():
        assert relative_difference(value, first[name]) <= 1e-5, name
    for name, value in first.items():
        np.testing.assert_array_equal(value, second[name], err_msg=name)


@pytest.mark.parametrize("case", LOCAL)
def test_local_statistics(workers, case):
    """`synchronized=False`: with TensorFlow and PyTorch each worker
    normalizes with its own half, and training differs from one process.
    On JAX one program runs over the global batch across processes, so the
    statistics are global anyway (as with Keras's own BN)."""
    first, _ = load(workers, case)
    worst = worst_difference(scenario.reference(case), first)
    if BACKEND == "jax":
        assert worst <= 1e-5
    else:
        assert worst > 1e-3


@pytest.mark.parametrize("case", ["bn", "cbn_conv2d"])
def test_per_worker_statistics_would_be_seen(case):
    """The halves differ enough that statistics of one worker's half alone
    train far from the global batch's: the comparisons above can fail."""
    reference = scenario.reference(case)
    assert worst_difference(reference, scenario.alone(case, 0)) > 1e-2


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed calls")
def test_one_torch_all_reduce_per_layer(workers):
    """One `torch.distributed.all_reduce` per layer and training call on
    each worker, masked or not."""
    for i in range(2):
        path = workers / f"collectives-worker{i}.json"
        counts = json.loads(path.read_text())
        assert counts == dict.fromkeys(counts, 1), counts
        assert len(counts) == 6, counts


def test_example_runs_on_local_workers():
    """`examples/multi_worker.py --local-workers 2`: both workers train,
    print their step times, and end with the same moving statistics."""
    out = run_private(
        "examples/multi_worker.py", "--local-workers", "2", "--timeout", "600"
    )
    found = re.findall(
        r"worker (\d)/2 \(\w+\): 56 steps, median step ([\d.]+) ms, "
        r"moving statistics sha1 (\w+)",
        out,
    )
    assert sorted(i for i, _, _ in found) == ["0", "1"], out
    assert all(float(ms) > 0 for _, ms, _ in found), out
    assert found[0][2] == found[1][2], out
    assert "worker 1 vs worker 0: 6 moving statistics, largest " in out, out
    assert "largest difference 0.00e+00" in out, out


def test_benchmark_runs_and_reports(tmp_path):
    """`benchmarks/multi_process.py` (tiny sizes; no timing asserted)."""
    path = tmp_path / "bench.json"
    out = run_private(
        "benchmarks/multi_process.py",
        "--tiny",
        "--repeats",
        "2",
        "--json",
        str(path),
    )
    report = json.loads(path.read_text())
    assert report["backend"] == BACKEND
    assert "kn_bn_sync / kn_bn" in report["ratios"], report
    for name, ratio in report["ratios"].items():
        assert len(ratio["block_ratios"]) == 2, name
        assert ratio["ratio"] > 0, name
        assert name in out
    if BACKEND == "tensorflow":
        assert "kn_bn_sync / keras_bn_sync" in report["ratios"]
