"""The benchmark harness keeps running (tiny sizes; no timing asserted)."""

import json

from tests.helpers import run_script


def test_harness_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(
        "benchmarks/run.py",
        "--tiny",
        "--rounds",
        "1",
        "--jit",
        "off",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    cases = {entry["case"]: entry for entry in report["cases"]}
    assert sorted(cases) == ["2d", "3d", "3d_mask", "4d_nhwc"]
    for entry in cases.values():
        assert set(entry["train_seconds"]) >= {"keras_bn", "kn_bn", "kn_brn"}
        for ratio in entry["ratios"].values():
            assert ratio["ratio"] > 0
    assert "train conv+cbn / conv+bn" in cases["4d_nhwc"]["ratios"]
    assert "train kn_bn / keras_bn" in result.stdout
