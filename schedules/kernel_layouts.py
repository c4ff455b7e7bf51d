"""The contract between tvmq's kernel-emitting passes and the default schedule rules.

A pass in passes/ emits a kernel (a TE compute) tagged with a block attribute naming it;
a rule here finds the kernel by that name and tiles it for the layout the pass chose. Both
sides read the names and the layout arithmetic from this module, so schedules/ never
imports passes/.
"""

from __future__ import annotations

import numpy as np

# The block attribute naming each kernel tvmq's passes emit, and the names.
KERNEL_ATTR = "tvmq.kernel"
CONV_BLOCKED = "conv2d_blocked"
CONV_DEPTHWISE = "conv2d_depthwise"
CONV_POINTWISE = "conv2d_pointwise"
CONV_POINTWISE_QUADS = "conv2d_pointwise_quads"
MATMUL_BLOCKED = "matmul_blocked"
# The stage that widens packed int4 weights inside a kernel (passes/_int4.py), and the most
# weights one run of its packing holds: a run's first half in the low nibbles of its bytes,
# the second half in the high ones, so a vector of bytes unpacks into two vectors.
UNPACK_INT4 = "unpack_int4"
INT4_RUN = 128

# The padded input a strided depthwise kernel copies its stride phases from (a block of its
# own, not inlined into the phase copy).
DEPTHWISE_PAD = "depthwise_pad"


def pointwise_vectors(pixels: int, lanes: int) -> int:
    """Vectors of output pixels per register tile: two where the tile's pixels make whole
    pairs."""
    return 2 if pixels % (2 * lanes) == 0 else 1


def pointwise_image_rows(height: int, width: int, lanes: int) -> int | None:
    """Image rows per tile of the pointwise kernel: the fewest (dividing ``height``) whose
    pixels, contiguous in NCHW, are whole vectors; None where no such rows exist (14x14
    and 7x7 with 16 lanes). 56-wide images take two rows (7 vectors) on AVX-512."""
    return next((r for r in range(1, height + 1)
                 if height % r == 0 and r * width % lanes == 0), None)


def quad_tile_pixels(height: int, width: int, lanes: int) -> int:
    """Pixels per tile of the quad pointwise kernel: whole image rows making whole vectors
    (``pointwise_image_rows``), else the whole image padded to whole vectors."""
    rows = pointwise_image_rows(height, width, lanes)
    return rows * width if rows is not None else whole_vectors(height * width, lanes)


def whole_vectors(pixels: int, lanes: int) -> int:
    """``pixels`` rounded up to whole vectors: the quad kernel's flattened image."""
    return -(-pixels // lanes) * lanes


def int4_run_dims(shape) -> int:
    """How many trailing dimensions of an int4 weight laid out for a blocked kernel make one
    packing run: as many as fit in ``INT4_RUN`` weights; 0 where their product is odd."""
    run, dims = 1, 0
    for extent in reversed([int(d) for d in shape]):
        if run * extent > INT4_RUN:
            break
        run, dims = run * extent, dims + 1
    return dims if run % 2 == 0 else 0


def int4_run(shape) -> int | None:
    """Weights per packing run (``int4_run_dims``), or None where the run would be odd."""
    dims = int4_run_dims(shape)
    return int(np.prod([int(d) for d in shape][len(shape) - dims:])) if dims else None
