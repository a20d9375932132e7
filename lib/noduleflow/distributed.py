"""Data-parallel training on several GPUs of one node (or several CPU processes), started as torchrun starts it.

`run(fn, processes, *args)` calls `fn(*args)` directly for one process; for more it starts one worker per
device through torch's elastic launcher (the machinery behind `torchrun`: rendezvous on this node, RANK /
LOCAL_RANK / WORLD_SIZE in each worker's environment), joins them in a process group (NCCL on GPUs, Gloo on
CPUs) and calls `fn(*args)` in each. Inside, `noduleflow.models.training.train` splits every step's batch between the
workers and averages their gradients, so each step sees the same batch as on one device; only the main worker
writes checkpoints, metrics and models. A rule asking for more than one `gpu` resource runs its training this way.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def rank_and_size() -> tuple[int, int]:
    """This worker's rank and the number of workers ((0, 1) outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True in the worker that writes files (and outside a process group)."""
    return rank_and_size()[0] == 0


def device() -> torch.device:
    """This worker's device: its own GPU when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the workers (one all-reduce of all gradients at once)."""
    _, size = rank_and_size()
    grads = [p.grad for p in parameters if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_from_main(module: torch.nn.Module) -> None:
    """Give every worker the main worker's parameters and buffers (all start from the same weights)."""
    if rank_and_size()[1] == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def mean_over_workers(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the workers (the tensor itself on one)."""
    if rank_and_size()[1] == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / rank_and_size()[1]


def _worker(fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group(backend)
    try:
        fn(**kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(fn: Callable[..., Any], processes: int, **kwargs: Any) -> None:
    """`fn(**kwargs)` in `processes` data-parallel workers on this node (directly when `processes` <= 1)."""
    if processes <= 1 or dist.is_initialized():
        fn(**kwargs)
        return
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0)
    elastic_launch(config, _worker)(fn, kwargs)
