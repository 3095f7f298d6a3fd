"""Stride-1 patch encoding of whole images (pyvae.encode.encode_patches, the fully-convolutional
network) against encoding every patch alone, same run: "eager" cuts every p×p patch out
(unfold) and runs the patch encoder on it, "compile" does the same with the encoder under
torch.compile, "stride1" is pyvae's exact fully-convolutional encoder. ``items`` = images, so
the report shows images per second (compute only: the images are already on the device).
``flops`` is the work each way does (:func:`pyvae.encode.encode_flops`: per-patch FLOPs × patches
for eager and compile, the fully-convolutional network's FLOPs for stride1), so TFLOP/s and
% FMA peak are each implementation's achieved rate; ``flop_ratio`` (the same for the three) is
the speed-up stride1 would have at equal FLOP/s."""
import copy

import pytest
import torch

from conftest import timed
from pyvae.encode import encode_flops, encode_patches, fully_convolutional
from pyvae.models import PatchVAE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (p, i, latent_dim, channels, images, image size)
if DEVICE == "cuda":
    CASES = [(15, 3, 32, 3, 1024, 64), (9, 3, 32, 3, 1024, 64)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    CASES = [(15, 3, 32, 3, 8, 64), (9, 3, 16, 3, 8, 64)]
    DTYPES = [torch.float32]
IMPLS = ["eager", "compile", "stride1"]
QUICK = {(9, 3, 16, 3, 8, 64)}


def cases():
    for case in CASES:
        for dtype in DTYPES:
            for impl in IMPLS:
                marks = [pytest.mark.quick] if case in QUICK else []
                p, i, d, c, n, size = case
                name = f"{p}|{i} D{d} {n}x{c}x{size}x{size}-{str(dtype)[6:]}-{impl}"
                yield pytest.param(case, dtype, impl, id=name, marks=marks)


@pytest.mark.parametrize("case,dtype,impl", list(cases()))
def test_encode_patches(benchmark, case, dtype, impl):
    p, i, d, c, n, size = case
    torch.manual_seed(0)
    model = PatchVAE(p, i, d, c).to(DEVICE).eval()
    images = torch.rand(n, c, size, size, device=DEVICE)
    autocast = None if dtype == torch.float32 else dtype
    network = fully_convolutional(model.encoder, p)
    flops = encode_flops(model, size, size, network=network)
    if impl == "stride1":
        def step():
            encode_patches(model, images, dtype=autocast, network=network)
    else:
        runner = model
        if impl == "compile":
            runner = copy.deepcopy(model)
            runner.encoder = torch.compile(runner.encoder)
        batch = 1 << 16 if DEVICE == "cuda" else 4096

        def step():
            encode_patches(runner, images, dtype=autocast, method="unfold", batch_size=batch)
    timed(benchmark, step, device=DEVICE, rounds=3 if DEVICE == "cpu" else 10,
          warmup=2 if impl == "compile" else 1, op="encode_patches", impl=impl,
          shape=f"{p}|{i} D{d} {n}x{c}x{size}x{size}", dtype=str(dtype)[6:],
          mode="forward", items=n, flop_ratio=flops.ratio,
          flops=n * (flops.stride1 if impl == "stride1" else flops.per_patch_total))
