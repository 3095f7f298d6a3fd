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


# ---- model-batched training (issue 17): a K=16 grid against 16 sequential fits ----------------

GRID_MODELS, GRID_STEPS, GRID_BATCH = 16, 6, 64


class _BinaryImages(torch.utils.data.Dataset):
    """Random binary size x size images (the throughput does not depend on their content)."""

    def __init__(self, n: int, size: int = 64):
        self.images = (torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
                       < 0.3).float()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def _seconds_per_step(records) -> float:
    """Mean seconds per step of a run's training records after the first (the warm-up steps
    1-2), from their ``images_per_s`` (examples of the one shared batch per second)."""
    later = [r for r in records if r["step"] > 2]
    return sum(GRID_BATCH / r["images_per_s"] for r in later) / len(later)


# (name, image size, make_model(**point), point of model k): the 2-D-shapes MLP VAE of Chen et
# al. (hidden 1200) and a narrower one, over β; layer_rates' (seed 002) two-layer hierarchical
# VAE at its default size, over β₁, whose 441-model grid is the seed's experiment.
def _beta(k):
    return 2.0 ** (k / 2 - 2)


GRID_NETWORKS = [
    ("VAE mlp1200 64x64 D10", 64,
     lambda beta: models.VAE(10, 1, 64, beta=beta, architecture="mlp", hidden=1200),
     lambda k: {"beta": _beta(k)}),
    ("VAE mlp256 64x64 D10", 64,
     lambda beta: models.VAE(10, 1, 64, beta=beta, architecture="mlp", hidden=256),
     lambda k: {"beta": _beta(k)}),
    ("HierarchicalVAE [8,4] hidden128 8x8", 8,
     lambda betas: models.HierarchicalVAE([8, 4], betas, 1, 8, hidden=128),
     lambda k: {"betas": [_beta(k), 1.0]}),
]


@pytest.mark.parametrize("network", GRID_NETWORKS, ids=["mlp1200", "mlp256", "hvae"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_grid_vs_sequential_fits(benchmark, tmp_path, backend, network):
    """models·steps/s of fit_grid on K=16 models of one network (GRID_NETWORKS) and of 16
    sequential fits of the same models, same run; the first 2 steps of every run are warm-up
    and not counted, checkpoints are excluded (the runs' own throughput records)."""
    from pyvae.train import fit, fit_grid, read_metrics
    name, size, make_model, point = network
    data = _BinaryImages(GRID_BATCH * GRID_STEPS, size)
    grid = [point(k) for k in range(GRID_MODELS)]
    settings = dict(steps=GRID_STEPS, batch_size=GRID_BATCH, log_every=2, checkpoint_every=None,
                    progress=False)

    with use_backend(backend):
        fit_grid(make_model, grid, data, out_dir=tmp_path / "grid", **settings)
        grid_seconds = _seconds_per_step(
            [r for r in read_metrics(tmp_path / "grid") if r["model"] == 0])
        sequential_seconds = 0.0
        for k, point in enumerate(grid):
            torch.manual_seed(0)
            fit(make_model(**point), data, out_dir=tmp_path / f"fit{k}", **settings)
            sequential_seconds += _seconds_per_step(read_metrics(tmp_path / f"fit{k}"))
    grid_rate = GRID_MODELS / grid_seconds
    sequential_rate = GRID_MODELS / sequential_seconds
    benchmark.extra_info.update(
        op="train_grid", impl=backend, device=DEVICE, dtype="float32",
        shape=f"{GRID_MODELS} x {name} B{GRID_BATCH}",
        mode="forward+backward+AdamW", grid_model_steps_per_s=grid_rate,
        sequential_model_steps_per_s=sequential_rate, speedup=grid_rate / sequential_rate)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{backend} {name}: grid {grid_rate:.2f} model·steps/s, 16 sequential fits "
          f"{sequential_rate:.2f} model·steps/s, ratio {grid_rate / sequential_rate:.2f}x")
