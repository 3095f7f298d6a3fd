"""masked_conv2d: every pyvae backend against eager ``conv2d(x, weight * mask)`` and
torch.compile of it, forward and forward+backward, on (a) PixelCNN layers and (b) the small
blocks of a patch VAE (seed 000: a PixelCNN per i×i block, tens of thousands of blocks a batch).

``flops`` in extra_info counts the masked work only, 2·N·H·W·(allowed (output, input, tap)
triples) per convolution, times 3 with the backward (grad_x and grad_weight cost one forward
each), so that a report can show TFLOP/s of useful arithmetic; the dense eager code does
about twice that for type A."""
import pytest
import torch
import torch.nn.functional as F

from conftest import timed
from pyvae.ops import available_backends, masked_conv2d, masked_conv2d_mask, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, C, H = W, k, mask_type): C input and output channels.
if DEVICE == "cuda":
    PIXELCNN = [(n, c, size, k, "A") for n, c in [(16, 64), (16, 128), (64, 128)]
                for size in (32, 64) for k in (3, 5, 7)]
    BLOCKS = [(65536, c, size, size, "A") for c in (32, 64) for size in (3, 5)]
    DTYPES = [torch.float32, torch.bfloat16]
    QUICK = {(16, 64, 32, 3, "A")}
else:
    PIXELCNN = [(16, 64, 32, k, "A") for k in (3, 5, 7)]
    BLOCKS = [(4096, 32, 5, 5, "A")]
    DTYPES = [torch.float32]
    QUICK = {(16, 64, 32, 3, "A")}
IMPLS = ["eager", "compile"] + [b for b in available_backends(DEVICE) if b != "reference"]


def eager_masked_conv2d(x, weight, bias, mask, padding):
    """What PixelCNN code usually writes: a dense convolution of the masked weight."""
    return F.conv2d(x, weight * mask, bias, padding=padding)


_compiled = torch.compile(eager_masked_conv2d)


def implementation(impl, mask_type):
    if impl in ("eager", "compile"):
        fn = eager_masked_conv2d if impl == "eager" else _compiled

        def dense(x, weight, bias, mask):
            return fn(x, weight, bias, mask, weight.shape[-1] // 2)
        return dense

    def pyvae_op(x, weight, bias, mask):
        with use_backend(impl):
            return masked_conv2d(x, weight, bias, mask_type=mask_type)
    return pyvae_op


def cases():
    for case in PIXELCNN + BLOCKS:
        n, c, size, k, mask_type = case
        for dtype in DTYPES:
            for mode in ("forward", "forward+backward"):
                for impl in IMPLS:
                    marks = [pytest.mark.quick] if case in QUICK else []
                    name = f"{n}x{c}x{size}x{size}-k{k}{mask_type}-{str(dtype)[6:]}-{mode}-{impl}"
                    yield pytest.param(case, dtype, mode, impl, id=name, marks=marks)


@pytest.mark.parametrize("case,dtype,mode,impl", list(cases()))
def test_masked_conv2d(benchmark, case, dtype, mode, impl):
    n, c, size, k, mask_type = case
    fn = implementation(impl, mask_type)
    grad = mode != "forward"
    x = torch.randn(n, c, size, size, device=DEVICE, dtype=dtype, requires_grad=grad)
    weight = (torch.randn(c, c, k, k, device=DEVICE) / (c * k)).to(dtype).requires_grad_(grad)
    bias = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=grad)
    mask = masked_conv2d_mask(c, c, k, mask_type, dtype=dtype, device=DEVICE)
    grad_y = torch.randn(n, c, size, size, device=DEVICE, dtype=dtype)
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(x, weight, bias, mask)
    else:
        def step():
            fn(x, weight, bias, mask).backward(grad_y)
    flops = 2 * n * size * size * int(mask.sum().item()) * (3 if grad else 1)
    slow = DEVICE == "cpu" and flops * k * k >= 1 << 34
    timed(benchmark, step, device=DEVICE, rounds=7 if slow else 10,
          warmup=1 if impl != "compile" else 2, op="masked_conv2d", impl=impl,
          shape=f"{n}x{c}x{size}x{size} k{k}{mask_type}", dtype=str(dtype)[6:], mode=mode,
          flops=flops)
