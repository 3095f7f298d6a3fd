"""Model-batched training: :func:`fit_grid` trains K copies of one architecture with different
hyper-parameters in one process, each step one batched computation.

How it works (one step):

1. every model sees the same batch x (B, C, H, W) of the run's data order (``config.seed``);
2. the K models' parameters are stacked (``torch.func.stack_module_state``: every tensor gets a
   leading K dimension) and ``vmap(functional_call)`` runs ``model.loss`` on all of them at once;
   the per-model float hyper-parameters that vary over the grid (e.g. ``beta``, ``betas``,
   ``alpha``, ``gamma``) are handed in as a batched (K, ...) tensor in place of the model's
   attribute of the same name;
3. the sum of the K losses is back-propagated (the models share no parameter, so each model's
   gradient is the gradient of its own loss) and a batched AdamW (or Adagrad) with a (K,) learning
   rate updates the stacked tensors: per model, the same update as ``torch.optim.AdamW``.

Noise: model k has its own ``torch.Generator`` on the training device, seeded with
``derived_seed(seed_k, NOISE, 0)`` (:func:`pyvae.train.sampler.derived_seed`), where ``seed_k``
is its grid point's ``seed`` (default ``config.model_seed``, else ``config.seed``). The one
int64 seed that each :func:`pyvae.ops.reparameterize_kl` call of the model's loss draws for its
Philox noise is, inside ``pyvae.ops.reparameterize_kl.noise_seeds``, the next value drawn from
model k's generator. That is what
``fit(model_k, data, config, model_seed=seed_k)`` draws from the global generator, which it
seeds with the same ``derived_seed(seed_k, NOISE, 0)``; and model k's initial weights are made by
``make_model`` right after ``torch.manual_seed(seed_k)``. Hence model k of a grid trains as
``torch.manual_seed(seed_k); fit(make_model(**point_k), data, config, lr=lr_k,
model_seed=seed_k)`` does, up to float rounding (batched matrix products sum in another order).
Any other random draw inside the loss (``torch.randn``, dropout, ...) is an error under
``vmap``: the models' noise could not be told apart.

Run directory (``out_dir``):

* ``grid.json``: the grid points, each model's config, seed and learning rate, and which
  hyper-parameters vary (``{"format": 1, "points": [...], "models": [...], "seeds": [...],
  "lrs": [...], "varied": [...]}``);
* ``config.json``: ``{"models": [model configs], "train": config.to_dict(), "dataset": sizes}``;
* ``metrics.jsonl``: training records as :func:`pyvae.train.fit` writes, one per model and log
  step, each with ``"model": k`` (its index in the grid), its own ``lr``, and
  ``model_steps_per_s`` (K steps per grid step, per second);
* ``checkpoint/``: the whole grid's checkpoint, written with
  :func:`pyvae.train.checkpoint.save_checkpoint` (atomic, checksummed): ``model.safetensors``
  holds every stacked (K, ...) tensor (names with ``/`` for ``.``), ``state.pt`` the batched
  optimizer's state, every model's noise generator state and the open log window. Resume
  (``resume=True``) reads it and continues bit-identically (on the CPU);
* ``models/<k:03d>/``: model k alone, exported after every grid checkpoint, which
  :func:`pyvae.train.load_model` reads (``load_model(out_dir / "models" / "002")``);
* ``.lock``: held while ``fit_grid`` runs.

Not supported (a ValueError says so): models with buffers (batch-norm statistics), fp16 (one
GradScaler cannot skip one model's step), evaluation sets, ``gather_global_batch`` and
torchrun; a hyper-parameter that varies must be a float (or a list of floats) attribute that
the model's loss reads.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pyvae._device import AUTOCAST_DTYPES
from pyvae._io import exclusive_lock, write_text_atomic
from pyvae.models import BaseVAE, build_model
from pyvae.ops.reparameterize_kl import noise_seeds
from pyvae.train.checkpoint import (CONFIG, LINK, WEIGHTS, MissingCheckpointError,
                                    checkpoint_dir, load_checkpoint, remove_stale_checkpoints,
                                    save_checkpoint)
from pyvae.train.config import TrainConfig
from pyvae.train.loop import TrainingDiverged, _Window, checkpointed_before, collate_images
from pyvae.train.metrics import MetricLayout, MetricsLog
from pyvae.train.sampler import NOISE, WORKERS, ShardedBatchSampler, derived_seed
from pyvae.train.schedules import kl_weight, lr_factor

GRID_FORMAT = 1
TRAINING_KEYS = ("lr", "seed")  # per-model training settings; the other keys go to make_model


@dataclass
class GridResult:
    """What :func:`fit_grid` returns.

    Attributes:
        step: optimizer steps done (every model takes each step).
        epoch: ``step / steps_per_epoch``.
        metrics: per model, the means of its training metrics since the last record (as
            :attr:`pyvae.train.FitResult.metrics`).
        out_dir, checkpoint, metrics_path: the run directory, its grid checkpoint link (None if
            none was written) and ``metrics.jsonl``.
        model_dirs: ``out_dir/models/<k:03d>``, each loadable with
            :func:`pyvae.train.load_model`.
        grid: the grid points as given.
    """

    step: int
    epoch: float
    metrics: list[dict]
    out_dir: Path
    checkpoint: Path | None
    metrics_path: Path
    model_dirs: list[Path]
    grid: list[dict]


def grid_product(axes: dict[str, list]) -> list[dict]:
    """The Cartesian product of ``{name: values}`` as grid points, the last name varying
    fastest: ``grid_product({"beta": [1, 4], "seed": [0, 1]})`` -> ``[{"beta": 1, "seed": 0},
    {"beta": 1, "seed": 1}, {"beta": 4, "seed": 0}, {"beta": 4, "seed": 1}]``."""
    for name, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"grid_product: {name!r} needs a non-empty list of values, got "
                             f"{values!r}")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]


def varied_keys(grid: list[dict]) -> list[str]:
    """The keys whose value is not the same in every grid point (a key missing from a point
    counts as a different value), in first-seen order."""
    keys = list(dict.fromkeys(key for point in grid for key in point))
    missing = object()
    return [key for key in keys
            if len({json.dumps(point.get(key, missing), default=repr) for point in grid}) > 1]


# ---- building and checking the K models ------------------------------------------------------

def _check_grid(grid) -> list[dict]:
    if not isinstance(grid, (list, tuple)) or not grid:
        raise ValueError(f"fit_grid: grid must be a non-empty list of dicts, got {grid!r}")
    for k, point in enumerate(grid):
        if not isinstance(point, dict):
            raise TypeError(f"fit_grid: grid[{k}] must be a dict of hyper-parameters, got "
                            f"{type(point).__name__}")
    return [dict(point) for point in grid]


def _training_settings(grid: list[dict], config: TrainConfig) -> tuple[list[int], list[float]]:
    """Each model's seed and learning rate (when its point has none: ``config.lr`` and
    ``config.model_seed``, else ``config.seed``), checked as TrainConfig checks them."""
    seeds, lrs = [], []
    for point in grid:
        checked = dataclasses.replace(config, lr=point.get("lr", config.lr),
                                      model_seed=point.get("seed", config.noise_seed))
        seeds.append(checked.model_seed)
        lrs.append(float(checked.lr))
    return seeds, lrs


def _build_models(make_model: Callable[..., BaseVAE], grid: list[dict], seeds: list[int]
                  ) -> list[BaseVAE]:
    """``make_model(**point without lr/seed)`` for each point, after ``torch.manual_seed`` of
    the point's seed (so the initial weights are those ``pyvae train --model-seed`` makes)."""
    models = []
    for k, (point, seed) in enumerate(zip(grid, seeds)):
        torch.manual_seed(seed)
        model = make_model(**{key: v for key, v in point.items() if key not in TRAINING_KEYS})
        if not isinstance(model, BaseVAE):
            raise TypeError(f"fit_grid: make_model(**grid[{k}]) must return a "
                            f"pyvae.models.BaseVAE, got {type(model).__name__}")
        models.append(model)
    return models


def _check_same_architecture(models: list[BaseVAE]) -> None:
    """Every model must have model 0's class and parameter names, shapes and dtypes, and no
    buffers; a ValueError names the first model and tensors that differ."""
    first = models[0]
    buffers = [name for name, _ in first.named_buffers()]
    if buffers:
        raise ValueError(f"fit_grid: {type(first).__name__} has buffers {buffers[:4]} (e.g. "
                         f"batch-norm statistics, updated in place by the forward pass), which "
                         f"model-batched training does not support")
    reference = {name: (tuple(p.shape), p.dtype) for name, p in first.named_parameters()}
    for k, model in enumerate(models[1:], start=1):
        if type(model) is not type(first):
            raise ValueError(f"fit_grid: grid[{k}] makes a {type(model).__name__}, grid[0] a "
                             f"{type(first).__name__}; a grid trains one architecture")
        shapes = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
        differ = [f"{name}: {reference.get(name, 'missing')} vs {shapes.get(name, 'missing')}"
                  for name in sorted(set(reference) | set(shapes))
                  if reference.get(name) != shapes.get(name)]
        if differ:
            raise ValueError(f"fit_grid: grid[{k}] gives parameters of other shapes than "
                             f"grid[0] ({'; '.join(differ[:4])}); every grid point must give "
                             f"the same architecture")


def _is_float_weights(value) -> bool:
    if isinstance(value, float):
        return True
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value))


def _varied_hyperparameters(models: list[BaseVAE], grid: list[dict], device: torch.device
                            ) -> dict[str, torch.Tensor]:
    """The model attributes that vary over the grid, stacked: name -> (K,) or (K, L) float32.

    Each varied constructor argument must be stored by the model as a float (or list of
    floats) attribute of the same name (``VAE.beta``, ``BetaTCVAE.alpha`` / ``gamma``,
    ``HierarchicalVAE.betas``), which the batched loss then reads as a batched tensor.
    """
    stacked = {}
    for key in varied_keys(grid):
        if key in TRAINING_KEYS:
            continue
        values = [getattr(model, key, None) for model in models]
        if not all(_is_float_weights(value) for value in values):
            raise ValueError(
                f"fit_grid: grid key {key!r} varies, but {type(models[0]).__name__} does not "
                f"keep it as float loss weights (attribute {key!r} is "
                f"{type(values[0]).__name__}); only float hyper-parameters such as beta, betas, "
                f"alpha and gamma (and lr, seed) can vary within a grid")
        stacked[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return stacked


# ---- per-model noise -------------------------------------------------------------------------

class _SeedFeed:
    """The noise seeds of one model's loss call, handed out in order to pyvae's ops through
    :func:`pyvae.ops.reparameterize_kl.noise_seeds`; ``seeds`` None: draw as usual and count."""

    def __init__(self, seeds: torch.Tensor | None, device: torch.device):
        self.seeds, self.device, self.used = seeds, device, 0

    def __call__(self) -> torch.Tensor:
        self.used += 1
        if self.seeds is None:  # counting the draws (_count_seed_draws)
            return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=self.device)
        if self.used > len(self.seeds):
            raise RuntimeError(f"fit_grid: the model's loss drew more than the {len(self.seeds)} "
                               f"noise seeds it drew on the first step")
        return self.seeds[self.used - 1]


def _count_seed_draws(model: BaseVAE, x: torch.Tensor) -> int:
    """How many noise seeds one ``model.loss`` call draws (run once, without gradients, with
    the global RNG state restored afterwards)."""
    fork = [model.device.index or 0] if model.device.type == "cuda" else []
    feed = _SeedFeed(None, model.device)
    with torch.no_grad(), torch.random.fork_rng(devices=fork), noise_seeds(feed):
        model.loss(x)
    return feed.used


class _NoiseStreams:
    """One generator per model on ``device``, model k's seeded with
    ``derived_seed(seeds[k], NOISE, 0)``: what fit seeds its global generator with."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(derived_seed(seed, NOISE, 0))
                           for seed in seeds]
        self.device = device

    def draw(self, count: int) -> torch.Tensor:
        """(K, count, 1) int64: per model, ``count`` draws of the call reparameterize_kl
        makes."""
        return torch.stack([
            torch.stack([torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64,
                                       device=self.device, generator=g) for _ in range(count)])
            if count else torch.empty(0, 1, dtype=torch.int64, device=self.device)
            for g in self.generators])

    def state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def load_state(self, states: list[torch.Tensor]) -> None:
        for generator, state in zip(self.generators, states):
            generator.set_state(state.cpu())


# ---- the batched optimizer -------------------------------------------------------------------

class _BatchedOptimizer:
    """AdamW or Adagrad on stacked (K, ...) tensors with a (K,) learning rate: for each model,
    the update of ``torch.optim.AdamW`` / ``torch.optim.Adagrad`` with that model's learning
    rate, by their fused kernels (``torch._fused_adamw_``, ``torch._fused_adagrad_``, what
    ``fused=True`` runs): one pass over each element, one call per run of models with the same
    learning rate — the K models' stacked state is K times too large to stay in cache through
    the several passes of an unfused update (that made the optimizer take longer than the
    models' forward and backward on a CPU)."""

    def __init__(self, params: dict[str, torch.Tensor], config: TrainConfig):
        self.params, self.name = params, config.optimizer
        self.betas, self.weight_decay = config.betas, config.weight_decay
        self.steps = 0
        moments = ("exp_avg", "exp_avg_sq") if self.name == "adamw" else ("sum",)
        self.state = {moment: {name: torch.zeros_like(p) for name, p in params.items()}
                      for moment in moments}

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        """One update with learning rates ``lrs`` (K,) float64, from the tensors' ``.grad``."""
        self.steps += 1
        names = list(self.params)
        tensors = [self.params[n] for n in names]
        grads = [p.grad for p in tensors]
        moments = [[self.state[m][n] for n in names] for m in self.state]
        # The fused kernels read the step count (for AdamW's bias corrections) from a tensor.
        steps = [torch.tensor(float(self.steps), device=tensors[0].device)] * len(tensors)
        for first, last, lr in _runs_of_equal(lrs.tolist()):
            # models first..last-1 share a learning rate: one call on their block of every tensor
            block = lambda ts: [_storage_view(t[first:last]) for t in ts]  # noqa: E731
            if self.name == "adamw":
                beta1, beta2 = self.betas
                torch._fused_adamw_(block(tensors), block(grads), block(moments[0]),
                                    block(moments[1]), [], steps, lr=lr, beta1=beta1,
                                    beta2=beta2, weight_decay=self.weight_decay, eps=1e-8,
                                    amsgrad=False, maximize=False)
            else:
                torch._fused_adagrad_(block(tensors), block(grads), block(moments[0]), steps,
                                      lr=lr, lr_decay=0.0, weight_decay=self.weight_decay,
                                      eps=1e-10, maximize=False)

    def relayout(self, name: str, stride: tuple[int, ...]) -> None:
        """Give the moments of tensor ``name`` the strides ``stride`` (see _adopt_layouts)."""
        for moments in self.state.values():
            moments[name] = _with_strides(moments[name], stride)

    def state_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"fit_grid(resume=True): the checkpoint was trained with "
                             f"optimizer={state['name']!r}, this call has "
                             f"optimizer={self.name!r}")
        self.steps = state["steps"]
        for moment, tensors in state["state"].items():
            for name, value in tensors.items():
                self.state[moment][name].copy_(value)


def _runs_of_equal(values: list[float]) -> list[tuple[int, int, float]]:
    """(first, last, value) of each run of equal consecutive values: [1, 1, 2] -> (0, 2, 1),
    (2, 3, 2)."""
    runs = []
    for k, value in enumerate(values):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], k + 1, value)
        else:
            runs.append((k, k + 1, value))
    return runs


def _storage_view(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as the 1-D run of storage they fill, whatever their order
    (the fused kernels' elementwise updates need no more: a tensor, its gradient and its
    moments share one layout)."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,),
                                                              t.storage_offset())


def _is_dense_models_first(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a (K, ...) tensor of these strides fills its storage without gaps or overlaps,
    with each model's slice one block (the models' dimension outermost)."""
    dims = sorted((st, n) for st, n in zip(stride, shape) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return not dims or shape[0] == 1 or dims[-1] == (stride[0], shape[0])


def _with_strides(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _clip_per_model(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each model's gradient (its slice k of every tensor) to global L2 norm
    ``max_norm``, as ``clip_grad_norm_`` does per model; returns the (K,) norms before
    clipping."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.reshape(-1, *([1] * (g.dim() - 1))))
    return norms


# ---- the grid checkpoint's weights file ------------------------------------------------------

class _StackedWeights(nn.Module):
    """The stacked (K, ...) tensors as one module, so that :func:`save_checkpoint` writes them
    as one safetensors file (``/`` replaces ``.`` in the names: module attributes cannot hold
    dots)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict):
        super().__init__()
        for name, value in tensors.items():
            # safetensors stores contiguous tensors (the grid's may have adopted other layouts)
            self.register_buffer(name.replace(".", "/"), value.detach().contiguous())
        self.config = config


def _read_stacked_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load_file(checkpoint_dir(out_dir) / WEIGHTS)
    return {name.replace("/", "."): value for name, value in tensors.items()}


def _write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


# ---- fit_grid --------------------------------------------------------------------------------

def fit_grid(make_model: Callable[..., BaseVAE], grid: list[dict], dataset: Dataset,
             config: TrainConfig | None = None, *, out_dir: str | os.PathLike,
             device: str | torch.device | None = None, progress: bool = True,
             extra_config: dict | None = None, **settings) -> GridResult:
    """Train one model per grid point, all K at once (stacked parameters, one ``vmap``-ed loss
    and one batched optimizer step per step), on the same data stream; exactly resumable.

    Args:
        make_model: builds a model from a grid point's model arguments, e.g.
            ``lambda **kw: VAE(10, 1, 64, architecture="mlp", **kw)``. Every point must give
            the same architecture (parameter names, shapes and dtypes).
        grid: K dicts of hyper-parameters: ``lr`` and ``seed`` are model k's learning rate and
            seed (initial weights and noise; default ``config``'s), the other keys are passed
            to ``make_model`` (e.g. ``beta``, ``betas``, ``alpha``, ``gamma``).
            :func:`grid_product` makes a Cartesian product.
        dataset: as for :func:`pyvae.train.fit`; its order (one for all models) is seeded by
            ``config.seed``.
        config, **settings: a :class:`TrainConfig` and field overrides, shared by the models
            (``lr`` and ``model_seed`` are per model: the grid's).
        out_dir: the run directory (see the module docstring).
        device: where to train (default: model 0's device).
        progress: show a progress bar.
        extra_config: more entries for ``config.json``.

    Returns:
        A :class:`GridResult`.

    Raises:
        ValueError, TypeError: a bad grid, models of different shapes, a setting fit_grid does
            not support, a varied hyper-parameter the batched loss cannot take; and as
            :func:`pyvae.train.fit` for resume (a checkpoint of another grid or settings).
        TrainingDiverged: a model's step was not finite (its index is in the metric names);
            no model's step was applied.
        FileExistsError, pyvae.errors.AlreadyRunningError, IntegrityError,
        MissingCheckpointError, OSError: as :func:`pyvae.train.fit`.

    Model k trains as ``fit`` would train it alone with ``model_seed`` = its seed (see the
    module docstring for the noise derivation), to float tolerance.
    """
    unknown = set(settings) - set(TrainConfig.field_names())
    if unknown:
        raise TypeError(f"fit_grid: unknown keyword arguments {sorted(unknown)}; the settings "
                        f"are TrainConfig's fields {TrainConfig.field_names()}")
    config = (TrainConfig(**settings) if config is None
              else dataclasses.replace(config, **settings))
    _check_supported(config)
    grid = _check_grid(grid)
    seeds, lrs = _training_settings(grid, config)
    models = _build_models(make_model, grid, seeds)
    _check_same_architecture(models)
    out_dir = Path(out_dir)
    with exclusive_lock(out_dir, "run directory"):
        trainer = _GridTrainer(models, grid, seeds, lrs, dataset, out_dir, config,
                               torch.device(device) if device is not None else models[0].device,
                               extra_config or {}, progress)
        del models  # the trainer holds the stacked copies of their tensors
        return trainer.run()


def _check_supported(config: TrainConfig) -> None:
    refused = {"precision='fp16'": config.precision == "fp16",
               "eval_fraction > 0": config.eval_fraction > 0,
               "eval_every": config.eval_every is not None,
               "eval_batches": config.eval_batches is not None,
               "gather_global_batch": config.gather_global_batch}
    named = [name for name, bad in refused.items() if bad]
    if named:
        raise ValueError(f"fit_grid does not support {', '.join(named)} (evaluate the exported "
                         f"models afterwards; use fp32 or bf16)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fit_grid trains in one process; it does not run under torchrun")


class _GridTrainer:
    """The state of one :func:`fit_grid` call."""

    def __init__(self, models: list[BaseVAE], grid: list[dict], seeds: list[int],
                 lrs: list[float], dataset: Dataset, out_dir: Path, config: TrainConfig,
                 device: torch.device, extra_config: dict, progress: bool):
        self.config, self.out_dir, self.progress, self.device = config, out_dir, progress, device
        self.grid, self.seeds, self.K = grid, seeds, len(models)
        self.configs = [model.config for model in models]
        self.base_lrs = torch.tensor(lrs, dtype=torch.float64)
        self.template = copy.deepcopy(models[0]).to("meta")
        self.hyper = _varied_hyperparameters(models, grid, device)
        self.params, _ = stack_module_state([model.to(device).train() for model in models])
        self.example_model = models[0]  # counts the noise draws on the first batch
        self.optimizer = _BatchedOptimizer(self.params, config)
        self.noise = _NoiseStreams(seeds, device)
        self.draws: int | None = None
        self.layouts_adopted = False
        self.amp_dtype = AUTOCAST_DTYPES[config.precision]

        try:
            self.sampler = ShardedBatchSampler(len(dataset), config.batch_size, seed=config.seed)
        except ValueError as error:
            raise ValueError(f"fit_grid: the training set is too small: {error}") from None
        self.data_generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_sampler=self.sampler,
                                 num_workers=config.num_workers, collate_fn=collate_images,
                                 pin_memory=device.type == "cuda",
                                 persistent_workers=config.num_workers > 0,
                                 generator=self.data_generator)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.end_step = min(self.total_steps, config.stop_after or self.total_steps)
        self.sizes = {"train_examples": len(dataset), "eval_examples": 0}
        self.layout: MetricLayout | None = None
        self.window = _Window()
        self.step = self._restore_or_start()
        self.saved_step = self.step if self.step > 0 else None
        remove_stale_checkpoints(out_dir)
        self._write_descriptions(extra_config)
        self.log = MetricsLog(out_dir / "metrics.jsonl", keep_until_step=self.step)

    # ---- files ---------------------------------------------------------------------------

    def _grid_description(self) -> dict:
        return {"format": GRID_FORMAT, "points": self.grid, "models": self.configs,
                "seeds": self.seeds, "lrs": self.base_lrs.tolist(),
                "varied": varied_keys(self.grid)}

    def _write_descriptions(self, extra_config: dict) -> None:
        _write_json(self.out_dir / "grid.json", self._grid_description())
        _write_json(self.out_dir / "config.json", {"models": self.configs,
                                                   "train": self.config.to_dict(),
                                                   "dataset": self.sizes, **extra_config})

    def _restore_or_start(self) -> int:
        """Load ``out_dir/checkpoint`` (resume) or start at step 0; nothing in ``out_dir``
        changes before the checkpoint is accepted."""
        link = self.out_dir / LINK
        if (link / CONFIG).is_file() and not self.config.resume:
            raise FileExistsError(f"fit_grid: {str(self.out_dir)!r} already holds a checkpoint; "
                                  f"pass resume=True to continue that run, or choose another "
                                  f"out_dir")
        first = min(self.config.checkpoint_every or self.end_step, self.end_step)
        if not self.config.resume or not (os.path.lexists(link)
                                          or checkpointed_before(self.out_dir, first)):
            return 0
        try:
            state = load_checkpoint(self.out_dir)
            weights = _read_stacked_weights(self.out_dir)
        except MissingCheckpointError as error:
            raise type(error)(f"fit_grid(resume=True): the checkpoint of {str(self.out_dir)!r} "
                              f"cannot be used: {error}") from None
        self._check_resumable(state, weights)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.load_state(state["noise"])
        self.draws = state["noise_draws_per_step"]
        self.window = _Window.from_state(state["log_window"])
        return state["step"]

    def _check_resumable(self, state: dict, weights: dict) -> None:
        expected = {"grid": self._grid_description(), "seed": self.config.seed,
                    "global_batch_size": self.sampler.global_batch_size,
                    "train_examples": self.sizes["train_examples"]}
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(f"fit_grid(resume=True): the checkpoint in "
                                 f"{str(checkpoint_dir(self.out_dir))!r} was trained with "
                                 f"another {key} ({state[key]!r}, this call: {value!r})")
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        if {name: tuple(w.shape) for name, w in weights.items()} != shapes:
            raise ValueError(f"fit_grid(resume=True): the checkpoint in "
                             f"{str(checkpoint_dir(self.out_dir))!r} holds tensors of other "
                             f"names or shapes than this grid's models")

    def _save(self) -> None:
        """Checkpoint the whole grid, then export each model to ``models/<k:03d>``."""
        if self.saved_step == self.step:
            return
        epoch, position = divmod(self.step, self.steps_per_epoch)
        state = {"format": GRID_FORMAT, "step": self.step, "epoch": epoch,
                 "batch_in_epoch": position, "steps_per_epoch": self.steps_per_epoch,
                 "seed": self.config.seed, "global_batch_size": self.sampler.global_batch_size,
                 "train_examples": self.sizes["train_examples"],
                 "grid": self._grid_description(), "optimizer": self.optimizer.state_dict(),
                 "noise": self.noise.state(), "noise_draws_per_step": self.draws,
                 "log_window": self.window.state()}
        stacked = _StackedWeights(self.params, {"name": "ModelGrid", "models": self.configs})
        save_checkpoint(self.out_dir, stacked, state)
        for k in range(self.K):
            self.model_dir(k).mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.model_dir(k), self.export(k),
                            {"step": self.step, "grid_index": k})
        self.saved_step = self.step

    def model_dir(self, k: int) -> Path:
        return self.out_dir / "models" / f"{k:03d}"

    def export(self, k: int) -> BaseVAE:
        """Model k as a model of its own (its slice of every stacked tensor), on the CPU."""
        with torch.device("meta"):  # no initialisation: every tensor is assigned below
            model = build_model(self.configs[k])
        model.load_state_dict({name: p[k].detach().cpu().clone()
                               for name, p in self.params.items()}, assign=True)
        return model

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> GridResult:
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.progress)
        last_records: list[dict] | None = None
        tick = time.perf_counter()
        try:
            while self.step < self.end_step:
                epoch, position = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, position)
                self.data_generator.manual_seed(derived_seed(config.seed, WORKERS, epoch))
                for x in self.loader:
                    kl = kl_weight(self.step, schedule=config.kl_schedule,
                                   warmup_steps=config.kl_warmup_steps,
                                   cycle_steps=config.kl_cycle_steps,
                                   cycle_ramp=config.kl_cycle_ramp)
                    lrs = self.base_lrs * lr_factor(
                        self.step, schedule=config.lr_schedule,
                        warmup_steps=config.lr_warmup_steps, total_steps=self.total_steps)
                    values = self._train_step(x.to(self.device, non_blocking=True), kl, lrs)
                    self.step += 1
                    self.window.add(values, time.perf_counter() - tick)
                    bar.update(1)
                    if self.step % config.log_every == 0 or self.step == self.total_steps:
                        last_records = self._log_train(lrs, kl)
                        self.window = _Window()
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self._save()
                    if self.step == self.end_step:
                        self._save()
                        break
                    tick = time.perf_counter()
        finally:
            bar.close()
            self.log.close()
            self.loader = None
        return self._result(last_records)

    def _result(self, last_records: list[dict] | None) -> GridResult:
        if self.window.steps and self.layout is not None:
            metrics = [self.layout.unpack(part) for part in self._per_model(self.window.means())]
        else:
            metrics = [{key: record[key] for key in self.layout.shapes}
                       for record in last_records] if last_records else [{}] * self.K
        link = self.out_dir / LINK
        return GridResult(step=self.step, epoch=self.step / self.steps_per_epoch,
                          metrics=metrics, out_dir=self.out_dir,
                          checkpoint=link if (link / CONFIG).is_file() else None,
                          metrics_path=self.out_dir / "metrics.jsonl",
                          model_dirs=[self.model_dir(k) for k in range(self.K)], grid=self.grid)

    def _per_model(self, values: list[float]) -> list[list[float]]:
        width = len(values) // self.K
        return [values[k * width:(k + 1) * width] for k in range(self.K)]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _noise_draws(self, x: torch.Tensor) -> int:
        """Noise seeds one model's loss draws per step (counted on the first batch, or resumed)."""
        if self.draws is None:
            self.draws = _count_seed_draws(self.example_model.to(self.device), x)
        self.example_model = None
        return self.draws

    def _batched_loss(self, x: torch.Tensor, kl: float, seeds: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The K models' losses (K,) and packed metrics (K, M) on batch ``x``, in one vmap, with
        the noise seeds ``seeds`` (K, draws) (default: the next ones of the models' streams)."""
        if seeds is None:
            seeds = self.noise.draw(self._noise_draws(x))
        template, hyper_names = self.template, list(self.hyper)

        def one_model(params, hyper, seeds):
            saved = {name: getattr(template, name) for name in hyper_names}
            try:
                for name in hyper_names:
                    setattr(template, name, hyper[name])
                with noise_seeds(_SeedFeed(seeds, x.device)):
                    output = functional_call(template, params, (x,), {"kl_weight": kl})
            finally:
                for name, value in saved.items():
                    setattr(template, name, value)
            if self.layout is None:
                extra = ["grad_norm"] if self.config.grad_clip is not None else []
                self.layout = MetricLayout(output, extra=extra)
            return output.loss, self.layout.pack(output)

        try:
            with self._autocast():
                return vmap(one_model)(self.params, self.hyper, seeds)
        except RuntimeError as error:
            if "randomness" not in str(error):
                raise
            raise RuntimeError(
                f"fit_grid: {type(self.template).__name__}.loss draws random numbers other than "
                f"the noise seeds of pyvae's ops (e.g. torch.randn or dropout), which cannot be "
                f"given to each model of the grid: {error}") from None

    def _adopt_layouts(self, x: torch.Tensor, kl: float) -> None:
        """Store each stacked tensor (and its optimizer moments) in the layout in which the
        vmapped backward delivers its gradient, found by one trial backward on ``x`` with
        throw-away noise seeds (no generator advances, no parameter changes).

        Under vmap a linear layer's weight gradient arrives as the transpose of a contiguous
        (K, in, out) product; autograd then copies it into the parameter's layout, and that
        strided copy of every large weight took as long as the step's matrix products on a
        CPU. Run before the first step of every run and resume, so that every step computes
        with the same layouts."""
        seen: dict[str, tuple[int, ...]] = {}
        def record(name):
            def hook(grad):
                seen.setdefault(name, grad.stride())
            return hook
        hooks = [p.register_hook(record(name)) for name, p in self.params.items()]
        try:
            losses, _ = self._batched_loss(x, kl, torch.zeros(
                self.K, self._noise_draws(x), 1, dtype=torch.int64, device=self.device))
            losses.sum().backward()
        finally:
            for hook in hooks:
                hook.remove()
        with torch.no_grad():
            for name, p in self.params.items():
                p.grad = None
                stride = seen.get(name)
                if stride is not None and stride != p.stride() and \
                        _is_dense_models_first(tuple(p.shape), stride):
                    p.data = _with_strides(p.data, stride)
                    self.optimizer.relayout(name, stride)
        self.layouts_adopted = True

    def _train_step(self, x: torch.Tensor, kl: float, lrs: torch.Tensor) -> list[float]:
        """One batched step; returns the K models' packed metrics, concatenated (K·M floats).
        Raises TrainingDiverged, without changing any parameter, if one is not finite."""
        if not self.layouts_adopted:
            self._adopt_layouts(x, kl)
        losses, packed = self._batched_loss(x, kl)
        losses.sum().backward()
        if self.config.grad_clip is not None:
            norms = _clip_per_model([p.grad for p in self.params.values()],
                                    self.config.grad_clip)
            packed = torch.cat([packed, norms[:, None].to(packed.dtype)], dim=1)
        values = packed.flatten().tolist()
        self._check_finite(values)
        self.optimizer.step(lrs)
        for p in self.params.values():
            p.grad = None
        return values

    def _check_finite(self, values: list[float]) -> None:
        if all(map(math.isfinite, values)):
            return
        for p in self.params.values():
            p.grad = None
        metrics, bad = {}, []
        for k, part in enumerate(self._per_model(values)):
            for name, value in self.layout.unpack(part).items():
                metrics[f"model {k} {name}"] = value
            bad += [f"model {k} {name}" for name in self.layout.nonfinite(part)]
        link = self.out_dir / LINK
        raise TrainingDiverged(self.step + 1, metrics, bad,
                               link if (link / CONFIG).is_file() else None)

    def _log_train(self, lrs: torch.Tensor, kl: float) -> list[dict]:
        """One record per model of the steps since the last record."""
        window, records = self.window, []
        common = {"split": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "kl_weight": kl,
                  "images_per_s": window.steps * self.sampler.global_batch_size / window.seconds,
                  "model_steps_per_s": window.steps * self.K / window.seconds}
        for k, part in enumerate(self._per_model(window.means())):
            record = {**common, "model": k, "lr": float(lrs[k]), **self.layout.unpack(part)}
            self.log.write(record)
            records.append(record)
        return records
