"""`refine=True` on synthetic calibration data, end to end through the `kpq` CLI (issue 20, item 4)."""

import json

import numpy as np

from tests.cli_helpers import invoke
from tests.test_statistics_separable import _smooth_images
from tests.test_statistics_separable import _xception_like


def test_cli_convert_with_synthetic_data_and_recommended_refinement(tmp_path):
    model = _xception_like(_smooth_images(64, seed=1))
    model.save(tmp_path / "sep.keras")
    result = invoke(
        "convert", tmp_path / "sep.keras", "-o", tmp_path / "out", "--wbits", "8", "--abits", "8",
        "--calibration-data", "synthetic", "--synthetic-samples", "8", "--refine", "recommended",
        "--refine-samples", "8", "--refine-evaluations", "2",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "1" / "kpq-report.json").read_text())["report"]
    assert report["options"]["synthetic"]["num_samples"] == 8
    assert [step["name"] for step in report["refinement"]] == report["options"]["refine"]
    assert {a["rule"] for a in report["activations"] if a["status"] == "quantized"} == {"calibration"}
    assert all(np.isfinite(step["loss_after"]) and step["loss_after"] <= step["loss_before"] * (1 + 1e-6)
               for step in report["refinement"] if step["kept"])
