"""FP8 quantization kernels: fused amax, scale and cast, with the transposed copy the backward needs.

Math (every recipe): for a tensor ``x`` and an FP8 format with largest finite value ``FMAX``
(448 for E4M3, 57344 for E5M2)::

    amax      = max |x|                          (over the tensor, a row or a column)
    scale     = FMAX / max(amax, MIN_AMAX)       if 0 < amax < inf, else 1
    scale_inv = 1 / scale                        (what ``torch._scaled_mm`` multiplies by)
    q         = fp8(clamp(x * scale, -FMAX, FMAX))   rounded to nearest even
    q         = NaN wherever x is inf or NaN

All arithmetic is FP32 with correctly rounded division (``div_rn``), so a kernel and its
``*_reference`` produce the same bits on any device. The guards make the scale finite for
every input: an all-zero tensor gets scale 1, a subnormal amax cannot overflow the
division, and non-finite input leaves the scale at 1 and sets a caller-provided flag
instead of poisoning the scale. Non-finite *values* come out as NaN (E4M3 has no inf),
so the loss shows them rather than a silently saturated 448.

Kernels (launchers below take 2-D tensors of any strides, contiguous output):

- ``_amax_kernel``: a persistent pass over 2-D tiles computing max|x| per tensor (one
  partial per program, no atomics, deterministic), per row or per column (int32 atomics).
  The max runs on the float's bit pattern with the sign cleared: for non-negative IEEE
  floats integer order equals float order, and a (positive) NaN sorts above inf, so NaN
  propagates through the reduction, which ``tl.max`` on floats does not guarantee.
- ``_cast_kernel``: one pass over 2-D tiles that scales, casts and writes the row-major
  copy and/or the transposed copy (``_scaled_mm`` wants its second operand column-major,
  so the backward needs Xᵀ, Wᵀ and dYᵀ). The scale comes from the amax partials
  (tensorwise), from a scale tensor while recording this tensor's amax into an amax
  history slot in the same pass (delayed), or per row / per column (rowwise). The
  transposed copy's row length is padded with zeros to a multiple of 16, because it is
  the reduction dimension of the weight-gradient GEMM and ``_scaled_mm`` requires that.
- ``_delayed_update_kernel``: one tiny program that turns an amax history column into a
  new scale and rolls the history (TransformerEngine's recipe), without host sync.

References: the Triton layer-norm and fused-attention tutorials for the tile and
persistent-grid patterns; torchao.float8 and TransformerEngine for the scaling recipes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreting, launch, next_power_of_2
from .quant_reference import (
    MIN_AMAX,
    Fp8Quantized,
    _check_2d,
    _check_f32_scalar,
    _check_fp8,
    _check_rms_norm,
    _check_swiglu_up,
    amax_to_scale_reference,
    delayed_scale_update_many_reference,
    delayed_scale_update_reference,
    pad_to,
    quantize_colwise_transposed_reference,
    quantize_delayed_reference,
    quantize_rowwise_reference,
    quantize_tensorwise_reference,
    quantize_with_scale_reference,
)

__all__ = [
    "MIN_AMAX",
    "Fp8Quantized",
    "quantize_tensorwise",
    "quantize_tensorwise_reference",
    "quantize_delayed",
    "quantize_delayed_reference",
    "quantize_with_scale",
    "quantize_with_scale_reference",
    "quantize_rowwise",
    "quantize_rowwise_reference",
    "quantize_colwise_transposed",
    "quantize_colwise_transposed_reference",
    "delayed_scale_update",
    "delayed_scale_update_many",
    "delayed_update_addresses",
    "delayed_scale_update_reference",
    "delayed_scale_update_many_reference",
    "amax_to_scale_reference",
    "pad_to",
]


_SCALE_FROM_PARTIALS = 0  # tensorwise: reduce the amax kernel's partials in every program
_SCALE_FROM_TENSOR = 1  # delayed: read a precomputed scale
_SCALE_PER_ROW = 2  # rowwise: one scale per row of x, from a per-row amax
_SCALE_PER_COL = 3  # rowwise of xᵀ: one scale per column of x


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------
@triton.jit
def _abs_bits(x):
    """|x| as an int32 whose integer order is the float order, with NaN above inf."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _scale_from_amax(amax, FP8_MAX: tl.constexpr, MIN_AMAX_C: tl.constexpr):
    """Guarded scale: finite for every amax (zero, subnormal, inf, NaN)."""
    ok = (amax > 0.0) & (amax < float("inf"))
    safe = tl.where(ok, tl.maximum(amax, MIN_AMAX_C), 1.0)
    scale = tl.math.div_rn(tl.full(safe.shape, FP8_MAX, tl.float32), safe)
    return tl.where(ok, scale, 1.0)


@triton.jit
def _reciprocal(scale):
    """Correctly rounded 1/scale (Triton's ``/`` on fp32 is an approximate division)."""
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _load_operand(
    x_ptr, up_ptr, rstd_ptr, nw_ptr, offs, rows, cols, mask, R, C, GATED: tl.constexpr, NORMED: tl.constexpr
):  # fmt: skip
    """The FP32 tile to quantize: ``x``; with GATED the SwiGLU ``silu(x) * up`` rounded to x's dtype;
    with NORMED the RMSNorm output ``w * (x * rstd)`` (``rstd`` per row, ``w`` per column), rounded
    where :mod:`hf_fp8.kernels.norm_swiglu`'s forward rounds (the normalized value to x's dtype, the
    product to x's dtype). The same expressions and roundings as those kernels, so the codes are
    those of the unfused op followed by a cast. Masked elements load as 0 (and silu(0) * 0 = 0)."""
    # bf16/fp16 loads must be upcast before any arithmetic (exact for every value).
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x * tl.sigmoid(x) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
    if NORMED:
        rstd = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)
        w = tl.load(nw_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (w[None, :] * normed).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = tl.where(mask, x, 0.0)  # padding: +0 (a negative weight times 0 would give -0)
    return x


@triton.jit
def _amax_kernel(
    x_ptr,
    up_ptr,  # GATED: the SwiGLU ``up`` input, same shape and strides as x (the gate)
    rstd_ptr,  # NORMED: (R,) fp32 1/rms per row
    nw_ptr,  # NORMED: (C,) the RMSNorm weight, in x's dtype
    out_ptr,  # int32 view: (num_programs,) partials, or (R,) / (C,) zero-initialised for atomics
    R,
    C,
    stride_xr,
    stride_xc,
    AXIS: tl.constexpr,  # -1: whole tensor; 0: per row; 1: per column
    GATED: tl.constexpr,  # the tensor is silu(x) * up, computed here (see _load_operand)
    NORMED: tl.constexpr,  # the tensor is RMSNorm(x), computed here (see _load_operand)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    n_tiles = tl.cdiv(R, BLOCK_R) * tiles_c
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for tile in range(pid, n_tiles, num_progs):
        rows = (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        offs = rows.to(tl.int64)[:, None] * stride_xr + cols.to(tl.int64)[None, :] * stride_xc
        bits = _abs_bits(_load_operand(x_ptr, up_ptr, rstd_ptr, nw_ptr, offs, rows, cols, mask, R, C, GATED, NORMED))
        if AXIS == -1:
            acc = tl.maximum(acc, bits)
        elif AXIS == 0:
            tl.atomic_max(out_ptr + rows, tl.max(bits, axis=1), mask=rows < R)
        else:
            tl.atomic_max(out_ptr + cols, tl.max(bits, axis=0), mask=cols < C)
    if AXIS == -1:
        tl.store(out_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _tensor_scale_from_partials(
    partials_ptr, n_partials, pid, scale_inv_out_ptr, amax_out_ptr, scale_out_ptr, flag_ptr,
    FP8_MAX: tl.constexpr, MIN_AMAX_C: tl.constexpr, HAS_FLAG: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Tensorwise: the scale from the amax pass's int32 partials; program 0 writes the outputs."""
    p = tl.arange(0, BLOCK_P)
    amax = tl.max(tl.load(partials_ptr + p, mask=p < n_partials, other=0), axis=0).to(tl.float32, bitcast=True)
    scale = _scale_from_amax(amax, FP8_MAX, MIN_AMAX_C)
    if pid == 0:
        tl.store(scale_inv_out_ptr, _reciprocal(scale))
        tl.store(amax_out_ptr, amax)
        tl.store(scale_out_ptr, scale)
        if HAS_FLAG:
            tl.store(flag_ptr, 1, mask=~(amax < float("inf")))
    return scale


@triton.jit
def _given_scale(
    x, scale_ptr, record_ptr, pid, scale_inv_out_ptr, scale_out_ptr, flag_ptr,
    RECORD: tl.constexpr, HAS_FLAG: tl.constexpr, WRITE_SCALE: tl.constexpr,
):  # fmt: skip
    """Delayed / re-cast: a precomputed scale; with RECORD, max-reduce this tile's amax into the
    slot; with WRITE_SCALE, copy the scale out (the module's buffer changes at the next update)."""
    scale = tl.load(scale_ptr)
    if pid == 0:
        # a fresh 0-d tensor: cuBLASLt rejects scale pointers that are not 16-byte aligned,
        # which a view into the module's (3,) scale buffer would not be
        tl.store(scale_inv_out_ptr, _reciprocal(scale))
        if WRITE_SCALE:
            tl.store(scale_out_ptr, scale)
    if RECORD:
        tile_amax = tl.max(tl.max(_abs_bits(x), axis=1), axis=0)
        tl.atomic_max(record_ptr, tile_amax)
        if HAS_FLAG:
            tl.store(flag_ptr, 1, mask=tile_amax >= 0x7F800000)  # inf or NaN bits
    return scale


@triton.jit
def _saturate(y, x, FP8_MAX: tl.constexpr):
    """Clamp to the format's range; NaN wherever ``x`` is not finite (E4M3 has no inf)."""
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    return tl.where(tl.abs(x) < float("inf"), y, float("nan"))


@triton.jit
def _saturate_and_store(
    y, x, scale, src_ptr, y_ptr, yt_ptr, rows, cols, mask, C, R_pad, stride_yr, stride_ytr,
    FP8_MAX: tl.constexpr, WRITE_Y: tl.constexpr, WRITE_T: tl.constexpr, TRANS_MODE: tl.constexpr,
):  # fmt: skip
    """Saturate the scaled tile ``y = x * scale`` and store its FP8 copies.

    ``TRANS_MODE`` picks what crosses shared memory for the transposed copy (same codes
    whichever): 0, the scaled FP32 tile; 1, the operand ``x`` in ``src_ptr``'s 16-bit dtype
    (exact: ``x`` holds values of that dtype), scaled and cast after the transpose (half the
    shared-memory traffic; a scalar ``scale`` only); 2, the FP8 codes as int8 (a quarter).
    """
    if WRITE_Y:
        y_offs = rows.to(tl.int64)[:, None] * stride_yr + cols[None, :]
        tl.store(y_ptr + y_offs, _saturate(y, x, FP8_MAX).to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_T:
        # Rows in [R, R_pad) were loaded as 0 and are written as the zero padding; the stored
        # rows of the transposed tile are contiguous along the original rows. With triton 3.6
        # on an H100, writing both copies from one FP32-loaded tile gave wrong bits (FP16 was
        # not tried), so the launchers ask for both at once only from BF16 input (see _launch_cast).
        t_offs = cols.to(tl.int64)[:, None] * stride_ytr + rows[None, :]
        t_mask = (cols < C)[:, None] & (rows < R_pad)[None, :]
        if TRANS_MODE == 0:
            yt = tl.trans(_saturate(y, x, FP8_MAX)).to(yt_ptr.dtype.element_ty)
            tl.store(yt_ptr + t_offs, yt, mask=t_mask)
        elif TRANS_MODE == 1:
            xt = tl.trans(x.to(src_ptr.dtype.element_ty)).to(tl.float32)
            yt = _saturate(xt * scale, xt, FP8_MAX).to(yt_ptr.dtype.element_ty)
            tl.store(yt_ptr + t_offs, yt, mask=t_mask)
        else:
            codes = _saturate(y, x, FP8_MAX).to(yt_ptr.dtype.element_ty).to(tl.int8, bitcast=True)
            tl.store(yt_ptr.to(tl.pointer_type(tl.int8)) + t_offs, tl.trans(codes), mask=t_mask)


@triton.jit
def _cast_kernel(
    x_ptr,
    up_ptr,  # GATED: the SwiGLU ``up`` input, same shape and strides as x (the gate)
    rstd_ptr,  # NORMED: (R,) fp32 1/rms per row
    nw_ptr,  # NORMED: (C,) the RMSNorm weight, in x's dtype
    y_ptr,  # (R, C) row-major FP8 output, if WRITE_Y
    yt_ptr,  # (C, R_pad) row-major FP8 output, if WRITE_T
    amax_ptr,  # SCALE_FROM_PARTIALS: int32 partials; PER_ROW/PER_COL: int32 amax per row/col
    n_partials,
    scale_ptr,  # SCALE_FROM_TENSOR: fp32 scale to use
    record_ptr,  # SCALE_FROM_TENSOR with RECORD_AMAX: int32 view of the amax slot to max into
    scale_inv_out_ptr,  # fp32: () or (R,) or (C,)
    amax_out_ptr,  # fp32: () or (R,) or (C,)
    scale_out_ptr,  # fp32 (): the per-tensor scale, from the partials (SCALE_FROM_PARTIALS) or given (WRITE_SCALE)
    flag_ptr,  # int32 sticky non-finite flag, if HAS_FLAG
    R,
    C,
    R_pad,
    stride_xr,
    stride_xc,
    stride_yr,
    stride_ytr,
    FP8_MAX: tl.constexpr,
    MIN_AMAX_C: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    WRITE_SCALE: tl.constexpr,  # SCALE_FROM_TENSOR: copy the given scale to scale_out_ptr
    GATED: tl.constexpr,
    NORMED: tl.constexpr,
    RECORD_AMAX: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_T: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    REVERSE: tl.constexpr,  # walk tiles backwards: the amax pass just left the tail in L2
    TRANS_MODE: tl.constexpr,  # see _saturate_and_store
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    tile_r = pid // tiles_c
    tile_c = pid % tiles_c
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_in = rows < R
    col_in = cols < C
    mask = row_in[:, None] & col_in[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_xr + cols.to(tl.int64)[None, :] * stride_xc
    x = _load_operand(x_ptr, up_ptr, rstd_ptr, nw_ptr, offs, rows, cols, mask, R, C, GATED, NORMED)

    # ---- the scale (and, for the first program of a row/column, its outputs) ----------
    if SCALE_MODE == 0:
        scale = _tensor_scale_from_partials(
            amax_ptr, n_partials, pid, scale_inv_out_ptr, amax_out_ptr, scale_out_ptr, flag_ptr,
            FP8_MAX, MIN_AMAX_C, HAS_FLAG, BLOCK_P,
        )  # fmt: skip
        y = x * scale
    elif SCALE_MODE == 1:
        scale = _given_scale(
            x, scale_ptr, record_ptr, pid, scale_inv_out_ptr, scale_out_ptr, flag_ptr, RECORD_AMAX, HAS_FLAG, WRITE_SCALE
        )  # fmt: skip
        y = x * scale
    elif SCALE_MODE == 2:
        amax = tl.load(amax_ptr + rows, mask=row_in, other=0).to(tl.float32, bitcast=True)
        scale = _scale_from_amax(amax, FP8_MAX, MIN_AMAX_C)
        if tile_c == 0:
            tl.store(scale_inv_out_ptr + rows, _reciprocal(scale), mask=row_in)
            tl.store(amax_out_ptr + rows, amax, mask=row_in)
            if HAS_FLAG:
                tl.store(flag_ptr, 1, mask=tl.max((row_in & ~(amax < float("inf"))).to(tl.int32), axis=0) > 0)
        y = x * scale[:, None]
    else:
        amax = tl.load(amax_ptr + cols, mask=col_in, other=0).to(tl.float32, bitcast=True)
        scale = _scale_from_amax(amax, FP8_MAX, MIN_AMAX_C)
        if tile_r == 0:
            tl.store(scale_inv_out_ptr + cols, _reciprocal(scale), mask=col_in)
            tl.store(amax_out_ptr + cols, amax, mask=col_in)
            if HAS_FLAG:
                tl.store(flag_ptr, 1, mask=tl.max((col_in & ~(amax < float("inf"))).to(tl.int32), axis=0) > 0)
        y = x * scale[None, :]

    _saturate_and_store(
        y, x, scale, x_ptr, y_ptr, yt_ptr, rows, cols, mask, C, R_pad, stride_yr, stride_ytr,
        FP8_MAX, WRITE_Y, WRITE_T, TRANS_MODE,
    )  # fmt: skip


@triton.jit
def _update_and_roll(
    hist_ptr, scale_ptr, flag_ptr, slot, L, stride_h,
    FP8_MAX: tl.constexpr, MIN_AMAX_C: tl.constexpr, MARGIN_MUL: tl.constexpr, USE_MAX: tl.constexpr,
    HAS_FLAG: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """One history column -> new scale, then roll. Non-finite entries (a step whose tensor held
    inf/NaN; the cast flagged it) take no part in the max: one bad batch must not freeze the
    scale for the history's length. A column with no positive finite amax keeps the old scale."""
    i = tl.arange(0, BLOCK_L)
    h = tl.load(hist_ptr + i * stride_h + slot, mask=i < L, other=0.0)
    finite = tl.abs(h) < float("inf")  # NaN compares false
    if USE_MAX:
        amax = tl.max(_abs_bits(tl.where(finite, h, 0.0)), axis=0).to(tl.float32, bitcast=True)
    else:
        amax = tl.load(hist_ptr + slot)
    ok = (amax > 0.0) & (amax < float("inf"))
    new_scale = _scale_from_amax(amax, FP8_MAX, MIN_AMAX_C) * MARGIN_MUL
    old_scale = tl.load(scale_ptr + slot)
    scale = tl.where(ok, new_scale, old_scale)
    tl.store(scale_ptr + slot, scale)
    if HAS_FLAG:
        if USE_MAX:
            bad = tl.max((~finite & (i < L)).to(tl.int32), axis=0)
        else:
            bad = (~(amax < float("inf"))).to(tl.int32)
        tl.store(flag_ptr, 1, mask=bad > 0)
    # roll: entry i+1 <- entry i, entry 0 <- 0 (ready for this step's amax)
    shifted = tl.load(hist_ptr + (i - 1) * stride_h + slot, mask=(i >= 1) & (i < L), other=0.0)
    tl.debug_barrier()
    tl.store(hist_ptr + i * stride_h + slot, shifted, mask=i < L)


@triton.jit
def _delayed_update_kernel(
    hist_ptr,  # (L, S) fp32, row 0 the most recent
    scale_ptr,  # (S,) fp32
    flag_ptr,  # int32 sticky non-finite flag, if HAS_FLAG
    slot,
    L,
    stride_h,
    FP8_MAX: tl.constexpr,
    MIN_AMAX_C: tl.constexpr,
    MARGIN_MUL: tl.constexpr,  # 2**-margin, exact
    USE_MAX: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    _update_and_roll(
        hist_ptr, scale_ptr, flag_ptr, slot, L, stride_h, FP8_MAX, MIN_AMAX_C, MARGIN_MUL, USE_MAX, HAS_FLAG, BLOCK_L
    )


@triton.jit
def _delayed_update_many_kernel(
    hist_addrs,  # int64 (E,): addresses of (L, S) fp32 histories, one entry per program
    scale_addrs,  # int64 (E,): addresses of (S,) fp32 scales
    slots,  # int32 (E,)
    L,
    stride_h,
    FP8_MAX: tl.constexpr,
    MIN_AMAX_C: tl.constexpr,
    MARGIN_MUL: tl.constexpr,
    USE_MAX: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    e = tl.program_id(0)
    hist_ptr = tl.load(hist_addrs + e).to(tl.pointer_type(tl.float32))
    scale_ptr = tl.load(scale_addrs + e).to(tl.pointer_type(tl.float32))
    slot = tl.load(slots + e)
    _update_and_roll(
        hist_ptr, scale_ptr, scale_ptr, slot, L, stride_h, FP8_MAX, MIN_AMAX_C, MARGIN_MUL, USE_MAX, False, BLOCK_L
    )


# ---------------------------------------------------------------------------------------
# launch settings
# ---------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return interpreting()


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# GPU launch settings, (BLOCK_R, BLOCK_C, num_warps), from the H100 sweep in
# benchmarks/results/quant_h100.json (``python -m benchmarks.bench_quant --sweep-blocks``).
# Benchmarks may override them; the library never changes them at run time.
TUNING: dict[str, tuple[int, ...]] = {
    "amax": (16, 512, 8),  # row-major reads: 16 KB of 16-bit input per tile
    "amax_colwise": (128, 32, 4),  # per-column amax: tall tiles so each column's partial max is long
    "programs_per_sm": (4,),  # persistent amax grid: enough loads in flight to cover HBM latency
    "cast": (32, 256, 4),
    # with a transposed copy: 64x64 tiles moving the 16-bit operand through shared memory, from
    # every transposed cast of the 8B step (benchmarks/results/history/cast_transpose_h100.json: 9.32 ms
    # per step against 10.33 at the former 128x64, FP32 tile; same codes)
    "cast_t": (64, 64, 4),
    "cast_t_mode": (1,),  # what the transposed copy moves through shared memory (_saturate_and_store)
}


def _max_programs(x: torch.Tensor) -> int:
    if x.is_cuda:
        sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
        return TUNING["programs_per_sm"][0] * sms
    return 4  # the interpreter runs programs one after another: fewer, larger is faster


def _settings(x: torch.Tensor, transposed_io: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for the cast kernel.

    Under the interpreter every program costs ~0.5 ms, so tiles are as large as practical.
    """
    if _interpreting():
        return 64, 128, 4
    return TUNING["cast_t" if transposed_io else "cast"]


def _trans_mode(x: torch.Tensor, scalar_scale: bool) -> int:
    """The transposed copy's TRANS_MODE: 1 (16-bit operand) needs a 16-bit input and one scale."""
    mode = TUNING["cast_t_mode"][0]
    if mode == 1 and not (scalar_scale and x.dtype in (torch.bfloat16, torch.float16)):
        return 0
    return mode


def _launch_cast(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    scale_mode: int,
    write_y: bool,
    write_t: bool,
    amax_src: torch.Tensor | None = None,
    n_partials: int = 0,
    scale: torch.Tensor | None = None,
    record: torch.Tensor | None = None,
    out_shape: tuple[int, ...] = (),
    nonfinite_flag: torch.Tensor | None = None,
    reverse: bool = False,
    block: tuple[int, int, int] | None = None,
    up: torch.Tensor | None = None,
    rms: tuple[torch.Tensor, torch.Tensor] | None = None,
    write_scale: bool = False,
) -> Fp8Quantized:
    if write_y and write_t and x.is_cuda and x.dtype != torch.bfloat16:
        # Writing both copies from one FP32 tile miscompiled with triton 3.6 on an H100 (wrong
        # bits in one of the two outputs; each alone is exact), so non-BF16 inputs take two
        # passes. The scale is computed identically in both, so the bits are the same.
        kwargs = dict(
            scale_mode=scale_mode,
            amax_src=amax_src,
            n_partials=n_partials,
            scale=scale,
            record=record,
            out_shape=out_shape,
            nonfinite_flag=nonfinite_flag,
            reverse=reverse,
            block=block,
            up=up,
            rms=rms,
            write_scale=write_scale,
        )
        rows = _launch_cast(x, fp8_dtype, write_y=True, write_t=False, **kwargs)
        cols = _launch_cast(x, fp8_dtype, write_y=False, write_t=True, **kwargs)
        return Fp8Quantized(rows.data, cols.data_t, rows.scale_inv, rows.amax, rows.scale)
    R, C = x.shape
    R_pad = pad_to(R) if write_t else R
    fmax = _check_fp8(fp8_dtype)
    dev = x.device
    y = torch.empty((R, C), dtype=fp8_dtype, device=dev) if write_y else None
    yt = torch.empty((C, R_pad), dtype=fp8_dtype, device=dev) if write_t else None
    scale_inv = torch.empty(out_shape, dtype=torch.float32, device=dev)
    # a given scale (delayed, re-cast) has no amax output: its callers report the history slot or NaN
    amax = scale_inv if scale_mode == _SCALE_FROM_TENSOR else torch.empty(out_shape, dtype=torch.float32, device=dev)
    write_scale = write_scale and scale_mode == _SCALE_FROM_TENSOR
    want_scale = scale_mode == _SCALE_FROM_PARTIALS or write_scale
    scale_out = torch.empty((), dtype=torch.float32, device=dev) if want_scale else None
    BLOCK_R, BLOCK_C, num_warps = block or _settings(x, write_t)
    grid = (cdiv(R_pad, BLOCK_R) * cdiv(C, BLOCK_C),)
    dummy = scale_inv
    launch(
        _cast_kernel,
        grid,
        (
            x,
            up if up is not None else x,
            rms[0] if rms is not None else dummy,
            rms[1] if rms is not None else x,
            y if y is not None else yt,
            yt if yt is not None else y,
            amax_src if amax_src is not None else dummy,
            n_partials,
            scale if scale is not None else dummy,
            record if record is not None else dummy,
            scale_inv,
            amax,
            scale_out if scale_out is not None else dummy,
            nonfinite_flag if nonfinite_flag is not None else dummy,
            R,
            C,
            R_pad,
            x.stride(0),
            x.stride(1),
            C,
            R_pad,
        ),
        dict(
            FP8_MAX=fmax,
            MIN_AMAX_C=MIN_AMAX,
            SCALE_MODE=scale_mode,
            WRITE_SCALE=write_scale,
            GATED=up is not None,
            NORMED=rms is not None,
            RECORD_AMAX=record is not None,
            WRITE_Y=write_y,
            WRITE_T=write_t,
            HAS_FLAG=nonfinite_flag is not None,
            REVERSE=reverse,
            TRANS_MODE=_trans_mode(x, scale_mode in (_SCALE_FROM_PARTIALS, _SCALE_FROM_TENSOR)) if write_t else 0,
            BLOCK_R=BLOCK_R,
            BLOCK_C=BLOCK_C,
            BLOCK_P=max(next_power_of_2(max(n_partials, 1)), 16),
        ),
        num_warps,
    )
    return Fp8Quantized(y, yt, scale_inv, amax, scale_out)


def _launch_amax(
    x: torch.Tensor,
    axis: int,
    block: tuple[int, int, int] | None = None,
    up: torch.Tensor | None = None,
    rms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Per-tensor partials (axis=-1) or per-row/column amax bits (axis=0/1) as int32."""
    R, C = x.shape
    if _interpreting():
        BLOCK_R, BLOCK_C, num_warps = 64, 128, 4
    else:
        BLOCK_R, BLOCK_C, num_warps = block or (TUNING["amax"] if x.stride(1) == 1 else TUNING["amax_colwise"])
    n_tiles = cdiv(R, BLOCK_R) * cdiv(C, BLOCK_C)
    n_progs = min(n_tiles, _max_programs(x))
    if axis == -1:
        out = torch.empty(n_progs, dtype=torch.int32, device=x.device)
    else:
        out = torch.zeros(R if axis == 0 else C, dtype=torch.int32, device=x.device)
    launch(
        _amax_kernel,
        (n_progs,),
        (
            x,
            up if up is not None else x,
            rms[0] if rms is not None else out,
            rms[1] if rms is not None else x,
            out,
            R,
            C,
            x.stride(0),
            x.stride(1),
        ),
        dict(AXIS=axis, GATED=up is not None, NORMED=rms is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C),
        num_warps,
    )
    return out, n_progs


# ---------------------------------------------------------------------------------------
# public launchers (GPU or TRITON_INTERPRET=1) and their pure-torch references
# ---------------------------------------------------------------------------------------
def _gated_operands(x: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``x`` (and the SwiGLU ``up`` input); the kernels index both with x's strides."""
    _check_2d(x)
    if up is None:
        return x, None
    _check_swiglu_up(x, up)
    if x.stride() != up.stride():
        x, up = x.contiguous(), up.contiguous()
    return x, up


def _rms_operand(
    x: torch.Tensor, rms_norm: tuple[torch.Tensor, torch.Tensor] | None, up: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate ``rms_norm=(rstd, weight)``: the operand is RMSNorm(x) (see _load_operand)."""
    if rms_norm is None:
        return None
    _check_rms_norm(x, rms_norm, up)
    rstd, weight = rms_norm
    return rstd.contiguous(), weight.contiguous()


def quantize_tensorwise(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    write_y: bool = True,
    write_t: bool = False,
    nonfinite_flag: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None,
    swiglu_up: torch.Tensor | None = None,
    rms_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Fp8Quantized:
    """Dynamic per-tensor scaling: amax pass, then one scale-and-cast pass (no host sync).

    Args:
        x (`torch.Tensor`): (R, C) float32/bfloat16/float16, any strides.
        fp8_dtype (`torch.dtype`): ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        write_y (`bool`): write the (R, C) row-major copy.
        write_t (`bool`): write the (C, pad_to(R)) transposed copy.
        nonfinite_flag (`torch.Tensor`, *optional*): int32 (1,) set to 1 if x has inf/NaN.
        swiglu_up (`torch.Tensor`, *optional*): quantize ``silu(x) * swiglu_up`` (rounded to x's
            dtype) instead of ``x``, without writing it: the SwiGLU output feeding an FP8 layer.
            Every launcher here takes it.
        rms_norm (`(torch.Tensor, torch.Tensor)`, *optional*): ``(rstd, weight)``: quantize the
            RMSNorm output ``weight * (x * rstd)`` (rstd (R,) FP32 from
            :func:`hf_fp8.kernels.norm_swiglu.rms_rstd`, weight (C,) in x's dtype; rounded as
            the norm kernel rounds) instead of ``x``, without writing it: the norm output
            feeding FP8 layers. The per-tensor launchers take it.
    """
    x, swiglu_up = _gated_operands(x, swiglu_up)
    rms = _rms_operand(x, rms_norm, swiglu_up)
    partials, n = _launch_amax(x, -1, up=swiglu_up, rms=rms)
    return _launch_cast(
        x,
        fp8_dtype,
        scale_mode=_SCALE_FROM_PARTIALS,
        write_y=write_y,
        write_t=write_t,
        amax_src=partials,
        n_partials=n,
        nonfinite_flag=nonfinite_flag,
        reverse=True,
        block=block,
        up=swiglu_up,
        rms=rms,
    )


def quantize_delayed(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor,
    amax_slot: torch.Tensor,
    *,
    write_y: bool = True,
    write_t: bool = False,
    nonfinite_flag: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None,
    swiglu_up: torch.Tensor | None = None,
    rms_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_scale: bool = False,
) -> Fp8Quantized:
    """Cast with a precomputed scale and record max|x| into ``amax_slot`` in the same pass.

    Args:
        scale (`torch.Tensor`): fp32 0-d (a view into the module's scale buffer).
        amax_slot (`torch.Tensor`): fp32 0-d view into the amax history that must hold 0 (or
            a smaller amax) before the call; it is max-reduced into atomically.
        nonfinite_flag (`torch.Tensor`, *optional*): int32 (1,) set to 1 if x has inf/NaN.
        keep_scale (`bool`): also return the scale used, copied out by the cast itself (the
            result's ``scale``), for a later re-cast after the buffer has moved on; one less
            launch than cloning the buffer first.
    """
    x, swiglu_up = _gated_operands(x, swiglu_up)
    rms = _rms_operand(x, rms_norm, swiglu_up)
    _check_f32_scalar("scale", scale)
    _check_f32_scalar("amax_slot", amax_slot)
    q = _launch_cast(
        x,
        fp8_dtype,
        scale_mode=_SCALE_FROM_TENSOR,
        write_y=write_y,
        write_t=write_t,
        scale=scale,
        record=amax_slot.view(torch.int32),
        nonfinite_flag=nonfinite_flag,
        block=block,
        up=swiglu_up,
        rms=rms,
        write_scale=keep_scale,
    )
    return Fp8Quantized(q.data, q.data_t, q.scale_inv, amax_slot, q.scale)


def quantize_with_scale(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor,
    *,
    write_y: bool = False,
    write_t: bool = True,
    block: tuple[int, int, int] | None = None,
    swiglu_up: torch.Tensor | None = None,
    rms_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Fp8Quantized:
    """Cast with a given per-tensor scale, recording nothing: a copy that an earlier cast with
    this scale skipped (the backward's transposed weight), bit-identical to what it would have
    written. ``amax`` of the result is not computed (NaN).

    Args:
        scale (`torch.Tensor`): fp32 0-d, the multiplier the earlier cast used.
    """
    x, swiglu_up = _gated_operands(x, swiglu_up)
    rms = _rms_operand(x, rms_norm, swiglu_up)
    _check_f32_scalar("scale", scale)
    q = _launch_cast(
        x,
        fp8_dtype,
        scale_mode=_SCALE_FROM_TENSOR,
        write_y=write_y,
        write_t=write_t,
        scale=scale,
        block=block,
        up=swiglu_up,
        rms=rms,
    )
    return Fp8Quantized(q.data, q.data_t, q.scale_inv, torch.full_like(q.scale_inv, float("nan")))


def quantize_rowwise(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    nonfinite_flag: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None,
    swiglu_up: torch.Tensor | None = None,
) -> Fp8Quantized:
    """One scale per row of ``x``: data (R, C), scale_inv (R,)."""
    x, swiglu_up = _gated_operands(x, swiglu_up)
    amax_bits, _ = _launch_amax(x, 0, up=swiglu_up)
    return _launch_cast(
        x,
        fp8_dtype,
        scale_mode=_SCALE_PER_ROW,
        write_y=True,
        write_t=False,
        amax_src=amax_bits,
        out_shape=(x.shape[0],),
        nonfinite_flag=nonfinite_flag,
        block=block,
        up=swiglu_up,
    )


def quantize_colwise_transposed(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    nonfinite_flag: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None,
    swiglu_up: torch.Tensor | None = None,
) -> Fp8Quantized:
    """One scale per column of ``x``, written transposed: data_t (C, pad_to(R)), scale_inv (C,).

    This is the rowwise quantization of ``xᵀ`` without materializing ``xᵀ`` in high precision.
    """
    x, swiglu_up = _gated_operands(x, swiglu_up)
    amax_bits, _ = _launch_amax(x, 1, up=swiglu_up)
    return _launch_cast(
        x,
        fp8_dtype,
        scale_mode=_SCALE_PER_COL,
        write_y=False,
        write_t=True,
        amax_src=amax_bits,
        out_shape=(x.shape[1],),
        nonfinite_flag=nonfinite_flag,
        block=block,
        up=swiglu_up,
    )


def delayed_scale_update(
    history: torch.Tensor,
    scale: torch.Tensor,
    slot: int,
    fp8_dtype: torch.dtype,
    *,
    use_max: bool = True,
    margin: int = 0,
    nonfinite_flag: torch.Tensor | None = None,
) -> None:
    """In place: ``scale[slot]`` from ``history[:, slot]`` (guarded), then roll that column.

    The GEMM's ``scale_inv`` is written by the cast that uses the scale (:func:`quantize_delayed`).

    Args:
        history (`torch.Tensor`): (L, S) fp32, contiguous; row 0 is the most recent amax.
        scale (`torch.Tensor`): (S,) fp32. A non-positive or non-finite amax keeps
            the previous scale (and sets ``nonfinite_flag`` if non-finite).
    """
    if history.dim() != 2 or history.dtype != torch.float32 or not history.is_contiguous():
        raise ValueError(
            f"history: expected a contiguous 2-D float32 tensor, got {history.dtype} {tuple(history.shape)}"
        )
    L = history.shape[0]
    launch(
        _delayed_update_kernel,
        (1,),
        (
            history,
            scale,
            nonfinite_flag if nonfinite_flag is not None else scale,
            slot,
            L,
            history.stride(0),
        ),
        dict(_delayed_update_constexprs(fp8_dtype, use_max, margin, L), HAS_FLAG=nonfinite_flag is not None),
        4,
    )


def _delayed_update_constexprs(fp8_dtype: torch.dtype, use_max: bool, margin: int, L: int) -> dict:
    """The compile-time arguments both delayed-update kernels take (history length L)."""
    return dict(
        FP8_MAX=_check_fp8(fp8_dtype),
        MIN_AMAX_C=MIN_AMAX,
        MARGIN_MUL=float(2.0**-margin),
        USE_MAX=use_max,
        BLOCK_L=max(next_power_of_2(L), 16),
    )


def delayed_scale_update_many(
    histories: list[torch.Tensor],
    scales: list[torch.Tensor],
    slots: list[int],
    fp8_dtype: torch.dtype,
    *,
    use_max: bool = True,
    margin: int = 0,
    addresses: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """:func:`delayed_scale_update` for many (history, scale, slot) entries in one launch.

    All histories must share their length and layout (contiguous (L, S) FP32) and one device.
    ``addresses``: the (E,) device tables of history and scale addresses (int64) and slots
    (int32), as :func:`delayed_update_addresses` builds them (checking the entries); pass them
    to skip that host work when the same entries are updated again (the caller keeps them
    valid). hf_fp8.delayed's per-forward hook, which walked the model and checked all 168
    entries of an 8-layer Llama-3-8B at every forward, took 1.0-1.8 ms of host time at the
    start of each step while the GPU waited; it now checks them once, here.
    """
    if not histories:
        return
    first = histories[0]
    if addresses is None:
        addresses = delayed_update_addresses(histories, scales, slots)
    L = first.shape[0]
    launch(
        _delayed_update_many_kernel,
        (len(histories),),
        (
            *addresses,
            L,
            first.stride(0),
        ),
        _delayed_update_constexprs(fp8_dtype, use_max, margin, L),
        4,
    )


def delayed_update_addresses(
    histories: list[torch.Tensor], scales: list[torch.Tensor], slots: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device tables for :func:`delayed_scale_update_many` (one host-to-device copy), after
    checking that the entries share one layout and device."""
    first = histories[0]
    for h, sc in zip(histories, scales):
        if h.shape != first.shape or h.dtype != torch.float32 or not h.is_contiguous() or h.device != first.device:
            raise ValueError(f"histories: expected contiguous float32 {tuple(first.shape)} tensors on one device")
        if sc.dtype != torch.float32 or not sc.is_contiguous() or sc.device != first.device:
            raise ValueError("scales: expected contiguous float32 tensors on the histories' device")
    device = first.device
    table = torch.tensor(
        [[h.data_ptr() for h in histories], [sc.data_ptr() for sc in scales], list(slots)], dtype=torch.int64
    ).to(device)
    return table[0], table[1], table[2].to(torch.int32)
