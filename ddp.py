"""Distributed set-up, precision and rank-0 printing: the only places CPU and GPU differ.

What it does: reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE into a `Dist` (NCCL on GPU, gloo on
CPU), picks the precision (bf16 autocast on GPU; fp32 on CPU unless bf16 is asked for:
`resolve_precision`), prints on rank 0, and offers the two
collectives the trainers need (a sum of numbers, a gather of Python objects, work done on rank 0
and broadcast) and DDP's gradient-accumulation switch, and `OneCallerRetriever` (all ranks' searches
of a turn sent by rank 0 as one request). Without torchrun every helper is the one-process identity.

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
    precision: str = "fp32"      # "bf16": the forwards run under bf16 autocast (ddp.autocast)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(device=device, precision=resolve_precision("auto", device))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank, device, resolve_precision("auto", device))


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16_cpu() -> bool:
    """Whether this CPU has native bf16 dot products (the avx512_bf16 or amx_bf16 flag in /proc/cpuinfo;
    False where that file does not exist). Without them torch emulates bf16 matmuls, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, device: torch.device) -> str:
    """--precision: "auto" is bf16 autocast on a GPU and fp32 on a CPU — on a CPU bf16 is only taken when
    asked for, because its speed and its results against fp32 are measured per machine (bench/bench_speed.py,
    docs/performance.md), not assumed; "bf16" on a CPU without native bf16 runs, emulated and slow."""
    if choice not in PRECISIONS:
        raise ValueError(f"--precision {choice!r}: expected one of {', '.join(PRECISIONS)}")
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return choice


def precision_line(dist: Dist) -> str:
    """What a run's log and records say about its arithmetic."""
    if dist.device.type == "cuda":
        return f"precision: {dist.precision} on {torch.cuda.get_device_name(dist.device)}"
    native = "native bf16" if native_bf16_cpu() else "no native bf16 (bf16 would be emulated)"
    return f"precision: {dist.precision} on CPU ({native}, {torch.get_num_threads()} threads)"


def autocast(dist: Dist):
    """bf16 autocast when dist.precision is bf16 (the default on GPU), else fp32. The loss kernels
    (dgpo.py) upcast their log-softmax to fp32 either way."""
    if dist.precision == "bf16":
        return torch.autocast(dist.device.type, dtype=torch.bfloat16)
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


def on_master(dist: Dist, work, user_errors: tuple = ()):
    """work() run on rank 0 alone, its result broadcast to every rank: what needs one caller (a search
    server) or one copy (an index) is done once. An exception there is raised on every rank, so none
    waits forever: rank 0's own; on the others a ValueError (for the `user_errors` types: a one-line
    error) or a RuntimeError, naming rank 0 and the reason."""
    if not dist.enabled:
        return work()
    reply, error = [None], None
    if dist.master:
        try:
            reply = [("ok", work())]
        except Exception as e:               # noqa: BLE001 - raised again below, on every rank
            error, reply = e, [("user" if isinstance(e, user_errors) else "bug", f"{type(e).__name__}: {e}")]
    torch_dist.broadcast_object_list(reply, src=0)
    kind, value = reply[0]
    if error is not None:
        raise error
    if kind != "ok":
        raise (ValueError if kind == "user" else RuntimeError)(f"rank 0 failed: {value}")
    return value


def gather_objects(dist: Dist, items: list) -> list | None:
    """Concatenates every rank's list on rank 0, in rank order; None on the others (what rank 0 alone
    writes is held once, not on every rank as all_gather_objects would)."""
    if not dist.enabled:
        return items
    gathered = [None] * dist.world_size if dist.master else None
    torch_dist.gather_object(items, gathered, dst=0)
    return [x for part in gathered for x in part] if dist.master else None


class OneCallerRetriever:
    """A retriever every rank calls together, of which only rank 0 talks to the search engine: each call
    gathers every rank's queries, rank 0 sends them as one request and scatters the hit lists back —
    Search-R1's pattern (one process drives all rollouts, so its e5 server, often a GPU FAISS index that
    is unsafe to search from several threads, never sees two requests at once). Because the call is a
    collective, every rank must make the same calls: rollout(..., lockstep=True) calls search on every
    turn that may search, with no queries when none of its rows search, and arc_eval.generate_records
    gives every rank the same number of rollout() calls. A failure on rank 0 is raised on every rank."""
    collective = True

    def __init__(self, retriever, dist: Dist):
        self.retriever, self.dist = retriever, dist

    def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        if not self.dist.enabled:
            return self.retriever.search(queries, topk=topk)
        asked = [None] * self.dist.world_size
        torch_dist.all_gather_object(asked, list(queries))                 # every rank's queries, in rank order
        reply: list = [None]
        if self.dist.master:
            flat = [q for part in asked for q in part]
            try:
                hits = self.retriever.search(flat, topk=topk) if flat else []
                bounds = [sum(len(part) for part in asked[:r]) for r in range(self.dist.world_size + 1)]
                reply = [("hits", [hits[bounds[r]:bounds[r + 1]] for r in range(self.dist.world_size)])]
            except Exception as e:        # sent to every rank, so none waits forever for hits
                reply = [("error", f"{type(e).__name__}: {e}")]
        torch_dist.broadcast_object_list(reply, src=0)
        kind, value = reply[0]
        if kind == "error":
            raise RuntimeError(f"retrieval on rank 0 (the one caller) failed: {value}")
        return value[self.dist.rank]


def ddp_sync(model, last: bool):
    """Gradient accumulation: DDP all-reduces only on the last micro-batch of an optimizer step."""
    if isinstance(model, DDP) and not last:
        return model.no_sync()
    return contextlib.nullcontext()
