"""pyvae.ops.masked_conv2d on every backend against the eager float64 reference."""
import itertools

import pytest
import torch

from conftest import backend_params
from pyvae.ops import (available_backends, last_backend, masked_conv2d, masked_conv2d_mask,
                       masked_conv2d_reference, nan_policy, use_backend)

BACKENDS = backend_params()
# (k, mask_type, color_channels, dilation): every combination the kernels special-case.
CASES = list(itertools.product([3, 5, 7], ["A", "B"], [1, 3], [1, 2]))
# The Triton interpreter runs kernels in numpy, one program at a time: a spread of the cases.
INTERPRETED_CASES = [(3, "A", 1, 1), (5, "B", 3, 2), (7, "A", 3, 1), (3, "B", 1, 2)]
# Odd sizes: N, C_in, C_out, H, W (both channel counts divisible by G = 3).
SHAPE = (3, 6, 9, 7, 5)
INTERPRETED_SHAPE = (2, 3, 6, 5, 4)
# Relative tolerances against the float64 reference, scaled by the largest magnitude of each
# result. Half inputs are compared with the reference of the same rounded inputs: only the
# float32 accumulation and the final rounding to the input dtype differ.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def cases_for(backend, device):
    return INTERPRETED_CASES if interpreted(backend, device) else CASES


def shape_for(backend, device):
    return INTERPRETED_SHAPE if interpreted(backend, device) else SHAPE


def make_inputs(n, c_in, c_out, h, w, k, dtype, device, bias=True):
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, device=device).to(dtype)
    weight = (torch.randn(c_out, c_in, k, k, dtype=torch.float64, device=device)
              / (c_in * k)).to(dtype)
    b = torch.randn(c_out, dtype=torch.float64, device=device).to(dtype) if bias else None
    return x, weight, b


def run(backend, x, weight, bias, **kwargs):
    with use_backend(backend):
        y = masked_conv2d(x, weight, bias, **kwargs)
    assert last_backend("masked_conv2d") == backend
    return y


def forward_and_grads(backend, x, weight, bias, grad_y, **kwargs):
    """y and d(sum grad_y · y)/d(x, weight, bias) from ``backend``."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    if bias is None:
        leaves.append(None)
    with use_backend(backend):
        y = masked_conv2d(leaves[0], leaves[1], leaves[2], **kwargs)
    assert last_backend("masked_conv2d") == backend
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, inputs, grad_y.to(y.dtype))
    return y, grads


def reference64(x, weight, bias, grad_y, **kwargs):
    up = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return forward_and_grads("reference", up(x), up(weight), up(bias), grad_y.double(), **kwargs)


def assert_close(actual, expected, rtol, what):
    scale = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def check_against_reference(backend, x, weight, bias, rtol, what, **kwargs):
    grad_y = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:], dtype=torch.float64,
                         device=x.device)
    y, grads = forward_and_grads(backend, x, weight, bias, grad_y, **kwargs)
    y_ref, grads_ref = reference64(x, weight, bias, grad_y, **kwargs)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, rtol, f"y {what}")
    for name, g, g_ref in zip(["x", "weight", "bias"], grads, grads_ref):
        assert g.dtype == x.dtype, name
        assert_close(g, g_ref, rtol, f"grad {name} {what}")
    return grads


# ---- the mask -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k,fraction", [(1, 0 / 1), (3, 4 / 9), (5, 12 / 25), (7, 24 / 49)])
def test_mask_keeps_the_stated_fraction_of_taps(k, fraction):
    mask_a = masked_conv2d_mask(4, 5, k, "A", dtype=torch.float64)
    mask_b = masked_conv2d_mask(4, 5, k, "B", dtype=torch.float64)
    assert mask_a.shape == (4, 5, k, k)
    assert mask_a.mean().item() == pytest.approx(fraction)
    assert mask_b.mean().item() == pytest.approx(fraction + 1 / k**2)
    assert set(mask_a.unique().tolist()) <= {0.0, 1.0}


def test_mask_is_causal_in_raster_order_and_by_colour_group():
    k, c = 5, 2
    for mask_type in ["A", "B"]:
        mask = masked_conv2d_mask(6, 9, k, mask_type, color_channels=3)
        for r, s in itertools.product(range(k), range(k)):
            if (r, s) < (c, c):  # before the centre in raster order: fully visible
                assert mask[:, :, r, s].eq(1).all(), (r, s)
            elif (r, s) > (c, c):
                assert mask[:, :, r, s].eq(0).all(), (r, s)
        for o, i in itertools.product(range(6), range(9)):
            g_out, g_in = o // 2, i // 3
            visible = g_in < g_out if mask_type == "A" else g_in <= g_out
            assert mask[o, i, c, c].item() == float(visible), (mask_type, o, i)


def test_reference_is_conv2d_of_the_masked_weight():
    x, weight, bias = make_inputs(2, 3, 6, 6, 5, 5, torch.float64, "cpu")
    mask = masked_conv2d_mask(6, 3, 5, "B", 3, dtype=torch.float64)
    y = masked_conv2d_reference(x, weight, bias, mask_type="B", color_channels=3, dilation=2)
    expected = torch.nn.functional.conv2d(x, weight * mask, bias, padding=4, dilation=2)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


# ---- values and gradients -----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(backend, device, dtype):
    n, c_in, c_out, h, w = shape_for(backend, device)
    for k, mask_type, groups, dilation in cases_for(backend, device):
        x, weight, bias = make_inputs(n, c_in, c_out, h, w, k, dtype, device)
        check_against_reference(backend, x, weight, bias, RTOL[dtype],
                                f"k={k} {mask_type} G={groups} d={dilation}",
                                mask_type=mask_type, color_channels=groups, dilation=dilation)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs(backend, device, dtype):
    n, c_in, c_out, h, w = shape_for(backend, device)
    for k, mask_type, groups, dilation in cases_for(backend, device)[::3]:
        x, weight, bias = make_inputs(n, c_in, c_out, h, w, k, dtype, device)
        check_against_reference(backend, x, weight, bias, RTOL[dtype],
                                f"k={k} {mask_type} G={groups} d={dilation}",
                                mask_type=mask_type, color_channels=groups, dilation=dilation)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_larger_layers(backend, device):
    # Many channels (the CPU kernel cuts 32x32 images into bands of rows), many small images
    # (several per GEMM, with a partial last group), and channel counts that leave partial
    # register tiles in the CPU GEMM (more than 64 columns, not a multiple of 16).
    if interpreted(backend, device):
        pytest.skip("too large for the Triton interpreter")
    for shape, k in [((3, 64, 16, 32, 32), 7), ((37, 8, 12, 5, 5), 5), ((2, 67, 70, 9, 11), 5)]:
        x, weight, bias = make_inputs(*shape, k, torch.float32, device)
        check_against_reference(backend, x, weight, bias, RTOL[torch.float32], f"{shape} k={k}",
                                mask_type="A")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    n, c_in, c_out, h, w = shape_for(backend, device)
    x, weight, bias = make_inputs(n, c_in, c_out, h, 2 * w, 3, torch.float32, device)
    x = x[..., ::2]  # strided width
    weight = weight.transpose(0, 1).contiguous().transpose(0, 1)  # (C_in, C_out) memory order
    bias = torch.stack([bias, bias], 1)[:, 0]
    assert not (x.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    check_against_reference(backend, x, weight, bias, RTOL[torch.float32], "strided",
                            mask_type="B", color_channels=3, dilation=2)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_without_bias_and_partial_gradients(backend, device):
    n, c_in, c_out, h, w = shape_for(backend, device)
    x, weight, bias = make_inputs(n, c_in, c_out, h, w, 5, torch.float32, device)
    grad_y = torch.randn(n, c_out, h, w, device=device)
    kwargs = dict(mask_type="A", color_channels=3)
    y_ref, (gx_ref, gw_ref) = reference64(x, weight, None, grad_y, **kwargs)
    y, (gx, gw) = forward_and_grads(backend, x, weight, None, grad_y, **kwargs)
    assert_close(y, y_ref, 2e-5, "y without bias")
    assert_close(gx, gx_ref, 2e-5, "grad x without bias")
    assert_close(gw, gw_ref, 2e-5, "grad weight without bias")
    # Each input alone: the backward computes only what is asked for.
    _, (_, gw_b, gb_ref) = reference64(x, weight, bias, grad_y, **kwargs)
    for wanted in range(3):
        tensors = [t.detach().requires_grad_(i == wanted) for i, t in enumerate((x, weight, bias))]
        with use_backend(backend):
            y = masked_conv2d(*tensors, **kwargs)
        (grad,) = torch.autograd.grad(y, tensors[wanted], grad_y)
        assert_close(grad, [gx_ref, gw_b, gb_ref][wanted], 2e-5, f"only input {wanted}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    _, c_in, c_out, h, w = shape_for(backend, device)
    x, weight, bias = make_inputs(0, c_in, c_out, h, w, 3, torch.float32, device)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    with use_backend(backend):
        y = masked_conv2d(x, weight, bias, mask_type="B", color_channels=3)
    assert y.shape == (0, c_out, h, w)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, weight, bias))
    assert gx.shape == x.shape
    assert gw.eq(0).all() and gw.shape == weight.shape
    assert gb.eq(0).all() and gb.shape == bias.shape


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_grad_weight_is_exactly_zero_at_masked_taps(backend, device):
    n, c_in, c_out, h, w = shape_for(backend, device)
    # Dilation 1: every allowed tap overlaps the image, so its gradient is not 0.
    for k, mask_type, groups, dilation in [(3, "A", 1, 1), (5, "B", 3, 1), (7, "A", 3, 1)]:
        x, weight, bias = make_inputs(n, c_in, c_out, h, w, k, torch.float32, device)
        grad_y = torch.randn(n, c_out, h, w, dtype=torch.float64, device=device)
        _, (_, grad_weight, _) = forward_and_grads(backend, x, weight, bias, grad_y,
                                                   mask_type=mask_type, color_channels=groups,
                                                   dilation=dilation)
        mask = masked_conv2d_mask(c_out, c_in, k, mask_type, groups, device=device)
        assert grad_weight[mask == 0].eq(0).all(), (k, mask_type, groups)
        assert grad_weight[mask == 1].ne(0).all(), (k, mask_type, groups)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_weights_are_never_read(backend, device):
    # The kernels skip the masked taps: even non-finite values there change nothing.
    n, c_in, c_out, h, w = shape_for(backend, device)
    x, weight, bias = make_inputs(n, c_in, c_out, h, w, 5, torch.float32, device)
    mask = masked_conv2d_mask(c_out, c_in, 5, "A", 3, device=device)
    poisoned = weight.masked_fill(mask == 0, float("nan"))
    grad_y = torch.randn(n, c_out, h, w, device=device)
    y, grads = forward_and_grads(backend, x, poisoned, bias, grad_y, mask_type="A",
                                 color_channels=3)
    y_ref, grads_ref = reference64(x, weight, bias, grad_y, mask_type="A", color_channels=3)
    assert_close(y, y_ref, 2e-5, "y")
    for name, g, g_ref in zip(["x", "weight", "bias"], grads, grads_ref):
        assert_close(g, g_ref, 2e-5, f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_gradcheck_float64(backend, mask_type):
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    x, weight, bias = make_inputs(2, 3, 3, 4, 3, 3, torch.float64, "cpu")
    inputs = [t.requires_grad_() for t in (x, weight, bias)]

    def fn(x, weight, bias):
        with use_backend(backend):
            return masked_conv2d(x, weight, bias, mask_type=mask_type, color_channels=3,
                                 dilation=2)

    assert torch.autograd.gradcheck(fn, inputs)


# ---- causality of a PixelCNN stack --------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_stack_is_causal(backend, device):
    # An A layer then B layers (G = 3 colour groups): output channel group g at pixel p may
    # depend on input pixels before p in raster order and on input groups < g at p, on nothing
    # else. Checked on the rows of the Jacobian (the backward), the forward checked above.
    size = 4 if interpreted(backend, device) else 6
    groups, hidden = 3, 6
    layers = [(3, hidden, 3, "A", 1), (hidden, hidden, 3, "B", 2), (hidden, 3, 5, "B", 1)]
    params = [make_inputs(1, c_in, c_out, 1, 1, k, torch.float64, device)[1:]
              for c_in, c_out, k, _, _ in layers]

    def stack(x):
        with use_backend(backend):
            for (weight, bias), (_, _, _, mask_type, dilation) in zip(params, layers):
                x = torch.tanh(masked_conv2d(x, weight, bias, mask_type=mask_type,
                                             color_channels=groups, dilation=dilation))
        return x

    x = torch.randn(1, 3, size, size, dtype=torch.float64, device=device, requires_grad=True)
    y = stack(x)
    pixels = size * size
    outputs = range(3 * pixels) if not interpreted(backend, device) else [0, 7, 20, 29, 47]
    for flat in outputs:
        channel, pixel = divmod(flat, pixels)
        (row,) = torch.autograd.grad(y.flatten()[flat], x, retain_graph=True)
        row = row.reshape(3, pixels)  # [input channel, input pixel]
        assert row[:, pixel + 1:].eq(0).all(), f"output {channel}@{pixel} sees a later pixel"
        assert row[channel:, pixel].eq(0).all(), f"output {channel}@{pixel} sees its own group"
        # (Pixels up and to the right fall in the blind spot of a PixelCNN stack.)
        if pixel % size > 0:
            assert row[:, pixel - 1].ne(0).any(), f"output {channel}@{pixel} misses its left"
        if pixel >= size:
            assert row[:, pixel - size].ne(0).any(), f"output {channel}@{pixel} misses its top"
        if channel > 0:
            assert row[:channel, pixel].ne(0).all(), f"output {channel}@{pixel} misses groups"


# ---- compile, dispatch and bad inputs -----------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_torch_compile_fullgraph(backend, device):
    n, c_in, c_out, h, w = shape_for(backend, device)
    x, weight, bias = make_inputs(n, c_in, c_out, h, w, 3, torch.float32, device)
    weight2 = make_inputs(1, c_out, c_out, 1, 1, 5, torch.float32, device)[1]
    leaves = tuple(t.requires_grad_() for t in (x, weight, bias, weight2))

    def fn(x, weight, bias, weight2):  # a type A layer, then a type B one
        with use_backend(backend):
            y = masked_conv2d(x * 2, weight, bias, mask_type="A", color_channels=3)
            return masked_conv2d(torch.relu(y), weight2, None, mask_type="B", color_channels=3,
                                 dilation=2)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    actual = compiled(*leaves)
    expected = fn(*leaves)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(actual.sum(), leaves)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_backend_selection(monkeypatch):
    x, weight, bias = make_inputs(2, 3, 3, 4, 4, 3, torch.float32, "cpu")
    masked_conv2d(x, weight, bias)
    expected_auto = "cpu" if "cpu" in available_backends("cpu") else "reference"
    assert last_backend("masked_conv2d") == expected_auto
    monkeypatch.setenv("PYVAE_BACKEND", "reference")
    masked_conv2d(x, weight, bias)
    assert last_backend("masked_conv2d") == "reference"
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run tensors on cpu"):
        with use_backend("cuda"):
            masked_conv2d(x, weight, bias)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bad_inputs(backend, device):
    x, weight, bias = make_inputs(2, 6, 9, 5, 5, 3, torch.float32, device)
    cases = [
        (dict(x=x.long()), TypeError, "x must be float16"),
        (dict(x="x"), TypeError, "x must be a torch.Tensor"),
        (dict(x=x[0]), ValueError, r"x must be 4-D \(N, C_in, H, W\)"),
        (dict(weight=weight[0]), ValueError, r"weight must be 4-D \(C_out, C_in, k, k\)"),
        (dict(weight=weight[..., :2]), ValueError, "square kernel of odd size k, got 3x2"),
        (dict(weight=torch.zeros(9, 6, 4, 4, device=device)), ValueError,
         "odd size k, got 4x4"),
        (dict(x=x[:, :5]), ValueError, "x has 5 channels but weight expects 6"),
        (dict(weight=weight.double()), TypeError, "weight is torch.float64 but x is"),
        (dict(weight=weight.to("meta")), ValueError, "weight is on meta"),
        (dict(bias=bias[:4]), ValueError, r"bias must have shape \(9,\)"),
        (dict(bias=bias.half()), TypeError, "bias is torch.float16"),
        (dict(bias=bias.to("meta")), ValueError, "bias is on meta"),
        (dict(mask_type="C"), ValueError, "mask_type must be 'A' or 'B'"),
        (dict(mask_type=0), ValueError, "mask_type must be 'A' or 'B'"),
        (dict(color_channels=0), ValueError, "color_channels must be >= 1"),
        (dict(color_channels=2), ValueError, r"color_channels \(2\) must divide"),
        (dict(color_channels=1.0), TypeError, "color_channels must be an int"),
        (dict(dilation=0), ValueError, "dilation must be >= 1"),
        (dict(dilation=True), TypeError, "dilation must be an int, got bool"),
    ]
    with use_backend(backend):
        for overrides, error, message in cases:
            kwargs = dict(dict(x=x, weight=weight, bias=bias), **overrides)
            with pytest.raises(error, match=message):
                masked_conv2d(**kwargs)
        bad = x.clone()
        bad[1, 2, 0, 0] = float("nan")  # the first pixel: every later output reads it
        y = masked_conv2d(bad, weight, bias)  # default policy: NaN propagates like conv2d
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1, :, 0, 1]).all()
        with nan_policy("raise"), pytest.raises(ValueError, match="x contains NaN"):
            masked_conv2d(bad, weight, bias)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        masked_conv2d_mask(2, 2, 4)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_type, color_channels", [(0, 3), (1, 1)])
def test_opcheck(backend, device, dtype, mask_type, color_channels):
    """torch.library.opcheck on the forward and backward kernel ops (odd sizes, both mask
    types, 1 and 3 colour groups, dilation 2)."""
    from conftest import opcheck_op

    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    x, weight, bias = rand(2, 6, 9, 7, grad=True), rand(9, 6, 3, 3, grad=True), rand(9, grad=True)
    opcheck_op("masked_conv2d_forward", backend, (x, weight, bias, mask_type, color_channels, 2))
    grad_y = rand(2, 9, 9, 7)
    for output_mask in ([True, True, True], [True, False, False]):
        opcheck_op("masked_conv2d_backward", backend,
                   (grad_y, x.detach(), weight.detach(), mask_type, color_channels, 2,
                    output_mask))


# ---- torch.func.vmap over models ----------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_vmap_matches_the_loop_over_models(backend, device, dtype):
    # Only x vmapped (one launch on the K·N images), the weight and bias vmapped (one launch per
    # model), and grad of x alone with a shared weight (the backward's one-launch path).
    from conftest import assert_vmap_matches_loop

    k_models = 3
    # small: the Triton interpreter runs the per-model launches of 4 checks × 3 gradients
    n, c_in, c_out, h, w = (1, 3, 3, 4, 3) if interpreted(backend, device) else INTERPRETED_SHAPE
    k, mask_type, color_channels, dilation = (3, "B", 3, 2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    x, weight, bias = (torch.stack(t) for t in zip(*[
        make_inputs(n, c_in, c_out, h, w, k, dtype, device) for _ in range(k_models)]))

    def fn(x, weight, bias):
        with use_backend(backend):
            return masked_conv2d(x, weight, bias, mask_type=mask_type,
                                 color_channels=color_channels, dilation=dilation)

    assert_vmap_matches_loop(fn, (x, weight[0], bias[0]), (0, None, None), **tol)
    assert_vmap_matches_loop(fn, (x, weight[0], bias[0]), (0, None, None), argnums=(0,), **tol)
    assert_vmap_matches_loop(fn, (x[0], weight, bias), (None, 0, 0), **tol)
    assert_vmap_matches_loop(fn, (x.transpose(0, 1), weight, bias[0]), (1, 0, None), **tol)
    assert last_backend("masked_conv2d") == backend
