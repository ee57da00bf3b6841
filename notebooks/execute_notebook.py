"""Executes notebooks in place with nbclient, storing their outputs.

`python notebooks/execute_notebook.py [NOTEBOOK ...]` (default: every
`.ipynb` in this folder). Each notebook runs in a fresh "python3" kernel
whose working folder is the notebook's own, with the repository root first
on `PYTHONPATH`, so it imports this checkout's `keras_powerquant`. What
TensorFlow's C++ runtime writes straight to the process's stderr (start-up
logs) stays in the terminal instead of the stored outputs, and cell timings
are not recorded, so re-executing changes only what the cells print.
"""

import os
import pathlib
import sys
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
CELL_TIMEOUT_SECONDS = 600


def execute(path, timeout=CELL_TIMEOUT_SECONDS):
    """Runs the notebook at `path` and returns it with its outputs.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised.
        nbclient.exceptions.CellTimeoutError: a cell ran longer than `timeout` seconds.
    """
    path = pathlib.Path(path).resolve()
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        extra_arguments=["--IPKernelApp.capture_fd_output=False"],
        resources={"metadata": {"path": str(path.parent)}},
    )
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    client.execute(env={**os.environ, "PYTHONPATH": python_path})
    return notebook


def main(paths):
    for path in paths or sorted(HERE.glob("*.ipynb")):
        start = time.perf_counter()
        notebook = execute(path)
        nbformat.write(notebook, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
