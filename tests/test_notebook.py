"""The walkthrough notebook runs top to bottom and shows its key outputs.

It is executed the way `notebooks/execute_notebook.py` stores it (fresh
"python3" kernel, this checkout first on `PYTHONPATH`). Skipped when
nbclient, nbformat or ipykernel is not installed.
"""

import importlib.util
import pathlib
import re

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
WALKTHROUGH = NOTEBOOKS / "powerquant_walkthrough.ipynb"
CELL_TIMEOUT_SECONDS = 300


def _executor():
    spec = importlib.util.spec_from_file_location("execute_notebook", NOTEBOOKS / "execute_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def _text(output):
    return output.get("text", "") + output.get("data", {}).get("text/plain", "")


@pytest.fixture(scope="module")
def executed_walkthrough():
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.kernelspec import NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel is installed")
    return _executor().execute(WALKTHROUGH, timeout=CELL_TIMEOUT_SECONDS)


def test_no_cell_errors(executed_walkthrough):
    errors = [o for o in _outputs(executed_walkthrough) if o.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)


def test_accuracy_table_compares_float_uniform_and_powerquant(executed_walkthrough):
    text = "\n".join(_text(o) for o in _outputs(executed_walkthrough))
    table = text[text.index("Accuracy table") :]
    percent = r"\d+\.\d\d%"
    assert re.search(rf"^float\s+-\s+{percent}\s+{percent}$", table, re.MULTILINE)
    for method in ("uniform", "powerquant"):
        for calibration in ("data-free", "calibrated"):
            row = rf"^W4/A4 {method}\s+{calibration}\s+{percent}\s+{percent}$"
            assert re.search(row, table, re.MULTILINE), row


def test_plots_are_stored(executed_walkthrough):
    images = [o for o in _outputs(executed_walkthrough) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # weight histogram with levels, error against a


def test_reloaded_saved_model_matches_keras(executed_walkthrough):
    text = "\n".join(_text(o) for o in _outputs(executed_walkthrough))
    assert "same top-1 class: 100%" in text
    difference = float(text.split("max |SavedModel - Keras| over 100 images: ")[1].split()[0])
    assert difference < 1e-4
