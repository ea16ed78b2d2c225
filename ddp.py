"""Distributed set-up, precision and rank-0 printing: the only places CPU and GPU differ.

What it does: reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE into a `Dist` (NCCL on GPU, gloo on
CPU), picks the precision (bf16 autocast on GPU, fp32 on CPU), prints on rank 0, and offers the two
collectives the trainers need (a sum of numbers, a gather of Python objects) and DDP's gradient-
accumulation switch. Without torchrun every helper is the one-process identity.

What it does not do: load models, wrap them in DDP (models.wrap), or know anything about training.

    import ddp
    dist = ddp.setup()                              # Dist(rank=0, world_size=1, ...) outside torchrun
    with ddp.autocast(dist):
        ...
    total, = ddp.all_reduce_sum(dist, [local_tokens])
    ddp.print0(dist, "only rank 0 prints this")
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank, device)


def autocast(dist: Dist):
    """bf16 autocast on GPU; fp32 on CPU (this CPU has no fast bf16)."""
    if dist.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def print0(dist: Dist, *args) -> None:
    if dist.master:
        print(*args, flush=True)


def all_reduce_sum(dist: Dist, values: list[float]) -> list[float]:
    """Sums a list of numbers over ranks (one collective for the whole list)."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(dist: Dist, items: list) -> list:
    """Concatenates every rank's list, in rank order."""
    if not dist.enabled:
        return items
    gathered = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def ddp_sync(model, last: bool):
    """Gradient accumulation: DDP all-reduces only on the last micro-batch of an optimizer step."""
    if isinstance(model, DDP) and not last:
        return model.no_sync()
    return contextlib.nullcontext()
