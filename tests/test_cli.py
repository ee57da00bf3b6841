"""The `kpq` command line: convert, inspect, evaluate, output streams and exit codes.

Most runs are in-process (click's CliRunner keeps stdout and stderr apart);
a few run `kpq` as a real process to check exit codes, stream separation and
the absence of tracebacks end to end.
"""

import json
import os

import numpy as np
import pytest

import keras_powerquant as kpq  # noqa: E402  (after cli_helpers: this checkout's CLI)
from keras_powerquant.cli.main import main as kpq_main  # noqa: E402
from keras_powerquant.evaluation import load_predictor  # noqa: E402
from keras_powerquant.evaluation import top_k_accuracy  # noqa: E402
from tests.cli_helpers import assert_one_line_error
from tests.cli_helpers import invoke
from tests.cli_helpers import kpq_stderr_lines
from tests.cli_helpers import random_images
from tests.cli_helpers import run_kpq
from tests.cli_helpers import save_small_model
from tests.cli_helpers import sha256
from tests.cli_helpers import SMALL_FLOAT
from tests.cli_helpers import SMALL_FOLDS
from tests.cli_helpers import SMALL_KEPT_BN
from tests.cli_helpers import SMALL_QUANTIZED
from tests.cli_helpers import snapshot

SCALE = 1 / 255


# ---------------------------------------------------------------------------
# Fixtures: one small model saved both ways, data, one shared export.


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def eval_data(small, tmp_path_factory):
    """An .npz whose labels are the float model's top-1 on even images and wrong on odd ones."""
    model, _ = small
    x = random_images(40, seed=3)
    predicted = np.argmax(model.predict(x.astype("float32") * np.float32(SCALE), verbose=0), axis=1)
    y = np.where(np.arange(len(x)) % 2 == 0, predicted, (predicted + 1) % 10).astype(np.int64)
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "eval.npz", x=x, y=y)
    np.savez(folder / "renamed.npz", images=x, labels=y)
    return folder / "eval.npz", folder / "renamed.npz", x, y


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    images = random_images(24, seed=5).astype("float32")
    np.save(folder / "calib.npy", images)
    # "x" has the wrong shape: the run only succeeds if --calibration-key is honoured.
    np.savez(folder / "calib.npz", x=np.zeros((4, 5, 5, 3), "float32"), calib=images)
    return folder


@pytest.fixture(scope="module")
def small_export(small, tmp_path_factory):
    """`kpq convert small.keras -o OUT --format both`, once per module."""
    out = tmp_path_factory.mktemp("export") / "out"
    result = invoke("convert", small[1]["keras"], "-o", out, "--format", "both")
    assert result.exit_code == 0, result.output
    return out, result


def _report(out, version=1):
    with open(os.path.join(out, str(version), "kpq-report.json"), encoding="utf-8") as file:
        return json.load(file)


def _convert_ok(*args):
    result = invoke("convert", *args)
    assert result.exit_code == 0, result.output
    return result


def _float_variable_bytes(model):
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.variables))


def _assert_text_summary(stdout, metadata, out):
    """The per-layer table, the size totals and the written paths, read from the report file."""
    lines = stdout.splitlines()
    report = metadata["report"]
    for layer in report["layers"]:
        rows = [line for line in lines if line.startswith(layer["name"] + " ")]
        assert rows, f"no summary row for {layer['name']}:\n{stdout}"
        if layer["status"] == "quantized":
            assert f" {layer['weight_bits']} " in rows[0] and f"{layer['exponent']:.3f}" in rows[0]
        else:
            assert layer["reason"] in rows[0]
    for activation in report["activations"]:
        assert any(line.startswith(activation["name"] + " ") for line in lines), activation["name"]
    sizes = metadata["sizes"]
    (weights,) = [line for line in lines if line.startswith("Weights:")]
    assert f"({sizes['variable_ratio']:.3f}x)" in weights
    assert f"Report: {os.path.join(os.path.abspath(out), '1', 'kpq-report.json')}" in lines


# ---------------------------------------------------------------------------
# Help and version.


def test_top_level_help_lists_commands_and_global_options():
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("convert", "inspect", "evaluate", "--debug", "--version"):
        assert word in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("command", sorted(kpq_main.commands))
def test_each_command_help_describes_every_option(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    options = [p for p in kpq_main.commands[command].params if p.param_type_name == "option"]
    assert options
    for option in options:
        assert max(option.opts, key=len) in result.stdout, option.name
        assert option.help, f"`kpq {command} {max(option.opts, key=len)}` has no help text"
        # The first words of each description are on the help page.
        assert " ".join(option.help.split()[:2]) in " ".join(result.stdout.split()), option.name


def test_version_option_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"kpq, version {kpq.__version__}"


# ---------------------------------------------------------------------------
# convert.


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_convert_small_model_writes_savedmodel_and_report(small, kind, tmp_path):
    model, paths = small
    out = tmp_path / "out"
    result = _convert_ok(paths[kind], "-o", out, "--wbits", "4", "--abits", "4")
    assert os.listdir(out) == ["1"]
    expected = ["assets", "fingerprint.pb", "kpq-report.json", "saved_model.pb", "variables"]
    assert sorted(os.listdir(out / "1")) == expected
    metadata = _report(out)
    quantized = [layer["name"] for layer in metadata["report"]["layers"] if layer["status"] == "quantized"]
    assert quantized == SMALL_QUANTIZED
    assert metadata["sizes"]["float_variable_bytes"] == _float_variable_bytes(model)
    _assert_text_summary(result.stdout, metadata, out)
    # Progress goes to stderr only.
    for stage in ("Loading", "Converting", "Exporting version 1"):
        assert stage in result.stderr and stage not in result.stdout
    assert "Error" not in result.stderr


def test_convert_json_is_the_only_stdout(small, tmp_path):
    out = tmp_path / "out"
    result = _convert_ok(small[1]["keras"], "-o", out, "--json")
    data = json.loads(result.stdout)
    assert data["paths"]["saved_model"] == str(out / "1")
    assert data["paths"]["keras"] is None
    assert data["report"] == _report(out)["report"]
    assert data["report"]["options"]["wbits"] == 4 and data["report"]["options"]["abits"] == 4
    assert "Loading" in result.stderr


def _serve(saved_model_dir, x):
    import tensorflow as tf

    signature = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    (name,) = signature.structured_input_signature[1]
    (output,) = signature(**{name: tf.constant(x)}).values()
    return output.numpy()


def test_convert_format_both_writes_matching_keras_and_savedmodel(small_export):
    import keras

    out, result = small_export
    assert os.listdir(out) == ["1"]
    assert {"kpq-model.keras", "kpq-report.json", "saved_model.pb"} <= set(os.listdir(out / "1"))
    assert f"Keras: {out / '1' / 'kpq-model.keras'}" in result.stdout.splitlines()
    reloaded = keras.saving.load_model(out / "1" / "kpq-model.keras")
    assert any(isinstance(layer, kpq.PowerQuantConv2D) for layer in reloaded.layers)
    x = random_images(8, seed=7).astype("float32") * np.float32(SCALE)
    np.testing.assert_allclose(_serve(out / "1", x), reloaded.predict(x, verbose=0), atol=1e-6)


def test_convert_format_keras_writes_no_savedmodel(small, tmp_path):
    out = tmp_path / "out"
    _convert_ok(small[1]["h5"], "-o", out, "--format", "keras")
    assert sorted(os.listdir(out / "1")) == ["kpq-model.keras", "kpq-report.json"]


def test_convert_version_option_names_the_version(small, tmp_path):
    out = tmp_path / "out"
    result = _convert_ok(small[1]["keras"], "-o", out, "--version", "3")
    assert os.listdir(out) == ["3"]
    assert os.path.isfile(out / "3" / "saved_model.pb") and os.path.isfile(out / "3" / "kpq-report.json")
    assert "Exporting version 3" in result.stderr


def test_convert_method_uniform_sets_every_exponent_to_one(small, tmp_path):
    out = tmp_path / "out"
    _convert_ok(small[1]["keras"], "-o", out, "--method", "uniform")
    report = _report(out)["report"]
    assert report["options"]["method"] == "uniform"
    quantized = [layer for layer in report["layers"] if layer["status"] == "quantized"]
    activations = [a for a in report["activations"] if a["status"] == "quantized"]
    assert quantized and activations
    assert all(layer["exponent"] == 1.0 for layer in quantized)
    assert all(a["exponent"] == 1.0 for a in activations)


def test_convert_default_method_fits_exponents_other_than_one(small_export):
    report = _report(small_export[0])["report"]
    assert report["options"]["method"] == "powerquant"
    assert any(layer["exponent"] != 1.0 for layer in report["layers"] if layer["status"] == "quantized")


def _activations(report):
    return {a["name"]: a for a in report["activations"]}


def test_convert_with_npy_and_npz_calibration_data(small_export, small, calibration, tmp_path):
    data_free = _activations(_report(small_export[0])["report"])
    runs = {
        "npy": ["--calibration-data", calibration / "calib.npy"],
        "npz": ["--calibration-data", calibration / "calib.npz", "--calibration-key", "calib"],
    }
    reports = {}
    for name, options in runs.items():
        out = tmp_path / name
        result = _convert_ok(small[1]["keras"], "-o", out, *options)
        assert "calibrated" in result.stderr
        reports[name] = _report(out)["report"]
        assert reports[name]["options"]["calibrated"] is True
        activations = _activations(reports[name])
        assert {a["rule"] for a in activations.values()} == {"calibration"}
        # The model input has no data-free statistics; calibration quantizes it.
        assert data_free["conv_a_input_quantizer"]["status"] == "float"
        assert activations["conv_a_input_quantizer"]["status"] == "quantized"
    # The same images under both containers: the same fit.
    assert _activations(reports["npy"]) == _activations(reports["npz"])


def test_convert_npz_calibration_without_key_uses_x(small, calibration, tmp_path):
    # calib.npz's "x" array has the wrong shape, so the default key must fail on it.
    out = tmp_path / "out"
    result = invoke("convert", small[1]["keras"], "-o", out, "--calibration-data", calibration / "calib.npz")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "expected shape", "got (4, 5, 5, 3)")
    assert not out.exists()


def test_quantize_first_last_lowers_first_and_last_layers_to_wbits(small_export, small, tmp_path):
    default = {layer["name"]: layer for layer in _report(small_export[0])["report"]["layers"]}
    out = tmp_path / "out"
    _convert_ok(small[1]["keras"], "-o", out, "--wbits", "4", "--abits", "4", "--quantize-first-last")
    flagged = {layer["name"]: layer for layer in _report(out)["report"]["layers"]}
    assert default["conv_a"]["position"] == "first" and default["logits"]["position"] == "last"
    for name in ("conv_a", "logits"):
        assert default[name]["weight_bits"] == 8
        assert flagged[name]["weight_bits"] == 4
    assert default["logits"]["input_bits"] == 8 and flagged["logits"]["input_bits"] == 4
    assert default["conv_c"]["weight_bits"] == flagged["conv_c"]["weight_bits"] == 4


def test_scope_network_shares_one_exponent(small_export, small, tmp_path):
    layer_scope = _report(small_export[0])["report"]
    assert len({layer["exponent"] for layer in layer_scope["layers"] if layer["status"] == "quantized"}) > 1
    out = tmp_path / "out"
    _convert_ok(small[1]["keras"], "-o", out, "--scope", "network")
    report = _report(out)["report"]
    assert report["options"]["scope"] == "network"
    assert len({layer["exponent"] for layer in report["layers"] if layer["status"] == "quantized"}) == 1
    assert len({a["exponent"] for a in report["activations"] if a["status"] == "quantized"}) == 1


@pytest.mark.parametrize("flag", [None, "--fast-activations", "--continuous-activations"])
def test_fast_activations_flag(small, tmp_path, flag):
    out = tmp_path / "out"
    result = _convert_ok(small[1]["keras"], "-o", out, *([flag] if flag else []))
    report = _report(out)["report"]
    fast = flag != "--continuous-activations"
    assert report["options"]["fast_activations"] is fast
    exponents = {a["exponent"] for a in report["activations"] if a["status"] == "quantized"}
    assert exponents and (exponents <= {0.25, 0.5, 1.0}) == fast
    assert ("among 1, 1/2, 1/4" if fast else "continuous") in result.stdout


# ---------------------------------------------------------------------------
# The real ResNet-8.


@pytest.fixture(scope="module")
def resnet8_cli(resnet8_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet8") / "out"
    result = invoke("convert", resnet8_path, "-o", out, "--wbits", "4", "--abits", "4", "--format", "both")
    assert result.exit_code == 0, result.output
    return out, result


def test_convert_real_resnet8(resnet8_cli, resnet8_model):
    out, result = resnet8_cli
    assert os.listdir(out) == ["1"]
    assert {"kpq-model.keras", "kpq-report.json", "saved_model.pb"} <= set(os.listdir(out / "1"))
    metadata = _report(out)
    _assert_text_summary(result.stdout, metadata, out)
    conv_and_dense = [layer.name for layer in resnet8_model.layers if type(layer).__name__ in ("Conv2D", "Dense")]
    assert [layer["name"] for layer in metadata["report"]["layers"]] == conv_and_dense
    assert metadata["sizes"]["float_variable_bytes"] == _float_variable_bytes(resnet8_model)
    assert metadata["sizes"]["variable_bytes"] < 0.2 * metadata["sizes"]["float_variable_bytes"]
    assert "Loading" in result.stderr and "Loading" not in result.stdout


def test_evaluate_real_resnet8_float_and_converted(resnet8_cli, resnet8_path, cifar_test, tmp_path):
    out, _ = resnet8_cli
    x, y = cifar_test
    data = tmp_path / "test200.npz"
    np.savez(data, x=x[:200].astype(np.uint8), y=y[:200])
    result = invoke("evaluate", resnet8_path, out, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["model"] for row in rows] == [str(resnet8_path), str(out)]
    float_scores = kpq.load_model(resnet8_path).predict(x[:200], verbose=0)
    assert rows[0]["top1"] == pytest.approx(np.mean(np.argmax(float_scores, axis=1) == y[:200]), abs=1e-12)
    assert rows[1] == {"model": str(out), **top_k_accuracy(load_predictor(out), x[:200], y[:200])}
    # A 4-bit ResNet-8 stays a CIFAR-10 classifier (float: ~88%).
    assert rows[1]["top1"] > 0.5


# ---------------------------------------------------------------------------
# inspect.


def test_inspect_dry_run_lists_decisions_and_writes_nothing(small, tmp_path, monkeypatch):
    _, paths = small
    monkeypatch.chdir(tmp_path)
    before = (snapshot(tmp_path), snapshot(paths["h5"].parent))
    result = invoke("inspect", paths["h5"])
    assert result.exit_code == 0, result.output
    assert (snapshot(tmp_path), snapshot(paths["h5"].parent)) == before
    lines = result.stdout.splitlines()

    def row(name):
        rows = [line for line in lines if line.startswith(name + " ")]
        assert rows, f"no row for {name}:\n{result.stdout}"
        return rows[0]

    for name in SMALL_QUANTIZED:
        assert "float:" not in row(name)
    for name, class_name in SMALL_FLOAT.items():
        assert f"float: {class_name} has no kernel to quantize" in row(name)
    for bn, source in SMALL_KEPT_BN.items():
        assert any(f"'{bn}' kept" in line and f"'{source}'" in line for line in lines), result.stdout
    for bn, linear in SMALL_FOLDS.items():
        assert any(f"'{bn}'" in line and "folded" in line and f"'{linear}'" in line for line in lines), (
            f"the dry run does not say that {bn} folds into {linear}:\n{result.stdout}"
        )
    # Nothing is fitted in a dry run.
    assert "calibration" in row("conv_a_input_quantizer")


def test_inspect_dry_run_json(small):
    result = invoke("inspect", small[1]["keras"], "--json", "--quantize-first-last")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {f["batch_norm"]: f["into"] for f in report["folded_batch_norms"]} == SMALL_FOLDS
    assert {b["batch_norm"] for b in report["unfolded_batch_norms"]} == set(SMALL_KEPT_BN)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert {n for n, layer in layers.items() if layer["status"] == "float"} == set(SMALL_FLOAT)
    assert all(layers[name]["exponent"] is None for name in SMALL_QUANTIZED)
    assert layers["conv_a"]["weight_bits"] == layers["logits"]["weight_bits"] == 4


def test_inspect_converted_keras_prints_quantizer_metadata(small_export):
    import keras

    from keras_powerquant.layers import PowerQuantActivation
    from keras_powerquant.layers import QuantizedKernelLayer

    out, _ = small_export
    path = out / "1" / "kpq-model.keras"
    before = snapshot(out)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert snapshot(out) == before
    loaded = keras.saving.load_model(path)
    quantized = [layer for layer in loaded.layers if isinstance(layer, (QuantizedKernelLayer, PowerQuantActivation))]
    assert {layer.name for layer in quantized} >= set(SMALL_QUANTIZED)
    lines = result.stdout.splitlines()
    assert f"{len(quantized)} PowerQuant layers" in lines[0]
    for layer in quantized:
        (line,) = [line for line in lines if line.split() and line.split()[0] == layer.name]
        assert type(layer).__name__ in line
        for key, value in layer.quantizer.get_config().items():
            assert f"{key}={value}" in line, (key, line)


def test_inspect_export_folder_and_version_folder(small_export):
    out, _ = small_export
    metadata = _report(out)
    before = snapshot(out)
    for target in (out, out / "1"):
        result = invoke("inspect", target)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert "version 1" in lines[0]
        for layer in metadata["report"]["layers"]:
            assert any(line.startswith(layer["name"] + " ") for line in lines), layer["name"]
        (weights,) = [line for line in lines if line.startswith("Weights:")]
        assert f"({metadata['sizes']['variable_ratio']:.3f}x)" in weights
        assert any(line.startswith("Versions:") and metadata["versions"]["tensorflow"] in line for line in lines)
    assert snapshot(out) == before


# ---------------------------------------------------------------------------
# evaluate.


def _expected(path, x, y, scale=SCALE):
    return top_k_accuracy(load_predictor(path), x.astype("float32") * np.float32(scale), y)


def test_evaluate_side_by_side_matches_top_k_accuracy(small, small_export, eval_data):
    model, paths = small
    out, _ = small_export
    data, _, x, y = eval_data
    models = [paths["h5"], paths["keras"], out / "1", out]
    result = invoke("evaluate", *models, "--data", data, "--scale", str(SCALE), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["model"] for row in rows] == [str(m) for m in models]
    for row, path in zip(rows, models):
        assert row == {"model": str(path), **_expected(path, x, y)}
    # Independent check on the float model: even images are right by construction.
    scores = model.predict(x.astype("float32") * np.float32(SCALE), verbose=0)
    ranked = np.argsort(-scores, axis=1)
    assert rows[0]["top1"] == rows[1]["top1"] == pytest.approx(np.mean(ranked[:, 0] == y)) == pytest.approx(0.5)
    assert rows[0]["top5"] == pytest.approx(np.mean(np.any(ranked[:, :5] == y[:, None], axis=1)))
    assert rows[2] == {**rows[3], "model": str(out / "1")}
    assert [line for line in result.stderr.splitlines() if line.startswith("Evaluating")] == [
        f"Evaluating {m}" for m in models
    ]


def test_evaluate_table_output(small, small_export, eval_data):
    _, paths = small
    out, _ = small_export
    data, _, x, y = eval_data
    result = invoke("evaluate", paths["keras"], out, "--data", data, "--scale", "0.5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "top-1", "top-5", "images"]
    for path, line in zip([paths["keras"], out], lines[1:]):
        expected = _expected(path, x, y, 0.5)
        assert line.split() == [
            str(path),
            f"{100 * expected['top1']:.2f}%",
            f"{100 * expected['top5']:.2f}%",
            str(len(y)),
        ]


def test_evaluate_custom_keys(small, eval_data):
    _, paths = small
    _, renamed, x, y = eval_data
    result = invoke(
        "evaluate", paths["keras"], "--data", renamed, "--x-key", "images", "--y-key", "labels",
        "--scale", str(SCALE), "--json",
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row == {"model": str(paths["keras"]), **_expected(paths["keras"], x, y)}


@pytest.mark.parametrize("options", [[], ["--x-key", "images", "--y-key", "nope"]])
def test_evaluate_bad_keys_is_a_usage_error(small, eval_data, options):
    _, renamed, _, _ = eval_data
    result = invoke("evaluate", small[1]["keras"], "--data", renamed, *options)
    assert result.exit_code == 2
    missing = "nope" if options else "x"
    assert f"has no array '{missing}';" in result.stderr
    assert "['images', 'labels']" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------
# Exit codes.


@pytest.mark.parametrize(
    "args",
    [
        ["--wbits", "9"],
        ["--wbits", "1"],
        ["--abits", "0"],
        ["--wbits", "four"],
        ["--method", "log2"],
        ["--format", "onnx"],
        ["--scope", "channel"],
        ["--version", "0"],
        ["--no-such-option"],
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_option_values_exit_2_and_write_nothing(small, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", small[1]["keras"], "-o", "out", *args)
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.stderr and "Error:" in result.stderr
    assert os.listdir(tmp_path) == []


def test_missing_output_option_exits_2(small):
    result = invoke("convert", small[1]["keras"])
    assert result.exit_code == 2
    assert "Missing option '-o' / '--output'" in result.stderr


@pytest.mark.parametrize("command", ["convert", "inspect", "evaluate"])
def test_missing_model_path_exits_2(tmp_path, eval_data, command):
    extra = {"convert": ["-o", tmp_path / "out"], "inspect": [], "evaluate": ["--data", eval_data[0]]}[command]
    result = invoke(command, tmp_path / "missing.h5", *extra)
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "missing.h5" in result.stderr
    assert os.listdir(tmp_path) == []


def test_no_subcommand_or_no_model_is_a_usage_error():
    assert invoke("convert").exit_code == 2
    assert invoke("evaluate", "--data", "x.npz").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def test_other_errors_exit_1_with_one_error_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    result = invoke("convert", text, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "notes.txt", "not a Keras model file")
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_unexpected_exception_is_still_one_line(small, tmp_path, monkeypatch):
    """The CLI's last line of defence: an error that is not kpq's, with a multi-line message."""
    def broken_export(*args, **kwargs):
        raise RuntimeError("first line of a long message\nsecond line\nthird line")

    monkeypatch.setattr(kpq, "export_model", broken_export)
    result = invoke("convert", small[1]["keras"], "-o", tmp_path / "out")
    assert result.exit_code == 1
    line = assert_one_line_error(result.stderr, "RuntimeError", "first line of a long message", "--debug")
    assert "second line" not in result.stderr, line


def test_debug_reraises_the_exception(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    result = invoke("--debug", "convert", text, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert isinstance(result.exception, kpq.ModelLoadError)
    assert "not a Keras model file" in str(result.exception)


# ---------------------------------------------------------------------------
# End to end, as a real process.


def test_process_json_stdout_is_pure_json(small, tmp_path):
    out = tmp_path / "out"
    model_hash = sha256(small[1]["h5"])
    process = run_kpq("convert", small[1]["h5"], "-o", out, "--json", "--format", "keras")
    assert process.returncode == 0, process.stderr[-3000:]
    data = json.loads(process.stdout)
    assert data["paths"]["keras"] == str(out / "1" / "kpq-model.keras")
    assert os.path.isfile(data["paths"]["keras"])
    lines = kpq_stderr_lines(process.stderr)
    assert any(line.startswith("Loading ") for line in lines), process.stderr
    assert "Traceback" not in process.stderr
    assert sha256(small[1]["h5"]) == model_hash


def test_process_error_exits_1_with_one_line_and_no_traceback(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    process = run_kpq("inspect", text)
    assert process.returncode == 1
    assert process.stdout == ""
    assert_one_line_error(process.stderr, "notes.txt", "not a Keras model file")
    assert kpq_stderr_lines(process.stderr) == [process.stderr.strip().splitlines()[-1]]


def test_process_usage_error_exits_2(small, tmp_path):
    process = run_kpq("convert", small[1]["keras"], "-o", tmp_path / "out", "--wbits", "9")
    assert process.returncode == 2
    assert "Usage: kpq convert" in process.stderr and "--wbits" in process.stderr
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "out").exists()


def test_process_debug_shows_the_traceback(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    process = run_kpq("--debug", "convert", text, "-o", tmp_path / "out")
    assert process.returncode == 1
    assert "Traceback (most recent call last)" in process.stderr
    assert "ModelLoadError" in process.stderr and "not a Keras model file" in process.stderr
