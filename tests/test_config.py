"""`ConversionConfig`: every option checked once, serializable, and the one source of convert's options."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.config import ConversionConfig
from keras_powerquant.config import KNOWN_STEPS
from keras_powerquant.config import REFINEMENT_STEPS
from tests import models


@pytest.mark.parametrize(
    "options, message",
    [
        ({"wbits": 1}, "`wbits` must be from 2 to 8; got 1"),
        ({"wbits": 4.0}, "`wbits` must be an integer from 2 to 8; got 4.0"),
        ({"wbits": True}, "`wbits` must be an integer from 2 to 8; got True"),
        ({"abits": 9}, "`abits` must be from 2 to 8; got 9"),
        ({"abits": "float"}, "`abits` must be an integer from 2 to 8; got 'float'"),
        ({"method": "nonuniform"}, "`method` must be one of ('powerquant', 'uniform'); got 'nonuniform'"),
        ({"method": None}, "`method` must be one of"),
        ({"scope": "channel"}, "`scope` must be one of ('layer', 'network'); got 'channel'"),
        ({"per_channel": 1}, "`per_channel` must be True or False; got 1"),
        ({"p": 0}, "`p` must be a finite number > 0; got 0"),
        ({"p": float("inf")}, "`p` must be a finite number > 0; got inf"),
        ({"p": "2"}, "`p` must be a finite number > 0; got '2'"),
        ({"exponent_bounds": 0.5}, "`exponent_bounds` must be a pair (low, high); got 0.5"),
        ({"exponent_bounds": (0.1, 1.0, 2.0)}, "`exponent_bounds` must be a pair (low, high)"),
        ({"exponent_bounds": (2.0, 0.5)}, "`exponent_bounds` must satisfy 0 < low < high < inf"),
        ({"exponent_bounds": (0.0, 2.0)}, "`exponent_bounds` must satisfy 0 < low < high < inf"),
        ({"quantize_first_last": "yes"}, "`quantize_first_last` must be True or False; got 'yes'"),
        ({"first_last_bits": 16}, "`first_last_bits` must be from 2 to 8; got 16"),
        ({"fast_activations": None}, "`fast_activations` must be True or False; got None"),
        ({"weight_clipping": 1}, "`weight_clipping` must be True or False; got 1"),
        ({"bias_correction": "auto"}, "`bias_correction` must be True, False, 'analytic' or 'empirical'; got 'auto'"),
        ({"bias_correction": None}, "`bias_correction` must be True, False, 'analytic' or 'empirical'; got None"),
        ({"calibration_batch_size": 0}, "`calibration_batch_size` must be an integer >= 1; got 0"),
        ({"calibration_steps": 1.5}, "`calibration_steps` must be an integer >= 1; got 1.5"),
        ({"refine": "sharpen"}, "Unknown refinement step(s) ['sharpen']"),
        ({"refine": [1]}, "`refine` must be True, False or a list of step names"),
        ({"refine": 1}, "`refine` must be True, False or a list of step names"),
        ({"target_size": -1}, "`target_size` must be a positive number of bytes or a fraction"),
        ({"target_size": 1.5}, "`target_size` as a fraction of the float size must be in (0, 1]; got 1.5"),
        ({"target_size": True}, "`target_size` must be a positive number"),
        ({"mean_bits": 9}, "`mean_bits` must be a number in [2, 8]; got 9"),
        ({"target_size": 0.5, "mean_bits": 4}, "Give `target_size` or `mean_bits`, not both."),
        ({"refine_samples": 0}, "`refine_samples` must be an integer >= 1; got 0"),
        ({"refine_evaluations": -1}, "`refine_evaluations` must be an integer >= 0; got -1"),
        ({"rounding_iterations": 2.5}, "`rounding_iterations` must be an integer >= 0; got 2.5"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_every_option_is_checked_when_constructed(options, message):
    with pytest.raises(ValueError) as info:
        ConversionConfig(**options)
    assert message in str(info.value)


def test_options_after_method_are_keyword_only():
    with pytest.raises(TypeError):
        ConversionConfig(4, 4, "powerquant", "network")


def test_values_are_normalized_to_plain_python_types():
    config = ConversionConfig(
        np.int64(5), np.int32(6), calibration_steps=np.int64(2), p=np.float32(3.0),
        exponent_bounds=np.array([0.2, 1.5]), refine="lapq", mean_bits=np.float64(3.5),
    )
    assert (config.wbits, config.abits, config.calibration_steps) == (5, 6, 2)
    assert all(type(v) is int for v in (config.wbits, config.abits, config.calibration_steps))
    assert type(config.p) is float and config.exponent_bounds == (0.2, 1.5)
    assert config.refine == ("lapq",) and ConversionConfig(refine=True).refine == REFINEMENT_STEPS
    assert ConversionConfig(refine=False).refine == () and not ConversionConfig().refining
    assert ConversionConfig(target_size=np.int64(1000)).target_size == 1000


def test_get_config_round_trips_through_json():
    config = ConversionConfig(
        3, None, "uniform", scope="network", per_channel=False, p=np.float64(2.5), exponent_bounds=(0.2, 1.5),
        quantize_first_last=True, first_last_bits=6, fast_activations=False, weight_clipping=True,
        bias_correction="analytic", calibration_batch_size=np.int64(16), calibration_steps=3,
        refine=["grid", "rounding", "grid"], target_size=0.25, refine_samples=64, refine_evaluations=0,
        rounding_iterations=10,
    )
    text = json.dumps(config.get_config())
    restored = ConversionConfig.from_config(json.loads(text))
    assert restored == config
    assert restored.refine == ("grid", "rounding") and restored.exponent_bounds == (0.2, 1.5)
    assert json.loads(text)["refine"] == ["grid", "rounding"]
    assert ConversionConfig.from_config({}) == ConversionConfig()


def test_from_config_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"Unknown conversion option\(s\) \['wbit'\]"):
        ConversionConfig.from_config({"wbit": 4})
    with pytest.raises(ValueError, match="`wbits` must be from 2 to 8"):
        ConversionConfig.from_config({**ConversionConfig().get_config(), "wbits": 12})


def test_a_config_is_immutable_and_replace_checks_again():
    config = ConversionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.wbits = 3
    assert dataclasses.replace(config, wbits=3).wbits == 3
    with pytest.raises(ValueError, match="`wbits` must be from 2 to 8"):
        dataclasses.replace(config, wbits=1)


@pytest.mark.parametrize(
    "options, calibrated, labelled, message",
    [
        ({"refine": True}, False, False, "`refine` measures the network loss on calibration data"),
        ({"target_size": 0.5}, False, False, "`target_size` measures the network loss"),
        ({"mean_bits": 3}, False, False, "`mean_bits` measures the network loss"),
        ({"bias_correction": "empirical"}, False, False, "needs calibration data"),
        ({}, True, True, "`calibration_labels` are only used by refinement"),
    ],
)
def test_check_data_refuses_options_the_data_cannot_serve(options, calibrated, labelled, message):
    with pytest.raises(ValueError, match=message):
        ConversionConfig(**options).check_data(calibrated, labelled)
    ConversionConfig(**options).check_data(True)  # fine once calibration data is there


@pytest.mark.parametrize(
    "value, calibrated, method",
    [(True, True, "empirical"), (True, False, "analytic"), ("analytic", True, "analytic"),
     ("empirical", True, "empirical"), (False, True, None)],
)
def test_bias_correction_method_follows_the_data(value, calibrated, method):
    assert ConversionConfig(bias_correction=value).bias_correction_method(calibrated) == method


def test_the_config_needs_neither_keras_nor_tensorflow():
    code = (
        "import sys, json, keras_powerquant as kpq\n"
        "config = kpq.ConversionConfig(3, refine=True)\n"
        "json.dumps(config.get_config())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_refinement_runs_every_step_the_config_accepts():
    from keras_powerquant import refinement

    assert set(refinement.STEPS) == set(KNOWN_STEPS) and set(REFINEMENT_STEPS) <= set(KNOWN_STEPS)


# ---------------------------------------------------------------------------
# convert: a config, or the same options as arguments.


@pytest.fixture(scope="module")
def sequential():
    model = models.build("sequential")
    return model, models.reference_inputs(model, n=24)


def _weights(model):
    return [np.asarray(w) for w in model.weights]


def test_convert_with_a_config_equals_convert_with_keywords(sequential):
    model, x = sequential
    options = {"scope": "network", "weight_clipping": True, "calibration_batch_size": 8, "calibration_steps": 2}
    by_keywords, keyword_report = kpq.convert(model, 3, 5, "powerquant", calibration_data=x, **options)
    config = kpq.ConversionConfig(3, 5, "powerquant", **options)
    by_config, config_report = kpq.convert(model, config=config, calibration_data=x)
    assert [w.name for w in by_config.weights] == [w.name for w in by_keywords.weights]
    for a, b in zip(_weights(by_keywords), _weights(by_config)):
        np.testing.assert_array_equal(a, b)
    assert config_report.options == keyword_report.options


def test_the_report_records_the_config_with_what_conversion_resolved(sequential):
    model, _ = sequential
    config = kpq.ConversionConfig(
        5, 6, scope="network", per_channel=False, p=3.0, exponent_bounds=(0.2, 1.8), fast_activations=False,
        first_last_bits=7,
    )
    _, report = kpq.convert(model, config=config)
    options = json.loads(report.to_json())["options"]
    recorded = {k: v for k, v in options.items() if k in config.get_config()}
    assert recorded == {**config.get_config(), "bias_correction": "analytic"}  # True, resolved without data
    assert ConversionConfig.from_config(recorded) == dataclasses.replace(config, bias_correction="analytic")
    assert options["calibrated"] is False and options["labelled"] is False
    _, report = kpq.convert(model, 4, 4, bias_correction=False)
    assert report.options["bias_correction"] is False and report.options["refine"] == []


def test_convert_refuses_a_config_with_other_options_and_unknown_options(sequential):
    model, _ = sequential
    with pytest.raises(TypeError, match="not both; got `config` and \\['wbits'\\]"):
        kpq.convert(model, config=ConversionConfig(), wbits=3)
    with pytest.raises(TypeError, match="not both; got `config` and \\['3'\\]"):
        kpq.convert(model, 3, config=ConversionConfig())
    with pytest.raises(TypeError, match="`config` must be a ConversionConfig; got dict"):
        kpq.convert(model, config={"wbits": 3})
    with pytest.raises(TypeError, match=r"Unknown conversion option\(s\) \['bias_corection'\]"):
        kpq.convert(model, bias_corection=False)


# ---------------------------------------------------------------------------
# PowerQuantExport checks all its options when constructed.


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"rounding_iterations": -1}, ValueError, "`rounding_iterations` must be an integer >= 0"),
        ({"refine": ["lapq", "sharpen"]}, ValueError, "Unknown refinement step(s) ['sharpen']"),
        ({"per_channel": "no"}, ValueError, "`per_channel` must be True or False"),
        ({"refine": True}, ValueError, "`refine` measures the network loss on calibration data"),
        ({"calibration_labels": np.zeros(4, "int64")}, ValueError, "only used by refinement"),
        ({"calibration_data": "synthetc"}, ValueError, 'must be "synthetic"'),
        ({"target_size": 0.5, "mean_bits": 3}, ValueError, "not both"),
        ({"refine_sample": 10}, TypeError, "Unknown conversion option(s) ['refine_sample']"),
        ({"config": ConversionConfig(), "wbits": 5}, TypeError, "not both"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_the_callback_refuses_a_bad_option_when_constructed(tmp_path, options, error, message):
    with pytest.raises(error) as info:
        kpq.PowerQuantExport(tmp_path / "export", **options)
    assert message in str(info.value)
    assert not (tmp_path / "export").exists()


def test_the_callback_holds_the_config_it_converts_with(tmp_path):
    config = ConversionConfig(5, 6, "uniform", scope="network")
    assert kpq.PowerQuantExport(tmp_path, config=config).config is config
    assert kpq.PowerQuantExport(tmp_path, 5, 6, "uniform", scope="network").config == config


# ---------------------------------------------------------------------------
# kpq convert builds its config from its flags: bad combinations are usage errors.


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from tests.cli_helpers import random_images
    from tests.cli_helpers import save_small_model

    folder = tmp_path_factory.mktemp("config_cli")
    _, paths = save_small_model(folder)
    np.save(folder / "calib.npy", random_images(8))
    np.save(folder / "labels.npy", np.arange(8) % 10)
    return folder, paths


@pytest.mark.parametrize(
    "args, message",
    [
        (["--calibration-data", "calib.npy", "--target-size", "1.5"], "must be in (0, 1]; got 1.5"),
        (["--calibration-data", "calib.npy", "--target-size", "0.5", "--mean-bits", "3"], "not both"),
        (["--mean-bits", "3"], "`mean_bits` measures the network loss on calibration data: pass --calibration-data"),
        (["--calibration-data", "calib.npy", "--calibration-labels", "labels.npy"], "only used by refinement"),
    ],
)
def test_cli_options_the_config_refuses_exit_2(cli_files, monkeypatch, args, message):
    from tests.cli_helpers import invoke

    folder, paths = cli_files
    monkeypatch.chdir(folder)
    result = invoke("convert", paths["keras"], "-o", "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (folder / "out").exists()


def test_cli_report_records_the_config_of_its_flags(cli_files, monkeypatch):
    from tests.cli_helpers import invoke

    folder, paths = cli_files
    monkeypatch.chdir(folder)
    result = invoke("convert", paths["keras"], "-o", "flags", "--wbits", "5", "--abits", "float", "--scope", "network",
                    "--continuous-activations", "--bias-correction", "off", "--format", "keras", "--json")
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["report"]["options"]
    expected = ConversionConfig(5, None, scope="network", fast_activations=False, bias_correction=False)
    assert ConversionConfig.from_config({k: options[k] for k in expected.get_config()}) == expected


def test_cli_config_file_with_flags_that_override_it_and_a_report_to_convert_again(cli_files, monkeypatch):
    from tests.cli_helpers import invoke

    folder, paths = cli_files
    monkeypatch.chdir(folder)
    (folder / "config.json").write_text(json.dumps(ConversionConfig(5, 6, scope="network", p=3.0).get_config()))
    result = invoke("convert", paths["keras"], "-o", "first", "--config", "config.json", "--wbits", "3",
                    "--format", "keras", "--json")
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)["report"]["options"]
    assert (first["wbits"], first["abits"], first["scope"], first["p"]) == (3, 6, "network", 3.0)
    # An export's report converts again as that version was converted.
    result = invoke("convert", paths["keras"], "-o", "again", "--config", "first/1/kpq-report.json", "--format",
                    "keras", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"]["options"] == first


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"wbit": 4}', "Unknown conversion option(s) ['wbit']"),
        ('{"scope": "channel"}', "`scope` must be one of"),
        ("[4, 4]", "must hold a JSON object of conversion options"),
        ("wbits: 4", "cannot read"),
    ],
)
def test_cli_bad_config_file_exits_2(cli_files, monkeypatch, content, message):
    from tests.cli_helpers import invoke

    folder, paths = cli_files
    monkeypatch.chdir(folder)
    (folder / "bad.json").write_text(content)
    result = invoke("convert", paths["keras"], "-o", "out", "--config", "bad.json")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (folder / "out").exists()
