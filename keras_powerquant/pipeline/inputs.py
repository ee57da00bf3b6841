"""Stage 2, inputs: the calibration inputs, generated from the model when asked."""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CalibrationInputs:
    """The model inputs the quantizers are fitted on.

    Attributes:
        data: inputs in a form `calibration_batches` reads, or None (data-free).
        notes: what generating them found, for the report.
    """

    data: Any = None
    notes: tuple = ()


def calibration_inputs(request):
    """The request's calibration inputs; `SyntheticData` is generated here."""
    if request.synthetic is None:
        return CalibrationInputs(request.calibration_data)
    generated = request.synthetic.generate(request.model, progress=request.progress)
    inputs = generated.inputs
    return CalibrationInputs(inputs[0] if len(inputs) == 1 else inputs, tuple(generated.notes))
