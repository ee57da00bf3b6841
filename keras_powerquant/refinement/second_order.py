"""The `gptq` refinement step: second-order rounding of every kernel (docs/method.md §10).

For each quantized layer, in graph order, its input is read from the
evaluation model with the layers before it quantized (their second-order
codes applied, activation quantizers and bias correction as the loss
applies them), turned into the rows `X` of the layer's linear map (im2col
patches of a convolution, in its kernel's flatten order), and the Hessian
`H = 2 X^T X / rows` is accumulated per kernel group; the numpy core
`keras_powerquant.quantization.second_order.gptq_codes` then finds the
codes on the layer's own grid (bits, exponent, scales, clip fraction as
the earlier steps left them).

To bound the number of forward passes, layers are taken in consecutive
groups of at most `ceil(layers / MAX_PASSES)` (and at most
`PASS_BYTES` of inputs per batch): one pass reads the inputs of a whole
group, so a layer sees the second-order codes of the groups before its
own and nearest rounding within it. Convolution rows are a seeded uniform
sample of output positions, `row_count` per layer: `ROWS`, fewer where
they would exceed `ROW_BYTES`, never fewer than `4 n` (`n` inputs of its
linear map).
"""

import math

import numpy as np

from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.second_order import gptq_codes
from keras_powerquant.quantization.second_order import least_squares_kernels
from keras_powerquant.quantization.second_order import PowerGrid
from keras_powerquant.quantization.second_order import target_error
from keras_powerquant.quantization.second_order import TargetAccumulator
from keras_powerquant.quantization.weights import channel_scales
from keras_powerquant.refinement.objective import traced_inference
from keras_powerquant.refinement.settings import ExplicitCodes
from keras_powerquant.refinement.steps import StepReport

# At most this many forward passes read layer inputs (layers are grouped to fit).
MAX_PASSES = 16
# A pass holds at most this many bytes of layer inputs per batch.
PASS_BYTES = 1 << 30
# Rows of `X` per layer: this many (where the data has them), fewer where they
# would take more than ROW_BYTES, and never fewer than 4 per input of the linear map.
ROWS = 16384
# A depthwise layer's rows hold every channel: 16,384 rows of 1,536 channels x
# 25 taps are 2.5 GB, and a pass of them ran a 24 GB machine out of memory.
ROW_BYTES = 1 << 28


def row_count(groups, size):
    """Rows of `X` sampled for a layer with `groups` Hessians of `size` inputs each."""
    return max(4 * size, min(ROWS, ROW_BYTES // (4 * groups * size)))


class LayerFeatures:
    """How one layer's input becomes the rows of its linear map, and its kernel the matching `(G, n, k)` matrices.

    Args:
        layer: the original Keras layer.
        kernel_shape: the PowerQuant (tunable) layer's kernel shape.

    Attributes:
        reason: why the layer is rounded to nearest instead (None if it is not).
    """

    def __init__(self, layer, kernel_shape):
        self.layer = layer
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        entry = linear_type(layer)
        self.layout = entry.layout
        self.reason = None
        self.groups = 1
        if type(layer).__name__ == "Conv2DTranspose":
            self.reason = (
                "a transposed convolution's outputs are not one patch of its input times its kernel; "
                "rounded to nearest"
            )
            return
        if self.layout == "dense":
            self.inputs = int(np.prod(self.kernel_shape[:-1])) if entry.flattening is None else 0
            if entry.flattening is not None:
                flattening = entry.flattening(layer)
                self.row_ndim = len(flattening.row_shape)
                self.inputs = math.prod(flattening.row_shape)
            else:
                self.row_ndim = 1
            self.outputs = int(np.prod(self.kernel_shape)) // self.inputs
            return
        self.spatial = self.kernel_shape[:-2]
        self.taps = math.prod(self.spatial)
        self.strides = tuple(layer.strides)
        self.dilation = tuple(layer.dilation_rate)
        self.padding = layer.padding
        self.channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        if self.layout == "conv":
            self.groups = int(getattr(layer, "groups", 1))

    @property
    def hessian_shape(self):
        """`(G, n)`: groups and inputs per group."""
        if self.layout == "dense":
            return 1, self.inputs
        if self.layout == "depthwise":
            return self.kernel_shape[-2], self.taps
        return self.groups, self.taps * self.kernel_shape[-2]

    def matrices(self, kernel):
        """The kernel (PowerQuant layer shape) as `(G, n, k)`."""
        kernel = np.asarray(kernel)
        if self.layout == "dense":
            return kernel.reshape(1, self.inputs, -1)
        if self.layout == "depthwise":
            channels, multiplier = self.kernel_shape[-2:]
            return kernel.reshape(self.taps, channels, multiplier).transpose(1, 0, 2)
        group_inputs, outputs = self.kernel_shape[-2:]
        per_group = outputs // self.groups
        grouped = kernel.reshape(self.taps, group_inputs, self.groups, per_group).transpose(2, 0, 1, 3)
        return grouped.reshape(self.groups, self.taps * group_inputs, per_group)

    def kernel(self, matrices):
        """`matrices`' inverse: `(G, n, k)` back in the PowerQuant layer's kernel shape."""
        if self.layout == "dense":
            return np.reshape(matrices, self.kernel_shape)
        if self.layout == "depthwise":
            return np.transpose(matrices, (1, 0, 2)).reshape(self.kernel_shape)
        group_inputs, outputs = self.kernel_shape[-2:]
        grouped = np.reshape(matrices, (self.groups, self.taps, group_inputs, outputs // self.groups))
        return grouped.transpose(1, 2, 0, 3).reshape(self.kernel_shape)

    def rows(self, inputs, count, rng):
        """Up to `count` rows `(rows, G, n)` of the linear map's inputs from a batch of the layer's input."""
        x = np.asarray(inputs, dtype=np.float32)
        groups, size = self.hessian_shape
        if self.layout == "dense":
            flat = x.reshape(-1, self.inputs)
            if flat.shape[0] > count:
                flat = flat[np.sort(rng.choice(flat.shape[0], count, replace=False))]
            return flat.reshape(-1, 1, self.inputs)
        if self.channels_first:
            x = np.moveaxis(x, 1, -1)
        patches = self.patches(x, count, rng)  # (rows, taps, channels)
        if self.layout == "depthwise":
            return np.transpose(patches, (0, 2, 1))
        rows, taps, channels = patches.shape
        grouped = patches.reshape(rows, taps, self.groups, channels // self.groups).transpose(0, 2, 1, 3)
        return grouped.reshape(rows, self.groups, size)

    def patches(self, x, count, rng):
        """im2col patches `(rows, taps, channels)` at up to `count` sampled output positions (channels-last `x`)."""
        sizes = x.shape[1:-1]
        pads, outputs = [], []
        for length, k, s, d in zip(sizes, self.spatial, self.strides, self.dilation):
            before, after, out = _padding(length, k, s, d, self.padding)
            pads.append((before, after))
            outputs.append(out)
        padded = np.pad(x, [(0, 0)] + pads + [(0, 0)])
        total = x.shape[0] * math.prod(outputs)
        chosen = np.arange(total) if total <= count else np.sort(rng.choice(total, count, replace=False))
        position = np.unravel_index(chosen, (x.shape[0],) + tuple(outputs))
        taps = np.unravel_index(np.arange(self.taps), self.spatial)
        index = [position[0][:, None]]
        for axis in range(len(self.spatial)):
            start = position[axis + 1][:, None] * self.strides[axis]
            index.append(start + taps[axis][None, :] * self.dilation[axis])
        return padded[tuple(index)]


def _padding(length, k, stride, dilation, padding):
    """`(before, after, outputs)` of one spatial axis, as TensorFlow pads ("valid", "same", "causal")."""
    extent = (k - 1) * dilation + 1
    if padding == "valid":
        return 0, 0, (length - extent) // stride + 1
    if padding == "causal":
        return extent - 1, 0, (length - 1) // stride + 1
    out = -(-length // stride)
    total = max((out - 1) * stride + extent - length, 0)
    return total // 2, total - total // 2, out


def _layer_grid(features, kernel, setting):
    """The `PowerGrid` of a layer's kernel setting, its scales `(G, k)` as the PowerQuant layer computes them."""
    channel_ndim = linear_type(features.layer).channel_ndim if setting.per_channel else 0
    scales = np.asarray(channel_scales(kernel, channel_ndim) * np.float64(setting.clip_fraction), dtype=np.float32)
    # Every row of a `(G, n, k)` matrix has the same scales.
    grid_scales = features.matrices(np.broadcast_to(scales, kernel.shape))[:, 0, :]
    return PowerGrid(setting.bits, setting.exponent, grid_scales)


def _read(reader, objective, batches):
    """`(index, [layer inputs as numpy])` per batch, each batch's bias-correction means in place."""
    for index, xs in enumerate(batches):
        objective.use_batch(index)
        outputs = reader(xs if len(xs) > 1 else xs[0])
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        yield index, [np.asarray(x) for x in outputs]


def _layer_codes(features, matrices, grid, accumulators, least_squares=True):
    """`(decision, codes)` for one layer: the codes (PowerQuant kernel shape, int8), or None for nearest.

    Candidates: nearest rounding, second-order rounding of the kernel on
    the quantized network's inputs (GPTQ's target), and, if
    `least_squares`, of the least-squares kernel (the float network's layer
    output as target). Each is fitted on the even rows and measured against
    the float layer's output on the odd rows; the best is refitted on all
    rows.
    """
    whole = grid.with_scales(grid.scales[:, None, :])
    nearest = whole.codes(matrices)
    fit, check = accumulators
    check_moments = check.moments()

    def candidate(kind, accumulator):
        if kind == "nearest":
            return nearest
        moments = accumulator.moments()
        target = matrices if kind == "second-order" else least_squares_kernels(matrices, moments)
        return gptq_codes(target, moments[0], grid)

    errors = {
        kind: target_error(whole.decode(candidate(kind, fit)), check_moments)
        for kind in ("nearest", "second-order") + (("least-squares second-order",) if least_squares else ())
    }
    chosen = min(errors, key=lambda kind: (errors[kind], kind != "nearest"))
    decision = {
        "groups": int(matrices.shape[0]),
        "inputs": int(matrices.shape[1]),
        "rows": int(fit.rows + check.rows),
        **{f"held_out_error_{kind.replace(' ', '_').replace('-', '_')}": value for kind, value in errors.items()},
        "chosen": chosen,
    }
    if chosen == "nearest":
        return decision, None
    codes = candidate(chosen, fit.merged(check))
    decision["changed_fraction"] = float(np.mean(codes != nearest))
    return decision, features.kernel(codes).astype(np.int8)


def gptq_step(context, settings):
    """Second-order (GPTQ) rounding of every quantized layer's kernel, on its grid as the settings give it.

    Keeps the result only if the network loss does not rise; per layer,
    the second-order codes replace nearest rounding only where they lower
    the layer's output error on rows held out from their fit.
    """
    import keras

    objective = context.objective
    start_loss = objective(settings)
    report = StepReport("gptq", start_loss, start_loss)
    layer_plans = {p.layer.name: p for p in context.plan.layers.values()}
    names = list(settings.kernels)
    features = {}
    for name in names:
        tunable = objective.kernel_layers[name]
        features[name] = LayerFeatures(layer_plans[name].layer, tunable.float_kernel.shape)
        if features[name].reason is not None:
            report.notes.append(f"{name}: {features[name].reason}")
    done_names = [n for n in names if features[n].reason is None]
    batches = objective.batches
    per_pass = max(1, math.ceil(len(done_names) / MAX_PASSES))
    passes, current_pass, pass_bytes = [], [], 0
    for name in done_names:
        shape = objective.kernel_layers[name].input.shape
        size = 4 * math.prod(int(d) for d in shape[1:]) * max(int(xs[0].shape[0]) for xs in batches)
        if current_pass and (len(current_pass) >= per_pass or pass_bytes + size > PASS_BYTES):
            passes.append(current_pass)
            current_pass, pass_bytes = [], 0
        current_pass.append(name)
        pass_bytes += size
    if current_pass:
        passes.append(current_pass)
    report.notes.append(f"{len(done_names)} layers in {len(passes)} input passes")
    current = settings
    done = 0
    for group in passes:
        # The tunable layers' Python flags do not change during this step; its settings are variables.
        reader = traced_inference(
            keras.Model(objective.model.inputs, [objective.kernel_layers[n].input for n in group])
        )
        rows_per_batch = {
            name: math.ceil(row_count(*features[name].hessian_shape) / len(batches)) for name in group
        }
        kernels = {name: objective.kernel_layers[name].float_kernel.numpy() for name in group}
        matrices = {name: features[name].matrices(kernels[name]).astype(np.float32) for name in group}
        # The float layers' outputs first, at the positions the quantized network's rows are sampled at below.
        objective.assign(current, quantized=False)
        targets = {name: [] for name in group}
        for index, outputs in _read(reader, objective, batches):
            for name, x in zip(group, outputs):
                rows = features[name].rows(x, rows_per_batch[name], np.random.default_rng((names.index(name), index)))
                targets[name].append(np.einsum("rgn,gnk->rgk", rows, matrices[name]))
        objective.assign(current)
        accumulators = {}
        for name in group:
            groups, size = features[name].hessian_shape
            outputs = matrices[name].shape[-1]
            accumulators[name] = (TargetAccumulator(groups, size, outputs), TargetAccumulator(groups, size, outputs))
        for index, outputs in _read(reader, objective, batches):
            for name, x in zip(group, outputs):
                rows = features[name].rows(x, rows_per_batch[name], np.random.default_rng((names.index(name), index)))
                target = targets[name][index]
                # Even rows fit, odd rows check; the codes kept are fitted on all.
                accumulators[name][0].add(rows[0::2], target[0::2])
                accumulators[name][1].add(rows[1::2], target[1::2])
                targets[name][index] = None
        # The least-squares target compensates the error of the inputs it was
        # read with. Once a layer of this pass changed its codes, the later
        # ones' inputs were read before that change: fitted to them, it would
        # correct an error already corrected (EfficientNet-Lite2, 5 layers a
        # pass: the network loss rose from 0.11 to 0.50).
        changed = False
        for name in group:
            grid = _layer_grid(features[name], kernels[name], current.kernels[name])
            decision, codes = _layer_codes(
                features[name], matrices[name].astype(np.float64), grid, accumulators[name],
                least_squares=not changed,
            )
            if codes is not None:
                changed = True
                current = current.replace(codes={name: ExplicitCodes(current.kernels[name], codes)})
            report.decisions.append({"name": name, **decision})
            done += 1
            context.report_progress("refine: gptq", done, len(done_names))
    final_loss = objective(current)
    if final_loss > start_loss:
        report.notes.append(
            f"second-order rounding raised the network loss to {final_loss:.6g}: kept the rounding before it"
        )
        objective(settings)
        return settings, report
    report.loss_after = final_loss
    return current, report
