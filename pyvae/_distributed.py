"""The process group of a ``torchrun`` launch, as training (:func:`pyvae.train.fit`) and encoding
(:func:`pyvae.encode.encode_dataset`) use it, and the differentiable all-gather of a global batch
(:func:`gather_batch`, for losses that need the whole batch, e.g. β-TCVAE's)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyvae._device import check_device

# Process groups setup() has created in this process; the same count on every rank as long as
# the ranks call fit alike.
_groups_created = 0


@dataclass
class Distributed:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``, and
    whether :func:`setup` created the process group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (in place, and returned)."""
        if self.enabled:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (any picklable object)."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (RANK and WORLD_SIZE > 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | torch.device | None, default: torch.device) -> Distributed:
    """Join (or create, under ``torchrun``) the process group and choose this rank's device.

    Without a process group and without torchrun's environment this is a single process on
    ``device`` (``default`` when None). In a group, ``device=None`` or an index-less ``"cuda"``
    mean ``cuda:LOCAL_RANK`` when CUDA is available (else the CPU); the group is created with
    NCCL for CUDA devices and Gloo otherwise.
    """
    device = check_device(device) if device is not None else None
    if not dist.is_initialized() and not launched_by_torchrun():
        device = device or default
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return Distributed(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        # torchrun's rendezvous store outlives a process group: without a fresh key prefix, a
        # group created after an earlier one was destroyed can read that group's stale keys
        # and hang (e.g. two fit calls in one script).
        global _groups_created
        store, rank, world_size = next(dist.rendezvous("env://"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size,
                                store=dist.PrefixStore(f"pyvae.fit.{_groups_created}", store))
        _groups_created += 1
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                       owns_group=owns_group)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and returns
    this rank's slice (an all-reduce, which every backend, gloo included, supports)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_batch(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """The tensors of every rank concatenated along dim 0 (differentiably), and where this
    rank's rows start. Every rank must hold the same number of rows."""
    rows = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    all_rows = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(all_rows, rows)
    if len({int(r) for r in all_rows}) != 1:
        raise ValueError("gather_batch: gather_global_batch needs the same batch size on every "
                         f"rank, got {[int(r) for r in all_rows]} (drop the last partial batch)")
    return [_AllGather.apply(t) for t in tensors], dist.get_rank() * tensors[0].shape[0]
