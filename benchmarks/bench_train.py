"""One training step (forward, backward, AdamW update) of each pyvae model: the model on pyvae's
kernels against the same model on the eager reference ops ("eager") and under torch.compile
("compile", reference ops traced by inductor), same run. ``items`` in extra_info is the batch,
so the report shows images (or patches) per second."""
import pytest
import torch

from conftest import timed
from pyvae import models
from pyvae.ops import available_backends, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 4 if DEVICE == "cuda" else 1


def model_cases():
    """(name, model factory, batch shape)."""
    b = 64 * SCALE
    return [
        ("VAE 64x64 D10", lambda: models.VAE(10, 1, 64), (b, 1, 64, 64)),
        ("BetaTCVAE 64x64 D10", lambda: models.BetaTCVAE(10, 1, 64, dataset_size=737280),
         (b, 1, 64, 64)),
        ("HierarchicalVAE 64x64 D16+8", lambda: models.HierarchicalVAE([16, 8], [1.0, 4.0], 1, 64),
         (b, 1, 64, 64)),
        ("CapacityAE 64x64 D10", lambda: models.CapacityAE(10, 0.5, 1, 64), (b, 1, 64, 64)),
        ("PatchVAE 9|3 RGB D16", lambda: models.PatchVAE(9, 3, 16, 3), (4 * b, 3, 9, 9)),
        ("PatchVAE 15|3 RGB D32", lambda: models.PatchVAE(15, 3, 32, 3), (4 * b, 3, 15, 15)),
    ]


IMPLS = ["eager", "compile"] + [b for b in available_backends(DEVICE) if b != "reference"]
QUICK = {"PatchVAE 9|3 RGB D16"}


def cases():
    for name, make, shape in model_cases():
        for impl in IMPLS:
            marks = [pytest.mark.quick] if name in QUICK else []
            yield pytest.param(name, make, shape, impl, id=f"{name}-{impl}", marks=marks)


def batch_for(shape):
    if shape[-1] in (9, 15):  # 8-bit patches for the patch VAEs' categorical likelihood
        return torch.randint(0, 256, shape, device=DEVICE).float() / 255
    return (torch.rand(shape, device=DEVICE) < 0.3).float()  # binary images


@pytest.mark.parametrize("name,make,shape,impl", list(cases()))
def test_train_step(benchmark, name, make, shape, impl):
    torch.manual_seed(0)
    model = make().to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = batch_for(shape)
    backend = "reference" if impl in ("eager", "compile") else impl
    loss_fn = torch.compile(model.loss) if impl == "compile" else model.loss

    def step():
        with use_backend(backend):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(x).loss.backward()
            optimizer.step()

    timed(benchmark, step, device=DEVICE, rounds=5 if DEVICE == "cpu" else 20,
          warmup=3 if impl == "compile" else 1, op="train_step", impl=impl,
          shape=f"{name} B{shape[0]}", dtype="float32", mode="forward+backward+AdamW",
          items=shape[0])
