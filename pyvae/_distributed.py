"""The process group of a ``torchrun`` launch, as :func:`pyvae.train.fit` uses it."""
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
