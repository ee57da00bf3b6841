"""The `ConversionReport` of a conversion: what was folded, quantized and kept float, and why."""

import numpy as np

from keras_powerquant.converter import nested
from keras_powerquant.converter.folding import fold_records
from keras_powerquant.report import ActivationReport
from keras_powerquant.report import ConversionReport
from keras_powerquant.report import LayerReport


def _describe(correction):
    if correction is None:
        return None
    return correction.method if correction.reason is None else f"none: {correction.reason}"


def conversion_report(graph, plan, folds, unfolded, options, notes, seconds, corrections=None, nested_plan=None):
    """The report of converting `graph`'s model with `plan` (fitted or not: `inspect_model`'s dry run)."""
    report = ConversionReport(graph.model.name, options, notes=notes, seconds=seconds)
    report.folded_batch_norms = fold_records(folds)
    report.unfolded_batch_norms = [{"batch_norm": bn.name, "reason": why} for bn, why in unfolded]
    float_reasons = {id(layer): reason for layer, reason in plan.float_layers}
    for layer in graph.layers():
        layer_plan = plan.layers.get(id(layer))
        if layer_plan is not None:
            quantizer = layer_plan.input_quantizer
            correction = (corrections or {}).get(id(layer))
            input_quantized = quantizer is not None and quantizer.reason is None
            report.layers.append(
                LayerReport(
                    name=layer.name,
                    class_name=type(layer).__name__,
                    status="quantized",
                    params=int(layer_plan.kernel.size),
                    kernel_params=int(layer_plan.kernel.size),
                    weight_bits=layer_plan.weight_bits,
                    position=layer_plan.position,
                    exponent=layer_plan.fit.exponent if layer_plan.fit else None,
                    error=layer_plan.fit.error if layer_plan.fit else None,
                    uniform_error=layer_plan.fit.uniform_error if layer_plan.fit else None,
                    weight_clip=layer_plan.clip_fraction if layer_plan.fit else None,
                    bias_correction=_describe(correction),
                    bias_shift=correction.norm if correction else None,
                    input_quantizer=quantizer.name if input_quantized else None,
                    input_bits=quantizer.bits if input_quantized else None,
                    folded_batch_norm=layer_plan.fold.batch_norm_names if layer_plan.fold else None,
                    clip_fraction=layer_plan.clip_fraction,
                    per_channel=layer_plan.per_channel,
                )
            )
        elif id(layer) in float_reasons:
            report.layers.append(
                LayerReport(
                    name=layer.name,
                    class_name=type(layer).__name__,
                    status="float",
                    reason=float_reasons[id(layer)],
                    params=int(sum(np.prod(w.shape) for w in layer.weights)),
                    kernel_params=nested.kernel_parameters(layer, own=nested_plan is not None
                                                          and bool(nested_plan.rows_of(layer))),
                )
            )
        if nested_plan is not None:
            report.layers += [_nested_report(layer, *row) for row in nested_plan.rows_of(layer)]
    for quantizer in plan.quantizers.values():
        fit = quantizer.fit
        report.activations.append(
            ActivationReport(
                name=quantizer.name,
                kind=quantizer.kind,
                status="float" if quantizer.reason else "quantized",
                reason=quantizer.reason,
                activation=quantizer.spec.name,
                source=quantizer.source,
                consumers=list(quantizer.consumers),
                bits=quantizer.bits,
                signed=quantizer.signed,
                clip=fit.clip if fit else None,
                exponent=fit.exponent if fit else None,
                error=fit.error if fit else None,
                uniform_clip=fit.uniform_clip if fit else None,
                uniform_error=fit.uniform_error if fit else None,
                rule=quantizer.rule,
            )
        )
    return report


def _nested_report(owner, name, kernel, layer, reason):
    """The `LayerReport` of a kernel layer nested in another layer (`converter.nested`)."""
    if kernel is None:
        return LayerReport(
            name=name, class_name=type(layer).__name__, status="float", reason=reason,
            params=int(sum(np.prod(w.shape) for w in layer.weights)), kernel_params=nested.kernel_parameters(layer),
            nested_in=owner.name,
        )
    fit, input_fit = kernel.fit, kernel.input_fit
    return LayerReport(
        name=name,
        class_name=type(layer).__name__,
        status="quantized",
        params=int(kernel.kernel.size),
        kernel_params=int(kernel.kernel.size),
        weight_bits=kernel.weight_bits,
        exponent=fit.exponent if fit else None,
        error=fit.error if fit else None,
        uniform_error=fit.uniform_error if fit else None,
        weight_clip=kernel.clip_fraction if fit else None,
        input_quantizer=f"{name}_input_quantizer" if input_fit else None,
        input_bits=kernel.input_bits if input_fit else None,
        input_reason=kernel.reason,
        clip_fraction=kernel.clip_fraction,
        nested_in=None if kernel.in_graph else owner.name,
        input_exponent=input_fit.exponent if input_fit else None,
        input_clip=input_fit.clip if input_fit else None,
        rule=kernel.rule,
    )
