"""Helpers of benchmarks/gpu_check.sh, the check on a lent GPU machine.

    KERAS_BACKEND=jax python benchmarks/gpu_report.py devices
    python benchmarks/gpu_report.py junit junit-jax.xml junit-torch.xml
    python benchmarks/gpu_report.py bench TMP_DIR OUT_DIR

`devices` prints what the backend's framework and Keras see and exits with
3 when Keras does not put tensors on a GPU. `junit` counts each JUnit XML
file's outcomes and names its failures. `bench` gathers the benchmarks'
JSON files (`run-BACKEND.json`, `cbn-BACKEND.json` and the text output
`cbn-BACKEND.txt` in TMP_DIR) into OUT_DIR: `run.json` (the list of
`run.py`'s reports, as `run.py --backends` writes it), `cbn_speed.json`
(`{backend: report}`) and `bench.md` (the ratio table of `run.py`, the
step times beside each ratio, and `cbn_speed.py`'s output).
"""

import glob
import json
import os
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("jax", "torch")


def devices():
    backend = os.environ.get("KERAS_BACKEND", "")
    if backend == "jax":
        import jax

        gpu = jax.default_backend() == "gpu"
        print(
            f"jax {jax.__version__}: default backend "
            f"{jax.default_backend()}, devices {jax.devices()}"
        )
    elif backend == "torch":
        import torch

        gpu = torch.cuda.is_available()
        name = torch.cuda.get_device_name(0) if gpu else "no CUDA device"
        print(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}): {name}; TF32 in matmul "
            f"{torch.backends.cuda.matmul.allow_tf32}, in cuDNN "
            f"{torch.backends.cudnn.allow_tf32}"
        )
    else:
        sys.exit(f"KERAS_BACKEND must be jax or torch, not {backend!r}")
    import keras

    where = str(getattr(keras.ops.ones((2,)), "device", "unknown"))
    print(f"keras {keras.__version__} ({backend}) puts a new tensor on {where}")
    return 0 if gpu and "cpu" not in where.lower() else 3


def junit(paths):
    for path in paths:
        name = os.path.basename(path)
        if not os.path.exists(path):
            print(f"{name}: no report (the run wrote none)")
            continue
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as error:
            print(f"{name}: unreadable ({error})")
            continue
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        failed = []
        seconds = 0.0
        for suite in root.iter("testsuite"):
            seconds += float(suite.get("time", 0))
        for case in root.iter("testcase"):
            if case.get("name") is None:  # a test cut off by the time limit
                continue
            test_id = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                failed.append(test_id)
            elif case.find("error") is not None:
                counts["error"] += 1
                failed.append(test_id)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
        total = sum(counts.values())
        parts = ", ".join(f"{n} {k}" for k, n in counts.items())
        print(f"{name}: {total} tests: {parts}; {seconds:.0f} s")
        for test_id in failed[:40]:
            print(f"  not passed: {test_id}")
        if len(failed) > 40:
            print(f"  ... and {len(failed) - 40} more")
    return 0


def _load(path):
    with open(path) as f:
        return json.load(f)


def step_times(reports):
    """A Markdown table of each ratio with the two step times it divides."""
    lines = [
        "| backend | case | shape | jit | comparison | candidate ms | "
        "baseline ms | ratio [range] | target |",
        "|" + " --- |" * 9,
    ]
    for report in reports:
        for entry in report["cases"]:
            shape = "x".join(str(d) for d in entry["shape"])
            if entry["mask"]:
                shape += " masked"
            for label, r in entry["ratios"].items():
                cand, base = (1e3 * s for s in r["seconds"].values())
                low, high = min(r["block_ratios"]), max(r["block_ratios"])
                lines.append(
                    f"| {report['backend']} {report['framework']} | "
                    f"{entry['case']} | {shape} | "
                    f"{'on' if entry['jit_compile'] else 'off'} | {label} | "
                    f"{cand:.3f} | {base:.3f} | {r['ratio']:.2f} "
                    f"[{low:.2f}-{high:.2f}] | <= {r['target']:.2f} "
                    f"{r['verdict']} |"
                )
    return "\n".join(lines)


def bench(tmp_dir, out_dir):
    runs = [
        _load(p)
        for b in BACKENDS
        for p in glob.glob(os.path.join(tmp_dir, f"run-{b}.json"))
    ]
    cbn = {
        b: _load(p)
        for b in BACKENDS
        for p in glob.glob(os.path.join(tmp_dir, f"cbn-{b}.json"))
    }
    lines = [f"# GPU benchmarks, {time.strftime('%Y-%m-%d')}", ""]
    for b in BACKENDS:
        path = os.path.join(tmp_dir, f"devices-{b}.txt")
        if os.path.exists(path):
            with open(path) as f:
                lines += [f"    {line.rstrip()}" for line in f if line.strip()]
    lines.append("")
    if runs:
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump(runs, f, indent=2)
        sys.path.insert(0, HERE)
        os.environ.setdefault("KERAS_BACKEND", runs[0]["backend"])
        import run  # benchmarks/run.py, for its table

        lines += [
            "## benchmarks/run.py: ratios",
            "",
            run.markdown_table(runs),
            "",
            "## benchmarks/run.py: step times (median of the blocks)",
            "",
            step_times(runs),
            "",
        ]
    else:
        lines += ["benchmarks/run.py: no report (it did not finish)", ""]
    if cbn:
        with open(os.path.join(out_dir, "cbn_speed.json"), "w") as f:
            json.dump(cbn, f, indent=2)
    for b in BACKENDS:
        path = os.path.join(tmp_dir, f"cbn-{b}.txt")
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().rstrip()
            lines += [f"## benchmarks/cbn_speed.py, {b}", "", "```text"]
            lines += [text, "```", ""]
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write("\n".join(lines))
    return 0


def main(argv):
    if argv[:1] == ["devices"]:
        return devices()
    if argv[:1] == ["junit"]:
        return junit(argv[1:])
    if argv[:1] == ["bench"] and len(argv) == 3:
        return bench(argv[1], argv[2])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
