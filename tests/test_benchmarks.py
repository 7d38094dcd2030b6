"""The benchmark harness keeps running (tiny sizes; no timing asserted)."""

import json

import pytest

from tests.helpers import BACKEND
from tests.helpers import ROOT
from tests.helpers import run_script


def test_harness_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(
        "benchmarks/run.py",
        "--tiny",
        "--rounds",
        "1",
        "--repeats",
        "2",
        "--jit",
        "off",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    cases = {entry["case"]: entry for entry in report["cases"]}
    assert sorted(cases) == ["2d", "3d", "3d_mask", "4d_nhwc"]
    for entry in cases.values():
        assert "train kn_brn / kn_bn" in entry["ratios"]
        for ratio in entry["ratios"].values():
            assert ratio["ratio"] > 0
            assert len(ratio["block_ratios"]) == report["repeats"]
            assert all(t > 0 for t in ratio["seconds"].values())
    assert "train conv+cbn / conv+bn" in cases["4d_nhwc"]["ratios"]
    assert "train kn_bn / keras_bn" in result.stdout


def test_harness_with_input_gradients(tmp_path):
    """`--input-gradient` puts a trainable scalar before the normalization
    of the non-convolution candidates (so their train step computes the
    normalization's input gradient) and says so in the report."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "benchmark_run", os.path.join(ROOT, "benchmarks", "run.py")
    )
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    shape = (4, 5, 8)
    plain = run.build(run.candidates("3d")["kn_brn"], shape, False, False)
    scaled = run.build(
        run.candidates("3d")["kn_brn"], shape, False, False, True
    )
    assert len(scaled.trainable_weights) == len(plain.trainable_weights) + 1
    assert isinstance(scaled.layers[1], run.InputScale)
    out = tmp_path / "bench.json"
    result = run_script(
        "benchmarks/run.py",
        "--tiny",
        "--rounds",
        "1",
        "--cases",
        "4d_nhwc",
        "--jit",
        "off",
        "--input-gradient",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    assert report["input_gradient"] is True
    assert "with input gradients" in result.stdout
    assert "train conv+cbn / conv+bn" in report["cases"][0]["ratios"]


@pytest.mark.skipif(BACKEND == "torch", reason="one process per device")
def test_multi_device_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "multi.json"
    run_script("benchmarks/multi_device.py", "--tiny", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["ratios"] and all(r > 0 for r in report["ratios"].values())
    assert (
        "kn_bn_sync" in report["seconds"] or report["backend"] != "tensorflow"
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's kernels")
def test_xla_formulations_benchmark_runs():
    result = run_script("benchmarks/xla_formulations.py", "--tiny")
    for label in ("keras xla", "fused no xla", "analytic xla"):
        assert label in result.stdout


def test_cbn_speed_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "cbn.json"
    result = run_script("benchmarks/cbn_speed.py", "--tiny", "--json", str(out))
    report = json.loads(out.read_text())
    for kind in ("keras_bn", "keras_norms_bn", "cbn", "cbn_authors"):
        assert report[kind]["seconds"] > 0, report
        low, high = report[kind]["range"]
        assert 0 < low <= report[kind]["ratio"] <= high, report
    assert report["cbn / cbn_authors"]["ratio"] > 0
    assert report["cbn_buffer_floats"] <= report["cbn_buffer_bound"]
    assert "target Conv2D + CBN <= 1.3x" in result.stdout


def test_fold_speed_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "fold.json"
    run_script("benchmarks/fold_speed.py", "--tiny", "--json", str(out))
    report = json.loads(out.read_text())
    for kind in ("keras_bn", "bn", "brn", "cbn"):
        low, high = report[kind]["range"]
        assert 0 < low <= report[kind]["ratio"] <= high, report
        assert report[kind]["max_abs_difference"] < 1e-5, report
    # Folding removes the three normalization layers (CBN: none to remove,
    # each becomes its convolution with a bias).
    assert report["bn"]["layers"] == [11, 8]
    assert report["cbn"]["layers"] == [8, 8]
