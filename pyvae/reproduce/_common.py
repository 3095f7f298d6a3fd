"""What the reproduction experiments share: in-memory data sets, seeded training through
:func:`pyvae.train.fit`, batched encoding, the result report (a printed markdown table,
``results.md`` and ``results.json``) and a description of the machine."""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pyvae._device import check_device
from pyvae.train import fit, fit_grid, load_model, read_metrics

LN2 = math.log(2.0)
SIZES = ("smoke", "default")


# ---- data -------------------------------------------------------------------------------------

class TensorImages(Dataset):
    """An (N, C, H, W) image tensor as a data set for :func:`pyvae.train.fit`.

    uint8 tensors are stored as they are (a quarter of the memory) and scaled to [0, 1] floats
    per item; float tensors are returned as they are. ``targets`` (optional, numpy) ride along
    for probes. ``__getitems__`` hands the DataLoader a whole batch at once.
    """

    def __init__(self, images: torch.Tensor, targets: np.ndarray | None = None):
        if images.dim() != 4:
            raise ValueError(f"TensorImages: images must be (N, C, H, W), got "
                             f"{tuple(images.shape)}")
        self.images = images.contiguous()
        self.targets = targets
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.clone()

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._convert(self.images[index])

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(self._convert(self.images[torch.as_tensor(indices)]))

    def all(self) -> torch.Tensor:
        """Every image as one float tensor in [0, 1]."""
        return self._convert(self.images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as uint8 levels (what :class:`TensorImages` stores compactly)."""
    return (images.clamp(0, 1) * 255).round_().to(torch.uint8)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images (N, C, H, H) average-pooled to (N, C, size, size); H must be a multiple."""
    factor = images.shape[-1] // size
    if factor * size != images.shape[-1]:
        raise ValueError(f"downsample: {images.shape[-1]} is not a multiple of {size}")
    return images if factor == 1 else F.avg_pool2d(images, factor)


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random (train, test) split of range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(test_fraction * n))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@dataclass
class DigitsSplit:
    """scikit-learn's digits at ``image_size`` (images in [0, 1], (N, 1, S, S)) in a fixed
    random train/test split; ``train_set`` serves the training images to :func:`train`."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_set: Dataset


def digits_split(image_size: int, test_fraction: float, seed: int) -> DigitsSplit:
    from pyvae.data import Digits
    digits = Digits(size=image_size)
    images, labels = digits.images, digits.targets
    train_idx, test_idx = split_indices(len(images), test_fraction, seed)
    return DigitsSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                       TensorImages(images[train_idx]))


# ---- training and encoding --------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python (model initialisation draws from torch's global RNG)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class Trained:
    """A model after :func:`train`, with its training records and wall-clock seconds."""

    model: torch.nn.Module
    records: list[dict]
    seconds: float

    @property
    def last(self) -> dict:
        """The last training record (means over its log window)."""
        train = [r for r in self.records if r.get("split", "train") == "train"]
        return train[-1] if train else {}


def train(model, dataset: Dataset, *, work_dir: Path, name: str, steps: int, batch_size: int,
          lr: float, device: torch.device, seed: int, **fit_kwargs) -> Trained:
    """Train ``model`` with :func:`pyvae.train.fit` into ``work_dir/name`` (quietly, one
    checkpoint at the end) and return it in eval mode with its records."""
    out = Path(work_dir) / name
    if out.exists():
        shutil.rmtree(out)  # a fresh run every time: the experiments are re-runnable
    fit_kwargs.setdefault("log_every", max(1, steps // 25))
    start = time.perf_counter()
    fit(model, dataset, out_dir=out, steps=steps, batch_size=min(batch_size, len(dataset)),
        lr=lr, seed=seed, device=device, progress=False, checkpoint_every=None, **fit_kwargs)
    seconds = time.perf_counter() - start
    model.eval()
    return Trained(model, read_metrics(out / "metrics.jsonl"), seconds)


def train_grid(make_model, grid: list[dict], dataset: Dataset, *, work_dir: Path, name: str,
               steps: int, batch_size: int, lr: float, device: torch.device, seed: int,
               **fit_kwargs) -> list[Trained]:
    """Train the K models of ``grid`` together with :func:`pyvae.train.fit_grid` into
    ``work_dir/name`` (quietly, one checkpoint at the end; ``seed`` seeds the one data order,
    each point's ``seed`` its model's initial weights and noise) and return them, in grid
    order, in eval mode on ``device`` with their own training records. ``seconds`` of each is
    the wall clock of the whole grid (the K models train in one computation)."""
    out = Path(work_dir) / name
    if out.exists():
        shutil.rmtree(out)
    fit_kwargs.setdefault("log_every", max(1, steps // 25))
    start = time.perf_counter()
    result = fit_grid(make_model, grid, dataset, out_dir=out, steps=steps,
                      batch_size=min(batch_size, len(dataset)), lr=lr, seed=seed, device=device,
                      progress=False, checkpoint_every=None, **fit_kwargs)
    seconds = time.perf_counter() - start
    records = read_metrics(out / "metrics.jsonl")
    return [Trained(load_model(path).to(device).eval(),
                    [r for r in records if r.get("model") == k], seconds)
            for k, path in enumerate(result.model_dirs)]


def mean_and_standard_error(values) -> tuple[float, float]:
    """The mean of ``values`` and its standard error std/√n (sample std, ddof 1; 0 for one
    value), skipping NaNs."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    error = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(np.mean(values)), error


@torch.no_grad()
def encode_means(model, images: torch.Tensor, *, batch_size: int = 512,
                 with_logvar: bool = False):
    """Posterior means (and log-variances) of ``images`` (float, [0, 1]) in batches, as float32
    CPU tensors (N, D)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mus, logvars = [], []
    try:
        for part in images.split(batch_size):
            mu, logvar = model.encode(part.to(device).float())
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
    finally:
        model.train(was_training)
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    return (mu, logvar) if with_logvar else mu


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """``model.reconstruct`` in batches, on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.reconstruct(part.to(device).float()).float().cpu()
                      for part in images.split(batch_size)])


def resolve_device(device) -> torch.device:
    """``None`` -> cuda when available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


# ---- the machine ------------------------------------------------------------------------------

def machine(device: torch.device) -> str:
    """One line: CPU model and cores (or the GPU), torch version and threads, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with "
             f"{torch.get_num_threads()} threads"]
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    try:
        parts.append("load average at start %.1f" % os.getloadavg()[0])
    except OSError:
        pass
    return "; ".join(parts)


def versions() -> dict[str, str]:
    """The versions of Python, pyvae, torch, numpy and scikit-learn."""
    import sklearn
    import pyvae
    return {"python": platform.python_version(), "pyvae": pyvae.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}


# ---- reports ----------------------------------------------------------------------------------

def fmt(value) -> str:
    """A table cell: floats with 3 decimals (fewer for big values, scientific for tiny ones),
    None as a dash, everything else as str."""
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)) and not isinstance(value, bool):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        size = abs(value)
        if size >= 1000:
            return f"{value:.0f}"
        if size >= 100:
            return f"{value:.1f}"
        if size >= 1e-3 or size == 0:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    escape = lambda text: text.replace("|", "\\|")  # a literal | would split the cell
    columns = [escape(c) for c in columns]
    cells = [[escape(v if isinstance(v, str) else fmt(v)) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[k]) for r in cells)) if cells else len(c)
              for k, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells])


@dataclass
class Table:
    """A result table: a caption, column names and rows of values."""

    caption: str
    columns: list[str]
    rows: list[list]
    #: per column, a format spec for numbers (e.g. ".1f"), or None for :func:`fmt`
    formats: list[str | None] | None = None

    def cells(self) -> list[list[str]]:
        formats = self.formats or [None] * len(self.columns)
        return [[format(v, f) if f and isinstance(v, (int, float, np.number))
                 and not isinstance(v, bool) else fmt(v) for v, f in zip(row, formats)]
                for row in self.rows]

    def markdown(self) -> str:
        return f"**{self.caption}**\n\n{markdown_table(self.columns, self.cells())}"

    def as_json(self) -> dict:
        return {"caption": self.caption, "columns": self.columns,
                "rows": [[_jsonable(v) for v in row] for row in self.rows],
                "formats": self.formats}


@dataclass
class Report:
    """What an experiment returns to :func:`pyvae.reproduce.run`.

    Attributes:
        tables: the result tables (the first is the headline).
        held: whether the seed's finding held (None: not applicable / mixed).
        finding: one or two sentences saying what the seed claims and whether it held here.
        pictures: (file name relative to the output folder, caption) of every PNG written.
        notes: further remarks for results.md (setup deviations, caveats).
        data: everything else worth keeping in results.json (JSON-serialisable).
    """

    tables: list[Table]
    held: bool | None
    finding: str
    pictures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def _jsonable(value):
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(value), indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class WorkDir:
    """A scratch directory for the training runs (checkpoints, logs) that is removed afterwards,
    so that only the report lands in the output folder."""

    def __enter__(self) -> Path:
        self._tmp = tempfile.TemporaryDirectory(prefix="pyvae-reproduce-")
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()
