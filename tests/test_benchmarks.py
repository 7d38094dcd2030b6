"""The benchmark harness keeps running (tiny sizes; no timing asserted)."""

import json
import os
import subprocess
import sys

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
    result = run_script(
        "benchmarks/cbn_speed.py", "--tiny", "--profile", "--json", str(out)
    )
    report = json.loads(out.read_text())
    kinds = ("keras_bn", "keras_norms_bn", "cbn", "cbn_authors", "conv")
    for kind in kinds + ("cbn_k1", "cbn_zero_derivatives"):
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


def _load_run():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "benchmark_run", os.path.join(ROOT, "benchmarks", "run.py")
    )
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def test_harness_prints_one_table_for_several_backends(tmp_path):
    """`--backends` runs the harness once per backend (here the tests'
    backend, twice) and prints one Markdown table of all runs; on JAX the
    compiled train steps' scratch memory is in it."""
    out = tmp_path / "all.json"
    result = run_script(
        "benchmarks/run.py",
        "--tiny",
        "--rounds",
        "1",
        "--cases",
        "4d_nhwc",
        "--backends",
        f"{BACKEND},{BACKEND}",
        "--json",
        str(out),
    )
    reports = json.loads(out.read_text())
    assert [r["backend"] for r in reports] == [BACKEND, BACKEND]
    rows = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(f"| {BACKEND} ")
    ]
    jits = {"tensorflow": 2, "jax": 1, "torch": 1}[BACKEND]
    assert len(rows) == 2 * jits, result.stdout
    conv_rows = [row for row in rows if "| 4d_nhwc |" in row]
    assert conv_rows == rows
    for row in conv_rows:
        cells = row.split(" | ")
        assert cells[6].count("[") == 1  # Conv2D+CBN / Conv2D+BN
    if BACKEND == "jax":  # jit on: XLA's memory analysis
        memory = reports[0]["cases"][0]["temp_bytes"]
        assert set(memory) >= {"kn_bn", "keras_bn", "conv_kn_cbn"}
        assert all(size >= 0 for size in memory.values())
        assert "not exposed on CPU" not in conv_rows[0]
    else:
        assert all(row.endswith("| not exposed on CPU |") for row in rows)


def test_markdown_table_and_verdicts():
    run = _load_run()
    ratios = {
        "train kn_bn / keras_bn": {"ratio": 0.95, "block_ratios": [0.9, 1.0]},
        "infer kn_bn / keras_bn": {"ratio": 1.02, "block_ratios": [0.97, 1.1]},
        "infer kn_brn / keras_renorm": {
            "ratio": 0.99,
            "block_ratios": [0.98, 0.99],
        },
    }
    report = {
        "backend": "jax",
        "framework": "0.1",
        "machine": "CPU X, 2 cores",
        "date": "2026-12-04",
        "keras": "3",
        "loss": "mse",
        "repeats": 2,
        "rounds": 5,
        "cases": [
            {
                "case": "2d",
                "jit_compile": True,
                "ratios": ratios,
                "temp_bytes": {
                    "kn_bn": 150,
                    "keras_bn": 100,
                    "kn_brn": 100,
                    "keras_renorm": 200,
                },
            }
        ],
    }
    table = run.markdown_table([report]).splitlines()
    assert table[2] == (
        "| jax 0.1 | 2d | on | 0.95 [0.90-1.00] |  |  |  | "
        "1.02 [0.97-1.10], 0.99 [0.98-0.99] | 1.50, 0.50 |"
    )
    assert "2026-12-04; CPU X, 2 cores" in table[-1]
    assert table[-1].endswith("jax 2 blocks of 5 alternating steps.")
    assert run.verdict(0.99, [0.9, 1.2], 1.0) == "ok"
    assert run.verdict(1.02, [0.99, 1.2], 1.0) == "noise"
    assert run.verdict(1.02, [1.01, 1.2], 1.0) == "MISSED"
    assert run.target("train kn_bn / keras_bn", "4d_nhwc", False, "jax") == 1.0
    assert (
        run.target("train kn_bn / keras_bn", "4d_nhwc", False, "tensorflow")
        == 0.8
    )
    assert (
        run.target("train conv+cbn / conv+bn", "4d_nhwc", True, "tensorflow")
        == 1.5
    )


def test_online_speed_benchmark_runs_and_reports(tmp_path):
    """benchmarks/online_speed.py: each candidate's train step against
    Keras's BN on the MLP, at batch sizes 1 and 4; the target (<= 1.1x)
    applies to batch 1; Keras's renormalization is measured for reference."""
    out = tmp_path / "online.json"
    result = run_script(
        "benchmarks/online_speed.py",
        "--tiny",
        "--repeats",
        "2",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    assert report["via"] == "train_function"
    assert sorted(report["batches"]) == ["1", "4"]
    for size, ratios in report["batches"].items():
        assert sorted(ratios) == [
            "keras_renorm / keras_bn",
            "kn_bn / keras_bn",
            "kn_brn / keras_bn",
            "kn_brn / keras_renorm",
            "kn_cbn / keras_bn",
        ]
        for label, r in ratios.items():
            assert len(r["block_ratios"]) == 2
            assert (
                min(r["block_ratios"]) <= r["ratio"] <= max(r["block_ratios"])
            )
            assert all(t > 0 for t in r["seconds"].values())
            # The target: the package's layers against Keras's BN, batch 1.
            candidate = label.startswith("kn_") and label.endswith("keras_bn")
            assert r["target"] == (1.1 if size == "1" and candidate else None)
    assert "kn_cbn / keras_bn" in result.stdout


def test_ws_speed_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "ws.json"
    result = run_script("benchmarks/ws_speed.py", "--tiny", "--json", str(out))
    report = json.loads(out.read_text())
    assert sorted(report["train"]) == ["conv", "ws", "ws_scaled"]
    assert sorted(report["inference"]) == ["conv", "ws", "ws_folded"]
    for part in ("train", "inference"):
        for entry in report[part].values():
            low, high = entry["range"]
            assert 0 < low <= entry["ratio"] <= high, report
    assert report["folded_relative_difference"] < 1e-5
    assert "target train step Conv2D + WS <= 1.05x" in result.stdout


def test_harness_takes_another_shape_for_a_case():
    """`--shape CASE=DIMS` (the GPU check's 64x56x56x64 4-D case) replaces
    a case's shape and keeps its mask; a shape of another rank, or an
    unknown case, is refused."""
    import argparse

    run = _load_run()
    parser = argparse.ArgumentParser()
    sizes = run.with_shapes(
        run.FULL, ["4d_nhwc=64x56x56x64", "3d_mask=8x10x16"], parser
    )
    assert sizes["4d_nhwc"] == ((64, 56, 56, 64), False)
    assert sizes["3d_mask"] == ((8, 10, 16), True)
    assert sizes["2d"] == run.FULL["2d"]
    assert run.FULL["4d_nhwc"] == ((32, 32, 32, 64), False)
    for bad in ("4d_nhwc=64x56x56", "5d=1x2", "2d=256xabc", "2d"):
        with pytest.raises(SystemExit):
            run.with_shapes(run.FULL, [bad], parser)


def test_gpu_check_parses_and_counts_test_reports(tmp_path):
    """benchmarks/gpu_check.sh is valid bash, and its report counts a JUnit
    file's outcomes (the GPU run itself needs a lent machine)."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    report = tmp_path / "junit-jax.xml"
    report.write_text(
        '<testsuites><testsuite time="2.5">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="bad"><failure/></testcase>'
        '<testcase classname="tests.b" name="off"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_report.py"),
            "junit",
            str(report),
            str(tmp_path / "junit-torch.xml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "junit-jax.xml: 3 tests: 1 passed, 1 failed, 0 error, 1 skipped" in (
        result.stdout
    ), result.stdout
    assert "not passed: tests.a::bad" in result.stdout
    assert "junit-torch.xml: no report" in result.stdout
