"""`PowerQuantExport`: a real (short) `model.fit` exports a converted version at its end."""

import os
import re

import numpy as np
import pytest

import keras_powerquant as kpq

CLASSES = 3
SHAPE = (8, 8, 3)


def _tiny_cnn(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE, name="pixels")
    h = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(h)
    model = keras.Model(inputs, outputs, name="tiny_cnn")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _data(count, seed):
    """Images whose label is their brightest channel: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (count,) + SHAPE).astype("float32")
    x[np.arange(count), :, :, rng.integers(0, CLASSES, count)] += 0.5
    return x, np.argmax(x.mean(axis=(1, 2)), axis=1)


@pytest.fixture(scope="module")
def data():
    x, y = _data(96, seed=1)
    x_val, y_val = _data(48, seed=2)
    # Validation labels that contradict the task: the more the model learns,
    # the worse it validates, so the best epoch is not the last one.
    return (x, y), (x_val, (y_val + 1) % CLASSES)


class _Recorder:
    """Records each epoch's logs and weights (runs before PowerQuantExport's epoch end)."""

    def __init__(self):
        import keras

        self.logs, self.weights = [], []
        self.callback = keras.callbacks.LambdaCallback(on_epoch_end=self._on_epoch_end)

    def _on_epoch_end(self, epoch, logs):
        self.logs.append(dict(logs))
        self.weights.append([np.array(w) for w in self.callback.model.get_weights()])


def _serve(saved_model_dir, x):
    import tensorflow as tf

    signature = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    (name,) = signature.structured_input_signature[1]
    (output,) = signature(**{name: tf.constant(x)}).values()
    return output.numpy()


def _converted_outputs(model, weights, x, **options):
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(weights)
    quantized, _ = kpq.convert(copy, **options)
    return np.asarray(quantized(x, training=False))


def test_each_fit_exports_the_next_version_that_serves_the_converted_model(data, tmp_path, capsys):
    (x, y), _ = data
    export_dir = tmp_path / "export"
    model = _tiny_cnn()
    callback = kpq.PowerQuantExport(str(export_dir))
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    assert callback.result.version == 1
    assert os.listdir(export_dir) == ["1"]
    assert callback.best_epoch is None
    printed = capsys.readouterr().out
    assert f"PowerQuantExport: version 1 written to {export_dir / '1'}" in printed
    # Each conversion stage's progress, with its time, before the export line.
    assert re.search(r"^PowerQuantExport: weights: (\d+)/\1 in \d+ s$", printed, re.M), printed
    served_1 = _serve(callback.result.saved_model_dir, x[:16])
    np.testing.assert_allclose(served_1, _converted_outputs(model, model.get_weights(), x[:16]), atol=1e-5)

    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    assert callback.result.version == 2
    assert sorted(os.listdir(export_dir)) == ["1", "2"]
    served_2 = _serve(callback.result.saved_model_dir, x[:16])
    np.testing.assert_allclose(served_2, _converted_outputs(model, model.get_weights(), x[:16]), atol=1e-5)
    # Version 1 was left alone and is a different (less trained) model.
    np.testing.assert_array_equal(_serve(str(export_dir / "1"), x[:16]), served_1)
    assert not np.allclose(served_1, served_2, atol=1e-3)


@pytest.mark.parametrize(
    "monitor, mode, pick",
    [("val_loss", "min", np.argmin), ("val_accuracy", "auto", np.argmax)],
)
def test_monitor_exports_the_best_epoch_and_keeps_the_trained_weights(data, tmp_path, monitor, mode, pick):
    (x, y), validation = data
    model = _tiny_cnn()
    recorder = _Recorder()
    callback = kpq.PowerQuantExport(str(tmp_path / "export"), wbits=5, abits=6, monitor=monitor, mode=mode, verbose=0)
    epochs = 4
    model.fit(x, y, batch_size=16, epochs=epochs, validation_data=validation,
              callbacks=[recorder.callback, callback], verbose=0)

    values = [logs[monitor] for logs in recorder.logs]
    best = int(pick(values))  # first best epoch, as the callback keeps the first of equals
    assert best != epochs - 1, f"test data should make an early epoch best; {monitor} per epoch: {values}"
    assert callback.best_epoch == best
    assert callback.report.options["wbits"] == 5 and callback.report.options["abits"] == 6

    # The trained model ends with its last epoch's weights, not the best ones.
    for final, recorded in zip(model.get_weights(), recorder.weights[-1]):
        np.testing.assert_array_equal(final, recorded)

    served = _serve(callback.result.saved_model_dir, x[:16])
    from_best = _converted_outputs(model, recorder.weights[best], x[:16], wbits=5, abits=6)
    from_last = _converted_outputs(model, recorder.weights[-1], x[:16], wbits=5, abits=6)
    np.testing.assert_allclose(served, from_best, atol=1e-5)
    assert not np.allclose(served, from_last, atol=1e-3)


def test_unknown_monitor_is_a_clear_error(data, tmp_path):
    (x, y), validation = data
    export_dir = tmp_path / "export"
    model = _tiny_cnn()
    callback = kpq.PowerQuantExport(str(export_dir), monitor="val_acc", verbose=0)
    with pytest.raises(ValueError, match="'val_acc'") as info:
        model.fit(x, y, batch_size=16, epochs=2, validation_data=validation, callbacks=[callback], verbose=0)
    for logged in ("val_accuracy", "val_loss", "loss"):
        assert f"'{logged}'" in str(info.value)
    assert not export_dir.exists()


def test_bad_mode_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="`mode` must be 'auto', 'min' or 'max'"):
        kpq.PowerQuantExport(str(tmp_path), monitor="val_loss", mode="lowest")
    assert os.listdir(tmp_path) == []


def test_formats_both_writes_a_keras_file_matching_the_savedmodel(data, tmp_path):
    import keras

    (x, y), _ = data
    export_dir = tmp_path / "export"
    model = _tiny_cnn()
    callback = kpq.PowerQuantExport(str(export_dir), formats="both", method="uniform", verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    assert os.listdir(export_dir) == ["1"]
    assert callback.result.keras_path == str(export_dir / "1" / "kpq-model.keras")
    assert all(layer.exponent == 1.0 for layer in callback.report.quantized_layers)
    reloaded = keras.saving.load_model(callback.result.keras_path)
    served = _serve(callback.result.saved_model_dir, x[:16])
    np.testing.assert_allclose(reloaded.predict(x[:16], verbose=0), served, atol=1e-6)
    np.testing.assert_allclose(
        served, _converted_outputs(model, model.get_weights(), x[:16], method="uniform"), atol=1e-5
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(wbits=9),
        dict(abits=1),
        dict(method="nonuniform"),
        dict(formats="onnx"),
        dict(mode="best"),
        dict(scope="channel"),
        dict(exponent_bounds=(2.0, 0.5)),
    ],
)
def test_bad_options_fail_before_training(tmp_path, options):
    with pytest.raises(ValueError):
        kpq.PowerQuantExport(tmp_path / "export", **options)
    assert not (tmp_path / "export").exists()


def test_epochs_without_the_monitored_metric_are_skipped_with_a_warning(data, tmp_path):
    """validation_freq=2 logs val_loss at epochs 2 and 4 only; the best of those is exported."""
    (x, y), validation = data
    model = _tiny_cnn()
    recorder = _Recorder()
    callback = kpq.PowerQuantExport(str(tmp_path / "export"), monitor="val_loss", verbose=0)
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs of epoch 1") as warned:
        model.fit(x, y, batch_size=16, epochs=4, validation_data=validation, validation_freq=2,
                  callbacks=[recorder.callback, callback], verbose=0)
    assert len([w for w in warned if "is not in the logs" in str(w.message)]) == 2
    validated = {epoch: logs["val_loss"] for epoch, logs in enumerate(recorder.logs) if "val_loss" in logs}
    assert sorted(validated) == [1, 3]
    assert callback.best_epoch == min(validated, key=validated.get)
    assert callback.result.version == 1


def _f1_model():
    import keras

    model = _tiny_cnn()
    model.compile(optimizer=keras.optimizers.Adam(0.005), loss="categorical_crossentropy",
                  metrics=[keras.metrics.F1Score(average="macro")])
    return model


def test_auto_mode_maximizes_metrics_keras_declares_higher_is_better(data, tmp_path):
    """F1 (like IoU) has no "acc" in its name; Keras' metric says higher is better."""
    (x, y), _ = data
    x_val, y_val = _data(48, seed=2)  # true labels: F1 rises as the model learns
    model = _f1_model()
    recorder = _Recorder()
    callback = kpq.PowerQuantExport(str(tmp_path / "export"), monitor="val_f1_score", verbose=0)
    one_hot = np.eye(CLASSES, dtype="float32")
    model.fit(x, one_hot[y], batch_size=16, epochs=4, validation_data=(x_val, one_hot[y_val]),
              callbacks=[recorder.callback, callback], verbose=0)
    values = [logs["val_f1_score"] for logs in recorder.logs]
    assert int(np.argmax(values)) != int(np.argmin(values)), values
    assert callback.best_epoch == int(np.argmax(values))


def test_auto_mode_with_a_metric_of_unknown_direction_is_a_clear_error(data, tmp_path):
    import keras

    def agreement(y_true, y_pred):
        return keras.ops.max(y_pred, axis=-1)

    (x, y), validation = data
    model = _tiny_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=[agreement])
    callback = kpq.PowerQuantExport(str(tmp_path / "export"), monitor="val_agreement", verbose=0)
    with pytest.raises(ValueError, match="cannot tell whether 'val_agreement' should be maximized"):
        model.fit(x, y, batch_size=16, epochs=2, validation_data=validation, callbacks=[callback], verbose=0)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("options", [dict(calibration_steps=0), dict(calibration_batch_size=0), dict(p=float("inf"))])
def test_calibration_and_norm_options_fail_before_training(tmp_path, options):
    with pytest.raises(ValueError, match="must be"):
        kpq.PowerQuantExport(tmp_path / "export", **options)
