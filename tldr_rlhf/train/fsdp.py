"""FSDP2 (``--run.fsdp``): the trained models' parameters, gradients and optimizer states sharded
over the processes of a ``torchrun`` / ``accelerate launch`` job, one node or many.

Why ``torch.distributed.fsdp.fully_shard`` directly and not accelerate's FSDP2 plugin: every stage
already owns its loop (no Trainer), reads log-probs through its own paths and writes its own
checkpoints, so what it needs from FSDP is four calls (shard, clip, gather for ``final/``, sharded
save / load); the plugin adds a second configuration surface (``accelerate config`` files,
environment variables) and wraps the optimizer and state-dict types behind it. With the calls here a
stage's code reads the same with and without sharding.

What is sharded: each transformer block of a trained model is its own FSDP unit (its weights are
gathered just before its forward and freed after it), the rest of the model (embeddings, final norm,
LM / scalar head; a tied LM head stays with its embedding) is the root unit. Frozen models (the
reference policy, the reward model) are replicated: they hold no gradients or optimizer states, and
replicating them keeps their forward free of collectives. PPO's policy and value model are two roots.

Numbers: gradients are reduce-scattered as averages over processes, exactly as DDP all-reduces
them, so each stage's loss scaling is the same with and without FSDP, and a 2-process FSDP run
equals the 1-process run up to float summation order (tests/test_fsdp.py states the tolerance).

Checkpoints (``checkpointing.save_checkpoint``): ``checkpoints/step-N/sharded/`` is a
``torch.distributed.checkpoint`` folder (each process writes its own shard of weights and AdamW
states), ``rng-R.pt`` holds process R's RNG state, and the Hugging Face folder beside them (and
``final/``) is written by process 0 from the gathered full weights, as without FSDP. Such a
checkpoint resumes under FSDP on any number of processes (``torch.distributed.checkpoint`` reshards
on load), or without FSDP.

Paths that call a model's submodules directly (the chunked LM head, the shared-prompt rollouts of
GRPO / RLOO and DPO's query-once scoring) are not seen by FSDP's hooks; sharded models take the
full-row forward through the root module instead (same numbers; ``is_sharded``). Generation keeps
every process stepping until all are done (``synced_gpus``), since each step gathers weights.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
from torch import nn

from ..distributed import barrier, is_sharded, rank, world_size  # noqa: F401  (fsdp.rank() etc. read as one family in the loops)

log = logging.getLogger(__name__)
SHARDED = "sharded"  # a checkpoint's torch.distributed.checkpoint folder


def _ensure_process_group(device: torch.device) -> None:
    """A 1-process group when the job was not launched by torchrun / accelerate launch (accelerate
    starts none for one process): FSDP needs one, e.g. ``--run.fsdp`` on a single GPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _block_classes(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks: the ``_no_split_modules`` Hugging Face models declare
    (e.g. ``Qwen2DecoderLayer``), over every pretrained submodule (a reward model's or value model's
    backbone)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (each transformer block a unit, then the model as the root
    unit) over all processes, on ``device``; returns ``model`` (its class becomes ``FSDP<Class>``,
    its parameters DTensors sharded on dim 0). Build the optimizer after this call, over the sharded
    parameters. Raises ValueError for a model with no known transformer blocks (nothing to shard
    block by block) or a LoRA (peft) model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if hasattr(model, "peft_config"):
        raise ValueError("--run.fsdp with LoRA adapters is not supported: LoRA already keeps the trained state small")
    _ensure_process_group(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    blocks = _block_classes(model)
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"--run.fsdp: no transformer blocks found in {type(model).__name__} (looked for {sorted(blocks) or 'its _no_split_modules'})")
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (a DTensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def trained_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This process's bytes of trainable parameters and of optimizer states (AdamW's two moments per
    parameter; the 0-dimensional step counters, one number per tensor, left out): what FSDP divides
    by the number of processes. Raises nothing; an optimizer before its first step has no states (0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    return {"parameters": local_bytes(params), "optimizer": local_bytes(states)}


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the global gradient norm of (possibly sharded) ``parameters`` to ``max_norm``; returns
    the norm before clipping. A sharded norm is a partial sum per process; ``full_tensor`` reduces
    it, so every process clips by the same global norm (as torchtitan does)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on CPU, on process 0; an empty dict on the others. Every
    process must call it (it all-gathers each unit)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (the LM head sharing the embedding) is one parameter under two names: keep the
    # first name, as an unsharded save_pretrained does, so both saves hold the same tensors
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            full.pop(name, None)
    return full


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shard of ``model``'s weights and ``optimizer``'s states into
    ``folder`` (a ``torch.distributed.checkpoint`` folder: one ``.distcp`` file per process plus
    ``.metadata``). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what ``save_sharded`` wrote into ``model`` and ``optimizer``, resharded to this job's
    processes (any number, or an unsharded model). Collective when sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not is_sharded(model) and world_size() == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
