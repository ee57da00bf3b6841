"""The supported bit widths, in a module that imports nothing.

The quantizers check bit widths against them and the `kpq` command line
declares its options with them before anything heavy is imported.
"""

MIN_BITS = 2
MAX_BITS = 8
