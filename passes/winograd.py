"""ConvToWinograd: 3x3 stride-1 float convolutions as Winograd F(2x2,3x3) or F(4x4,3x3).

Runs on the graph before LegalizeOps (after batch-norm folding, so the folded weight is
the one transformed). The weight transform U = G g G^T is computed here, once, with
numpy: the artifact holds U as a constant and the kernel only transforms the input and the
output. Float32/float16 only: quantized layers keep the integer direct/GEMM path, because
integer Winograd loses too much accuracy (TVM's ARM experiment).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, topi

from ._conv import Conv2D, read_conv2d

TILE_SIZES = (2, 4)


def eligible(conv: Conv2D) -> bool:
    """Whether Winograd F(m x m, 3x3) computes this convolution."""
    return (
        conv.kernel == (3, 3)
        and conv.strides == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.data_shape[0] >= 1
    )


def transform_weight(weight: np.ndarray, tile_size: int) -> np.ndarray:
    """U[eps, nu, ci, co] = sum_{kh, kw} G[eps, kh] g[co, ci, kh, kw] G[nu, kw]."""
    _, _, g = transform_matrices(tile_size)
    u = np.einsum("ek,oikl,nl->enio", g, weight.astype(np.float64), g)
    return u.astype(weight.dtype)


def transform_matrices(tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Winograd A, B, G for F(m x m, 3x3), as TVM's topi builds them."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    points = _interpolation_points(tile_size + 3 - 2)
    a, b, g = _cook_toom_convolution(points, tile_size, 3)
    return a, b, g


def emit_winograd(builder: relax.BlockBuilder, conv: Conv2D, tile_size: int) -> relax.Expr:
    """The call of a Winograd kernel for ``conv`` (its PrimFunc added to ``builder``)."""
    weight = relax.const(transform_weight(conv.weight, tile_size))
    return builder.call_te(
        winograd_compute, conv.data, weight, conv.padding, tile_size, conv.out_dtype,
        primfunc_name_hint=f"conv2d_winograd{tile_size}",
    )


def winograd_compute(data, packed_weight, padding, tile_size: int, out_dtype: str):
    """TE compute of NCHW Winograd with a pre-transformed weight ``[alpha, alpha, CI, CO]``.

    Tiles are numbered p = (n, tile row, tile column), the rows padded to ``tile_columns``
    tiles so the transforms and the batched GEMM vectorize across whole vectors of tiles
    with affine indices. The input transform B^T d B runs in two passes: down the columns
    of the image (``input_rows``: alpha combinations of image rows, contiguous along the
    row) and then across each tile (``data_pack``: strided reads of a row that is in cache).
    The transforms are written out as sums with the constant coefficients of B and A (zeros
    dropped), so they are elementwise stages, not reductions.
    """
    from tvm import te

    m = tile_size
    alpha = m + 2
    a_matrix, b_matrix, _ = transform_matrices(m)
    batch, channels, height, width = (int(d) for d in data.shape)
    out_channels = int(packed_weight.shape[3])
    top, left, bottom, right = padding
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    row_tiles = tile_columns(tiles_h, tiles_w)
    tiles = batch * tiles_h * row_tiles
    # Rows padded to whole vectors of any CPU (16 floats): a row that ends short of one
    # left its last vector under a predicate, which scalarized the whole row.
    row_width = -(-(row_tiles * m + 2) // 16) * 16
    data_pad = topi.nn.pad(
        data,
        (0, 0, top, left),
        (0, 0, tiles_h * m + 2 - height - top, row_width - width - left),
        name="data_pad",
    )

    def row_combination(n, ci, th, eps, w):
        return _linear(b_matrix, eps, lambda a: data_pad[n, ci, th * m + a, w], data.dtype)

    rows = te.compute((batch, channels, tiles_h, alpha, row_width), row_combination,
                      name="input_rows")

    def data_pack(eps, nu, ci, p):
        n, th, tw = p // (tiles_h * row_tiles), p // row_tiles % tiles_h, p % row_tiles
        return _linear(b_matrix, nu, lambda b: rows[n, ci, th, eps, tw * m + b], data.dtype)

    packed = te.compute((alpha, alpha, channels, tiles), data_pack, name="data_pack")
    k = te.reduce_axis((0, channels), name="ci")
    bgemm = te.compute(
        (alpha, alpha, out_channels, tiles),
        lambda eps, nu, co, p: te.sum(
            packed[eps, nu, k, p].astype(out_dtype)
            * packed_weight[eps, nu, k, co].astype(out_dtype),
            axis=k,
        ),
        name="bgemm",
    )

    def inverse(co, vh, vw, p):
        return _bilinear(a_matrix, vh, vw, lambda a, b: bgemm[a, b, co, p], out_dtype)

    inverse_tiles = te.compute((out_channels, m, m, tiles), inverse, name="inverse")

    def output(n, co, h, w):
        p = (n * tiles_h + h // m) * row_tiles + w // m
        return inverse_tiles[co, h % m, w % m, p]

    return te.compute((batch, out_channels, out_h, out_w), output, name="conv2d_winograd")


def tile_columns(tiles_h: int, tiles_w: int) -> int:
    """Tiles per row of the tile grid: ``tiles_w``, padded to a multiple of 8 where the
    grid's tile count would not split into vectors of at least 14 tiles (7x7 tiles as
    49 = 7 x 7 would run the batched GEMM on 7-lane vectors; 7 x 8 runs it on 14)."""
    count = tiles_h * tiles_w
    if count % 16 == 0 or count % 14 == 0 or tiles_w % 8 == 0:
        return tiles_w
    return -(-tiles_w // 8) * 8


def _linear(matrix: np.ndarray, i, element, dtype: str):
    """sum_a matrix[a, i] * element(a) for a loop variable i, as a Select over i's values
    (folded once the i loop is unrolled)."""
    result = None
    for out_i in range(matrix.shape[1]):
        value = tvm.tirx.const(0, dtype)
        for a in range(matrix.shape[0]):
            if matrix[a, out_i] != 0:
                value = value + tvm.tirx.const(float(matrix[a, out_i]), dtype) * element(a)
        result = value if result is None else tvm.tirx.Select(i == out_i, value, result)
    return result


def _bilinear(matrix: np.ndarray, i, j, element, dtype: str):
    """sum_{a, b} matrix[a, i] * matrix[b, j] * element(a, b) for loop variables i, j:
    ``_linear`` over a of ``_linear`` over b (every Select folds once i, j are unrolled)."""
    return _linear(matrix, i, lambda a: _linear(matrix, j, lambda b: element(a, b), dtype),
                   dtype)


@tvm.transform.module_pass(opt_level=0, name="ConvToWinograd")
class ConvToWinograd:
    """Rewrite eligible conv2d calls to Winograd.

    Parameters
    ----------
    tile_size : {2, 4}
        The output tile: F(2x2,3x3) multiplies 2.25x less, F(4x4,3x3) 4x less (but its
        transforms cost more and lose a little precision).
    select : callable, optional
        ``select(conv, binding_name) -> bool``: which eligible convolutions to rewrite
        (default: all). The per-layer algorithm choice passes its decision here.
    """

    def __init__(self, tile_size: int = 4, select: Callable[[Conv2D, str], bool] | None = None):
        if tile_size not in TILE_SIZES:
            from tvmq.errors import ConfigError

            raise ConfigError(f"Winograd tile size {tile_size} is not one of {TILE_SIZES}")
        self.tile_size = tile_size
        self.select = select

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tile_size, select = self.tile_size, self.select

        def rewrite(builder, conv, name):
            if not eligible(conv) or (select is not None and not select(conv, name)):
                return None
            return emit_winograd(builder, conv, tile_size)

        return rewrite_convolutions(mod, rewrite)


def rewrite_convolutions(mod: tvm.IRModule, rewrite, *, integer: bool = False) -> tvm.IRModule:
    """Bind each conv2d's variable to ``rewrite(builder, conv, binding_name)`` instead, where
    that returns an expression (a call of a kernel the rewrite added to the builder).
    ``integer`` also offers the integer convolutions of quantized layers.

    A PyExprMutator rather than a pattern: the replacement is a TE kernel, which only a
    BlockBuilder can add to the module.
    """

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_var_binding_(self, binding) -> None:
            conv = read_conv2d(binding.value, integer=integer)
            if conv is not None:
                conv = _with_data(conv, self.visit_expr(conv.data))
                replacement = rewrite(self.builder_, conv, binding.var.name)
                if replacement is not None:
                    value = self.builder_.normalize(replacement)
                    self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
                    return
            super().visit_var_binding_(binding)

    rewriter = _Rewriter(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def _with_data(conv: Conv2D, data: relax.Expr) -> Conv2D:
    from dataclasses import replace

    return replace(conv, data=data)
