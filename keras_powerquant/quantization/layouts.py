"""Kernel layouts of the linear layers: which input channel each kernel entry reads.

- "dense": `(in, out)`.
- "conv": `(*spatial, in // groups, out)`; with `groups` channel groups,
  output channel `o` belongs to group `g = o // (out // groups)` and its
  entry `[..., c, o]` reads input channel `g * (in // groups) + c`.
- "depthwise": `(*spatial, in, multiplier)`; entry `[..., i, j]` reads
  input channel `i` and feeds output channel `i * multiplier + j`.

Folding, statistics and bias correction all reduce to per-entry products
of a kernel summed over its taps, `(in', out')`, with a per-input-channel
vector gathered through `input_channel_index`, then `to_outputs`.
"""

import numpy as np

# Each layout and how many trailing kernel axes index its output channels.
OUTPUT_CHANNEL_NDIM = {"dense": 1, "conv": 1, "depthwise": 2}
LAYOUTS = tuple(OUTPUT_CHANNEL_NDIM)


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}.")


def input_channel_index(kernel_shape, layout, groups=1):
    """Input channel read by each entry of the kernel's two trailing axes.

    Returns:
        int array of shape `kernel_shape[-2:]`.
    """
    check_layout(layout)
    rows, columns = kernel_shape[-2:]
    if layout == "depthwise":
        return np.broadcast_to(np.arange(rows)[:, None], (rows, columns))
    if groups < 1 or columns % groups:
        raise ValueError(f"{columns} output channels do not split into {groups} groups.")
    group = np.arange(columns) // (columns // groups)
    return group[None, :] * rows + np.arange(rows)[:, None]


def to_outputs(products, layout):
    """Per-output-channel values from per-entry `products` of shape `(in', out')`.

    Dense and conv outputs sum their entries over the input axis; depthwise
    entries are output channels themselves, ordered `i * multiplier + j`.
    """
    check_layout(layout)
    return np.ravel(products) if layout == "depthwise" else np.sum(products, axis=0)
