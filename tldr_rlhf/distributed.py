"""Where this process stands among the training processes: its rank, the world size, whether a model
is sharded (FSDP2), and a barrier. Everything answers for a single process too (rank 0 of 1, no
barrier), so library code (generation, the LM head, checkpoints) can ask without knowing whether a run
is distributed.

This module knows nothing about how a model is sharded or saved (``train/fsdp.py``) or about the
training loops; it imports only torch.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` or one of its submodules is an FSDP2 unit (``fully_shard`` was applied)."""
    from torch.distributed.fsdp import FSDPModule  # lazy: pulls in the FSDP machinery only when asked

    return any(isinstance(m, FSDPModule) for m in model.modules())


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
