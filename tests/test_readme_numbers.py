"""The README's results table is the recorded benchmark results, not numbers typed in by hand.

Each row names the benchmark whose results file holds it; this test reads
those files (benchmarks/*.json) and checks every number of the table, so a
rerun benchmark that moves a number fails here until the README follows.
"""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _json(name):
    return json.loads((ROOT / "benchmarks" / name).read_text(encoding="utf-8"))


def _top1_from_hits(hits):
    return 100.0 * hits.count("1") / len(hits)


def _separable(bits, method):
    wbits, abits = bits
    runs = _json("separable_data_free.json")["main"]["rows"]
    (row,) = [
        r for r in runs
        if r["model"] == "resnet8" and (r["wbits"], r["abits"]) == (wbits, abits) and r["method"] == method
    ]
    return 100.0 * row["top1"] if row["top1"] <= 1 else row["top1"]


# The run of benchmarks/bias_correction.py (its --label) the README quotes.
BIAS_CORRECTION_RUN = "compiled-pass-64-samples"


def _bias_correction(bits, method):
    result = _json("bias_correction.json")[BIAS_CORRECTION_RUN]["models"]["ResNet-8"]
    return _top1_from_hits(result[f"W{bits[0]}/A{bits[1]} {method}"])


def _refinement(method):
    rows = _json("second_order.json")["parts"]["resnet8"]["rows"]
    (row,) = [r for r in rows if r["refine"].startswith("refine=True") and r["method"] == method]
    return 100.0 * row["top1"]


def _efficientnet(bits, refine):
    rows = _json("second_order.json")["parts"]["efficientnet"]["rows"]
    label = "refine=True" if refine else "no refinement"
    return tuple(
        100.0 * row["top1"]
        for method in ("uniform", "powerquant")
        for row in rows
        if row["bits"] == bits and row["method"] == method and row["refine"].startswith(label)
    )


# README row label -> (uniform, PowerQuant) from the results files.
EXPECTED = {
    "W8/A8, data-free": lambda: (_separable((8, 8), "uniform"), _separable((8, 8), "powerquant")),
    "W4/A4, data-free": lambda: (_separable((4, 4), "uniform"), _separable((4, 4), "powerquant")),
    "W8/A8, calibrated": lambda: (_bias_correction((8, 8), "uniform"), _bias_correction((8, 8), "powerquant")),
    "W4/A8, calibrated": lambda: (_bias_correction((4, 8), "uniform"), _bias_correction((4, 8), "powerquant")),
    "W4/A4, calibrated": lambda: (_bias_correction((4, 4), "uniform"), _bias_correction((4, 4), "powerquant")),
    "W4/A4, calibrated, `refine=True`": lambda: (_refinement("uniform"), _refinement("powerquant")),
    "W4/A8, no refinement": lambda: _efficientnet("W4/A8", False),
    "W4/A8, `refine=True`": lambda: _efficientnet("W4/A8", True),
    "W4/A4, `refine=True`": lambda: _efficientnet("W4/A4", True),
}


def _readme_rows():
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"\d+\.\d\d", cells[1] or "") and cells[0] in EXPECTED:
            rows[cells[0]] = (float(cells[1]), float(cells[2]))
    return rows


def test_the_readme_table_has_every_row():
    assert sorted(_readme_rows()) == sorted(EXPECTED)


@pytest.mark.parametrize("row", sorted(EXPECTED))
def test_each_readme_number_is_the_recorded_result(row):
    uniform, powerquant = EXPECTED[row]()
    assert _readme_rows()[row] == (round(uniform, 2), round(powerquant, 2))


def test_the_float_accuracy_is_the_recorded_one():
    text = README.read_text(encoding="utf-8")
    (quoted,) = re.findall(r"Float: (\d+\.\d\d)\.", text)
    hits = _json("bias_correction.json")[BIAS_CORRECTION_RUN]["models"]["ResNet-8"]["float"]
    assert float(quoted) == round(_top1_from_hits(hits), 2)


def test_the_efficientnet_float_accuracy_is_the_recorded_one():
    text = README.read_text(encoding="utf-8")
    (quoted,) = re.findall(r"paired; float (\d+\.\d\d)\)", text)
    assert float(quoted) == round(100.0 * _json("second_order.json")["parts"]["efficientnet"]["float_top1"], 2)
