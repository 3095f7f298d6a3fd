"""Masked (PixelCNN) 2-D convolution Triton kernels (forward and backward) and their launchers.

For an odd k x k kernel with centre c = k // 2, dilation d, stride 1 and zero "same" padding,

    y[n, o, h, w] = bias[o] + sum over allowed taps (r, s) and input channels i of
                    weight[o, i, r, s] * x[n, i, h + (r - c) d, w + (s - c) d]

A tap is allowed when r < c, or r == c and s < c: exactly the first c k + c taps in row-major
order. The centre tap (c, c) is allowed for the channel pair (o, i) when group(i) < group(o)
(mask type A) or group(i) <= group(o) (type B), with G = color_channels contiguous groups
group(o) = o // (C_out / G), group(i) = i // (C_in / G).

All three products are implicit GEMMs that visit only allowed (tap, channel) pairs, which is about
half the arithmetic of conv2d(x, weight * mask) (type A keeps 4/9, 12/25, 24/49 taps for k = 3, 5, 7):

    forward  y[pixels, C_out]      reduction over (full tap, C_in), then the centre tap over the
                                   input channels [0, (group(o) + B) C_in / G) of the output block
    grad_x   grad_x[pixels, C_in]  the transposed conv: the same taps with negated offsets over
                                   (full tap, C_out), then the centre over the output channels
                                   [(group(i) + 1 - B) C_out / G, C_out)
    grad_w   grad_w[C_in, C_out]   per allowed tap, reduction over the N H W pixels, split over pixel
                                   chunks into float32 partials that torch sums (deterministic)

(B = 1 for type B, 0 for type A.) The host builds a small int32 table of the taps a call can reach:
taps whose offset is at least the image size read only padding and are dropped, which matters for
the small per-block PixelCNNs of the patch VAE (k = 7 on 3 x 3 blocks keeps 12 of its 24 full taps,
on 1 x 1 blocks none). The weight is gathered to [tap, C_in, C_out] so the B-operand tiles of the
forward and grad_x GEMMs are contiguous runs instead of k^2-strided gathers. The centre-tap step
masks the disallowed (o, i) pairs on the weight load, so masked weights never reach the sums and
grad_weight is exactly 0 at every masked tap and pair.

tl.dot runs on tensor cores for float16/bfloat16 with float32 accumulation; float32 uses
input_precision="ieee" (no TF32) so results match an fp32 reference, float64 accumulates in float64.
"""
import functools

import torch
import triton
import triton.language as tl

from pyvae.ops._checks import accumulation_dtype


# grad_weight has few output tiles (C_in x C_out per tap) and a long reduction over the pixels:
# split the pixels so that about this many programs run, with at least _MIN_SPLIT_BLOCKS pixel
# blocks per program and at most _MAX_PARTIAL_ELEMENTS float32 partial sums in flight.
_WEIGHT_GRAD_PROGRAMS = 512
_MIN_SPLIT_BLOCKS = 16
_MAX_PARTIAL_ELEMENTS = 1 << 24


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b in acc's dtype; DOT_UPCAST feeds the operands as float32 (exact for bfloat16)."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _masked_conv2d_gemm_kernel(
    src_ptr,
    w_ptr,
    bias_ptr,
    taps_ptr,
    out_ptr,
    n_pixels,
    height,
    width,
    red_channels,
    out_channels,
    red_group,
    out_group,
    n_taps,
    w_stride_tap,
    w_stride_red,
    w_stride_out,
    TYPE_B: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per [BLOCK_M pixels, BLOCK_N channels] tile of out (N, out_channels, H, W).

    Forward (TRANSPOSED=False): src = x, red = C_in, out = C_out. grad_x (TRANSPOSED=True): src =
    grad_y, red = C_out, out = C_in, and tap offsets are negated (the adjoint of a read at +offset
    is a read of the gradient at -offset). w_ptr is the packed weight [tap, C_in, C_out] with the
    given strides of its tap, reduced-channel and output-channel axes; taps_ptr the int32
    (n_taps, 3) table of (dh, dw, r k + s), the centre tap last. red_group and out_group are the
    channels per colour group of the reduced and the output channels.
    """
    acc_dtype: tl.constexpr = tl.float64 if src_ptr.dtype.element_ty == tl.float64 else tl.float32
    hw = height * width
    pixels = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pixel_mask = pixels < n_pixels
    image = pixels // hw
    position = pixels - image * hw
    h = position // width
    w = position - h * width
    # int64 image offsets: N C H W may exceed 2^31; offsets within one image stay int32.
    src_base = image.to(tl.int64) * red_channels * hw
    out_start = tl.program_id(1) * BLOCK_N
    outs = out_start + tl.arange(0, BLOCK_N)
    out_mask = outs < out_channels
    w_outs = outs[None, :] * w_stride_out
    lanes = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    # Activation tiles are loaded and stored as [channels, pixels]: the compiler cannot prove pixel
    # contiguity through // and %, and orders threads along the last axis, so pixels last is what
    # makes a warp's accesses coalesce. The transposes only change how the tiles enter shared memory.
    # One flat loop over (tap, channel block) rather than a loop per tap: the software pipeliner
    # only handles innermost loops, and with the channels in one block a per-tap loop has one step.
    red_blocks = tl.cdiv(red_channels, BLOCK_K)
    for step in range(0, (n_taps - 1) * red_blocks):
        tap = step // red_blocks
        reds = (step - tap * red_blocks) * BLOCK_K + lanes
        red_mask = reds < red_channels
        dh = tl.load(taps_ptr + 3 * tap)
        dw = tl.load(taps_ptr + 3 * tap + 1)
        if TRANSPOSED:
            dh = -dh
            dw = -dw
        hh = h + dh
        ww = w + dw
        # Out-of-image reads are the zero padding: masked, never dereferenced.
        valid = pixel_mask & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
        a = tl.load(src_ptr + (src_base + hh * width + ww)[None, :] + reds[:, None] * hw,
                    mask=red_mask[:, None] & valid[None, :], other=0.0)
        b = tl.load(w_ptr + tap * w_stride_tap + reds[:, None] * w_stride_red + w_outs,
                    mask=red_mask[:, None] & out_mask[None, :], other=0.0)
        acc = _dot(tl.trans(a), b, acc, DOT_PRECISION, DOT_UPCAST)

    # Centre tap: only the reduced channels that some output channel of the block may read, with
    # the disallowed (red, out) pairs masked on the weight load.
    groups = outs // out_group
    if TRANSPOSED:
        # grad_x[i] reads grad_y[o] when group(o) >= group(i) + 1 - B.
        red_start = (out_start // out_group + 1 - TYPE_B) * red_group
        red_end = red_channels
        red_first = (groups + 1 - TYPE_B) * red_group
    else:
        # y[o] reads x[i] when i < (group(o) + B) C_in / G.
        last_out = tl.minimum(out_start + BLOCK_N, out_channels) - 1
        red_start = 0
        red_end = (last_out // out_group + TYPE_B) * red_group
        red_limit = (groups + TYPE_B) * red_group
    centre = n_taps - 1
    for red_block in range(red_start, red_end, BLOCK_K):
        reds = red_block + lanes
        red_mask = reds < red_end
        if TRANSPOSED:
            pair_mask = reds[:, None] >= red_first[None, :]
        else:
            pair_mask = reds[:, None] < red_limit[None, :]
        a = tl.load(src_ptr + (src_base + position)[None, :] + reds[:, None] * hw,
                    mask=red_mask[:, None] & pixel_mask[None, :], other=0.0)
        b = tl.load(w_ptr + centre * w_stride_tap + reds[:, None] * w_stride_red + w_outs,
                    mask=pair_mask & red_mask[:, None] & out_mask[None, :], other=0.0)
        acc = _dot(tl.trans(a), b, acc, DOT_PRECISION, DOT_UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_mask, other=0.0).to(acc_dtype)[None, :]
    out_offsets = (image.to(tl.int64) * out_channels * hw + position)[None, :] + outs[:, None] * hw
    tl.store(out_ptr + out_offsets, tl.trans(acc).to(out_ptr.dtype.element_ty),
             mask=out_mask[:, None] & pixel_mask[None, :])


@triton.jit
def _masked_conv2d_grad_weight_kernel(
    x_ptr,
    grad_y_ptr,
    taps_ptr,
    partial_ptr,
    n_pixels,
    height,
    width,
    in_channels,
    out_channels,
    in_group,
    out_group,
    n_taps,
    kernel_taps,
    pixels_per_split,
    TYPE_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program per ([BLOCK_I, BLOCK_O] channel tile, tap of the table, pixel chunk).

    partial[split, o, i, r k + s] = sum over the chunk's pixels p of grad_y[n, o, p] x[n, i, p + tap]
    in the accumulation dtype; partial is (n_split, C_out, C_in, k k), zero-filled by the caller,
    and only allowed (tap, o, i) entries are written.
    """
    acc_dtype: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    hw = height * width
    out_blocks = tl.cdiv(out_channels, BLOCK_O)
    in_start = (tl.program_id(0) // out_blocks) * BLOCK_I
    ins = in_start + tl.arange(0, BLOCK_I)
    out_start = (tl.program_id(0) % out_blocks) * BLOCK_O
    outs = out_start + tl.arange(0, BLOCK_O)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    in_mask = ins < in_channels
    out_mask = outs < out_channels
    dh = tl.load(taps_ptr + 3 * tap)
    dw = tl.load(taps_ptr + 3 * tap + 1)
    kernel_tap = tl.load(taps_ptr + 3 * tap + 2)

    # At the centre only pairs with i < (group(o) + B) C_in / G exist: a per-o limit on i (C_in at the
    # other taps). A tile with no pair skips the reduction and writes nothing (its partials stay 0).
    is_centre = tap == n_taps - 1
    in_limit = tl.where(is_centre, (outs // out_group + TYPE_B) * in_group, in_channels)
    keep = (ins[:, None] < in_limit[None, :]) & out_mask[None, :]
    last_out = tl.minimum(out_start + BLOCK_O, out_channels) - 1
    last_limit = tl.where(is_centre, (last_out // out_group + TYPE_B) * in_group, in_channels)
    pixel_start = split * pixels_per_split
    pixel_end = tl.minimum(pixel_start + pixels_per_split, n_pixels)
    pixel_end = tl.where(in_start < last_limit, pixel_end, pixel_start)

    acc = tl.zeros([BLOCK_I, BLOCK_O], dtype=acc_dtype)
    for pixel_block in range(pixel_start, pixel_end, BLOCK_P):
        pixels = pixel_block + tl.arange(0, BLOCK_P)
        pixel_mask = pixels < pixel_end
        image = pixels // hw
        position = pixels - image * hw
        h = position // width
        w = position - h * width
        hh = h + dh
        ww = w + dw
        valid = pixel_mask & (hh >= 0) & (hh < height) & (ww >= 0) & (ww < width)
        image = image.to(tl.int64)
        x_tile = tl.load(x_ptr + (image * in_channels * hw + hh * width + ww)[None, :] + ins[:, None] * hw,
                         mask=in_mask[:, None] & valid[None, :], other=0.0)
        # [BLOCK_O, BLOCK_P], pixels last for coalescing (as in the GEMM kernel).
        grad_tile = tl.load(grad_y_ptr + (image * out_channels * hw + position)[None, :] + outs[:, None] * hw,
                            mask=out_mask[:, None] & pixel_mask[None, :], other=0.0)
        acc = _dot(x_tile, tl.trans(grad_tile), acc, DOT_PRECISION, DOT_UPCAST)

    weight_size = out_channels * in_channels * kernel_taps
    offsets = (split.to(tl.int64) * weight_size + outs[None, :] * (in_channels * kernel_taps)
               + ins[:, None] * kernel_taps + kernel_tap)
    tl.store(partial_ptr + offsets, acc.to(partial_ptr.dtype.element_ty), mask=keep)


@functools.lru_cache(maxsize=64)
def _tap_table(kernel_size, dilation, height, width, device):
    """(int32 (T, 3) table of (dh, dw, r k + s), int64 (T,) r k + s) on device, centre tap last.

    The full taps in row-major order, less those whose offset reaches past the image (they read
    only padding at every pixel). Cached: the table is built once per geometry, not per call.
    """
    c = kernel_size // 2
    rows = []
    for r in range(c + 1):
        for s in range(kernel_size if r < c else c):
            dh, dw = (r - c) * dilation, (s - c) * dilation
            if -dh < height and abs(dw) < width:
                rows.append((dh, dw, r * kernel_size + s))
    rows.append((0, 0, c * kernel_size + c))
    table = torch.tensor(rows, dtype=torch.int32, device=device)
    return table, table[:, 2].long()


def _pack_weight(weight, tap_index):
    """(C_out, C_in, k, k) -> [T, C_in, C_out] at the table's taps, in one gather.

    The kernels address it through its strides (torch lays each tap out as a contiguous C_out x C_in
    block), so no second copy is needed to make it contiguous.
    """
    out_channels, in_channels, kernel_size, _ = weight.shape
    flat = weight.reshape(out_channels, in_channels, kernel_size * kernel_size)
    return flat.permute(2, 1, 0)[tap_index]


def _dot_args(tensor):
    """DOT_PRECISION and DOT_UPCAST for tensor's dtype and device.

    float32 stays IEEE (no TF32 truncation); half types ignore the precision. The Triton interpreter
    (the only way Triton runs CPU tensors) multiplies bfloat16 dot operands as their raw uint16
    bits, so there they are fed as float32, which keeps the tensor-core result: bfloat16 products
    are exact in float32.
    """
    upcast = tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
    precision = "ieee" if upcast or tensor.dtype in (torch.float32, torch.float64) else "tf32"
    return dict(DOT_PRECISION=precision, DOT_UPCAST=upcast)



def _gemm_config(dtype, red_channels, out_channels):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the forward / grad_x implicit GEMM.

    float16/bfloat16 run on tensor cores with 128 x 64 tiles over 8 warps: their gathered 2-byte
    loads cannot go through cp.async, so latency is hidden by warps rather than by the pipeliner,
    and 8 warps keep both GEMMs near 128 registers (4 warps: 167 / 238 on sm_90). float32 (IEEE, FMA
    units) and float64 use 64-row tiles. Channel blocks shrink to the channel count (rounded up to
    tl.dot's minimum of 16).
    """
    if dtype == torch.float64:
        block_m, max_n, max_k, num_warps = 64, 32, 16, 4
    elif dtype == torch.float32:
        block_m, max_n, max_k, num_warps = 64, 64, 16, 4
    else:
        block_m, max_n, max_k, num_warps = 128, 64, 32, 8
    block_n = min(max(triton.next_power_of_2(out_channels), 16), max_n)
    block_k = min(max(triton.next_power_of_2(red_channels), 16), max_k)
    return block_m, block_n, block_k, num_warps


def _grad_weight_config(dtype, in_channels, out_channels):
    """(BLOCK_I, BLOCK_O, BLOCK_P, num_warps) of the grad_weight GEMM (reduction over pixels)."""
    if dtype == torch.float64:
        max_c, block_p = 32, 16
    elif dtype == torch.float32:
        max_c, block_p = 32, 32
    else:
        max_c, block_p = 64, 32
    block_i = min(max(triton.next_power_of_2(in_channels), 16), max_c)
    block_o = min(max(triton.next_power_of_2(out_channels), 16), max_c)
    return block_i, block_o, block_p, 4


def _launch_gemm(src, packed, bias, table, out, red_channels, out_channels, color_channels, mask_type,
                 transposed):
    """out = the masked conv of src (forward) or its transpose (grad_x); see the GEMM kernel."""
    n, _, height, width = src.shape
    n_pixels = n * height * width
    block_m, block_n, block_k, num_warps = _gemm_config(src.dtype, red_channels, out_channels)
    # Packed weight [tap, C_in, C_out]: the forward reduces over C_in, grad_x over C_out.
    red_stride, out_stride = packed.stride(1), packed.stride(2)
    if transposed:
        red_stride, out_stride = out_stride, red_stride
    grid = (triton.cdiv(n_pixels, block_m), triton.cdiv(out_channels, block_n))
    # bias_ptr is never dereferenced without a bias; src stands in for it.
    _masked_conv2d_gemm_kernel[grid](
        src,
        packed,
        bias if bias is not None else src,
        table,
        out,
        n_pixels,
        height,
        width,
        red_channels,
        out_channels,
        red_channels // color_channels,
        out_channels // color_channels,
        table.shape[0],
        packed.stride(0),
        red_stride,
        out_stride,
        TYPE_B=mask_type,
        TRANSPOSED=transposed,
        HAS_BIAS=bias is not None,
        **_dot_args(src),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )


def masked_conv2d_forward(x, weight, bias, mask_type, color_channels, dilation):
    """Masked convolution y = conv2d(x, weight * mask, bias, padding=dilation * (k // 2), dilation).

    Args:
        x: (N, C_in, H, W) contiguous, float32/float64/float16/bfloat16.
        weight: (C_out, C_in, k, k) contiguous in x's dtype, k odd.
        bias: (C_out,) in x's dtype, or None.
        mask_type: 0 for "A" (centre excluded within a group), 1 for "B" (included).
        color_channels: G, dividing C_in and C_out.
        dilation: positive int.

    Returns:
        y: (N, C_out, H, W) in x's dtype.
    """
    n, in_channels, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    y = torch.empty((n, out_channels, height, width), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    table, tap_index = _tap_table(kernel_size, dilation, height, width, x.device)
    packed = _pack_weight(weight, tap_index)
    _launch_gemm(x, packed, bias, table, y, in_channels, out_channels, color_channels, mask_type,
                 transposed=False)
    return y


def _grad_weight(grad_y, x, kernel_size, table, mask_type, color_channels):
    """(C_out, C_in, k, k) weight gradient in x's dtype from per-pixel-chunk partials (deterministic)."""
    n, in_channels, height, width = x.shape
    out_channels = grad_y.shape[1]
    n_pixels = n * height * width
    kernel_taps = kernel_size * kernel_size
    acc_dtype = accumulation_dtype(x.dtype)
    block_i, block_o, block_p, num_warps = _grad_weight_config(x.dtype, in_channels, out_channels)
    tiles = triton.cdiv(in_channels, block_i) * triton.cdiv(out_channels, block_o)
    pixel_blocks = triton.cdiv(n_pixels, block_p)
    weight_size = out_channels * in_channels * kernel_taps
    n_split = min(triton.cdiv(_WEIGHT_GRAD_PROGRAMS, tiles * table.shape[0]),
                  triton.cdiv(pixel_blocks, _MIN_SPLIT_BLOCKS),
                  _MAX_PARTIAL_ELEMENTS // max(weight_size, 1))
    n_split = max(n_split, 1)
    blocks_per_split = triton.cdiv(pixel_blocks, n_split)
    n_split = triton.cdiv(pixel_blocks, blocks_per_split)

    partial = torch.zeros((n_split, out_channels, in_channels, kernel_taps), dtype=acc_dtype, device=x.device)
    _masked_conv2d_grad_weight_kernel[(tiles, table.shape[0], n_split)](
        x,
        grad_y,
        table,
        partial,
        n_pixels,
        height,
        width,
        in_channels,
        out_channels,
        in_channels // color_channels,
        out_channels // color_channels,
        table.shape[0],
        kernel_taps,
        blocks_per_split * block_p,
        TYPE_B=mask_type,
        **_dot_args(x),
        BLOCK_I=block_i,
        BLOCK_O=block_o,
        BLOCK_P=block_p,
        num_warps=num_warps,
    )
    grad_weight = partial[0] if n_split == 1 else partial.sum(0)
    return grad_weight.view(out_channels, in_channels, kernel_size, kernel_size).to(x.dtype)


def masked_conv2d_backward(grad_y, x, weight, mask_type, color_channels, dilation, needs):
    """Gradients of masked_conv2d_forward.

    Args:
        grad_y: (N, C_out, H, W) in x's dtype.
        x, weight, mask_type, color_channels, dilation: the forward's inputs.
        needs: (need_grad_x, need_grad_weight, need_grad_bias).

    Returns:
        (grad_x, grad_weight, grad_bias) in x's dtype, None where not needed; grad_weight is exactly
        0 at the masked taps and centre-tap pairs. Sums accumulate in float32 (float64 for float64).
    """
    need_x, need_weight, need_bias = needs
    n, in_channels, height, width = x.shape
    out_channels, _, kernel_size, _ = weight.shape
    # Autograd may hand over a non-contiguous (e.g. expanded) gradient.
    grad_y = grad_y.contiguous()
    empty = grad_y.numel() == 0 or x.numel() == 0
    grad_x = grad_weight = grad_bias = None
    if need_bias:
        grad_bias = grad_y.sum(dim=(0, 2, 3), dtype=accumulation_dtype(x.dtype)).to(x.dtype)
    if empty:
        grad_x = torch.zeros_like(x) if need_x else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        return grad_x, grad_weight, grad_bias

    table, tap_index = _tap_table(kernel_size, dilation, height, width, x.device)
    if need_x:
        grad_x = torch.empty_like(x)
        _launch_gemm(grad_y, _pack_weight(weight, tap_index), None, table, grad_x, out_channels,
                     in_channels, color_channels, mask_type, transposed=True)
    if need_weight:
        grad_weight = _grad_weight(grad_y, x, kernel_size, table, mask_type, color_channels)
    return grad_x, grad_weight, grad_bias
