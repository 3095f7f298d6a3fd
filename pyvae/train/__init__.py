"""Training pyvae models: :func:`fit` with a :class:`TrainConfig` (AdamW, LR and KL schedules,
mixed precision, evaluation, JSON-lines metrics, atomic checkpoints, exact resume,
DistributedDataParallel under torchrun), :func:`fit_grid` (K models of one architecture trained
at once, model-batched) and the checkpoint helpers."""
from pyvae.train.checkpoint import (MissingCheckpointError, load_checkpoint, load_model,
                                    save_checkpoint)
from pyvae.train.config import TrainConfig
from pyvae.train.grid import GridResult, fit_grid, grid_product
from pyvae.train.loop import (FitResult, MainRankFailed, TrainingDiverged, collate_images, fit,
                              split_dataset)
from pyvae.train.metrics import read_metrics
from pyvae.train.sampler import ShardedBatchSampler

__all__ = ["FitResult", "GridResult", "MainRankFailed", "MissingCheckpointError",
           "ShardedBatchSampler", "TrainConfig", "TrainingDiverged", "collate_images", "fit",
           "fit_grid", "grid_product", "load_checkpoint", "load_model", "read_metrics",
           "save_checkpoint", "split_dataset"]
