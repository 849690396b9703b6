"""Which process am I? The few collective operations mera needs when one run is spread over
several processes (``torchrun`` or ``accelerate launch``), each a no-op in a single process.

A launcher sets ``WORLD_SIZE`` (> 1) and the rank variables; the process group is then set up
through accelerate's :class:`~accelerate.PartialState` (gloo on CPU, NCCL on GPUs), which the
training loop's ``Accelerator`` shares. A process group already initialised by someone else
(``torch.distributed.init_process_group``) is used as it is. Without a launcher nothing is
initialised and every function answers for a single process.

On CPU, accelerate must be told ``cpu=True`` to set up a multi-process (gloo) group at all;
without it each process would silently run on its own as a world of size 1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def _launched() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _group() -> bool:
    """True when several processes run together (the process group is set up on first use)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_world_size() > 1
    if not _launched():
        return False
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # initialises the process group
    return td.is_initialized() and td.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as td

    return td.get_world_size() if _group() else 1


def rank() -> int:
    import torch.distributed as td

    return td.get_rank() if _group() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: its own GPU under a launcher (``cuda:<local rank>``), else cuda or cpu."""
    if _group():
        from accelerate import PartialState

        state = PartialState()
        if state.initialized and state.device is not None:
            return state.device
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier() -> None:
    """Wait until every process is here (e.g. after the main process wrote files the others read)."""
    if _group():
        import torch.distributed as td

        td.barrier()


def gather_object(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` alone."""
    if not _group():
        return [obj]
    import torch.distributed as td

    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """The main process's (``src``'s) ``obj`` on every process; ``obj`` itself alone."""
    if not _group():
        return obj
    import torch.distributed as td

    box = [obj if td.get_rank() == src else None]
    td.broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def main_process_first():
    """The main process runs the block first (e.g. writes a cache), the others after it (and read it)."""
    main = is_main()
    if not main:
        barrier()
    yield
    if main:
        barrier()
