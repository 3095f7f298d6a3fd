"""The training loop: :func:`fit`."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pyvae import _distributed as distributed
from pyvae._device import AUTOCAST_DTYPES
from pyvae._io import exclusive_lock, write_text_atomic
from pyvae.errors import IntegrityError
from pyvae.models import BaseVAE
from pyvae.train.checkpoint import (CONFIG, LINK, MissingCheckpointError, capture_rng_state,
                                    checkpoint_dir, load_checkpoint, remove_stale_checkpoints,
                                    restore_rng_state, save_checkpoint)
from pyvae.train.config import TrainConfig
from pyvae.train.metrics import MetricLayout, MetricsLog
from pyvae.train.sampler import (EVAL_NOISE, NOISE, SPLIT, WORKERS, ShardedBatchSampler,
                                 derived_seed)
from pyvae.train.schedules import kl_weight, lr_factor

STATE_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """A training step produced a non-finite loss (or metric); the step was not applied.

    Attributes:
        step: the 1-based number of the offending optimizer step.
        metrics: the step's metrics (global-batch means).
        nonfinite: the names of the non-finite ones.
        checkpoint: the last good checkpoint on disk, or None if none was written.
    """

    def __init__(self, step: int, metrics: dict, nonfinite: list[str], checkpoint: Path | None):
        self.step, self.metrics, self.nonfinite, self.checkpoint = (step, metrics, nonfinite,
                                                                    checkpoint)
        values = ", ".join(f"{name}={metrics[name]}" for name in nonfinite)
        where = (f"the last good checkpoint is {str(checkpoint)!r}" if checkpoint is not None
                 else "no checkpoint was written")
        super().__init__(f"training diverged at step {step}: non-finite {values}; the step was "
                         f"not applied and {where}")


class MainRankFailed(RuntimeError):
    """Raised on the ranks other than 0 when rank 0 failed a step only it takes (locking the
    run directory, writing its files); rank 0 raises its own error, which says why."""


def _on_main_rank(dist: distributed.Distributed, action, what: str):
    """Run ``action()`` on rank 0 only, and make every rank learn whether it failed (one
    all-reduce, which is also a barrier), so that no rank waits for a rank 0 that has given
    up. Returns the action's result on rank 0 (None on the others)."""
    result, error = None, None
    if dist.is_main:
        try:
            result = action()
        except Exception as exc:
            error = exc
    if dist.enabled:
        ok = torch.tensor([0.0 if error is not None else 1.0], device=dist.device)
        failed = dist.mean(ok).item() < 1.0
    else:
        failed = error is not None
    if error is not None:
        raise error
    if failed:
        raise MainRankFailed(f"rank 0 failed {what}; its error says why")
    return result


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        step: optimizer steps taken in total (by this call and the runs it resumed).
        epoch: ``step / steps_per_epoch`` (fractional).
        metrics: the last training log record's model metrics (means over its log window); for
            a call that stopped (``stop_after``) between two records, the means over the steps
            since the last record, which the next record after a resume will include.
        eval_metrics: the last evaluation's metrics, or None.
        out_dir: the run directory.
        checkpoint: ``out_dir/checkpoint``, or None if no checkpoint exists.
        metrics_path: ``out_dir/metrics.jsonl``.
    """

    step: int
    epoch: float
    metrics: dict
    eval_metrics: dict | None
    out_dir: Path
    checkpoint: Path | None
    metrics_path: Path


def collate_images(items: list) -> torch.Tensor:
    """Stack dataset items into a (B, C, H, W) batch; an item that is a tuple or list (e.g.
    ``(image, label)``) contributes its first element."""
    images = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
    return torch.stack([torch.as_tensor(image) for image in images])


def split_dataset(dataset: Dataset, eval_fraction: float, seed: int = 0
                  ) -> tuple[Dataset, Dataset | None]:
    """Hold out ``round(eval_fraction * len(dataset))`` examples (at least one) chosen by
    ``seed``; returns ``(train, eval)`` Subsets (``(dataset, None)`` when the fraction is 0)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return dataset, None
    n = len(dataset)
    n_eval = max(1, round(eval_fraction * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, SPLIT)))
    return (Subset(dataset, sorted(order[n_eval:].tolist())),
            Subset(dataset, sorted(order[:n_eval].tolist())))


def _write_json(path: Path, value: dict) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def fit(model: BaseVAE, dataset: Dataset, config: TrainConfig | None = None, *,
        out_dir: str | os.PathLike, eval_dataset: Dataset | None = None,
        device: str | torch.device | None = None, progress: bool = True,
        extra_config: dict | None = None, **settings) -> FitResult:
    """Train ``model`` on ``dataset`` with AdamW (or Adagrad), logging, evaluating and
    checkpointing into ``out_dir``; exactly resumable, and distributed under ``torchrun``.

    Every step draws a global batch from a permutation of the training set that depends only on
    ``(seed, epoch)`` (see :mod:`pyvae.train.sampler`), calls ``model.loss(x, kl_weight)``,
    back-propagates ``loss`` and takes an optimizer step. Under ``torchrun`` (RANK / WORLD_SIZE /
    LOCAL_RANK set, or an initialised process group) the model is wrapped in
    DistributedDataParallel and every rank trains on its ``batch_size`` slice of each global
    batch of ``batch_size * world_size`` examples; rank 0 alone logs, shows progress and
    writes files.

    Args:
        model: a :class:`pyvae.models.BaseVAE` (its ``config`` is saved with the weights).
        dataset: items are (C, H, W) float tensors in [0, 1], or tuples/lists whose first
            element is one.
        out_dir: the run directory: ``config.json`` (model config, these arguments, dataset
            sizes and ``extra_config``), ``metrics.jsonl``, ``checkpoint/`` and ``.lock``
            (held by the running fit).
        config: the run's settings, a :class:`TrainConfig` (its fields: length, optimizer,
            schedules, precision, evaluation, logging, checkpointing, resume, seed); default
            ``TrainConfig()`` but for ``settings``.
        **settings: :class:`TrainConfig` fields as keywords (``steps=1000, lr=3e-4``), which
            replace those of ``config``.
        eval_dataset: a held-out dataset to evaluate on (or ``config.eval_fraction``).
        device: where to train (None: the model's device; under torchrun ``cuda:LOCAL_RANK``
            when CUDA is available, else the CPU). The model is moved there.
        progress: show a tqdm progress bar with loss, distortion (nats) and rate (bits).
        extra_config: more JSON-serialisable entries for ``config.json`` (the CLI records the
            dataset spec there).

    Returns:
        A :class:`FitResult`.

    Raises:
        TrainingDiverged: a step's loss or metrics were not finite; the step was not applied
            and ``out_dir/checkpoint`` still holds the last good checkpoint.
        pyvae.errors.AlreadyRunningError: another process is training in ``out_dir`` (fit
            holds ``out_dir/.lock`` for the whole call; under torchrun rank 0 holds it).
        pyvae.errors.IntegrityError, pyvae.train.checkpoint.MissingCheckpointError: with
            ``resume``, the checkpoint is damaged (its files do not match the checksums in its
            ``manifest.json``, or cannot be parsed) or missing; the message names the file.
        OSError: writing a file of ``out_dir`` failed (e.g. a full disk); the message names
            the file and the cause, and the last checkpoint stays loadable.
        MainRankFailed: on the other ranks under torchrun, when rank 0 failed one of the
            above.
        ValueError, TypeError: an invalid setting (named in the message; TypeError also for an
            unknown keyword), a resumed checkpoint of a different model config, optimizer,
            seed, global batch size or training-set size.
        FileExistsError: ``out_dir`` holds a checkpoint and ``resume`` is False.

    ``metrics.jsonl`` holds one JSON object per line. Training records (``"split": "train"``,
    every ``log_every`` steps) have ``step`` (optimizer steps done), ``epoch`` (fractional),
    ``lr`` and ``kl_weight`` (of the record's last step), ``images_per_s`` (all ranks, data
    loading included, evaluation and checkpointing excluded), ``grad_norm`` (with
    ``grad_clip``; before clipping) and the model's metrics (:meth:`ModelOutput.metrics`:
    ``loss``, ``distortion`` in nats, ``rate_bits``, terms such as ``mi``, ``tc``, ``dim_kl``,
    ``layer_rates_bits`` or ``bits_per_dim``) averaged over the global batches since the last
    record. Evaluation records (``"split": "eval"``) have ``step``, ``epoch``, ``batches`` and
    the model's metrics averaged over the evaluation batches. On resume, the records a killed
    run wrote after its last checkpoint are dropped, so the file reads as one uninterrupted run.

    The parameters at the end of a run are bit-identical (on the CPU; on GPUs up to
    non-deterministic kernels) whether or not it was interrupted and resumed: the checkpoint
    holds the optimizer, scheduler and GradScaler state and every rank's RNG states, and the
    data order restarts at the same position of the same permutation.
    """
    if not isinstance(model, BaseVAE):
        raise TypeError(f"fit: model must be a pyvae.models.BaseVAE (its config is saved with the "
                        f"weights), got {type(model).__name__}")
    unknown = set(settings) - set(TrainConfig.field_names())
    if unknown:
        raise TypeError(f"fit: unknown keyword arguments {sorted(unknown)}; the settings are "
                        f"TrainConfig's fields {TrainConfig.field_names()}")
    config = (TrainConfig(**settings) if config is None
              else dataclasses.replace(config, **settings))
    if eval_dataset is not None and config.eval_fraction > 0:
        raise ValueError("fit: give eval_dataset or eval_fraction, not both")
    if config.gather_global_batch:
        if not hasattr(model, "gather_global_batch"):
            raise ValueError(f"fit: gather_global_batch=True, but {type(model).__name__} has no "
                             f"gather_global_batch attribute (only models whose loss uses "
                             f"statistics of the whole batch have one)")
        model.gather_global_batch = True
    if config.eval_fraction > 0:
        dataset, eval_dataset = split_dataset(dataset, config.eval_fraction, config.seed)
    dist = distributed.setup(device, default=model.device)
    trainer = None
    try:
        with contextlib.ExitStack() as stack:
            _on_main_rank(dist, lambda: stack.enter_context(
                exclusive_lock(out_dir, "run directory")), "to lock the run directory")
            trainer = _Trainer(model, dataset, eval_dataset, Path(out_dir), config, dist,
                               extra_config or {}, progress)
            return trainer.run()
    finally:
        # The DistributedDataParallel wrapper's reducer holds the process group: free it while
        # the group is alive. Left for later, its destructor can be the one that destroys a
        # Gloo group, joining Gloo's threads while holding the GIL they wait for (a hang seen
        # at the end of a torchrun run).
        del trainer
        gc.collect()
        dist.close()


def checkpointed_before(out_dir: Path, first_checkpoint_step: int) -> bool:
    """Whether ``out_dir/metrics.jsonl`` has a record past the step of the run's first
    checkpoint (the loop writes step N+1 only after the checkpoint of step N), i.e. a checkpoint
    was published even though none is there now."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line
        if isinstance(step, int) and step > first_checkpoint_step:
            return True
    return False


class _Window:
    """Sums of the packed metrics of the steps since the last log record, and their time
    (seconds); saved in checkpoints so that the first record after a resume averages the same
    steps as in an uninterrupted run."""

    def __init__(self, sums: list[float] | None = None, steps: int = 0, seconds: float = 0.0):
        self.sums, self.steps, self.seconds = sums, steps, seconds

    def state(self) -> dict:
        """For ``state.pt`` (numbers and lists only: loadable with ``weights_only=True``)."""
        return {"sums": self.sums, "steps": self.steps, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict | None) -> "_Window":
        """Inverse of :meth:`state`; None (a checkpoint from before windows were saved): an
        empty window."""
        return cls() if state is None else cls(state["sums"], state["steps"], state["seconds"])

    def add(self, values: list[float], seconds: float) -> None:
        self.sums = values if self.sums is None else [a + b for a, b in zip(self.sums, values)]
        self.steps += 1
        self.seconds += seconds

    def means(self) -> list[float]:
        return [value / self.steps for value in self.sums]


class _Trainer:
    """The state of one :func:`fit` call."""

    def __init__(self, model: BaseVAE, dataset: Dataset, eval_dataset: Dataset | None,
                 out_dir: Path, config: TrainConfig, dist: distributed.Distributed,
                 extra_config: dict, progress: bool):
        self.config, self.dist, self.out_dir, self.progress = config, dist, out_dir, progress
        self.device = dist.device
        self.seed = config.seed
        self.model = model.to(self.device).train()
        world, rank, batch = dist.world_size, dist.rank, config.batch_size

        try:
            self.sampler = ShardedBatchSampler(len(dataset), batch, seed=self.seed, rank=rank,
                                               world_size=world)
        except ValueError as error:
            raise ValueError(f"fit: the training set is too small: {error}") from None
        self.data_generator = torch.Generator()  # worker seeds, without touching the global RNG
        self.loader = self._loader(dataset, self.sampler, self.data_generator)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.end_step = min(self.total_steps, config.stop_after or self.total_steps)
        self.eval_loader = None
        if eval_dataset is not None:
            try:
                eval_sampler = ShardedBatchSampler(len(eval_dataset), batch, rank=rank,
                                                   world_size=world, shuffle=False)
            except ValueError as error:
                raise ValueError(f"fit: the evaluation set is too small: {error}") from None
            self.eval_loader = self._loader(eval_dataset, eval_sampler, torch.Generator())
        self.sizes = {"train_examples": len(dataset),
                      "eval_examples": len(eval_dataset) if eval_dataset is not None else 0}

        if config.optimizer == "adagrad":
            self.optimizer = torch.optim.Adagrad(model.parameters(), lr=config.lr,
                                                 weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                               betas=tuple(config.betas),
                                               weight_decay=config.weight_decay)
        total_steps = self.total_steps  # not self: no reference cycle keeps workers alive
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, schedule=config.lr_schedule, warmup_steps=config.lr_warmup_steps,
            total_steps=total_steps))
        self.amp_dtype = AUTOCAST_DTYPES[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")

        self.layout: MetricLayout | None = None  # made from the first step's output
        self.window = _Window()  # replaced by the checkpoint's on resume
        self.step = self._restore_or_start(model)
        self.saved_step = self.step if self.step > 0 else None

        def start():
            remove_stale_checkpoints(out_dir)  # e.g. half-written by a killed run
            _write_json(out_dir / "config.json", {"model": model.config, "train": config.to_dict(),
                                                  "dataset": self.sizes, **extra_config})
        _on_main_rank(dist, start, "to write config.json")
        self.ddp = (DistributedDataParallel(model, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
                    if dist.enabled else model)
        self.log = (MetricsLog(out_dir / "metrics.jsonl", keep_until_step=self.step)
                    if dist.is_main else None)

    def _loader(self, dataset, sampler, generator) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                          collate_fn=collate_images, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, generator=generator)

    def _checkpointed_before(self) -> bool:
        first = min(self.config.checkpoint_every or self.end_step, self.end_step)
        return checkpointed_before(self.out_dir, first)

    def _restore_or_start(self, model: BaseVAE) -> int:
        """Load ``out_dir/checkpoint`` (resume) or seed a fresh run; returns the start step.
        Nothing in ``out_dir`` changes before the checkpoint is accepted."""
        link = self.out_dir / LINK
        if (link / CONFIG).is_file() and not self.config.resume:
            raise FileExistsError(f"fit: {str(self.out_dir)!r} already holds a checkpoint; pass "
                                  f"resume=True to continue that run, or choose another out_dir")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.resume or not (os.path.lexists(link) or self._checkpointed_before()):
            _seed_everything(derived_seed(self.config.noise_seed, NOISE, self.dist.rank))
            return 0
        try:
            state = load_checkpoint(self.out_dir, model, scheduler=self.scheduler,
                                    scaler=self.scaler)
        except (MissingCheckpointError, IntegrityError) as error:
            found = [name for name in ("metrics.jsonl", "config.json")
                     if (self.out_dir / name).is_file()]
            has = f"has {' and '.join(found)} of an earlier run but " if found else ""
            raise type(error)(f"fit(resume=True): the run directory {str(self.out_dir)!r} "
                              f"{has}its checkpoint cannot be used: {error}. Restore the "
                              f"checkpoint, or train into another out_dir") from None
        except ValueError as error:
            raise ValueError(f"fit(resume=True): {error}") from None
        saved_optimizer = state.get("optimizer_name", "adamw")  # older checkpoints: AdamW
        if saved_optimizer != self.config.optimizer:
            raise ValueError(f"fit(resume=True): the checkpoint in "
                             f"{str(checkpoint_dir(self.out_dir))!r} was trained with "
                             f"optimizer={saved_optimizer!r}, this call has "
                             f"optimizer={self.config.optimizer!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        expected = {"seed": self.seed, "global_batch_size": self.sampler.global_batch_size,
                    "train_examples": self.sizes["train_examples"]}
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(
                    f"fit(resume=True): the checkpoint in {str(checkpoint_dir(self.out_dir))!r} "
                    f"was trained with {key}={state[key]}, this call has {key}={value}; the data "
                    f"order would not continue where it stopped")
        if len(state["rng"]) == self.dist.world_size:
            restore_rng_state(state["rng"][self.dist.rank], self.device)
        else:
            warnings.warn(f"fit: the checkpoint was written by {len(state['rng'])} processes and "
                          f"this run has {self.dist.world_size}: the sampling noise is re-seeded, "
                          f"so the run will not equal an uninterrupted one")
            _seed_everything(derived_seed(self.config.noise_seed, NOISE, self.dist.rank,
                                          state["step"]))
        self.window = _Window.from_state(state.get("log_window"))
        return state["step"]

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> FitResult:
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.dist.is_main))
        last_record, eval_metrics = None, None
        tick = time.perf_counter()
        try:
            while self.step < self.end_step:
                epoch, position = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, position)
                self.data_generator.manual_seed(derived_seed(self.seed, WORKERS, epoch))
                for x in self.loader:
                    kl = kl_weight(self.step, schedule=config.kl_schedule,
                                   warmup_steps=config.kl_warmup_steps,
                                   cycle_steps=config.kl_cycle_steps,
                                   cycle_ramp=config.kl_cycle_ramp)
                    lr = self.optimizer.param_groups[0]["lr"]
                    values = self._train_step(x, kl)
                    self.step += 1
                    now = time.perf_counter()
                    self.window.add(values, now - tick)
                    bar.set_postfix({"loss": values[0], "distortion": values[1],
                                     "rate_bits": values[2]}, refresh=False)
                    bar.update(1)

                    done = self.step == self.end_step
                    if self.step % config.log_every == 0 or self.step == self.total_steps:
                        last_record = self._log_train(self.window, lr, kl)
                        self.window = _Window()
                    if self.eval_loader is not None and (
                            (config.eval_every and self.step % config.eval_every == 0)
                            or self.step == self.total_steps):
                        eval_metrics = self._evaluate()
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self._save()
                    if done:
                        self._save()
                        break
                    tick = time.perf_counter()  # evaluation and checkpoints are not throughput
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()
            self.loader = self.eval_loader = None  # ends the worker processes now
        if self.window.steps and self.layout is not None:  # stopped between two records
            metrics = self.layout.unpack(self.window.means())
        else:
            metrics = {} if last_record is None else {key: last_record[key]
                                                      for key in self.layout.shapes}
        link = self.out_dir / LINK
        return FitResult(step=self.step, epoch=self.step / self.steps_per_epoch, metrics=metrics,
                         eval_metrics=eval_metrics, out_dir=self.out_dir,
                         checkpoint=link if (link / CONFIG).is_file() else None,
                         metrics_path=self.out_dir / "metrics.jsonl")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, x: torch.Tensor, kl: float) -> list[float]:
        """One optimizer step on batch ``x``; returns the packed global-batch metrics (see
        ``self.layout``). Raises TrainingDiverged, without changing the parameters, if they are
        not finite."""
        x = x.to(self.device, non_blocking=True)
        with self._autocast():
            output = self.ddp(x, kl_weight=kl)
        self.scaler.scale(output.loss).backward()
        clip = self.config.grad_clip
        if self.layout is None:
            self.layout = MetricLayout(output, extra=["grad_norm"] if clip is not None else [])
        extra = []
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            extra.append(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        # One all-reduce and one host sync per step: the progress bar shows global-batch values
        # and every rank takes the same decision on divergence.
        values = self.dist.mean(self.layout.pack(output, *extra)).tolist()
        bad = self.layout.nonfinite(values)
        if "grad_norm" in bad and self.amp_dtype == torch.float16:
            bad.remove("grad_norm")  # the GradScaler skips this step and lowers its scale
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            link = self.out_dir / LINK
            raise TrainingDiverged(self.step + 1, self.layout.unpack(values), bad,
                                   link if (link / CONFIG).is_file() else None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # After a step the GradScaler skipped, torch warns that the schedule moves on
            # without an optimizer step: intended here (steps count batches).
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler"))
            self.scheduler.step()
        return values

    def _log_train(self, window: _Window, lr: float, kl: float) -> dict:
        """The record of the steps since the last one (written by rank 0)."""
        record = {"split": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "lr": lr, "kl_weight": kl,
                  "images_per_s": window.steps * self.sampler.global_batch_size / window.seconds,
                  **self.layout.unpack(window.means())}
        if self.log is not None:
            self.log.write(record)
        return record

    def _evaluate(self) -> dict:
        """Metrics of the evaluation batches (means over batches and ranks), logged by rank 0."""
        module, limit = self.model, self.config.eval_batches
        module.eval()
        total, count, layout = None, 0, None
        fork = [self.device.index] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=fork), self._autocast():
            torch.manual_seed(derived_seed(self.seed, EVAL_NOISE, self.dist.rank))
            self.eval_loader.batch_sampler.set_epoch(0)
            for x in self.eval_loader:
                output = module.loss(x.to(self.device, non_blocking=True), kl_weight=1.0)
                layout = layout or MetricLayout(output)
                packed = layout.pack(output)
                total = packed if total is None else total + packed
                count += 1
                if count == limit:
                    break
        module.train()
        metrics = layout.unpack(self.dist.mean(total / count).tolist())
        if self.log is not None:
            self.log.write({"split": "eval", "step": self.step,
                            "epoch": self.step / self.steps_per_epoch, "batches": count,
                            **metrics})
        return metrics

    def _save(self) -> None:
        """Checkpoint the current step on rank 0 (every rank contributes its RNG states)."""
        if self.saved_step == self.step:
            return
        rng = self.dist.gather(capture_rng_state(self.device))

        def write():  # on rank 0
            epoch, position = divmod(self.step, self.steps_per_epoch)
            state = {"format": STATE_FORMAT, "step": self.step, "epoch": epoch,
                     "batch_in_epoch": position, "steps_per_epoch": self.steps_per_epoch,
                     "seed": self.seed, "global_batch_size": self.sampler.global_batch_size,
                     "train_examples": self.sizes["train_examples"],
                     "world_size": self.dist.world_size,
                     "optimizer_name": self.config.optimizer,
                     "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rng,
                     "log_window": self.window.state()}
            save_checkpoint(self.out_dir, self.model, state)
        _on_main_rank(self.dist, write, f"to write the checkpoint of step {self.step}")
        self.saved_step = self.step
