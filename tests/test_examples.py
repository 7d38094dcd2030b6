"""The examples run end to end (tiny settings) and report what they claim."""

import json
import os
import re

import pytest

from tests.helpers import ROOT
from tests.helpers import run_script


def test_digits_renorm_example_runs_and_reloads():
    result = run_script(
        "examples/digits_renorm.py", "--epochs", "1", "--batch-size", "16"
    )
    accuracies = re.findall(r"test accuracy (\d\.\d+)", result.stdout)
    assert len(accuracies) == 3, result.stdout
    # One epoch on digits already beats chance (0.1) by far.
    assert all(float(a) > 0.5 for a in accuracies), result.stdout
    assert "identical predictions: True" in result.stdout


def test_digits_cbn_example_runs():
    result = run_script(
        "examples/digits_cbn.py",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--window",
        "3",
        "--burnin-fraction",
        "0.3",
    )
    accuracies = re.findall(r"test accuracy (\d\.\d+)", result.stdout)
    assert len(accuracies) == 2, result.stdout
    assert "CBN(window_size=3, burnin_steps=101)" in result.stdout
    # 337 steps of batch size 4: both learn, far above chance (0.1).
    assert all(float(a) > 0.3 for a in accuracies), result.stdout


def test_digits_sequences_example_runs():
    result = run_script(
        "examples/digits_sequences.py",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--units",
        "16",
    )
    lines = re.findall(r"(.+?)\s+test accuracy (\d\.\d+)", result.stdout)
    names = [name.strip() for name, _ in lines]
    assert names == [
        "no normalization",
        "BatchNormalization",
        "BatchRenormalization",
        "CBN(Dense, k=4)",
    ], result.stdout
    assert all(0.0 <= float(a) <= 1.0 for _, a in lines)


def test_small_batch_study_quick_writes_table_plot_and_json(tmp_path):
    png, records = tmp_path / "study.png", tmp_path / "study.json"
    result = run_script(
        "examples/small_batch_study.py",
        "--quick",
        "--train-samples",
        "200",
        "--out",
        str(png),
        "--json",
        str(records),
    )
    assert "| setting | BN | BRN | CBN | GN | GN+WS |" in result.stdout
    rows = re.findall(r"^\| batch .*\|$", result.stdout, re.MULTILINE)
    assert len(rows) == 3, result.stdout  # batch 4, batch 16, non-i.i.d.
    assert re.search(r"\[ 15/15\] GN\+WS batch  16 2 cls", result.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(records.read_text())["results"]
    assert [
        (r["layer"], r["batch_size"], r["classes_per_batch"]) for r in runs
    ] == [
        (layer, batch, classes)
        for batch, classes in ((4, None), (16, None), (16, 2))
        for layer in ("BN", "BRN", "CBN", "GN", "GN+WS")
    ]
    for r in runs:
        assert r["seed"] == 0 and r["seconds"] > 0, r
        assert 0.0 <= r["accuracy"] <= 1.0, r
    # The table's cells are the mean of these runs (one seed each here).
    first = re.findall(r"(\d\.\d{3}) ±", rows[0])
    assert [float(a) for a in first] == [
        round(r["accuracy"], 3) for r in runs[:5]
    ]


def test_small_batch_study_differences_from_the_docs_records(tmp_path):
    """The study's records in docs/ give the paired differences the docs
    quote, the WS paper's claims among them (no training)."""
    result = run_script(
        "examples/small_batch_study.py",
        "--plot-from",
        "docs/small_batch_study.json",
        "--out",
        str(tmp_path / "study.png"),
        "--differences",
    )
    rows = {
        line.split(" | ")[0].lstrip("| ") + " @ " + line.split(" | ")[1]: line
        for line in result.stdout.splitlines()
        if line.startswith("| ") and " | 3 | " in line
    }
    expected = {
        "GN+WS - GN @ batch 2": "+1.5 ± 2.5",
        "GN+WS - GN @ batch 4": "-1.0 ± 0.6",
        "GN+WS - BN @ batch 16, 2 classes each": "+3.8 ± 1.5",
        "GN+WS batch 2 - BN batch 32 @ i.i.d.": "-0.8 ± 1.0",
        "GN+WS: batch 2 - batch 32 @ i.i.d.": "+0.2 ± 0.6",
    }
    for pair, value in expected.items():
        assert f"| {value} |" in rows[pair], (pair, rows.get(pair))


def test_online_learning_quick_writes_table_plot_and_json(tmp_path, capsys):
    png, records = tmp_path / "online.png", tmp_path / "online.json"
    result = run_script(
        "examples/online_learning.py",
        "--quick",
        "--drift-scale",
        "2",
        "--out",
        str(png),
        "--json",
        str(records),
    )
    variants = [
        "none",
        "keras_bn",
        "bn",
        "brn",
        "cbn",
        "cbn_no_compensation",
        "layer_norm",
    ]
    row = r"^\| (\w+) \| (\d+) \| (\d\.\d{3}) \((\d\.\d{3})-(\d\.\d{3})\)"
    row += r" \| (\d\.\d{3}) \| (\d\.\d{3}) \|$"
    rows = re.findall(row, result.stdout, re.MULTILINE)
    assert [(v, int(b)) for v, b, *_ in rows] == [
        (v, b) for b in (1, 4) for v in variants
    ], result.stdout
    for _, _, *accuracies in rows:
        assert all(0.0 <= float(a) <= 1.0 for a in accuracies), rows
    assert re.search(r"\[ 14/14\] layer_norm +batch  4 seed 0", result.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(records.read_text())
    assert data["recipe"]["stream"] == 120
    runs = data["results"]
    assert [(r["variant"], r["batch_size"]) for r in runs] == [
        (v, b) for b in (1, 4) for v in variants
    ]
    for r in runs:
        assert r["seed"] == 0 and r["seconds"] > 0, r
        assert len(r["correct"]) == 120 and set(r["correct"]) <= {"0", "1"}
        # One seed: the held-out mean is this run's accuracy.
        assert 0.0 <= r["held_out_accuracy"] <= 1.0, r
        assert r["prequential_accuracy"] == r["correct"].count("1") / 120
    held_out = [float(mean) for _, _, mean, *_ in rows]
    assert held_out == [round(r["held_out_accuracy"], 3) for r in runs]
    # The records give the same table again, without training (in this
    # process: a second one would spend its time importing Keras).
    import os
    import sys

    from tests.helpers import ROOT

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import online_learning

    png.unlink()
    online_learning.main(["--plot-from", str(records), "--out", str(png)])
    again = capsys.readouterr().out
    assert re.findall(row, again, re.MULTILINE) == rows
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cbn_ablation_runs_every_variant(tmp_path):
    records = tmp_path / "ablation.json"
    result = run_script(
        "examples/cbn_ablation.py",
        "--batch-sizes",
        "16",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--train-samples",
        "200",
        "--json",
        str(records),
    )
    rows = re.findall(
        r"^\| (\S.*?) \| (\S+) \| (\d\.\d{3}) ±", result.stdout, re.M
    )
    assert [(name, burnin) for name, burnin, _ in rows] == [
        ("default", "0%"),
        ("default", "10%"),
        ('negative_variance="exclude"', "0%"),
        ("compensation_gradient=False", "0%"),
        ("compensation_gradient=False", "10%"),
        ("compensation=False", "0%"),
        ("compensation=False", "10%"),
        ("window_size=1 (BN)", "-"),
    ], result.stdout
    runs = json.loads(records.read_text())["results"]
    assert len(runs) == 8


def test_digits_inference_example_recomputes_folds_and_exports():
    result = run_script(
        "examples/digits_inference.py",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--layers",
        "bn,cbn",
    )
    rows = re.findall(
        r"^(bn|cbn) +0 +(\d\.\d+) +(\d\.\d+) +(\S+) +(\d+)-> *(\d+) +(\d+)",
        result.stdout,
        re.MULTILINE,
    )
    assert [r[0] for r in rows] == ["bn", "cbn"], result.stdout
    for name, before, after, fold, n_in, n_out, kept in rows:
        assert float(before) > 0.3 and float(after) > 0.3, result.stdout
        assert float(fold) <= 1e-5, result.stdout
        # BN layers disappear; a CBN becomes the linear layer it wraps.
        removed = 3 if name == "bn" else 0
        assert int(n_out) == int(n_in) - removed, result.stdout
        assert int(kept) == 0, result.stdout
    assert ".keras 0.0e+00" in result.stdout


def test_fine_tune_example_compares_four_variants():
    # The options (shifted fine-tuning inputs, reset and re-estimated
    # statistics) add steps to the default path, so one quick run with all
    # of them covers both.
    result = run_script(
        "examples/fine_tune.py",
        "--quick",
        "--input-scale",
        "127.5",
        "--input-offset",
        "127.5",
        "--reset-statistics",
        "--reestimate-statistics",
    )
    assert "Fine-tuning images: 127.5 * x + 127.5" in result.stdout
    assert "moving statistics reset to 0 and 1" in result.stdout
    assert "Moving statistics re-estimated" in result.stdout
    assert "BRN: 52 batch norms -> 52 BatchRenormalization" in result.stdout
    # MobileNetV2: 35 batch norms follow a bias-free Conv2D, 17 a depthwise
    # convolution, which CBN cannot wrap.
    assert (
        "CBN: 52 batch norms -> 35 CrossIterationBatchNormalization"
        in result.stdout
    )
    assert "17 BatchNormalization (CBN cannot wrap it" in result.stdout
    rows = re.findall(
        r"^(.+?) +test accuracy mean (\d\.\d{3})  \(min (\d\.\d{3}), "
        r"max (\d\.\d{3}) over 1 seeds\)  \d+ s$",
        result.stdout,
        re.MULTILINE,
    )
    assert [name for name, *_ in rows] == [
        "Keras BN",
        "Keras BN (frozen)",
        "BRN",
        "CBN",
    ], result.stdout
    # Two fine-tuning steps after one epoch of pretraining: no accuracy to
    # speak of, but one seed's mean, min and max are its accuracy.
    for _, mean, low, high in rows:
        assert mean == low == high and 0.0 <= float(mean) <= 1.0, rows


def test_multi_worker_launcher_stops_every_worker_when_one_fails():
    """`examples/multi_worker.py`'s launcher: worker 1 fails at once,
    worker 0 would wait 300 s for it; worker 0 is killed, and the error
    names worker 1 with its own message."""
    import os
    import sys
    import time

    import pytest

    from tests.helpers import ROOT

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import multi_worker

    code = "import sys, time\n"
    code += "if sys.argv[-1] == '1': sys.exit('worker one broke')\n"
    code += "time.sleep(300)\n"
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)worker 1 of 2.*one broke"):
        multi_worker.launch_local_workers([sys.executable, "-c", code], 2, 60)
    assert time.monotonic() - start < 30
    # A worker ended by a signal of its own (an abort at exit) is the one
    # named, not the worker the launcher then stopped.
    code = "import os, sys, time\n"
    code += "if sys.argv[-1] == '1': print('aborting', file=sys.stderr)\n"
    code += "if sys.argv[-1] == '1': sys.stderr.flush(); os.abort()\n"
    code += "time.sleep(300)\n"
    with pytest.raises(
        RuntimeError, match=r"(?s)worker 1 of 2.*launcher: \[0\].*aborting"
    ):
        multi_worker.launch_local_workers([sys.executable, "-c", code], 2, 60)
    ok = "import sys; print('worker', sys.argv[-1])"
    outputs = multi_worker.launch_local_workers(
        [sys.executable, "-c", ok], 2, 60
    )
    assert outputs == ["worker 0\n", "worker 1\n"]


def test_crossq_quick_trains_each_variant_and_switches_inside_the_step(
    tmp_path,
):
    png, records = tmp_path / "crossq.png", tmp_path / "crossq.json"
    # --switch 0.5: plain BN for the critic's first 150 of 300 updates. The
    # actor trains at every third update: its 100 calls stay before it.
    result = run_script(
        "examples/crossq.py",
        "--quick",
        "--switch",
        "0.5",
        "--out",
        str(png),
        "--json",
        str(records),
    )
    row = r"^\| (\w+) \| (-?\d+) ± 0 \| (-?\d+) ± 0 \| (\d+\.\d) \|$"
    rows = re.findall(row, result.stdout, re.MULTILINE)
    variants = ["crossq_brn", "crossq_bn", "sac"]
    assert [r[0] for r in rows] == variants, result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(records.read_text())["runs"]
    assert [r["variant"] for r in runs] == variants
    for r in runs:
        assert r["steps"] == [200, 400] and r["updates"] == 300, r
        # Pendulum's reward per step lies in [-16.3, 0], over 200 steps.
        assert all(-3300 < x < 0 for x in r["returns"]), r
        assert r["ms_per_update"] > 0, r
    # [rmax, dmax, step] of the first BRN layer of each network: the
    # schedule switched inside the compiled critic step; the critic's
    # inference calls (in the actor's loss) did not count as steps.
    assert runs[0]["critic_brn"] == [3.0, 5.0, 300.0], runs[0]
    assert runs[0]["actor_brn"] == [1.0, 0.0, 100.0], runs[0]
    assert runs[1]["critic_brn"] is None and runs[2]["actor_brn"] is None


def _crossq_table_rows(records, tmp_path):
    """The rows of the table examples/crossq.py prints for records in docs/
    (no training)."""
    result = run_script(
        "examples/crossq.py",
        "--plot-from",
        os.path.join(ROOT, "docs", records),
        "--out",
        str(tmp_path / "table.png"),
    )
    return re.findall(r"^\| (?!variant|---).*$", result.stdout, re.MULTILINE)


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


@pytest.mark.parametrize(
    "records, runs", [("crossq.json", 3), ("crossq_schedules.json", 5)]
)
def test_crossq_tables_in_the_docs_come_from_its_records(
    records, runs, tmp_path
):
    """The variants' and the warm-up schedules' tables of the
    reinforcement-learning page are what the records give."""
    rows = _crossq_table_rows(records, tmp_path)
    assert len(rows) == runs, rows
    page = _read("docs/guide/reinforcement-learning.md")
    for row in rows:
        assert row in page, row


def test_crossq_table_in_the_readme_comes_from_its_records(tmp_path):
    """The README quotes the returns at steps 1000, 2000 and 3000."""
    readme = _read("README.md")
    for row in _crossq_table_rows("crossq.json", tmp_path):
        cells = row.strip("| ").split(" | ")
        short = " | ".join([cells[0], cells[2], cells[4], cells[6], cells[7]])
        assert f"| {short} |" in readme, short


def test_crossq_reference_table_in_the_docs_comes_from_its_records():
    """The comparison with sbx-rl in the docs is what the merged records in
    docs/crossq_reference.json give (no training, no sbx-rl needed)."""
    result = run_script(
        "benchmarks/crossq_reference.py",
        "--from",
        os.path.join(ROOT, "docs", "crossq_reference.json"),
    )
    rows = re.findall(r"^\| \d+ \|.*$", result.stdout, re.MULTILINE)
    assert len(rows) == 6, result.stdout
    assert all(row.endswith("| yes |") for row in rows), rows
    page = _read("docs/guide/reinforcement-learning.md")
    for row in rows:
        assert row in page, row
