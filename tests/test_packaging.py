"""The built wheel: every package inside, the CLI under keras_powerquant, no top-level `cli`."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy so the build leaves nothing in the working tree.
    source = tmp_path_factory.mktemp("source") / "project"
    shutil.copytree(ROOT, source, ignore=_SKIP)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--quiet", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("keras_powerquant-*.whl")
    with zipfile.ZipFile(path) as archive:
        return archive.namelist(), archive


def test_wheel_holds_every_source_package(wheel):
    names, _ = wheel
    for init in (ROOT / "keras_powerquant").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names
    assert "keras_powerquant/cli/main.py" in names


def test_wheel_puts_no_generic_module_on_the_path(wheel):
    names, _ = wheel
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"keras_powerquant"}


def test_wheel_installs_the_kpq_command(wheel):
    names, archive = wheel
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(archive.filename) as reopened:
        text = reopened.read(entry_points).decode()
    assert "kpq = keras_powerquant.cli.main:main" in text
