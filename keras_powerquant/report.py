"""The conversion report: what was folded, quantized and kept float, and why."""

import dataclasses
import json
from typing import Optional


@dataclasses.dataclass
class LayerReport:
    """One layer with weights.

    Attributes:
        name: layer name (same in the original and converted model).
        class_name: the original Keras class.
        status: "quantized" or "float".
        reason: why it stayed float.
        params: number of kernel values.
        weight_bits: kernel bit width.
        position: "first", "last", "first+last" or None.
        exponent: fitted kernel exponent `a*`.
        error: kernel reconstruction error `sum |W - W_hat|^p` at `a*`.
        uniform_error: the same at `a = 1` without clipping.
        weight_clip: the fitted clip fraction `alpha` (scales are
            `alpha max |W|` per channel; 1 = no clipping).
        bias_correction: "analytic" or "empirical" when its bias was
            corrected (docs/method.md §7), "none: <reason>" when it could not be.
        bias_shift: Euclidean norm of the mean output shift subtracted
            from its bias.
        input_quantizer: name of the quantizer of its input, if any.
        input_bits: bit width of its input, None if the input stays float.
        folded_batch_norm: names of the BatchNorms folded into it, comma
            separated (one before it, folded forward, then one after it).
        clip_fraction: the kernel scale as a fraction of `max |W|` (1: no
            weight clipping).
        per_channel: the scale granularity when refinement chose it; None
            follows the `per_channel` option.
        kernel_params: number of kernel values (weights named `*kernel`,
            `*embeddings`); 0 for a layer without a kernel (a LayerNorm).
            A layer whose kernel layers inside it are listed as their own
            rows counts only its own kernels.
        nested_in: for a kernel layer inside another layer (a
            MultiHeadAttention's projection, a custom layer's Dense), the
            outer layer's name; the row's name is `outer/inner`.
        input_reason: why a nested layer's input stays float, if it does.
        input_exponent, input_clip: its input quantizer's fit.
        rule: where its input statistics came from.
    """

    name: str
    class_name: str
    status: str
    reason: Optional[str] = None
    params: int = 0
    weight_bits: Optional[int] = None
    position: Optional[str] = None
    exponent: Optional[float] = None
    error: Optional[float] = None
    uniform_error: Optional[float] = None
    weight_clip: Optional[float] = None
    bias_correction: Optional[str] = None
    bias_shift: Optional[float] = None
    input_quantizer: Optional[str] = None
    input_bits: Optional[int] = None
    folded_batch_norm: Optional[str] = None
    clip_fraction: Optional[float] = None
    per_channel: Optional[bool] = None
    kernel_params: Optional[int] = None
    nested_in: Optional[str] = None
    input_reason: Optional[str] = None
    input_exponent: Optional[float] = None
    input_clip: Optional[float] = None
    rule: Optional[str] = None

    @property
    def error_ratio(self):
        """`error / uniform_error`: below 1 where PowerQuant beats uniform."""
        if self.error is None or not self.uniform_error:
            return None
        return self.error / self.uniform_error


@dataclasses.dataclass
class ActivationReport:
    """One activation quantizer (or an activation that could not be quantized).

    Attributes:
        name: name of the `PowerQuantActivation` layer.
        kind: "activation", "fused" or "input" (see `QuantizerPlan`).
        status: "quantized" or "float".
        reason: why it stayed float.
        activation: the activation function applied before quantizing.
        source: the original layer it replaces or splits, if any.
        consumers: quantized layers it feeds.
        bits, signed, clip, exponent: the fitted quantizer.
        error, uniform_clip, uniform_error: fit error, and the best clip and
            error at `a = 1`, on the samples it was fitted on.
        rule: where its statistics came from ("batchnorm", "propagated:
            add -> relu", "calibration", ...).
    """

    name: str
    kind: str
    status: str
    reason: Optional[str] = None
    activation: str = "linear"
    source: Optional[str] = None
    consumers: list = dataclasses.field(default_factory=list)
    bits: Optional[int] = None
    signed: Optional[bool] = None
    clip: Optional[float] = None
    exponent: Optional[float] = None
    error: Optional[float] = None
    uniform_clip: Optional[float] = None
    uniform_error: Optional[float] = None
    rule: Optional[str] = None


@dataclasses.dataclass
class ConversionReport:
    """Everything `convert` decided, as data.

    Attributes:
        model_name: the original model's name.
        options: the conversion options: `ConversionConfig.get_config()`
            with the values conversion resolved (`bias_correction`: the
            method used, or False), `calibrated`, `labelled` and, with
            synthetic calibration data, `synthetic` (its options).
        layers: `LayerReport`s in graph order.
        activations: `ActivationReport`s in graph order.
        folded_batch_norms: `{"batch_norm": name, "into": layer}` entries.
        unfolded_batch_norms: `{"batch_norm": name, "reason": why}` entries.
        notes: other remarks (legacy-file repairs, reused layers...).
        seconds: wall time per stage.
        refinement: one record per refinement step (`StepReport` fields:
            name, loss_before, loss_after, seconds, evaluations, decisions,
            notes, holdout_loss_before, holdout_loss_after, kept).
    """

    model_name: str
    options: dict
    layers: list = dataclasses.field(default_factory=list)
    activations: list = dataclasses.field(default_factory=list)
    folded_batch_norms: list = dataclasses.field(default_factory=list)
    unfolded_batch_norms: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    seconds: dict = dataclasses.field(default_factory=dict)
    refinement: list = dataclasses.field(default_factory=list)

    def layer(self, name):
        """The `LayerReport` of layer `name`."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def quantized_layers(self):
        return [layer for layer in self.layers if layer.status == "quantized"]

    @property
    def float_layers(self):
        return [layer for layer in self.layers if layer.status == "float"]

    @property
    def kernel_layers(self):
        """The rows that hold kernel values (nested ones included; LayerNorms and other scale-only layers not)."""
        return [layer for layer in self.layers if _kernel_params(layer) > 0]

    def kernel_counts(self):
        """`(quantized layers, float layers, quantized kernel values, float kernel values)`, nested layers included."""
        kernels = self.kernel_layers
        quantized = [layer for layer in kernels if layer.status == "quantized"]
        floats = [layer for layer in kernels if layer.status != "quantized"]
        return (
            len(quantized), len(floats),
            sum(_kernel_params(layer) for layer in quantized), sum(_kernel_params(layer) for layer in floats),
        )

    @property
    def warnings(self):
        """What the conversion did not do that its options asked for, in plain words."""
        found = []
        options = self.options
        quantized_layers, float_layers, quantized, floating = self.kernel_counts()
        if float_layers and floating:
            found.append(
                f"{float_layers} of {quantized_layers + float_layers} kernel layers stay float: "
                f"{_percent(floating, quantized + floating)} of the kernel values"
            )
        rows = self.quantized_layers
        wbits, abits = options.get("wbits"), options.get("abits")
        if rows and wbits is not None and not any(row.weight_bits == wbits for row in rows):
            found.append(_unreached("wbits", wbits, sorted({row.weight_bits for row in rows})))
        inputs = [row.input_bits for row in rows if row.input_bits is not None]
        if rows and abits is not None and abits not in inputs:
            floating_inputs = len(rows) - len(inputs)
            found.append(
                f"abits={abits} reaches no layer's input: "
                + (f"{len(inputs)} quantized at {', '.join(map(str, sorted(set(inputs))))} bits (the first and "
                   "last layers; quantize_first_last=True / --quantize-first-last quantizes them at "
                   f"{abits} bits)" if inputs else "none is quantized")
                + (f", {floating_inputs} kept float (see the input reasons)" if floating_inputs else "")
            )
        return found

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["layers"] = [LayerReport(**layer) for layer in data.get("layers", [])]
        data["activations"] = [ActivationReport(**a) for a in data.get("activations", [])]
        return cls(**data)

    def summary(self):
        """A readable multi-line table of the conversion."""
        lines = [f"Model '{self.model_name}': {_options_line(self.options)}"]
        activations = _activation_exponent_line(self.options)
        lines += ([activations] if activations else []) + [""]
        header = (
            f"{'layer':<28} {'kind':<22} {'bits':>4} {'exponent':>8} {'clip':>5} {'err/uniform':>11} "
            f"{'|bias shift|':>12}  input"
        )
        lines += [header, "-" * len(header)]
        for layer in self.layers:
            if layer.status == "quantized":
                ratio = layer.error_ratio
                input_desc = f"{layer.input_bits}-bit" if layer.input_bits else "float"
                lines.append(
                    f"{_clip(layer.name, 28)} {_clip(layer.class_name, 22)} {layer.weight_bits:>4} "
                    f"{_fmt_number(layer.exponent, '.3f'):>8} {_fmt_number(layer.weight_clip, '.3f'):>5} "
                    f"{_fmt_ratio(ratio):>11} {_fmt_number(layer.bias_shift, '.3g'):>12}  {input_desc}"
                    + (f" ({layer.position})" if layer.position else "")
                )
            else:
                lines.append(
                    f"{_clip(layer.name, 28)} {_clip(layer.class_name, 22)} {'-':>4} {'-':>8} {'-':>5} "
                    f"{'-':>11} {'-':>12}  float: {layer.reason}"
                )
            if layer.nested_in is not None and layer.status == "quantized" and layer.input_reason:
                lines.append(f"{'':<28}   input float: {layer.input_reason}")
        if self.activations:
            lines += ["", f"{'activation quantizer':<34} {'bits':>4} {'sign':>4} {'clip':>9} "
                      f"{'exponent':>8}  statistics"]
            for act in self.activations:
                if act.status == "quantized":
                    sign = "-" if act.signed is None else ("±" if act.signed else "+")
                    lines.append(
                        f"{_clip(act.name, 34)} {act.bits:>4} {sign:>4} "
                        f"{_fmt_number(act.clip, '.4g'):>9} {_fmt_number(act.exponent, '.3f'):>8}  {act.rule}"
                    )
                else:
                    lines.append(f"{_clip(act.name, 34)} {'-':>4} {'':>4} {'':>9} {'':>8}  float: {act.reason}")
        lines.append("")
        quantized_layers, float_layers, quantized, floating = self.kernel_counts()
        lines.append(
            f"{_count(quantized_layers + float_layers, 'kernel layer')} ({quantized + floating:,} kernel values): "
            f"{quantized_layers} quantized ({_percent(quantized, quantized + floating)} of the values), "
            f"{float_layers} kept float ({_percent(floating, quantized + floating)}); "
            f"{len(self.folded_batch_norms)} BatchNorm folded, {len(self.unfolded_batch_norms)} kept"
        )
        for warning in self.warnings:
            lines.append(f"  warning: {warning}")
        for entry in self.folded_batch_norms:
            lines.append(f"  BatchNorm '{entry['batch_norm']}' folded into '{entry['into']}'")
        for entry in self.unfolded_batch_norms:
            lines.append(f"  BatchNorm '{entry['batch_norm']}' kept: {entry['reason']}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for step in self.refinement:
            lines.append(
                f"  refinement '{step['name']}': loss {step['loss_before']:.4g} -> {step['loss_after']:.4g} "
                f"({step['evaluations']} evaluations, {step['seconds']:.1f} s)"
                + (
                    ""
                    if step.get("holdout_loss_before") is None
                    else f", held-out {step['holdout_loss_before']:.4g} -> {step['holdout_loss_after']:.4g}"
                    + ("" if step.get("kept", True) else ": discarded")
                )
            )
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def _kernel_params(layer):
    """A row's kernel values; reports written before `kernel_params` count a quantized row's `params`."""
    if layer.kernel_params is not None:
        return layer.kernel_params
    return layer.params if layer.status == "quantized" else 0


def _count(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _percent(part, whole):
    return "0%" if not whole else f"{100 * part / whole:.0f}%"


def _unreached(option, bits, used):
    return (
        f"{option}={bits} reaches no layer: every quantized layer is the first or last (kept at "
        f"{', '.join(map(str, used))} bits); quantize_first_last=True (--quantize-first-last) quantizes "
        f"them at {bits} bits"
    )


def _clip(text, width):
    """`text` cut or padded to exactly `width` characters."""
    text = text if len(text) <= width else text[: width - 1] + "…"
    return f"{text:<{width}}"


def _fmt_number(value, spec):
    return "-" if value is None else format(value, spec)


def _fmt_ratio(ratio):
    return "-" if ratio is None else f"{ratio:.3f}"


def _activation_exponent_line(options):
    """What the activation exponents cost at inference, when activations are quantized."""
    if options.get("abits") is None or "fast_activations" not in options:
        return None
    if options.get("method") == "uniform":
        return "Activation exponents: a = 1 (one FakeQuant op per activation)."
    if options["fast_activations"]:
        return ("Activation exponents: among 1, 1/2, 1/4 (a = 1 is one FakeQuant op per activation; 1/2 "
                "and 1/4 add square roots and squares; fast_activations=False / --continuous-activations "
                "fits any).")
    return "Activation exponents: continuous (two exp/log pairs per activation at inference)."


def _options_line(options):
    keys = (
        "method", "wbits", "abits", "scope", "fast_activations", "weight_clipping", "bias_correction", "calibrated"
    )
    # abits None is weight-only quantization: activations stay float.
    shown = options
    if options.get("abits", 0) is None:
        shown = {k: v for k, v in options.items() if k != "fast_activations"}
        shown["abits"] = "float"
    return ", ".join(f"{k}={shown[k]}" for k in keys if k in shown)
